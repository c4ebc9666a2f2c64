"""More than one process: data parallelism over MPI ranks, with NCCL on GPUs.

    mpiexec -n 2 python train.py --rows 500

trains one model in two processes (ranks) started by MPI's launcher, as llm.c's
`mpirun -np 8 ./train_gpt2cu` does. A plain `python train.py` never comes here: `start()` reads
the launcher's environment variables and imports mpi4py (an optional extra,
requirements-mpi.txt) only when there is more than one rank.

cpu.DataParallel is the same idea inside one process: the rows of each micro-batch are shared
out over worker threads, each adds into its own gradients, and their sums are added up once a
step. Across ranks, the rows are shared out over every rank's workers (ranks x threads shards
of each micro-batch, in rank order), each rank adds up its threads' gradients, and an all-reduce
adds up the ranks' sums. Afterwards every rank holds the same gradients, clips the same norm and
takes the same AdamW step, so the weights stay equal on every rank without ever being sent:

    one process, 2 threads   rows [0 1 | 2 3] -> thread 0, thread 1 -> g = g0 + g1
    2 ranks, 1 thread each   rows [0 1 | 2 3] -> rank 0,   rank 1   -> all-reduce: g = g0 + g1

The same shards and the same sum, so those two layouts write the same checkpoint bytes.

What crosses between the ranks each optimizer step:
- the gradients, float32, summed in place: MPI Allreduce on the CPU; on GPUs, NCCL (CuPy's
  bindings; each rank drives the GPU of its local rank, and the NCCL unique id is broadcast
  over MPI), between the ranks' device arrays directly;
- one float64 per micro-batch, each rank's loss summed over its rows' targets (the step's loss
  is then computed from the sums in the same order as in one process), and whether a rank was
  asked to stop (Ctrl-C): MPI on the host.

Failures: an error on any rank ends every rank (MPI_Abort) with the error printed; a collective
that waits longer than ALBOR_MPI_TIMEOUT seconds (default 600) says what it waited for and
aborts, so a rank that hangs or stops cannot hang the others forever; a rank that dies is
noticed by the launcher, which ends the others. Ranks other than 0 print nothing else: their
stdout and stderr go to /dev/null.
"""
import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
import traceback

import numpy as np

import gpu

# The launchers' variables for the number of ranks: Open MPI's mpirun; MPICH's and Intel MPI's
# mpiexec (and Slurm's srun --mpi=pmi2); MVAPICH2.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others in a collective before aborting


class LaunchError(Exception):
    """The run was launched over several ranks but cannot run there; a one-line message."""


def launched_size(environ=os.environ):
    """The number of ranks the launcher started this process among (1 without a launcher),
    from its environment variables: no MPI library is loaded to find out."""
    for name in SIZE_VARIABLES:
        if environ.get(name, "").strip():
            try:
                return max(1, int(environ[name]))
            except ValueError:
                raise LaunchError(f"{name}={environ[name]!r} is not a number of ranks") from None
    return 1


