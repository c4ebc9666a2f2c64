"""Training over several processes (distributed.py): MPI ranks on the CPU, NCCL's logic with a fake.

The MPI tests launch `mpiexec -n 2` on the tiny config (mpi4py and mpich, requirements-mpi.txt;
skipped with the reason where they are missing) and compare with one process of 2 worker threads,
which shares each micro-batch's rows out exactly as 2 ranks of 1 thread do: the same bytes. The
ranks run train.main through RANK_SCRIPT, which can make one rank press Ctrl-C or fail at a given
backward call, and logs every checkpoint write with the rank that made it. Subprocess timeouts
are hang guards only, never speed checks.
"""
import collections
import ctypes
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

import albor
import checkpoint
import cpu
import distributed
from test_train import corpus, tok_file  # noqa: F401  (the small corpus and tokenizer fixtures)
from tests import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD = 300  # seconds: far above any of these runs; only there so a hang fails instead of stalling
# Two layouts that add the gradients in other orders (float32 rounding), after 4 steps at lr 6e-4
# (measured: losses and norms 1e-8 apart, 8 in a million weights more than 1e-6 apart, all < 1e-5):
LOSS_TOLERANCE = 1e-6       # relative, losses and gradient norms
WEIGHT_TOLERANCE = 1e-6     # absolute, for all weights but a share of at most
WEIGHTS_BEYOND = 1e-4       # (AdamW divides by sqrt(v): a near-zero gradient's rounding moves
WEIGHT_BOUND = 2 * 4 * 6e-4  # its weight by up to lr a step, either way: 2 x steps x lr at most)

RANK_SCRIPT = r"""
import os, signal, sys
import albor, checkpoint, cpu, train

rank = int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
if os.environ.get("TEST_THREADS"):
    cpu.cpu_workers = lambda: int(os.environ["TEST_THREADS"])
real_backward, real_save = albor.backward, checkpoint.save_checkpoint
calls = []

def backward(*args, **kwargs):
    calls.append(1)
    if str(rank) == os.environ.get("TEST_RANK") and str(len(calls)) == os.environ.get("TEST_CALL"):
        if os.environ["TEST_ACTION"].startswith("SIG"):   # a stop signal: SIGINT is a Ctrl-C
            signal.raise_signal(getattr(signal, os.environ["TEST_ACTION"]))
        else:
            raise RuntimeError("a test failure on one rank")
    return real_backward(*args, **kwargs)

def save_checkpoint(folder, *args, **kwargs):
    if os.environ.get("TEST_LOG"):
        with open(os.environ["TEST_LOG"], "a") as f:
            f.write(f"rank {rank} saved step {kwargs['step']}\n")
    return real_save(folder, *args, **kwargs)

albor.backward, checkpoint.save_checkpoint = backward, save_checkpoint
argv = sys.argv[1:]
if str(rank) == os.environ.get("TEST_RANK") and os.environ.get("TEST_ACTION") == "another seed":
    argv += ["--seed", "1"]
sys.exit(train.main(argv))
"""


@pytest.fixture
def base(corpus, tok_file):  # noqa: F811
    """A small tiny-config run: 32 training rows, 2 micro-batches of 4 rows a step."""
    return ["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "32", "--val-rows", "4",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--eval-samples", "2"]


