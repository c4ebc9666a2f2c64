"""What makes albor fast on a CPU, kept out of the model file.

albor.py is the plain model; train.py and bench.py add these, each tested equal to the plain
code it stands in for (tests/test_model.py, tests/test_optim.py):

1. `keep_freed_memory`: glibc keeps the memory NumPy frees, so a step's temporaries are not
   page-faulted in anew every step;
2. `DataParallel`: a micro-batch's rows shared out over one worker thread per core, each with
   single-threaded BLAS (NumPy runs elementwise work on one core; BLAS threads help only inside
   matmuls), their gradients summed once a step;
3. `FastAdamW`: albor.AdamW's update in cache-sized blocks of rows, on two threads;
4. `LayerClock`: the time spent in albor's layer functions, for train.py's time split and
   bench.py's breakdown.

What each buys on the machine at hand is printed by `python bench.py` (README: Speed).
"""
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import albor
import gpu

# -----------------------------------------------------------------------------
# 1. Memory

GLIBC_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest)
GLIBC_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's free top back to the OS


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory NumPy frees, for the next step to reuse.

    A training step allocates and frees the same few hundred MB of temporaries every time.
    By default glibc hands large freed blocks back to the kernel (munmap, or trimming the top
    of the heap) and maps them again on the next allocation, so every 4 KiB page faults and is
    zeroed once more. With these two settings the blocks stay mapped and are reused; peak
    memory stays about the same. train.py and bench.py call this.
    Returns True if the settings took (glibc), False elsewhere (then nothing changes).
    """
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD))


# -----------------------------------------------------------------------------
# 2. Data parallelism over the CPU's cores
#
# Each worker thread runs forward + backward of its shard of rows with single-threaded BLAS.
# NumPy lets go of Python's GIL inside its loops and matmuls, so the workers really run at the
# same time. Each worker adds into its own gradients, and at the end of the step `gradients()`
# sums them: what data-parallel training on several GPUs does with an all-reduce (distributed.py
# does it across processes: MPI ranks are more workers, each rank's sum added up by an all-reduce).
# BLAS must be single-threaded for this, and OpenBLAS reads OPENBLAS_NUM_THREADS only when NumPy
# loads it, so train.py and bench.py set it to 1 before importing NumPy.


def cpu_workers():
    """Worker threads for DataParallel: one per core when NumPy's BLAS is single-threaded
    (OPENBLAS_NUM_THREADS=1, as train.py sets it); else 1 (BLAS threads use the cores); 1 on a GPU."""
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if gpu.BACKEND != "numpy" or blas_threads != "1":
        return 1
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cores)


def row_shards(n_rows, workers):
    """Contiguous slices splitting n_rows into at most `workers` nearly equal, non-empty parts.
    Example: row_shards(5, 2) -> [slice(0, 2), slice(2, 5)]; row_shards(1, 2) -> [slice(0, 1)]."""
    parts = min(workers, n_rows)
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


class DataParallel:
    """forward (+ backward) of a micro-batch, its rows shared out over `workers` threads.

    idx and targets are NumPy arrays, as train.py reads them: their targets are counted, and
    albor.forward checks them, on the host (on a GPU, without waiting for it). The loss sums it
    returns are float64 scalars of xp, left on a GPU until train.py fetches them.
    `clock` is the step's gpu.PhaseClock, kept from step to step (train.train_step uses it).

    With MPI (distributed.py, `mpiexec -n N python train.py`) this process is rank `rank` of
    `ranks`: each micro-batch's rows are shared out over ranks x workers shards, in rank order,
    and this process's threads take its rank's shards (so 2 ranks of 1 thread compute exactly
    what one process of 2 threads does). forward_backward and loss_sum return the loss summed
    over the counted targets of this process's rows; the caller adds up the ranks' sums.

    >>> config = albor.get_config("tiny")
    >>> params = albor.init_params(config)
    >>> idx = np.zeros((4, 8), dtype=np.int64)
    >>> workers = DataParallel(2)
    >>> loss_sum = workers.forward_backward(params, config, idx, idx)  # rows 0-1 and 2-3 in two threads
    >>> grads = workers.gradients()                                    # their gradients, summed
    >>> round(loss_sum / idx.size, 4) == round(albor.forward(params, config, idx, idx)[0], 4)
    True
    """

    def __init__(self, workers, rank=0, ranks=1):
        self.workers, self.rank, self.ranks = workers, rank, ranks
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.grads = [None] * workers  # each worker's gradient dict (None until its first shard)
        self.seconds = {"forward": 0.0, "backward": 0.0}  # summed over steps, averaged over shards
        self.clock = gpu.PhaseClock()  # train_step's phases; on a GPU one lags a step (gpu.py)

    def map(self, work, jobs):
        """work(*job) for every job: on the pool's threads, or in this thread with one worker."""
        if self.pool is None:
            return [work(*job) for job in jobs]
        return list(self.pool.map(lambda job: work(*job), jobs))

    def my_rows(self, n_rows):
        """This process's shards (row slices) of a batch of n_rows, one per worker thread at most."""
        every_shard = row_shards(n_rows, self.ranks * self.workers)
        return every_shard[self.rank * self.workers:(self.rank + 1) * self.workers]

    def _shards(self, targets):
        """((worker, row slice, counted targets in it) for each of this process's shards with a
        target to count, the counted targets of the whole batch: every rank's rows), all counted
        on the host (targets is a NumPy array)."""
        shards = []
        for worker, rows in enumerate(self.my_rows(targets.shape[0])):
            n_valid = int((targets[rows] != albor.IGNORE_INDEX).sum())
            if n_valid > 0:
                shards.append((worker, rows, n_valid))
        n_valid = int((targets != albor.IGNORE_INDEX).sum())
        if n_valid == 0:
            raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
        return shards, n_valid

    def loss_sum(self, params, config, idx, targets):
        """The loss summed over the counted targets of this process's rows of idx, targets (B, T)
        (each shard's mean loss times its count): forward only."""
        shards, _ = self._shards(targets)

        def work(worker, rows, count):
            return albor.forward(params, config, idx[rows], targets[rows])[0] * count
        return sum(self.map(work, shards))

    def forward_backward(self, params, config, idx, targets, loss_scale=1.0):
        """Add the gradients of loss_scale * (mean loss over the micro-batch's counted targets)
        into the workers' gradients (this process's rows' share of them); return the loss summed
        over this process's rows' counted targets. A shard's mean loss counts with weight (its
        counted targets) / (the micro-batch's), and so does its gradient."""
        shards, n_valid = self._shards(targets)

        def work(worker, rows, count):
            start = time.perf_counter()
            loss, cache = albor.forward(params, config, idx[rows], targets[rows])
            forward_done = time.perf_counter()
            self.grads[worker] = albor.backward(params, config, cache, loss_scale * count / n_valid,
                                                self.grads[worker])
            return loss * count, forward_done - start, time.perf_counter() - forward_done
        results = self.map(work, shards)
        if results:   # (a rank whose rows have nothing to count adds nothing)
            self.seconds["forward"] += sum(seconds for _, seconds, _ in results) / len(results)
            self.seconds["backward"] += sum(seconds for _, _, seconds in results) / len(results)
        return sum(weighted for weighted, _, _ in results)

    def gradients(self):
        """The sum of the workers' gradients since the last call (worker 0's dict, the others
        added in, parameters shared out over the threads); the workers start afresh after it."""
        grads = [g for g in self.grads if g is not None]
        self.grads = [None] * self.workers
        if not grads:
            return None   # no shard of this process had a target to count
        total, others = grads[0], grads[1:]
        if others:
            names = list(total)

            def add(share):
                for name in share:
                    for other in others:
                        total[name] += other[name]
            self.map(add, [(names[w::self.workers],) for w in range(self.workers)])
        return total


