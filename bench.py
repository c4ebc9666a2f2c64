"""Benchmark albor's training step on this machine, and compare it with PyTorch.

    python bench.py                                   # albor-base-50m, micro-batch 4 x 128
    python bench.py --config tiny --repeats 1         # a quick smoke run
    python bench.py --attention                       # attention alone, over a sweep of B and T
    python bench.py --attention --batch-sizes 4 8 --seq-lens 512 1024
    python bench.py --train-steps 31                  # the training of `train.py --rows 500`
    python bench.py --tokenizer                       # tokenizer.py beside Hugging Face tokenizers
    python bench.py --config workshop                 # the workshop preset's step (4 x 256 tokens)
    python bench.py --learning checkpoints/workshop   # bits per byte on held-out Python, beside gzip/xz
    python bench.py --ranks 2                         # train.py over 2 MPI ranks vs one process

What it measures, in order:
1. The machine's float32 GEMM rate, with albor's own array library (NumPy on a CPU,
   CuPy on a GPU), on exactly the matrix products one training step of the model
   does (the same shapes and the same transposed views of the (out, in) weights).
   MFU is measured against these products too, so it says how close albor gets to
   "nothing but matmuls at this machine's speed".
2. albor's training step exactly as train.py takes it (train.train_step: --grad-accum
   micro-batches of random tokens, default 4, then clip + AdamW): several repeats after
   a warmup step, medians reported per micro-batch. Each repeat first runs one
   micro-batch's matmuls alone (into ready buffers): the GEMM-bound floor, timed in
   the same loop, so the noise of a shared machine hits both. MFU = floor / time.
3. If PyTorch is importable: an equivalent eager PyTorch LLaMA (same shapes, tied
   embeddings, RMSNorm, rotate-half RoPE, GQA through SDPA, SwiGLU) loaded with
   albor's parameters. Its loss must match albor's; then albor and PyTorch steps
   run ALTERNATING in the same loop (the machines are shared and noisy, so both
   see the same noise) and the ratio albor/PyTorch is reported.
4. Where albor's time goes by layer kind: a second pass in which each of albor's
   module-level layer functions (attention_forward, rmsnorm_backward, ...) is
   temporarily replaced by a timed wrapper. Whatever forward+backward time is not
   inside a wrapped layer function is the matmuls (plus residual adds and reshapes).
With --train-steps N, only a whole run instead: N optimizer steps of --grad-accum
micro-batches, albor through train.py's own train_step and PyTorch with the same
settings and learning-rate schedule, taking turns step by step; total seconds and
the ratio. With --attention, only this instead: causal GQA attention forward + backward with the
preset's heads, over batch sizes x sequence lengths, through albor's reference code
(ALBOR_KERNELS=0's path), its kernels.cu (on a GPU) and PyTorch's
scaled_dot_product_attention (if installed); the paths' results must agree first. With
--ranks N, only this instead: train.py itself on the same cores, as `mpiexec -n N` (the cores
shared out over the ranks' worker threads) and as one process (a worker thread per core),
taking turns; seconds per step from each run's metrics.jsonl.
With --learning DIR, only what the checkpoint in DIR has learned: its bits per byte on held-out
Python (by default the source of the installed tqdm package: neither trained nor validated on),
each file on its own, beside gzip -9 and xz -9e compressing each file alone.

As train.py, bench.py sets OPENBLAS_NUM_THREADS=1 before NumPy loads (unless it is
set already): on a CPU cpu.DataParallel's worker threads, one per core, share out
each micro-batch's rows, each with single-threaded BLAS. The matmuls-alone floor runs
on those workers too; a fresh process times it once more with BLAS's own threads, and
MFU is measured against the faster of the two.
"""
import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "numpy" not in sys.modules:  # as train.py: single-threaded BLAS, the cores go to
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # cpu.DataParallel's worker threads
import numpy as np  # noqa: E402  (after the line above)
from tqdm import tqdm  # noqa: E402

import albor  # noqa: E402
import checkpoint  # noqa: E402
import cpu  # noqa: E402
import distributed  # noqa: E402
import gpu  # noqa: E402

WARMUP_STEPS = 1       # the first step allocates buffers and warms caches; not timed
GEMM_REPEATS = 5       # each GEMM shape is timed this many times (best kept), after one warmup
PAUSE_S = 0.2          # pause between albor and PyTorch so each one's idle BLAS/OpenMP
                       # threads (they spin-wait a while after work) stop competing for the CPUs
LOSS_TOLERANCE = 1e-4  # albor's and PyTorch's losses must agree this closely (relative)
LR = 6e-4              # train.py's default peak learning rate (the timings do not depend on it)
GRAD_CLIP = 1.0        # train.py's default global gradient-norm clip
GRAD_ACCUM = 4         # train.py's default micro-batches per optimizer step
TARGET_MFU = 0.80      # the speed targets albor aims at on a CPU: at least 80% of the
TARGET_RATIO = 0.9     # GEMM-bound floor, and at most 0.9x PyTorch's step time

# albor's layer functions (X_forward / X_backward) grouped into the kinds reported.
LAYER_KINDS = {
    "attention": "attention",
    "cross_entropy": "cross-entropy",
    "embedding": "norms/elementwise",
    "rmsnorm": "norms/elementwise",
    "rope": "norms/elementwise",
    "swiglu": "norms/elementwise",
}
KIND_ORDER = ["matmuls", "attention", "norms/elementwise", "cross-entropy", "optimizer"]


# ----------------------------------------------------------------------------
# clocks

def synchronize():
    """Wait for queued GPU work (CuPy runs asynchronously); a no-op on NumPy."""
    if albor.BACKEND == "cupy":
        albor.xp.cuda.get_current_stream().synchronize()


def cpu_count():
    """CPUs this process may run on (what OpenBLAS sizes its thread pool by)."""
    return len(os.sched_getaffinity(0))


def median_ms(seconds):
    """Median of a list of durations in seconds, in milliseconds."""
    return 1000.0 * statistics.median(seconds)


# ----------------------------------------------------------------------------
# 1. the machine's GEMM rate on the model's matrix products

def model_gemms(config, tokens):
    """The matrix products of one training step, as (label, M, K, N, count) for C = A @ B
    with A (M, K) and B (K, N).

    Every linear layer y = x @ W.T with W stored (out, in) does three products:
        forward   y  = x  @ W.T    (tokens, in)  @ (in, out)
        d-input   dx = dy @ W      (tokens, out) @ (out, in)
        d-weight  dW = dy.T @ x    (out, tokens) @ (tokens, in)
    Example, albor-base-50m with 512 tokens: the LM head (tied to the embedding,
    W is (32768, 512)) forward is (512, 512) @ (512, 32768): 17.2 GFLOP.
    """
    layers = config.num_hidden_layers
    kv_width = config.num_key_value_heads * config.head_dim
    C, F = config.hidden_size, config.intermediate_size
    linears = [  # (name, in, out, how many per step)
        ("q_proj, o_proj", C, C, 2 * layers),
        ("k_proj, v_proj", C, kv_width, 2 * layers),
        ("gate_proj, up_proj", C, F, 2 * layers),
        ("down_proj", F, C, layers),
        ("lm_head (tied)", C, config.vocab_size, 1),
    ]
    gemms = []
    for name, d_in, d_out, count in linears:
        gemms.append((f"{name} forward", tokens, d_in, d_out, count))
        gemms.append((f"{name} d-input", tokens, d_out, d_in, count))
        gemms.append((f"{name} d-weight", d_out, tokens, d_in, count))
    return gemms