def at_most_two_cores():
    """Run the launched processes on at most 2 cores, so 2 ranks get 1 worker thread each on
    any machine (distributed.threads_per_rank shares the cores they may use)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:2])


def start(argv, ranks=None, threads=None, **env):
    """train.main(argv) through RANK_SCRIPT: under `mpiexec -n ranks`, or as one process with
    `threads` worker threads. env: the TEST_* settings of RANK_SCRIPT, ALBOR_MPI_TIMEOUT."""
    command = [sys.executable, "-c", RANK_SCRIPT] + [str(a) for a in argv]
    if ranks:
        command = [oracles.mpiexec(), "-n", str(ranks)] + command
    variables = {name: value for name, value in os.environ.items()
                 if not name.startswith(("PMI_", "OMPI_", "MV2_", "TEST_"))}
    mark = uuid.uuid4().hex   # in the environment of every process of this run, to find them by
    variables.update(ALBOR_DEVICE="cpu", OPENBLAS_NUM_THREADS="1", TEST_MARK=mark,
                     **{name: str(value) for name, value in env.items()})
    if threads:
        variables["TEST_THREADS"] = str(threads)
    process = subprocess.Popen(command, cwd=ROOT, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=at_most_two_cores, start_new_session=True)
    process.mark = mark
    return process


def processes_of(mark, rank=None):
    """The pids of the processes started with TEST_MARK=mark (mpiexec, its proxies, the ranks),
    or of rank `rank` alone."""
    wanted = [f"TEST_MARK={mark}".encode()]
    if rank is not None:
        wanted.append(f"PMI_RANK={rank}".encode())
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if all(variable in environ for variable in wanted):
            pids.append(int(pid))
    return pids


def finish(process, signum=None, rank=None, after_steps=None, out=None):
    """Wait for the run to end (after sending signum to rank `rank` once `out` shows after_steps
    steps; rank None: to the whole process group, as a terminal's Ctrl-C does); a run that
    outlives the hang guard is killed, process by process. Returns its returncode, stdout, stderr."""
    try:
        if signum is not None:
            wait_for_steps(out, after_steps, process)
            if rank is None:
                os.killpg(process.pid, signum)
            else:
                [pid] = processes_of(process.mark, rank)
                os.kill(pid, signum)
        stdout, stderr = process.communicate(timeout=HANG_GUARD)
    finally:
        for pid in processes_of(process.mark) if process.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
    return SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)


def launch(argv, ranks=None, threads=None, **env):
    return finish(start(argv, ranks, threads, **env))


def metrics(folder, drop=("seconds",)):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def final_model(folder):
    with open(os.path.join(folder, "final_model.json")) as f:
        return json.load(f)


def saves(log):
    return log.read_text().splitlines() if log.exists() else []


def same_bytes(a, b, names=("model.safetensors", "optimizer.safetensors")):
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def wait_for_steps(folder, steps, process):
    """Wait until rank 0 has logged `steps` steps (the run is under way), or fail if it ended."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline and process.poll() is None:
        path = folder / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never logged {steps} steps:\n" + "".join(process.communicate()))


# -----------------------------------------------------------------------------
# 2 MPI ranks against one process (mpiexec -n 2)


def test_two_ranks_train_as_one_process_of_two_threads_does_byte_for_byte(base, tmp_path):
    """Losses, gradient norms, validation loss and the checkpoint's bytes are those of one process
    whose 2 worker threads take the same shards; rank 0 alone writes the checkpoint."""
    argv = base + ["--max-steps", "4", "--save-every", "2"]
    one = launch(argv + ["--out", tmp_path / "one"], threads=2, TEST_LOG=tmp_path / "one.log")
    two = launch(argv + ["--out", tmp_path / "two"], ranks=2, TEST_LOG=tmp_path / "two.log",
                 TEST_THREADS=2)   # each rank 1 (2 share at most 2 cores); rank 0's evaluation 2
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "parameters on numpy, 2 worker threads" in one.stdout
    assert "parameters on numpy, 2 MPI ranks of 1 worker thread each" in two.stdout
    assert two.stdout.count("checkpoint: ") == 1                       # rank 0 alone reports
    assert saves(tmp_path / "two.log") == ["rank 0 saved step 2", "rank 0 saved step 4"]
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")     # losses and norms: equal floats
    assert len(metrics(tmp_path / "two")) == 4
    for key in ("loss_curve", "val_loss", "parse_rate"):
        assert final_model(tmp_path / "two")[key] == final_model(tmp_path / "one")[key], key
    assert same_bytes(tmp_path / "one", tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    # another layout (one thread: the gradients added in another order): within float32 rounding
    single = launch(argv + ["--out", tmp_path / "single"], threads=1)
    assert single.returncode == 0, single.stderr
    for a, b in zip(metrics(tmp_path / "single"), metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_TOLERANCE)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_TOLERANCE)
    _, weights_single, _ = checkpoint.load_checkpoint(tmp_path / "single")
    _, weights_two, _ = checkpoint.load_checkpoint(tmp_path / "two")
    differences = np.concatenate([np.abs(weights_single[n] - weights_two[n]).ravel() for n in weights_two])
    assert differences.max() <= WEIGHT_BOUND
    assert (differences > WEIGHT_TOLERANCE).mean() <= WEIGHTS_BEYOND


def test_two_ranks_train_packed_windows_with_validations_as_one_process_does(base, tmp_path):
    """Packed data (--data-mode packed) and a validation every 2 steps: the ranks' metrics.jsonl
    (the validations' lines too) and checkpoint are one process's of 2 worker threads."""
    argv = base + ["--data-mode", "packed", "--max-steps", "4", "--eval-every", "2"]
    one = launch(argv + ["--out", tmp_path / "one"], threads=2)
    two = launch(argv + ["--out", tmp_path / "two"], ranks=2, TEST_THREADS=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    lines = metrics(tmp_path / "two")
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]                 # step 0: the first validation
    assert [line["step"] for line in lines if "val_loss" in line] == [0, 2, 4]
    assert lines == metrics(tmp_path / "one")
    assert same_bytes(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "loss.png").is_file()


def test_ctrl_c_at_the_terminal_stops_every_rank_after_a_step_and_saves_once(base, tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: mpiexec (which forwards
    it to the ranks) and the ranks themselves. The run still stops once, cleanly."""
    out, log = tmp_path / "run", tmp_path / "saves.log"
    result = finish(start(base + ["--max-steps", "100000", "--out", out], ranks=2, TEST_LOG=log),
                    signal.SIGINT, after_steps=2, out=out)
    assert result.returncode == 0, result.stdout + result.stderr
    step = int(re.search(r"stopped at step (\d+) of 100000", result.stdout).group(1))
    assert saves(log) == [f"rank 0 saved step {step}"]
    assert len(metrics(out)) == step


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_ctrl_c_on_one_rank_stops_every_rank_and_one_process_resumes_exactly(base, tmp_path, stop_signal):
    """A Ctrl-C (or a SIGTERM) on rank 1 during step 3 of 6: both ranks finish the step, rank 0
    saves once, both exit cleanly; one process (2 threads) resumes from that N=2 checkpoint and
    ends with the bytes of a run that was never stopped."""
    argv = base + ["--max-steps", "6", "--lr", "2e-3"]
    straight = launch(argv + ["--out", tmp_path / "straight"], threads=2)
    assert straight.returncode == 0, straight.stderr
    log = tmp_path / "saves.log"
    stopped = launch(argv + ["--out", tmp_path / "stopped"], ranks=2, TEST_LOG=log,
                     TEST_RANK=1, TEST_CALL=5, TEST_ACTION=stop_signal)   # 1 backward a micro-batch
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped at step 3 of 6 (a stop signal on another rank)" in stopped.stdout
    assert saves(log) == ["rank 0 saved step 3"]
    resumed = launch(["--resume", tmp_path / "stopped"], threads=2, TEST_LOG=log)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "MPI" not in resumed.stdout
    assert same_bytes(tmp_path / "straight", tmp_path / "stopped")
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight")
    assert final_model(tmp_path / "stopped")["val_loss"] == final_model(tmp_path / "straight")["val_loss"]


def test_an_error_on_one_rank_ends_every_rank_with_its_message(base, tmp_path):
    result = launch(base + ["--max-steps", "4", "--save-every", "1", "--out", tmp_path / "run"], ranks=2,
                    TEST_RANK=1, TEST_CALL=3, TEST_ACTION="raise")  # rank 1, step 2
    assert result.returncode != 0
    assert "[rank 1 of 2] Traceback" in result.stderr
    assert "RuntimeError: a test failure on one rank" in result.stderr
    _, _, step = checkpoint.load_checkpoint(tmp_path / "run")
    assert step == 1


def test_a_killed_rank_ends_the_others_and_the_last_checkpoint_loads(base, tmp_path):
    """kill -9 of rank 1 mid-run: the launcher sees it die, ends rank 0 and says so; the last
    checkpoint (one every step, so rank 0 may have been cut off in the middle of a save) loads."""
    out = tmp_path / "run"
    result = finish(start(base + ["--max-steps", "100000", "--save-every", "1", "--out", out], ranks=2),
                    signal.SIGKILL, rank=1, after_steps=3, out=out)
    assert result.returncode != 0
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in result.stdout + result.stderr
    _, params, step = checkpoint.load_checkpoint(out)
    assert step >= 2 and set(params) == set(albor.init_params(albor.get_config("tiny")))


def test_a_stuck_rank_is_given_up_on_after_the_timeout(base, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, so the launcher sees nothing wrong): rank 0
    waits ALBOR_MPI_TIMEOUT seconds in the step's all-reduce, then says so and ends the run."""
    out = tmp_path / "run"
    result = finish(start(base + ["--max-steps", "100000", "--out", out], ranks=2, ALBOR_MPI_TIMEOUT=3),
                    signal.SIGSTOP, rank=1, after_steps=2, out=out)
    assert result.returncode != 0
    assert "no answer from the other ranks for 3 s in the" in result.stderr, result.stderr


def test_ranks_that_read_other_rows_or_hold_other_weights_stop_at_the_start(base, tmp_path):
    result = launch(base + ["--out", tmp_path / "run"], ranks=2, TEST_RANK=1, TEST_ACTION="another seed")
    assert result.returncode != 0
    # (both ranks see it; whichever aborts first is the one heard)
    assert re.search(r"train.py: error: rank [01]'s train_rows_sha256 differs from rank [01]'s: every rank "
                     "must read the same data", result.stderr), result.stderr
    assert not checkpoint.holds_checkpoint(tmp_path / "run")
    comm = SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 2,
                           allgather=lambda mine: [mine, dict(mine, weights_sha256="b")])
    group = distributed.MPIGroup(comm)
    assert group.first_difference({"weights_sha256": "a"}) == "rank 1's weights_sha256 differs from rank 0's"
    comm.allgather = lambda mine: [mine, mine]
    assert group.first_difference({"weights_sha256": "a"}) is None


def test_every_rank_needs_a_row_of_each_micro_batch(base, tmp_path):
    result = launch(base + ["--batch-size", "1", "--out", tmp_path / "run"], ranks=2)
    assert result.returncode != 0
    assert "train.py: error: --batch-size 1 is smaller than the 2 ranks" in result.stderr
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# the pieces, without MPI


def test_the_launchers_variables_are_read_without_mpi():
    assert distributed.launched_size({}) == 1
    assert distributed.launched_size({"PMI_SIZE": "4", "PMI_RANK": "2"}) == 4         # MPICH, Intel MPI
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8             # Open MPI
    assert distributed.launched_size({"MV2_COMM_WORLD_SIZE": "2"}) == 2              # MVAPICH2
    with pytest.raises(distributed.LaunchError, match="PMI_SIZE='x' is not a number of ranks"):
        distributed.launched_size({"PMI_SIZE": "x"})
    assert distributed.mpi_timeout({}) == 600 and distributed.mpi_timeout({"ALBOR_MPI_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(distributed.LaunchError, match="must be a positive number"):
        distributed.mpi_timeout({"ALBOR_MPI_TIMEOUT": "0"})
    assert distributed.start({}) is distributed.SINGLE


def test_a_plain_run_never_imports_mpi_and_a_launched_one_without_mpi4py_says_so(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"   # mpi4py made unimportable
            "import train\n"
            "try:\n    train.main(['--help'])\nexcept SystemExit as e:\n    print('exit', e.code)")
    variables = {name: value for name, value in os.environ.items() if not name.startswith(("PMI_", "OMPI_"))}
    plain = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=variables, capture_output=True,
                           text=True, timeout=HANG_GUARD)
    assert plain.stdout.strip().endswith("exit 0"), plain.stdout + plain.stderr  # --help printed
    launched = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(variables, PMI_SIZE="2"),
                              capture_output=True, text=True, timeout=HANG_GUARD)
    assert "exit train.py: error: launched as one of 2 ranks, but mpi4py cannot be imported" in launched.stdout
    assert "pip install -r requirements-mpi.txt" in launched.stdout


def test_threads_per_rank_share_the_cores_the_ranks_may_use():
    both = [0, 1]
    assert distributed.threads_per_rank(2, [both, both], 0) == 1          # 2 unbound ranks, 2 cores
    assert distributed.threads_per_rank(8, [list(range(8))] * 2, 1) == 4
    assert distributed.threads_per_rank(1, [[0], [1]], 0) == 1            # bound to a core each
    assert distributed.threads_per_rank(4, [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2, 3) == 2  # 2 per socket
    assert distributed.threads_per_rank(1, [both] * 3, 2) == 1            # never fewer than 1
    group = distributed.MPIGroup(FakeComm(0, 2, FakeWorld(2)), threads_each=1)
    assert group.threads(2) == 1 and group.threads(1) == 1 and distributed.SINGLE.threads(2) == 2


def test_each_rank_drives_the_gpu_of_its_local_rank():
    assert [distributed.gpu_for_rank(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [distributed.gpu_for_rank(r, 2, 8) for r in range(2)] == [0, 1]
    with pytest.raises(distributed.LaunchError, match="4 ranks on this machine but 2 GPU"):
        distributed.gpu_for_rank(3, 4, 2)


def test_ranks_take_the_shards_the_threads_of_one_process_would():
    """DataParallel(1) as rank 0 and rank 1 of 2: their loss sums and gradients add up to those
    of DataParallel(2) exactly (the same shards, the same additions)."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 512, (5, 16)), rng.integers(0, 512, (5, 16))) for _ in range(2)]
    batches[0][1][3, 4:] = albor.IGNORE_INDEX
    threads, ranks = cpu.DataParallel(2), [cpu.DataParallel(1, rank, 2) for rank in range(2)]
    assert [r.my_rows(5) for r in ranks] == [[slice(0, 2)], [slice(2, 5)]] == [[s] for s in threads.my_rows(5)]
    for idx, targets in batches:
        one = threads.forward_backward(params, config, idx, targets, loss_scale=0.5)
        parts = [r.forward_backward(params, config, idx, targets, loss_scale=0.5) for r in ranks]
        assert parts[0] + parts[1] == one
        parts = [r.loss_sum(params, config, idx, targets) for r in ranks]
        assert parts[0] + parts[1] == threads.loss_sum(params, config, idx, targets)
    summed = threads.gradients()
    rank_grads = [r.gradients() for r in ranks]
    for name in params:
        assert (rank_grads[0][name] + rank_grads[1][name]).tobytes() == summed[name].tobytes(), name
    assert cpu.DataParallel(1, 1, 2).gradients() is None   # a rank that ran nothing has nothing to add


# -----------------------------------------------------------------------------
# NCCL's logic on a CPU, with fakes of CuPy's nccl module and of an MPI communicator for
# ranks that are threads of this process


class FakeWorld:
    """What the ranks (threads) share: a barrier, the value broadcast, the pending all-reduce."""

    def __init__(self, ranks):
        self.barrier = threading.Barrier(ranks, timeout=60)
        self.value = None
        self.pending = {}


class FakeComm:
    """mpi4py's communicator, as far as NcclAllReduce and MPIGroup's constructor use it."""

    def __init__(self, rank, size, world):
        self.rank, self.size, self.world = rank, size, world
        self.broadcasts = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, value, root=0):
        self.broadcasts += 1
        if self.rank == root:
            self.world.value = value
        self.world.barrier.wait()
        value = self.world.value
        self.world.barrier.wait()
        return value

    def Abort(self, code):
        raise AssertionError(f"MPI_Abort({code})")


def float32_view(pointer, count):
    """The float32 array at a memory address (what NCCL reads and writes on the device)."""
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer))


class FakeNccl:
    """cupy.cuda.nccl for thread ranks: records every call; allReduce really sums, through the
    addresses it is given (a real call only queues the work on the stream, within a group)."""

    NCCL_FLOAT32, NCCL_SUM = 7, 0
    available = True

    def __init__(self, world):
        self.world = world
        self.calls = collections.defaultdict(list)   # rank -> calls in order
        self.ids_made = 0
        self.rank = threading.local()

    def get_unique_id(self):
        self.ids_made += 1
        return tuple(range(128))   # CuPy's unique id: a tuple of 128 ints

    def groupStart(self):
        self.calls[self.rank.value].append("groupStart")

    def groupEnd(self):
        self.calls[self.rank.value].append("groupEnd")

    def NcclCommunicator(self, ndev, unique_id, rank):
        self.rank.value = rank
        self.calls[rank].append(("NcclCommunicator", ndev, unique_id, rank))
        return SimpleNamespace(allReduce=lambda *args: self.all_reduce(rank, *args))

    def all_reduce(self, rank, send, receive, count, dtype, op, stream):
        self.calls[rank].append(("allReduce", send, receive, count, dtype, op, stream))
        self.world.pending[rank] = (send, receive, count)
        self.world.barrier.wait()
        if rank == 0:
            total = sum(float32_view(s, n).copy() for s, _, n in self.world.pending.values())
            for _, r, n in self.world.pending.values():
                float32_view(r, n)[:] = total
        self.world.barrier.wait()


def test_nccl_sums_each_gradient_in_place_in_float32_in_one_group_call():
    """Two ranks: rank 0's NCCL unique id reaches rank 1 over MPI, both join one communicator;
    sum_gradients hands NCCL every gradient (and nothing else) once, in place, as float32 sums,
    in one group call on the current stream, and waits for it; both ranks end with the sum."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    before = {name: p.copy() for name, p in params.items()}
    rng = np.random.default_rng(5)
    grads = [{name: rng.standard_normal(p.shape).astype(np.float32) for name, p in params.items()}
             for _ in range(2)]
    expected = {name: grads[0][name] + grads[1][name] for name in params}
    world = FakeWorld(2)
    nccl = FakeNccl(world)
    streams = [SimpleNamespace(ptr=1000 + rank, waits=0) for rank in range(2)]
    for stream in streams:
        stream.synchronize = lambda stream=stream: setattr(stream, "waits", stream.waits + 1)
    results, errors = {}, []

    def rank_main(rank):
        try:
            comm = FakeComm(rank, 2, world)
            all_reduce = distributed.NcclAllReduce(comm, nccl, lambda: streams[rank])
            group = distributed.MPIGroup(comm, all_reduce=all_reduce)
            results[rank] = (comm, group.sum_gradients(grads[rank], params))
        except BaseException as e:   # reported below, in the test's thread
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert nccl.ids_made == 1                                  # made on rank 0 alone, sent over MPI
    names = sorted(params)
    for rank in range(2):
        comm, summed = results[rank]
        assert comm.broadcasts == 1
        calls = nccl.calls[rank]
        assert calls[0] == ("NcclCommunicator", 2, tuple(range(128)), rank)
        assert calls[1] == "groupStart" and calls[-1] == "groupEnd" and len(calls) == len(names) + 3
        for name, call in zip(names, calls[2:-1]):
            address = grads[rank][name].ctypes.data           # in place: send and receive buffers
            assert call == ("allReduce", address, address, grads[rank][name].size, nccl.NCCL_FLOAT32,
                            nccl.NCCL_SUM, 1000 + rank), name
            assert summed[name] is grads[rank][name]
            assert summed[name].tobytes() == expected[name].tobytes(), name
        assert streams[rank].waits == 1
    for name in params:                                        # only the gradients are summed
        assert params[name].tobytes() == before[name].tobytes()


def test_without_nccl_a_gpu_run_stops_with_a_one_line_error():
    with pytest.raises(distributed.LaunchError, match="CuPy cannot use NCCL on this machine"):
        distributed.NcclAllReduce(FakeComm(0, 1, FakeWorld(1)))   # no CuPy here; or CuPy without NCCL
    with pytest.raises(distributed.LaunchError, match="CuPy cannot use NCCL"):
        distributed.NcclAllReduce(FakeComm(0, 1, FakeWorld(1)), SimpleNamespace(available=False))


def test_nccl_takes_only_float32_arrays():
    world = FakeWorld(1)
    comm = FakeComm(0, 1, world)
    nccl = FakeNccl(world)
    all_reduce = distributed.NcclAllReduce(comm, nccl, lambda: SimpleNamespace(ptr=0, synchronize=lambda: None))
    with pytest.raises(TypeError, match="C-contiguous float32 arrays, got float64"):
        all_reduce([np.zeros(3, dtype=np.float64)])
    assert nccl.calls[0][-1] == "groupEnd"   # the group is closed even then


def test_start_picks_the_gpu_of_the_local_rank_before_nccl_is_set_up(monkeypatch):
    """start() on a GPU machine, with fakes of mpi4py and CuPy: world rank 3 of 4, the second of
    the 2 ranks on its machine, drives GPU 1 (chosen before any NCCL set-up), and its gradients
    go through NCCL; rank 3 prints nothing (its stdout and stderr go to /dev/null)."""
    events = []
    machine = SimpleNamespace(Get_rank=lambda: 1, Get_size=lambda: 2, allgather=lambda cores: [cores, cores])
    world = SimpleNamespace(Get_rank=lambda: 3, Get_size=lambda: 4, Split_type=lambda kind: machine)
    monkeypatch.setitem(sys.modules, "mpi4py", SimpleNamespace(MPI=SimpleNamespace(COMM_WORLD=world,
                                                                                   COMM_TYPE_SHARED="shared")))

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            events.append(("use GPU", self.index))

    cuda = SimpleNamespace(Device=Device, runtime=SimpleNamespace(getDeviceCount=lambda: 2))
    monkeypatch.setattr(distributed, "gpu", SimpleNamespace(BACKEND="cupy", xp=SimpleNamespace(cuda=cuda)))
    monkeypatch.setattr(distributed, "NcclAllReduce", lambda comm: events.append(("NCCL", comm)) or "nccl")
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    group = distributed.start({"PMI_SIZE": "4", "PMI_RANK": "3"})
    assert events == [("use GPU", 1), ("NCCL", world)]
    assert (group.rank, group.size, group.local_rank, group.is_root) == (3, 4, 1, False)
    assert group.all_reduce == "nccl"
    assert sys.stdout.name == os.devnull and sys.stderr.name == os.devnull
    sys.stdout.close()
    # a machine with fewer GPUs than ranks: this rank says so and ends every rank (MPI_Abort)
    cuda.runtime.getDeviceCount = lambda: 1

    def abort(code):
        raise SystemExit(f"MPI_Abort({code})")

    world.Abort = abort
    monkeypatch.setattr(sys, "__stderr__", io.StringIO())
    with pytest.raises(SystemExit, match=r"MPI_Abort\(1\)"):
        distributed.start({"PMI_SIZE": "4"})
    assert "error: 2 ranks on this machine but 1 GPU(s) visible" in sys.__stderr__.getvalue()