# -----------------------------------------------------------------------------
# 3. AdamW in cache-sized blocks, on two threads
#
# albor.AdamW streams each whole array (the embedding and its m and v are 67 MB each) through
# memory once per formula line, with a temporary per line. FastAdamW goes through each array a
# block of about BLOCK_NUMBERS numbers (1 MiB of float32) at a time: a block's dozen passes run
# in the CPU's cache, in one scratch buffer, and two threads share the blocks out (NumPy runs an
# elementwise op on one core but lets other threads run meanwhile).

BLOCK_NUMBERS = 1 << 18
OPTIMIZER_THREADS = 2


def row_blocks(a):
    """Slices of a's first axis, each about BLOCK_NUMBERS numbers (at least one row): a[block] is
    a view, so in-place updates of it land in a. Example: a (2048, 512) -> 4 slices of 512 rows."""
    rows = max(1, BLOCK_NUMBERS // (a.size // a.shape[0]))
    return [slice(start, start + rows) for start in range(0, a.shape[0], rows)]


class FastAdamW(albor.AdamW):
    """albor.AdamW with the same state and formula, its update done block by block on NumPy
    (on a GPU it is albor.AdamW: kernels.cu's fused update)."""

    def step(self, params, grads, lr):
        if gpu.BACKEND != "numpy":
            return super().step(params, grads, lr)
        self.t += 1
        bias_correction1 = 1.0 - self.beta1 ** self.t
        bias_correction2 = 1.0 - self.beta2 ** self.t
        # lr * m_hat / (sqrt(v_hat) + eps) = step_size * m / (sqrt(v) + eps_scaled), with
        # m_hat = m / bc1, v_hat = v / bc2, step_size = lr * sqrt(bc2) / bc1, eps_scaled = eps * sqrt(bc2)
        # (Python floats: a NumPy float64 scalar would turn the float32 arithmetic into float64)
        step_size = float(lr) * math.sqrt(bias_correction2) / bias_correction1
        eps_scaled = self.eps * math.sqrt(bias_correction2)
        blocks = []   # (p, g, m, v, lr * decay) of each block of rows, all views
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            decay = self.weight_decay if albor.is_decayed(name, p.shape) else 0.0
            blocks += [(p[b], g[b], m[b], v[b], float(lr) * decay) for b in row_blocks(p)]
        largest = max(p.size for p, *_ in blocks)

        def update_blocks(share):
            scratch = np.empty(largest, dtype=np.float32)   # this thread's work buffer
            for p, g, m, v, lr_decay in share:
                self._update(p, g, m, v, scratch[:p.size].reshape(p.shape), lr_decay, step_size,
                             eps_scaled)
        shares = [blocks[i::OPTIMIZER_THREADS] for i in range(OPTIMIZER_THREADS)]
        with ThreadPoolExecutor(OPTIMIZER_THREADS) as pool:
            list(pool.map(update_blocks, shares))   # list() waits, and re-raises a thread's error

    def _update(self, p, g, m, v, scratch, lr_decay, step_size, eps_scaled):
        """One block's update, in place: 13 passes, no temporary arrays."""
        if lr_decay > 0.0:
            p *= 1.0 - lr_decay                           # p = p - lr * wd * p
        m *= self.beta1                                   # m = beta1 * m + (1 - beta1) * g
        np.multiply(g, 1.0 - self.beta1, out=scratch)
        m += scratch
        np.multiply(g, g, out=scratch)                    # v = beta2 * v + (1 - beta2) * g^2
        scratch *= 1.0 - self.beta2
        v *= self.beta2
        v += scratch
        np.sqrt(v, out=scratch)                           # scratch = sqrt(v) + eps_scaled
        scratch += eps_scaled
        np.divide(m, scratch, out=scratch)                # scratch = m / (sqrt(v) + eps_scaled)
        scratch *= step_size                              # p = p - lr * m_hat / (sqrt(v_hat) + eps)
        p -= scratch


# -----------------------------------------------------------------------------
# 4. Where a step's time goes, layer by layer


class LayerClock:
    """While active (a with-block), adds up the seconds spent in albor's layer functions, per
    layer: self.seconds["attention"] holds attention_forward + attention_backward, and so on.

    albor's forward and backward call their layers through module globals, looked up at call
    time, so replacing albor.X_forward by a timed wrapper for the with-block times every call.
    What forward + backward spend outside the layers is the matmuls (with the residual adds and
    reshapes). A layer called from inside another timed one counts for the outer one. With
    worker threads, their seconds add up (divide by the threads for the average thread's).
    synchronize: called before and after each layer (on a GPU: wait for it, so its time is
    the layer's own; that wait slows the step, so train.py times only whole phases there).
    """

    LAYERS = ("embedding", "rmsnorm", "rope", "attention", "swiglu", "cross_entropy")

    def __init__(self, synchronize=None):
        self.synchronize = synchronize or (lambda: None)
        self.seconds = {}
        self.originals = {f"{layer}_{direction}": getattr(albor, f"{layer}_{direction}")
                          for layer in self.LAYERS for direction in ("forward", "backward")}
        self.inside = threading.local()   # per thread: inside a timed layer already?
        self.lock = threading.Lock()      # worker threads add into self.seconds too

    def wrap(self, name, fn):
        layer = name.rsplit("_", 1)[0]

        def timed(*args, **kwargs):
            if getattr(self.inside, "active", False):
                return fn(*args, **kwargs)
            self.inside.active = True
            self.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.synchronize()
                elapsed = time.perf_counter() - start
                self.inside.active = False
                with self.lock:
                    self.seconds[layer] = self.seconds.get(layer, 0.0) + elapsed
        return timed

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(albor, name, self.wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(albor, name, fn)

    def take(self):
        """Seconds per layer since the last take(), and reset."""
        with self.lock:
            seconds, self.seconds = self.seconds, {}
        return seconds