def gemm_operands(xp, label, M, K, N, rng):
    """A, B for one product, laid out the way the model holds them: B of a forward is
    the transposed view W.T of an (out, in) weight, A of a d-weight is the view dy.T."""
    def randn(*shape):
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32))
    if label.endswith("forward"):
        return randn(M, K), randn(N, K).T      # x, W.T
    if label.endswith("d-input"):
        return randn(M, K), randn(K, N)        # dy, W
    return randn(K, M).T, randn(K, N)          # dy.T, x


def run_products(products, workers):
    """out = a @ b, `count` times, for each (a, b, out, count) of `products`: with several
    worker threads (cpu.DataParallel, single-threaded BLAS each) every worker computes its
    share of each product's rows at the same time, as the model's workers split the tokens."""
    def share(worker):
        for a, b, out, count in products:
            rows = cpu.row_shards(a.shape[0], workers.workers)[worker]
            for _ in range(count):
                albor.xp.matmul(a[rows], b, out=out[rows])
    workers.map(share, [(worker,) for worker in range(workers.workers)])
    synchronize()


def time_gemm(product, workers):
    """Best seconds of one product over GEMM_REPEATS runs after one warmup: the best run
    is what the machine can do (a busy neighbour only ever slows a run down), which makes
    MFU against it a conservative figure."""
    run_products([product], workers)
    seconds = []
    for _ in range(GEMM_REPEATS):
        start = time.perf_counter()
        run_products([product], workers)
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def make_products(config, tokens):
    """(label, M, K, N, count) and its (a, b, out, 1) for every distinct product of a step."""
    rng = np.random.default_rng(0)
    products = []
    for label, M, K, N, count in model_gemms(config, tokens):
        a, b = gemm_operands(albor.xp, label, M, K, N, rng)
        products.append(((label, M, K, N, count), (a, b, albor.xp.empty((M, N), dtype=albor.xp.float32), count)))
    return products


def measure_gemm_rate(config, tokens, workers):
    """Time every distinct product of one training step; print a table; return
    (GFLOP per step in matmuls, seconds per step those matmuls take at the measured
    rates, a function that runs one step's matmuls alone and returns its seconds)."""
    how = (f"{workers.workers} worker threads, single-threaded BLAS each" if workers.workers > 1
           else "BLAS threads as NumPy starts them")
    print(f"GEMM rate: float32 {albor.BACKEND} matmul on this model's products, {how} "
          f"(best of {GEMM_REPEATS}, after 1 warmup)")
    print(f"  {'product':<30} {'shape (M,K) @ (K,N)':>26} {'x/step':>7} {'ms':>8} {'GFLOP/s':>8}")
    total_flop, total_seconds = 0.0, 0.0
    products = make_products(config, tokens)
    for (label, M, K, N, count), product in products:
        seconds = time_gemm(product[:3] + (1,), workers)
        flop = 2.0 * M * K * N
        shape = f"({M},{K}) @ ({K},{N})"
        print(f"  {label:<30} {shape:>26} {count:>7} {1000 * seconds:>8.2f} {flop / seconds / 1e9:>8.1f}")
        total_flop += count * flop
        total_seconds += count * seconds
    print(f"  the model's GEMM mix: {total_flop / 1e9:.3g} GFLOP per step in "
          f"{1000 * total_seconds:.2f} ms = {total_flop / total_seconds / 1e9:.1f} GFLOP/s")

    def matmuls_alone():
        """One step's matmuls and nothing else (each product `count` times, into a ready
        output buffer): the GEMM-bound floor, timed in the same loop as the steps."""
        start = time.perf_counter()
        run_products([product for _, product in products], workers)
        return time.perf_counter() - start
    return total_flop, total_seconds, matmuls_alone


DEFAULT_BLAS_FLOOR = """
import json, os, statistics, sys
import albor, bench, cpu
config = albor.get_config(sys.argv[1])
products = [product for _, product in bench.make_products(config, int(sys.argv[2]))]
workers = cpu.DataParallel(1)
seconds = []
for _ in range(4):
    start = bench.time.perf_counter()
    bench.run_products(products, workers)
    seconds.append(bench.time.perf_counter() - start)
print(json.dumps(statistics.median(seconds[1:])))
"""


def compare_with_blas_threads(config, tokens, matmuls_alone):
    """With worker threads, the floor's matmuls run as the workers run them. NumPy's BLAS
    with its own threads (a fresh process: OpenBLAS reads its thread count at load) may run
    them faster: time both, one right after the other, and return the factor (at most 1)
    that brings the workers' floor down to the faster of the two."""
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", DEFAULT_BLAS_FLOOR, config_name(config), str(tokens)],
                            capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if result.returncode != 0:
        print(f"  (could not time BLAS's own threads: {result.stderr.strip().splitlines()[-1:]})")
        return 1.0
    blas_threads = float(result.stdout)
    ours = statistics.median([matmuls_alone() for _ in range(3)])
    factor = min(1.0, blas_threads / ours)
    print(f"  the step's matmuls alone: {1000 * ours:.1f} ms on the worker threads, {1000 * blas_threads:.1f} ms "
          f"with BLAS's own threads (a fresh process): the floor below uses the faster "
          f"(factor {factor:.3f})")
    return factor


def config_name(config):
    return next(name for name, preset in albor.PRESETS.items() if preset == config)


def training_flop(config, batch_size, seq_len):
    """FLOPs of one training step (forward + backward) on batch_size x seq_len tokens:
        6 * params * tokens                    (every weight: 2 forward + 4 backward per token)
      + 12 * layers * heads * head_dim * T * tokens   (scores and weighted sum, forward
                                                       and backward, not halved for causality)
    Example, albor-base-50m, 4 x 128: 6 * 62,403,072 * 512 + 12 * 12 * 8 * 64 * 128 * 512
    = 191.7 + 4.8 GFLOP."""
    tokens = batch_size * seq_len
    dense = 6 * albor.param_count(config) * tokens
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len * tokens
    return dense + attention


# ----------------------------------------------------------------------------
# 2. albor's training step