def mpi_timeout(environ=os.environ):
    """ALBOR_MPI_TIMEOUT: seconds a collective may wait for the other ranks (default 600)."""
    value = environ.get("ALBOR_MPI_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LaunchError(f"ALBOR_MPI_TIMEOUT={value!r} must be a positive number of seconds")
    return seconds


def threads_per_rank(workers, affinities, local_rank):
    """Worker threads for this rank: the `workers` of one process (cpu.cpu_workers(): one per
    core it may run on) shared with the ranks on this machine that may run on the same cores.
    affinities: the core sets of the machine's ranks, by local rank. Example: 2 unbound ranks on
    a 2-core machine get 1 thread each; ranks bound to a core each by the launcher (Open MPI's
    default) see one core and get 1 thread; 2 ranks sharing a 4-core socket get 2."""
    sharing = sum(1 for cores in affinities if cores == affinities[local_rank])
    return max(1, workers // sharing)


def gpu_for_rank(local_rank, local_size, devices):
    """The GPU a rank drives: one GPU per rank, the one numbered by its local rank (its place
    among the ranks on its machine, counting the GPUs CUDA_VISIBLE_DEVICES leaves visible)."""
    if local_size > devices:
        raise LaunchError(f"{local_size} ranks on this machine but {devices} GPU(s) visible: start at "
                          f"most {devices} ranks per machine (one GPU each)")
    return local_rank


def digest(arrays):
    """A SHA-256 over the bytes of a sequence of arrays (host or device): equal iff every byte is."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(gpu.to_numpy(a).tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# The group of processes training together: one process, or the ranks of an MPI run


class Single:
    """One process, no MPI: rank 0 of 1, and every collective hands back what it was given."""

    rank, size, local_rank, is_root = 0, 1, 0, True

    def threads(self, workers):
        return workers

    def sum_floats(self, values):
        return list(values)

    def any(self, flag):
        return bool(flag)

    def sum_gradients(self, grads, params):
        return grads

    def first_difference(self, values):
        return None

    @contextlib.contextmanager
    def root_first(self):
        yield

    @contextlib.contextmanager
    def stop_all_on_failure(self):
        yield


SINGLE = Single()
ABORT_GRACE_S = 0.5  # seconds between printing a rank's error and ending every rank


class MPIGroup:
    """The ranks of an MPI run (mpi4py's communicator `comm`). Gradients are summed with
    `all_reduce` (NcclAllReduce on GPUs) or else MPI Allreduce; everything else goes over MPI."""

    def __init__(self, comm, local_rank=0, threads_each=1, all_reduce=None, timeout=DEFAULT_TIMEOUT):
        self.comm, self.local_rank, self.timeout = comm, local_rank, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.threads_each = threads_each
        self.all_reduce = all_reduce or self.mpi_all_reduce

    def threads(self, workers):
        """Worker threads for this rank's cpu.DataParallel (see threads_per_rank)."""
        return min(workers, self.threads_each)

    def sum_floats(self, values):
        """The element-wise sum over the ranks of a list of floats (float64), on every rank."""
        from mpi4py import MPI
        buffer = np.array(values, dtype=np.float64)
        with self.deadline("the sum of the losses"):
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        return buffer.tolist()

    def any(self, flag):
        """Whether any rank's flag is true (a Ctrl-C on any rank stops them all), on every rank."""
        from mpi4py import MPI
        buffer = np.array([bool(flag)], dtype=np.int32)
        with self.deadline("the stop check after the step"):
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.MAX)
        return bool(buffer[0])

    def sum_gradients(self, grads, params):
        """Every rank's gradients (name -> float32 array) added up, in place; every rank gets the
        sum. grads None (this rank's rows had no target to count) takes part as zeros."""
        if grads is None:
            grads = {name: gpu.xp.zeros_like(p) for name, p in params.items()}
        with self.deadline("the all-reduce of the gradients"):
            self.all_reduce([grads[name] for name in sorted(grads)])  # the same order on every rank
        return grads

    def mpi_all_reduce(self, arrays):
        """MPI Allreduce (sum) of each host array, in place."""
        from mpi4py import MPI
        for a in arrays:
            self.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    def first_difference(self, values):
        """None if every rank holds the same `values` (a dict of strings); else which differ."""
        for rank, theirs in enumerate(self.comm.allgather(values)):
            for name, value in theirs.items():
                if rank != self.rank and value != values.get(name):
                    return f"rank {rank}'s {name} differs from rank {self.rank}'s"
        return None

    @contextlib.contextmanager
    def root_first(self):
        """The with-block runs on rank 0 first, then on the other ranks (so rank 0 trains and
        caches a tokenizer once, and the others find it on a shared file system)."""
        if not self.is_root:
            self.comm.Barrier()
        yield
        if self.is_root:
            self.comm.Barrier()

    @contextlib.contextmanager
    def deadline(self, what):
        """Abort every rank if the with-block (a collective) takes longer than self.timeout:
        a watchdog thread, since MPI's collectives themselves wait forever."""
        timer = threading.Timer(self.timeout, self.abort,
                                args=(f"no answer from the other ranks for {self.timeout:g} s in {what}: "
                                      "a rank is stuck or gone (ALBOR_MPI_TIMEOUT sets the wait)",))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def stop_all_on_failure(self):
        """An exception or a failing exit on this rank ends every rank (MPI_Abort) after printing
        it: without this, mpi4py would finalize this rank and leave the others waiting forever."""
        try:
            yield
        except SystemExit as e:
            if e.code in (None, 0):
                raise
            # a message (a str) is printed here; an int status was printed already (by argparse,
            # on every rank alike: rank 0's copy is the one shown)
            message, status = (e.code, 1) if isinstance(e.code, str) else (None, e.code)
            self.abort(message, code=status if isinstance(status, int) else 1)
        except BaseException:
            self.abort(traceback.format_exc().rstrip())

    def abort(self, message, code=1):
        """Print `message` (from any rank: to the real stderr, named by rank) and end every rank."""
        if message:
            prefix = "" if self.is_root else f"[rank {self.rank} of {self.size}] "
            sys.__stderr__.write(f"{prefix}{message}\n")
            sys.__stderr__.flush()
            time.sleep(ABORT_GRACE_S)  # the launcher forwards output asynchronously: an abort at
                                       # once can drop the message still on its way (MPICH's hydra)
        self.comm.Abort(code)


class NcclAllReduce:
    """Sums float32 device arrays over the ranks with NCCL, in place, on the current CUDA stream.

    comm: the MPI communicator, used once, to broadcast rank 0's NCCL unique id (NCCL's own
    rendezvous: with it every rank joins the same NCCL communicator). nccl: CuPy's
    cupy.cuda.nccl (the tests hand in a fake); current_stream: the stream to run on.
    """

    def __init__(self, comm, nccl=None, current_stream=None):
        if nccl is None:
            try:
                from cupy.cuda import nccl
            except ImportError:
                pass
        if not getattr(nccl, "available", False):   # CuPy's flag: it found the NCCL library
            raise LaunchError("CuPy cannot use NCCL on this machine (README: More than one process "
                              "says how to install it)")
        self.nccl = nccl
        self.current_stream = current_stream or gpu.xp.cuda.get_current_stream
        rank, size = comm.Get_rank(), comm.Get_size()
        unique_id = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)

    def __call__(self, arrays):
        """All-reduce (sum) every array in one NCCL group call, then wait for it (so a hang shows
        inside the deadline of MPIGroup.sum_gradients, not at a later sync)."""
        stream = self.current_stream()
        self.nccl.groupStart()
        try:
            for a in arrays:
                if a.dtype != np.float32 or not a.flags.c_contiguous:
                    raise TypeError(f"NCCL all-reduce takes C-contiguous float32 arrays, got {a.dtype}")
                pointer = a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data  # CuPy, or NumPy (tests)
                self.comm.allReduce(pointer, pointer, a.size, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM,
                                    stream.ptr)
        finally:
            self.nccl.groupEnd()
        stream.synchronize()


def start(environ=os.environ):
    """The group this process trains in: SINGLE without a launcher (or with one rank); else the
    MPI ranks, with this rank's GPU chosen (one per rank, by local rank) and NCCL set up on GPUs.
    On ranks other than 0, stdout and stderr go to /dev/null from here on."""
    size = launched_size(environ)
    if size == 1:
        return SINGLE
    timeout = mpi_timeout(environ)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"launched as one of {size} ranks, but mpi4py cannot be imported ({e}): "
                          "pip install -r requirements-mpi.txt") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise LaunchError(f"the launcher started {size} ranks but MPI sees {comm.Get_size()}: mpi4py was "
                          "built for another MPI than this mpiexec (use the one that came with it)")
    machine = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
    local_rank = machine.Get_rank()
    threads_each = threads_per_rank(len(os.sched_getaffinity(0)),
                                    machine.allgather(sorted(os.sched_getaffinity(0))), local_rank)
    all_reduce = None
    if gpu.BACKEND == "cupy":
        try:   # (a machine without enough GPUs, or without NCCL, must not leave the others waiting)
            gpu.xp.cuda.Device(gpu_for_rank(local_rank, machine.Get_size(),
                                            gpu.xp.cuda.runtime.getDeviceCount())).use()
            all_reduce = NcclAllReduce(comm)
        except LaunchError as e:
            MPIGroup(comm).abort(f"{os.path.basename(sys.argv[0])}: error: {e}")
    group = MPIGroup(comm, local_rank, threads_each, all_reduce, timeout)
    if not group.is_root:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return group


def find_mpiexec():
    """The MPI launcher that came with this Python's packages (pip's mpich puts it beside the
    interpreter), else the PATH's; None if there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