def albor_train_step(params, config, adamw, inputs, targets, workers, lr=LR):
    """One step exactly as train.py takes it (its own train_step): the micro-batches inputs[m],
    targets[m] forward and backward (rows shared out over `workers`, gradients added up), then
    clip the global gradient norm to GRAD_CLIP and an AdamW step at lr. Returns (mean loss,
    seconds per phase per micro-batch: the optimizer's time shared out over the micro-batches)."""
    import train  # here, not at the top: only the training benchmarks need the trainer
    timing = collections.defaultdict(float)
    start = time.perf_counter()
    loss, _, _, _ = train.train_step(params, config, adamw, inputs, targets, lr, GRAD_CLIP, 1, timing, None,
                                     workers)
    synchronize()
    n = len(inputs)
    return loss, {"forward": timing["forward_seconds"] / n, "backward": timing["backward_seconds"] / n,
                  "optimizer": timing["optimizer_seconds"] / n, "step": (time.perf_counter() - start) / n}


# ----------------------------------------------------------------------------
# 3. the equivalent PyTorch model (only if torch is importable)

def import_torch():
    """torch, or None if it is not installed (PyTorch is never required)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_device(torch):
    """The device matching albor's backend, or None if PyTorch cannot use it."""
    if albor.BACKEND == "cupy":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu"


def torch_rmsnorm(torch, x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def torch_rope_tables(torch, config, seq_len, device):
    """cos, sin (T, D) for rotate-half RoPE, as HF LLaMA builds them."""
    D = config.head_dim
    inv_freq = config.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                             # (T, D)
    return angles.cos(), angles.sin()


def torch_rope(torch, x, cos, sin):
    """x * cos + rotate_half(x) * sin; rotate_half([a, b]) = [-b, a] over the last axis."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def torch_loss(torch, weights, config, idx, targets):
    """Mean cross-entropy of the LLaMA in `weights` (HF names), written with plain
    torch ops and SDPA attention the way an eager PyTorch user would."""
    F = torch.nn.functional
    B, T = idx.shape
    H, KVH, D, C = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    eps = config.rms_norm_eps
    cos, sin = torch_rope_tables(torch, config, T, idx.device)
    x = F.embedding(idx, weights["model.embed_tokens.weight"])                    # (B, T, C)
    for i in range(config.num_hidden_layers):
        w = lambda name: weights[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        h = torch_rmsnorm(torch, x, w("input_layernorm"), eps)
        q = F.linear(h, w("self_attn.q_proj")).view(B, T, H, D).transpose(1, 2)    # (B, H, T, D)
        k = F.linear(h, w("self_attn.k_proj")).view(B, T, KVH, D).transpose(1, 2)  # (B, KVH, T, D)
        v = F.linear(h, w("self_attn.v_proj")).view(B, T, KVH, D).transpose(1, 2)  # (B, KVH, T, D)
        q, k = torch_rope(torch, q, cos, sin), torch_rope(torch, k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, D)
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, C), w("self_attn.o_proj"))
        h = torch_rmsnorm(torch, x, w("post_attention_layernorm"), eps)
        x = x + F.linear(F.silu(F.linear(h, w("mlp.gate_proj"))) * F.linear(h, w("mlp.up_proj")),
                         w("mlp.down_proj"))
    x = torch_rmsnorm(torch, x, weights["model.norm.weight"], eps)
    logits = F.linear(x, weights["model.embed_tokens.weight"])                   # (B, T, V), tied head
    return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), ignore_index=albor.IGNORE_INDEX)


def make_torch_optimizer(torch, weights, adamw):
    """The same update in PyTorch as optimizer_step(): clip_grad_norm_ to GRAD_CLIP, then
    torch.optim.AdamW with albor's settings, decaying the same parameters (the matrices)."""
    decayed = [w for name, w in weights.items() if albor.is_decayed(name, tuple(w.shape))]
    not_decayed = [w for name, w in weights.items() if not albor.is_decayed(name, tuple(w.shape))]
    torch_adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": adamw.weight_decay},
                                     {"params": not_decayed, "weight_decay": 0.0}],
                                    lr=LR, betas=(adamw.beta1, adamw.beta2), eps=adamw.eps)

    def optimizer_step(lr=LR):
        for group in torch_adamw.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(list(weights.values()), GRAD_CLIP)
        torch_adamw.step()
    return optimizer_step


def setup_torch(params, config, idx_host, targets_host, adamw):
    """The PyTorch twin of albor's model and optimizer, or None (with a line saying why).
    Its loss on the benchmark batch must match albor's, or the run stops: the timings
    would not compare the same model."""
    torch = import_torch()
    if torch is None:
        print("PyTorch: not installed, so only albor is timed (PyTorch is never required)")
        return None
    device = torch_device(torch)
    if device is None:
        print("PyTorch: installed but cannot use the GPU albor runs on, so only albor is timed")
        return None
    if device == "cpu":
        torch.set_num_threads(cpu_count())  # as many threads as OpenBLAS uses by default
    weights = {name: torch.tensor(albor.to_numpy(p), device=device).requires_grad_()
               for name, p in params.items()}
    idx = torch.tensor(idx_host, device=device)
    targets = torch.tensor(targets_host, device=device)
    albor_loss, _ = albor.forward(params, config, albor.xp.asarray(idx_host), albor.xp.asarray(targets_host))
    with torch.no_grad():
        reference = torch_loss(torch, weights, config, idx, targets).item()
    difference = abs(albor_loss - reference)
    print(f"PyTorch {torch.__version__} on {device} ({torch.get_num_threads()} threads), the same model "
          f"and parameters: loss {reference:.6f}, albor {albor_loss:.6f}, |difference| {difference:.2e}")
    if difference > LOSS_TOLERANCE * max(1.0, abs(reference)):
        raise SystemExit(f"error: albor's loss {albor_loss:.6f} does not match PyTorch's "
                         f"{reference:.6f}; the timings would not compare the same model")
    return {"torch": torch, "weights": weights, "device": device,
            "optimizer_step": make_torch_optimizer(torch, weights, adamw)}


# ----------------------------------------------------------------------------
# 4. where albor's time goes: cpu.LayerClock's timed wrappers around its layer functions

def layer_breakdown(params, config, adamw, inputs, targets, repeats, workers):
    """Run `repeats` timed train steps with cpu.LayerClock active; return (median ms per kind
    per micro-batch, median ms per micro-batch, the layers called (X of X_forward), number
    of threads they ran in),
    or None if no layer function was called through albor's module globals. With worker
    threads, a layer's seconds are summed over them: divided by their number, they are
    the average thread's, comparable with the step's wall time."""
    per_kind = {kind: [] for kind in KIND_ORDER}
    steps = []
    called = set()
    with cpu.LayerClock(synchronize) as timer:
        albor_train_step(params, config, adamw, inputs, targets, workers)  # warmup
        timer.take()
        threads = len(cpu.row_shards(inputs[0].shape[0], workers.workers))
        for _ in range(repeats):
            _, phases = albor_train_step(params, config, adamw, inputs, targets, workers)
            seconds = {layer: spent / threads / len(inputs) for layer, spent in timer.take().items()}
            if not seconds:
                return None
            called.update(seconds)
            kinds = {kind: 0.0 for kind in KIND_ORDER}
            for layer, spent in seconds.items():
                kinds[LAYER_KINDS[layer]] += spent
            kinds["optimizer"] = phases["optimizer"]
            layers_total = sum(spent for kind, spent in kinds.items() if kind != "optimizer")
            kinds["matmuls"] = phases["forward"] + phases["backward"] - layers_total
            for kind, spent in kinds.items():
                per_kind[kind].append(spent)
            steps.append(phases["step"])
    medians = {kind: median_ms(spent) for kind, spent in per_kind.items()}
    return medians, median_ms(steps), called, threads


def print_breakdown(result, gemm_seconds):
    """The per-kind table of layer_breakdown's result."""
    print("Where albor's time goes (a second pass: each albor.X_forward / X_backward timed "
          "by a wrapper; median ms per step):")
    if result is None:
        print("  not available: albor's forward/backward do not call their layer functions "
              "through module globals, so they cannot be wrapped")
        return
    medians, step_ms, called, threads = result
    notes = {
        "matmuls": "the rest of forward+backward: GEMMs, residual adds, reshapes",
        "optimizer": "clip_grad_norm + AdamW.step",
    }
    for kind in medians:
        if kind not in notes:
            layers = sorted(layer for layer in called if LAYER_KINDS[layer] == kind)
            notes[kind] = ", ".join(f"{layer}_*" for layer in layers)
    for kind, ms in medians.items():
        print(f"  {kind:<20} {ms:>9.1f} ms {100 * ms / step_ms:>6.1f}%   {notes[kind]}")
    print(f"  {'step':<20} {step_ms:>9.1f} ms")
    print(f"  the matmuls at the measured GEMM rates alone would take {1000 * gemm_seconds:.1f} ms")
    if threads > 1:
        print(f"  (albor ran its layers in {threads} worker threads at once: each layer kind is "
              f"the average thread's time)")


# ----------------------------------------------------------------------------
# 5. attention alone (--attention): albor's reference code, its kernels.cu, PyTorch's SDPA

ATTENTION_TOLERANCE = 1e-4  # the paths' out, dq, dk, dv must agree this closely (relative to
                            # the reference's largest value)
GPU_BATCH_SIZES, GPU_SEQ_LENS = [4, 8, 16, 32], [128, 256, 512, 1024, 2048]
CPU_BATCH_SIZES, CPU_SEQ_LENS = [4], [128, 256, 512]  # NumPy is slow: a smaller default sweep


def albor_attention(kernels):
    """run(q, k, v, dout) -> (out, dq, dk, dv) through albor.attention_forward / _backward,
    with kernels (a gpu.Kernels, or None for the reference code) on for the call."""
    def run(q, k, v, dout):
        with gpu.settings(kernels=kernels):
            out, lse = albor.attention_forward(q, k, v)
            dq, dk, dv = albor.attention_backward(dout, q, k, v, out, lse)
        return out, dq, dk, dv
    return run


def torch_attention(torch, device):
    """(prepare, run, sync) for PyTorch: prepare(q, k, v, dout) copies the host arrays to
    `device`; run does SDPA forward (causal, GQA) and its backward with torch.autograd.grad."""
    def prepare(*host):
        return [torch.tensor(a, device=device, requires_grad=i < 3) for i, a in enumerate(host)]

    def run(q, k, v, dout):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        return out, dq, dk, dv
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return prepare, run, sync


def attention_paths():
    """[(name, prepare, run, sync)]: prepare(q, k, v, dout) turns host arrays into the path's
    arrays, run(*prepared) returns (out, dq, dk, dv), sync waits for the path's device.
    The kernels.cu path only on the CuPy backend; PyTorch only if it is installed."""
    to_albor = lambda *host: [albor.xp.asarray(a) for a in host]  # noqa: E731
    paths = [("reference", to_albor, albor_attention(None), synchronize)]
    if albor.BACKEND == "cupy":
        paths.append(("kernels", to_albor, albor_attention(gpu.kernels() or gpu.Kernels()), synchronize))
    torch = import_torch()
    device = torch_device(torch) if torch else None
    if torch is None:
        print("  PyTorch: not installed, so only albor is timed")
    elif device is None:
        print("  PyTorch: installed but cannot use the GPU albor runs on, so only albor is timed")
    else:
        if device == "cpu":
            torch.set_num_threads(cpu_count())  # as many threads as OpenBLAS uses by default
        paths.append(("PyTorch", *torch_attention(torch, device)))
        print(f"  PyTorch {torch.__version__} scaled_dot_product_attention(is_causal=True, "
              f"enable_gqa=True) on {device} ({torch.get_num_threads()} threads)")
    return paths


def to_host(a):
    """A NumPy copy of an albor array or a torch tensor."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else albor.to_numpy(a)


def check_attention_agreement(paths, inputs, B, T):
    """Run every path once on the same inputs; print each one's largest |difference| from the
    reference over out, dq, dk, dv; stop the run if one is off (the timings would not compare
    the same computation)."""
    results = [[to_host(a) for a in run(*args)] for (_, _, run, _), args in zip(paths, inputs)]
    reference = results[0]
    scale = max(1.0, max(float(np.abs(a).max()) for a in reference))
    differences = []
    for (name, _, _, _), result in zip(paths[1:], results[1:]):
        difference = max(float(np.abs(a - b).max()) for a, b in zip(result, reference))
        differences.append(f"{name} {difference:.2e}")
        if difference > ATTENTION_TOLERANCE * scale:
            raise SystemExit(f"error: attention: {name} and the reference differ by {difference:.2e} "
                             f"at B={B}, T={T}; the timings would not compare the same computation")
    if differences:
        print(f"  agreement at B={B}, T={T}, max |difference| from the reference over out, dq, dk, dv: "
              f"{', '.join(differences)} (tolerance {ATTENTION_TOLERANCE:g} x {scale:.2f}): ok")


def attention_benchmark(config, batch_sizes, seq_lens, repeats):
    """Time causal GQA attention forward + backward per path at every (B, T): median ms of
    `repeats` runs after one warmup run, the paths taking turns; print a table with ratios."""
    H, KVH, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    print(f"Attention forward + backward, causal, H={H} query heads, KVH={KVH} KV heads, D={D}, "
          f"float32, backend {albor.BACKEND}; median of {repeats} after 1 warmup, the paths taking turns")
    paths = attention_paths()
    names = [name for name, _, _, _ in paths]
    ratios = [(a, "PyTorch") for a in names if a != "PyTorch" and "PyTorch" in names]
    ratios += [("reference", "kernels")] if "kernels" in names else []
    rng = np.random.default_rng(0)

    def make_inputs(B, T):  # each path's copy of the same random q, k, v, dout
        host = [rng.standard_normal(shape, dtype=np.float32)
                for shape in [(B, H, T, D), (B, KVH, T, D), (B, KVH, T, D), (B, H, T, D)]]
        return [prepare(*host) for _, prepare, _, _ in paths]

    B, T = batch_sizes[0], seq_lens[0]
    check_attention_agreement(paths, make_inputs(B, T), B, T)
    print(f"  {'B':>4} {'T':>6}" + "".join(f"{name + ' ms':>14}" for name in names)
          + "".join(f"{a + '/' + b:>20}" for a, b in ratios))
    for B, T in [(B, T) for B in batch_sizes for T in seq_lens]:
        inputs = make_inputs(B, T)
        for (_, _, run, sync), args in zip(paths, inputs):  # warmup
            run(*args)
            sync()
        seconds = {name: [] for name in names}
        for _ in range(repeats):
            for (name, _, run, sync), args in zip(paths, inputs):
                sync()
                start = time.perf_counter()
                run(*args)
                sync()
                seconds[name].append(time.perf_counter() - start)
                if albor.BACKEND == "numpy":
                    time.sleep(PAUSE_S)  # let the last library's spinning threads go idle
        ms = {name: median_ms(seconds[name]) for name in names}
        print(f"  {B:>4} {T:>6}" + "".join(f"{ms[name]:>14.2f}" for name in names)
              + "".join(f"{ms[a] / ms[b]:>20.2f}" for a, b in ratios))
        del inputs
    return 0


# ----------------------------------------------------------------------------
# 6. a whole run (--train-steps): optimizer steps as train.py takes them

def torch_train_step(torch, weights, optimizer_step, config, inputs, targets, lr=LR):
    """PyTorch's side of one train.py step: each micro-batch's loss / len(inputs) back-
    propagated (gradients accumulate in .grad), then clip + AdamW at lr, then .grad = None
    (what optimizer.zero_grad() does). Returns (mean loss, seconds per phase per micro-batch)."""
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    seconds = {"forward": 0.0, "backward": 0.0}
    total = 0.0
    start = time.perf_counter()
    for idx, tgt in zip(inputs, targets):
        micro_start = time.perf_counter()
        loss = torch_loss(torch, weights, config, idx, tgt) / len(inputs)
        sync()
        forward_done = time.perf_counter()
        loss.backward()
        sync()
        seconds["forward"] += forward_done - micro_start
        seconds["backward"] += time.perf_counter() - forward_done
        total += loss.item()
    optimizer_start = time.perf_counter()
    optimizer_step(lr)
    for weight in weights.values():
        weight.grad = None
    sync()
    end = time.perf_counter()
    n = len(inputs)
    return total, {"forward": seconds["forward"] / n, "backward": seconds["backward"] / n,
                   "optimizer": (end - optimizer_start) / n, "step": (end - start) / n}


def whole_run_benchmark(config, B, T, grad_accum, steps):
    """`steps` optimizer steps of grad_accum micro-batches (B, T) of random tokens, albor
    through train.py's own train_step, PyTorch through torch_train_step, taking turns step
    by step, and before each step the step's matmuls alone (grad_accum times the matmuls of
    a micro-batch: the GEMM-bound floor, for the whole run's MFU). With the defaults,
    --train-steps 31 is the training part of `python train.py --rows 500`
    (31 steps x 4 micro-batches x 4 x 128 tokens)."""
    tokens = steps * grad_accum * B * T
    workers = cpu.DataParallel(cpu.cpu_workers())
    gemm_flop, _, matmuls_alone = measure_gemm_rate(config, B * T, workers)
    floor_factor = compare_with_blas_threads(config, B * T, matmuls_alone) if workers.workers > 1 else 1.0
    print()
    print(f"Whole run: {steps} optimizer steps x {grad_accum} micro-batches of {B} x {T} tokens = "
          f"{tokens:,} tokens; each step: the matmuls alone, albor (train.py's train_step), PyTorch, in turn")
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, config.vocab_size, size=(grad_accum, B, T), dtype=np.int64),
                rng.integers(0, config.vocab_size, size=(grad_accum, B, T), dtype=np.int64))
               for _ in range(steps)]
    params = albor.init_params(config, seed=0)
    adamw = cpu.FastAdamW(params)
    twin = setup_torch(params, config, batches[0][0][0], batches[0][1][0], adamw)
    names = ["albor", "PyTorch"] if twin else ["albor"]
    seconds = {name: 0.0 for name in names}
    floor_seconds = 0.0
    losses = {}
    bar = tqdm(batches, unit="step", desc="whole run", dynamic_ncols=True)
    for step, (inputs, targets) in enumerate(bar, start=1):
        lr = albor.lr_at(step, steps, LR, albor.default_warmup(steps), LR / 10)
        floor_seconds += grad_accum * training_flop(config, B, T) / gemm_flop * matmuls_alone() * floor_factor
        losses["albor"], phases = albor_train_step(params, config, adamw, list(inputs), list(targets), workers, lr)
        seconds["albor"] += grad_accum * phases["step"]
        if twin:
            time.sleep(PAUSE_S)
            device_batch = [twin["torch"].tensor(a, device=twin["device"]) for a in (inputs, targets)]
            losses["PyTorch"], phases = torch_train_step(twin["torch"], twin["weights"], twin["optimizer_step"],
                                                         config, *device_batch, lr)
            seconds["PyTorch"] += grad_accum * phases["step"]
            time.sleep(PAUSE_S)
        bar.set_postfix({name: f"{spent:.0f}s" for name, spent in seconds.items()})
    bar.close()
    print(f"  {'':<8} {'seconds':>10} {'tokens/s':>9} {'MFU':>6}  loss at step {steps}")
    for name in names:
        print(f"  {name:<8} {seconds[name]:>10.2f} {tokens / seconds[name]:>9.0f} "
              f"{100 * floor_seconds / seconds[name]:>5.1f}%  {losses[name]:.4f}")
    print(f"  MFU = the matmuls alone ({floor_seconds:.2f} s for the whole run, attention's FLOPs at their "
          f"rate) / the time")
    if twin:
        print(f"  albor/PyTorch {seconds['albor'] / seconds['PyTorch']:.2f}")
    if floor_seconds > min(seconds.values()):
        print("  note: MFU above 100%: on tiny shapes the matmuls' call overheads outweigh the rest; "
              "on a shared machine, noise")
    return 0


# ----------------------------------------------------------------------------
# 7. the tokenizer (--tokenizer): tokenizer.py's BPE beside Hugging Face `tokenizers`

def train_hf_tokenizers(texts, vocab_size, min_frequency=1):
    """Train the same tokenizer with Hugging Face `tokenizers` (for bench/tests)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    import tokenizer
    hf = HFTokenizer(models.BPE(ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(tokenizer.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def tokenizer_benchmark(lines, vocab_size):
    """Train on the first `lines` stdlib lines, then encode them twice (cold, warm); the same
    with Hugging Face `tokenizers` when it is installed."""
    import tokenizer
    import train  # the training data's reader
    texts = list(train.stdlib_texts(lines))
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    print(f"corpus: the first {sum(len(t.splitlines()) for t in texts)} lines of the stdlib "
          f"({len(texts)} files, {megabytes:.2f} MB), vocab_size {vocab_size}")

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    tok, ours_train = timed(lambda: tokenizer.Tokenizer.train(texts, vocab_size))
    ours_cold = megabytes / timed(lambda: [tok.encode(text) for text in texts])[1]
    ours_warm = megabytes / timed(lambda: [tok.encode(text) for text in texts])[1]
    print(f"albor      train {ours_train:6.2f} s ({tok.vocab_size} tokens)   "
          f"encode {ours_cold:5.2f} MB/s cold, {ours_warm:5.2f} MB/s warm")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("(Hugging Face tokenizers is not installed: no comparison)")
        return 0
    hf, hf_train = timed(lambda: train_hf_tokenizers(texts, vocab_size))
    hf_encode = megabytes / timed(lambda: [hf.encode(text) for text in texts])[1]
    print(f"tokenizers train {hf_train:6.2f} s ({hf.get_vocab_size()} tokens)   encode {hf_encode:5.2f} MB/s")
    print(f"albor vs tokenizers: training takes x{ours_train / hf_train:.2f} the time, "
          f"warm encoding runs at x{ours_warm / hf_encode:.2f} the speed")
    return 0


# ----------------------------------------------------------------------------
# 8. what a checkpoint has learned (--learning): bits per byte on held-out Python beside gzip and xz

def held_out_files(path):
    """The .py files under path (a folder) or path itself (a file), sorted; by default the installed
    tqdm package's source: Python that no run trains or validates on (the runs read the standard
    library, and tqdm is not part of it)."""
    if path is None:
        import tqdm as package
        path = os.path.dirname(package.__file__)
    files = sorted(Path(path).rglob("*.py")) if os.path.isdir(path) else [Path(path)]
    if not files or not all(f.is_file() for f in files):
        raise SystemExit(f"error: --held-out {path}: no .py files there")
    return files


def learning_benchmark(folder, held_out):
    """The checkpoint's bits per byte on each held-out file alone (train.pack_windows of the file:
    its tokens after an <|endoftext|>, in windows of the run's --seq-len, every byte predicted),
    summed over the files; gzip -9 and xz -9e (Python's gzip and lzma, the same formats and
    levels as the command-line tools) compressing each file alone; and the run's own figure."""
    import gzip
    import lzma

    import sample
    import train
    try:
        config, params, tok = sample.load(folder)
    except sample.SampleError as e:
        raise SystemExit(f"error: {e}") from None
    state_path = Path(folder) / train.TRAINER_STATE
    run_args = checkpoint.read_json(state_path, "the run's state")["args"] if state_path.exists() else {}
    seq_len = run_args.get("seq_len", config.max_position_embeddings)
    workers = cpu.DataParallel(cpu.cpu_workers())
    files = held_out_files(held_out)
    totals = collections.Counter()
    for path in tqdm(files, desc="held-out files", unit="file", leave=False):
        data = path.read_bytes()
        inputs, targets = train.pack_windows(tok, [data.decode("utf-8", errors="replace")], seq_len)
        n_targets = int((targets != albor.IGNORE_INDEX).sum())
        if n_targets:
            totals["nats"] += train.evaluate(params, config, inputs, targets, 16, workers) * n_targets
        totals.update(tokens=n_targets, text_bytes=train.target_bytes(tok, targets), bytes=len(data),
                      gzip=len(gzip.compress(data, compresslevel=9)),
                      xz=len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)))
    print(f"held-out Python: {len(files)} files under {os.path.commonpath([str(f) for f in files])} "
          f"({totals['bytes']:,} bytes, {totals['tokens']:,} tokens), each file on its own")
    print(f"  {'':<44} {'bits per byte':>13}")
    model_bpb = totals["nats"] / math.log(2) / totals["text_bytes"]
    print(f"  {'albor ' + folder + ' (windows of ' + str(seq_len) + ')':<44} {model_bpb:>13.3f}")
    print(f"  {'gzip -9':<44} {8 * totals['gzip'] / totals['bytes']:>13.3f}")
    print(f"  {'xz -9e':<44} {8 * totals['xz'] / totals['bytes']:>13.3f}")
    summary_path = Path(folder) / train.FINAL_MODEL
    summary = checkpoint.read_json(summary_path, "the run's summary") if summary_path.exists() else {}
    if summary.get("val_bpb") is not None:
        print(f"  the run's own validation (held-out documents of its corpus): {summary['val_bpb']:.3f} "
              f"bits per byte after {summary.get('tokens', 0):,} tokens of training")
    return 0


# ----------------------------------------------------------------------------
# 9. MPI ranks against the worker threads (--ranks N): train.py itself, both ways

def ranks_benchmark(config_name, ranks, B, T, grad_accum, steps):
    """`python train.py` and `mpiexec -n ranks python train.py` on the same cores and the same
    rows, taking turns (one process, MPI, MPI, one process: a drift of the machine's speed hits
    both alike); the median seconds per step (each run's first step, which warms up, left out),
    whether the two wrote the same model bytes, and the load average before and after."""
    mpiexec = distributed.find_mpiexec()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        raise SystemExit("bench.py --ranks needs mpi4py and an mpiexec: pip install -r requirements-mpi.txt")
    root = os.path.dirname(os.path.abspath(__file__))
    argv = [os.path.join(root, "train.py"), "--config", config_name, "--rows", str(steps * B * grad_accum),
            "--batch-size", str(B), "--seq-len", str(T), "--grad-accum", str(grad_accum),
            "--max-steps", str(steps), "--val-rows", "0", "--eval-samples", "0"]
    layouts = {"one process": [sys.executable],
               f"mpiexec -n {ranks}": [mpiexec, "-n", str(ranks), sys.executable]}
    names = list(layouts)
    print(f"train.py on {cpu_count()} CPUs, {config_name}, {steps} steps of {grad_accum} x {B} x {T} tokens "
          f"per run: {' and '.join(names)}, taking turns (load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    seconds = {name: [] for name in names}
    setups, weights = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for turn, name in enumerate(names + names[::-1]):
            out = os.path.join(folder, f"run{turn}")
            result = subprocess.run(layouts[name] + argv + ["--out", out], cwd=root, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                raise SystemExit(f"{name} python train.py failed:\n{result.stdout}{result.stderr}")
            with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
                seconds[name] += [json.loads(line)["seconds"] for line in f][1:]
            setups[name] = next(line for line in result.stdout.splitlines() if " parameters on " in line)
            with open(os.path.join(out, "model.safetensors"), "rb") as f:
                weights.setdefault(name, f.read())
    tokens = B * grad_accum * T
    for name in names:
        median = statistics.median(seconds[name]) if seconds[name] else float("nan")
        print(f"  {name:<14} {median:8.3f} s a step {tokens / median:>8.0f} tokens/s   "
              f"({setups[name].split(' parameters on ')[1].split(';')[0]})")
    ratio = statistics.median(seconds[names[1]]) / statistics.median(seconds[names[0]])
    print(f"  {names[1]} / one process: {ratio:.3f} (step time)")
    same = weights[names[0]] == weights[names[1]]
    print(f"  model.safetensors of the two: {'byte-identical' if same else 'different bytes'}")
    print(f"  load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


# ----------------------------------------------------------------------------
# report

def blas_description():
    """One line per BLAS/OpenMP library NumPy (and anything else loaded) uses."""
    if albor.BACKEND == "cupy":
        return ["cuBLAS (CuPy) on " + albor.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()]
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        threads = f"{threads} (from the environment)" if threads else f"default, one per CPU ({cpu_count()})"
        return [f"numpy's BLAS: {blas['name']} {blas['version']}, threads: {threads} "
                f"(threadpoolctl not installed, so the live count is not read)"]
    return [f"{info['internal_api']} {info.get('version')}: {info['num_threads']} threads ({info['filepath']})"
            for info in threadpool_info()]


def print_step_table(albor_times, torch_times, tokens, floor_seconds, grad_accum):
    """Medians of each phase for albor (and PyTorch), tokens/s, MFU, and the ratio. Every
    figure is per micro-batch of a train.py step of grad_accum micro-batches: the step's
    time / grad_accum (so the optimizer's row is its time / grad_accum)."""
    columns = [("albor", albor_times)] + ([("PyTorch", torch_times)] if torch_times else [])
    header = "".join(f"{name:>14}" for name, _ in columns) + (f"{'albor/PyTorch':>15}" if torch_times else "")
    print(f"  per micro-batch{'':<7}{header}")
    for phase in ["forward", "backward", "optimizer", "step"]:
        cells = [median_ms(times[phase]) for _, times in columns]
        row = "".join(f"{ms:>11.1f} ms" for ms in cells)
        if torch_times and cells[1] > 0:
            row += f"{cells[0] / cells[1]:>15.2f}"
        label = "step / micro-batches" if phase == "step" else (
            f"optimizer / {grad_accum}" if phase == "optimizer" else phase)
        print(f"  {label:<22}{row}")
    seconds = [statistics.median(times["step"]) for _, times in columns]
    mfus = [floor_seconds / s for s in seconds]
    print(f"  {'tokens/s':<22}" + "".join(f"{tokens / s:>14.0f}" for s in seconds))
    print(f"  {'MFU':<22}" + "".join(f"{100 * mfu:>13.1f}%" for mfu in mfus))
    print("  MFU = the GEMM-bound floor / the time: training FLOPs at the rate of the matmuls alone, "
          "measured in the same loop")
    verdict = lambda met: "met" if met else "NOT met"  # noqa: E731
    targets = [f"albor MFU >= {100 * TARGET_MFU:.0f}% ({100 * mfus[0]:.1f}%: {verdict(mfus[0] >= TARGET_MFU)})"]
    if torch_times:
        ratio = seconds[0] / seconds[1]
        targets.append(f"albor/PyTorch <= {TARGET_RATIO} ({ratio:.3f}: {verdict(ratio <= TARGET_RATIO)})")
    print("  targets: " + "; ".join(targets))
    if max(mfus) > 1.0:
        print("  note: MFU above 100% means the matmuls alone ran while the machine was busier "
              "than during the steps (a shared machine); run again")


def preset_step(config_name):
    """The micro-batch and accumulation train.py uses for a preset: its DEFAULTS, or the preset's
    own training settings (train.PRESET_SETTINGS), e.g. workshop's 4 x 256 tokens, no accumulation."""
    import train   # here, not at the top: train.py's settings, not its run
    settings = {**train.DEFAULTS, **train.PRESET_SETTINGS.get(config_name, {})}
    return {name: settings[name] for name in ("batch_size", "seq_len", "grad_accum")}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time albor's training step (forward, backward, optimizer) against this "
                    "machine's own GEMM rate, and against PyTorch if it is installed.")
    parser.add_argument("--config", default="albor-base-50m", choices=list(albor.PRESETS),
                        help="model preset (default albor-base-50m)")
    parser.add_argument("--batch-size", type=int,
                        help="sequences per micro-batch (default: train.py's for the preset, 4 for "
                             "albor-base-50m)")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per sequence (default: train.py's for the preset, 128 for "
                             "albor-base-50m)")
    parser.add_argument("--grad-accum", type=int,
                        help="micro-batches per optimizer step, as in train.py: the optimizer's time "
                             f"is shared over them in the 'in training' figures (default: train.py's "
                             f"for the preset, {GRAD_ACCUM} for albor-base-50m)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed steps (or attention runs) after the warmup; medians are reported "
                             "(default 7)")
    parser.add_argument("--train-steps", type=int, metavar="N",
                        help="time only a whole run: N optimizer steps of --grad-accum micro-batches, "
                             "albor (train.py's train_step) and PyTorch taking turns; 31 with the "
                             "defaults is the training part of `python train.py --rows 500`")
    parser.add_argument("--attention", action="store_true",
                        help="time only attention forward + backward (the preset's heads): albor's "
                             "reference code, its kernels.cu (GPU only) and PyTorch's SDPA")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help=f"with --attention: batch sizes to sweep (default {GPU_BATCH_SIZES} on a "
                             f"GPU, {CPU_BATCH_SIZES} on a CPU)")
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        help=f"with --attention: sequence lengths to sweep (default {GPU_SEQ_LENS} on "
                             f"a GPU, {CPU_SEQ_LENS} on a CPU)")
    parser.add_argument("--learning", metavar="DIR",
                        help="only what the checkpoint in DIR has learned: bits per byte on held-out "
                             "Python files, each on its own, beside gzip -9 and xz -9e")
    parser.add_argument("--held-out", metavar="PATH",
                        help="with --learning: a folder of .py files or one file (default: the "
                             "installed tqdm package's source)")
    parser.add_argument("--tokenizer", action="store_true",
                        help="time only tokenizer.py's BPE training and encoding on the stdlib, beside "
                             "Hugging Face tokenizers if installed")
    parser.add_argument("--lines", type=int, default=100_000,
                        help="with --tokenizer: the first N stdlib lines (default 100000)")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="with --tokenizer: tokens to train (default 32768)")
    parser.add_argument("--ranks", type=int, metavar="N",
                        help="time only train.py as `mpiexec -n N` against one process on the same "
                             "cores, taking turns, --train-steps steps a run (default 4); needs "
                             "requirements-mpi.txt")
    args = parser.parse_args(argv)
    config = albor.get_config(args.config)
    if args.held_out is not None and args.learning is None:
        parser.error("--held-out only applies with --learning")
    if args.learning is not None:
        if args.tokenizer or args.attention or args.train_steps is not None or args.ranks is not None:
            parser.error("--learning, --tokenizer, --attention, --train-steps and --ranks are separate "
                         "benchmarks: give one")
        return args, config
    if args.ranks is not None and (args.tokenizer or args.attention):
        parser.error("--ranks, --tokenizer and --attention are separate benchmarks: give one")
    if args.tokenizer:
        if args.attention or args.train_steps is not None:
            parser.error("--tokenizer, --attention and --train-steps are separate benchmarks: give one")
        if args.lines < 1 or args.vocab_size < 258:
            parser.error("--lines must be at least 1 and --vocab-size at least 258")
        return args, config
    if args.attention:
        if args.batch_size is not None or args.seq_len is not None:
            parser.error("--attention sweeps --batch-sizes and --seq-lens, not --batch-size / --seq-len")
        if args.train_steps is not None:
            parser.error("--attention and --train-steps are separate benchmarks: give one")
        on_gpu = albor.BACKEND == "cupy"
        args.batch_sizes = args.batch_sizes or (GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)
        args.seq_lens = args.seq_lens or (GPU_SEQ_LENS if on_gpu else CPU_SEQ_LENS)
        if min(args.batch_sizes + args.seq_lens + [args.repeats]) < 1:
            parser.error("--batch-sizes, --seq-lens and --repeats must be at least 1")
        return args, config
    if args.batch_sizes is not None or args.seq_lens is not None:
        parser.error("--batch-sizes and --seq-lens only apply with --attention")
    if args.ranks is not None and args.ranks < 2:
        parser.error("--ranks must be at least 2")
    if args.train_steps is not None and args.train_steps < 1:
        parser.error("--train-steps must be at least 1")
    preset = preset_step(args.config)
    args.batch_size = preset["batch_size"] if args.batch_size is None else args.batch_size
    args.seq_len = preset["seq_len"] if args.seq_len is None else args.seq_len
    args.grad_accum = preset["grad_accum"] if args.grad_accum is None else args.grad_accum
    if min(args.batch_size, args.seq_len, args.repeats, args.grad_accum) < 1:
        parser.error("--batch-size, --seq-len, --grad-accum and --repeats must be at least 1")
    if args.seq_len > config.max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len} is longer than {args.config}'s "
                     f"max_position_embeddings {config.max_position_embeddings}")
    return args, config


def main(argv=None):
    args, config = parse_args(argv)
    if args.learning is not None:
        return learning_benchmark(args.learning, args.held_out)
    if args.tokenizer:
        return tokenizer_benchmark(args.lines, args.vocab_size)
    if args.attention:
        return attention_benchmark(config, args.batch_sizes, args.seq_lens, args.repeats)
    B, T = args.batch_size, args.seq_len
    tokens = B * T
    kept = cpu.keep_freed_memory()  # as train.py does (for PyTorch too: one process)
    if args.ranks:
        return ranks_benchmark(args.config, args.ranks, B, T, args.grad_accum, args.train_steps or 4)
    if args.train_steps:
        return whole_run_benchmark(config, B, T, args.grad_accum, args.train_steps)

    workers = cpu.DataParallel(cpu.cpu_workers())

    print(f"albor bench: {args.config} ({albor.param_count(config):,} parameters), "
          f"micro-batch {B} x {T} = {tokens} tokens, backend {albor.BACKEND}, {cpu_count()} CPUs")
    for line in blas_description():
        print(f"  {line}")
    print(f"  albor's worker threads (cpu.DataParallel, as train.py): {workers.workers}")
    print(f"  freed memory kept for reuse (cpu.keep_freed_memory): {'yes' if kept else 'no (not glibc)'}")
    print()

    gemm_flop, gemm_seconds, matmuls_alone = measure_gemm_rate(config, tokens, workers)
    floor_factor = compare_with_blas_threads(config, tokens, matmuls_alone) if workers.workers > 1 else 1.0
    gemm_rate = gemm_flop / gemm_seconds
    step_flop = training_flop(config, B, T)
    print("Training FLOPs per step = 6 * params * tokens + 12 * layers * heads * head_dim * T * tokens")
    print(f"  = {step_flop / 1e9:.3g} GFLOP; GEMM-bound floor at the rates above: "
          f"{1000 * step_flop / gemm_rate:.1f} ms per step")
    print()

    rng = np.random.default_rng(0)
    N = args.grad_accum
    inputs_host = rng.integers(0, config.vocab_size, size=(N, B, T), dtype=np.int64)   # N micro-batches
    targets_host = rng.integers(0, config.vocab_size, size=(N, B, T), dtype=np.int64)  # (N, B, T)
    inputs, targets = list(inputs_host), list(targets_host)  # NumPy, as train.py hands them over
    params = albor.init_params(config, seed=0)
    adamw = cpu.FastAdamW(params)
    print(f"A step as train.py takes it (its train_step): {N} micro-batches, each's gradients added "
          f"up, then clip the gradient norm to {GRAD_CLIP}, AdamW lr {LR:g} betas ({adamw.beta1}, "
          f"{adamw.beta2}) eps {adamw.eps:g} weight decay {adamw.weight_decay} (matrices)")

    twin = setup_torch(params, config, inputs_host[0], targets_host[0], adamw)
    if twin:
        twin["inputs"] = [twin["torch"].tensor(a, device=twin["device"]) for a in inputs_host]
        twin["targets"] = [twin["torch"].tensor(a, device=twin["device"]) for a in targets_host]
    print()

    albor_times = {phase: [] for phase in ["forward", "backward", "optimizer", "step"]}
    torch_times = {phase: [] for phase in albor_times} if twin else None
    alone_times = []
    order = "the matmuls alone, albor" + (" and PyTorch" if twin else "") + ", in turn"
    print(f"Training step: median of {args.repeats} after {WARMUP_STEPS} warmup; each repeat runs {order}")
    for repeat in range(WARMUP_STEPS + args.repeats):
        seconds = matmuls_alone()
        if repeat >= WARMUP_STEPS:
            alone_times.append(seconds)
        _, phases = albor_train_step(params, config, adamw, inputs, targets, workers)
        if repeat >= WARMUP_STEPS:
            for phase, seconds in phases.items():
                albor_times[phase].append(seconds)
        if twin:
            time.sleep(PAUSE_S)
            _, phases = torch_train_step(twin["torch"], twin["weights"], twin["optimizer_step"], config,
                                         twin["inputs"], twin["targets"])
            if repeat >= WARMUP_STEPS:
                for phase, seconds in phases.items():
                    torch_times[phase].append(seconds)
            time.sleep(PAUSE_S)
    alone = floor_factor * statistics.median(alone_times)
    floor = step_flop / gemm_flop * alone  # attention's few FLOPs at the same rate
    print(f"  the matmuls of a micro-batch alone: {1000 * alone:.1f} ms = "
          f"{gemm_flop / alone / 1e9:.1f} GFLOP/s; the GEMM-bound floor of a "
          f"micro-batch at that rate: {1000 * floor:.1f} ms")
    print_step_table(albor_times, torch_times, tokens, floor, N)
    if twin:
        # both took the same updates from the same start: the whole step (optimizer too) agrees
        albor_loss, _ = albor.forward(params, config, inputs[0], targets[0])
        with twin["torch"].no_grad():
            reference = torch_loss(twin["torch"], twin["weights"], config, twin["inputs"][0],
                                   twin["targets"][0]).item()
        print(f"  after {WARMUP_STEPS + args.repeats} updates each: loss albor {albor_loss:.6f}, "
              f"PyTorch {reference:.6f}, |difference| {abs(albor_loss - reference):.2e}")
    print()

    result = layer_breakdown(params, config, adamw, inputs, targets, args.repeats, workers)
    print_breakdown(result, gemm_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
