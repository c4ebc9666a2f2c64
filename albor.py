"""albor: a LLaMA-style language model with its forward and backward passes written by hand.

One file, read top to bottom in the order the data flows:

    idx (B, T) token ids
      -> embedding                        x (B*T, C)
      -> num_hidden_layers x block:
           x = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(..)), v_proj(..)))
           x = x + down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))
      -> final rmsnorm
      -> LM head (the embedding matrix again, "tied")   logits (B*T, V)
      -> softmax cross-entropy against targets          loss

Every layer is a pair X_forward / X_backward side by side (the style of llm.c's train_gpt2.c).
A forward returns what its backward needs; the backward quotes the forward line it
differentiates. There is no autograd: `backward` runs the layers in reverse by hand.

Arrays live in `xp`: NumPy on the CPU, CuPy on an NVIDIA GPU, same code. The hot path is
float32; the layers also run in float64 when handed float64 arrays (the tests use that to
check every backward against finite differences).

Parameter names and layouts are Hugging Face's LlamaForCausalLM ones (weights are (out, in),
so a linear layer is `x @ w.T`), so a checkpoint loads in `transformers` unchanged.
"""
import dataclasses
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as _safetensors_load_file

# -----------------------------------------------------------------------------
# Backend: `xp` is CuPy when a CUDA GPU is usable, NumPy otherwise.
# ALBOR_DEVICE=cpu forces NumPy; ALBOR_DEVICE=cuda demands a GPU (and says why there is none).


def _pick_backend():
    wanted = os.environ.get("ALBOR_DEVICE", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"ALBOR_DEVICE must be 'cpu', 'cuda' or 'auto', got {wanted!r}")
    if wanted == "cpu":
        return np, "numpy"
    try:
        import cupy  # optional: only installed on machines with an NVIDIA GPU
        usable = bool(cupy.cuda.is_available())  # False (no exception) without a driver
        reason = "cupy.cuda.is_available() is False (no CUDA driver or no device)"
    except Exception as error:  # not installed, or built for another CUDA version
        cupy, usable, reason = None, False, f"cannot import cupy: {error}"
    if usable:
        return cupy, "cupy"
    if wanted == "cuda":
        raise RuntimeError(f"ALBOR_DEVICE=cuda, but no usable GPU: {reason}")
    return np, "numpy"


xp, BACKEND = _pick_backend()  # BACKEND is "numpy" or "cupy"


def to_numpy(a):
    """A host (NumPy) copy of an xp array; a no-op on NumPy."""
    return xp.asnumpy(a) if BACKEND == "cupy" else np.asarray(a)


GLIBC_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest)
GLIBC_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's free top back to the OS


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory NumPy frees, for the next step to reuse.

    A training step allocates and frees the same few hundred MB of temporaries every time.
    By default glibc hands large freed blocks back to the kernel (munmap, or trimming the top
    of the heap) and maps them again on the next allocation, so every 4 KiB page faults and is
    zeroed once more: about 35,000 page faults per backward at B=4, T=128, 10-15% of a CPU
    step spent in the kernel. With these two settings the blocks stay mapped and are reused;
    peak memory stays about the same (measured: +2%). train.py and bench.py call this.
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
# Configuration. Field names are Hugging Face LlamaConfig's, so config.json maps 1:1.


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32768
    hidden_size: int = 512  # C
    num_hidden_layers: int = 12  # L
    num_attention_heads: int = 8  # H query heads
    num_key_value_heads: int = 2  # KVH key/value heads, shared by H // KVH query heads each
    intermediate_size: int = 2048  # F, the MLP's hidden width
    max_position_embeddings: int = 2048  # longest sequence T the model accepts
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")

    @property
    def head_dim(self):  # D
        return self.hidden_size // self.num_attention_heads


PRESETS = {
    "albor-base-50m": Config(),
    "tiny": Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256),
}


def get_config(name):
    """The preset called `name`, e.g. get_config("tiny").hidden_size == 64."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


IGNORE_INDEX = -100  # a target equal to this (e.g. padding) counts in neither the loss nor the grads

# -----------------------------------------------------------------------------
# Parameters


def param_shapes(config):
    """Name -> shape of every parameter, in the order the data flows through them.

    Example (tiny): "model.embed_tokens.weight" -> (512, 64), "model.layers.0.self_attn.k_proj.weight"
    -> (32, 64) (2 KV heads of 16 dims, from 64 inputs), ..., "model.norm.weight" -> (64,).
    There is no lm_head.weight: the LM head reuses the embedding matrix.
    """
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (C,)
        shapes[p + "self_attn.q_proj.weight"] = (C, C)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, C)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, C)
        shapes[p + "self_attn.o_proj.weight"] = (C, C)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
        shapes[p + "mlp.gate_proj.weight"] = (F, C)
        shapes[p + "mlp.up_proj.weight"] = (F, C)
        shapes[p + "mlp.down_proj.weight"] = (C, F)
    shapes["model.norm.weight"] = (C,)
    return shapes


def param_count(config):
    """Number of parameters; 62,403,072 for albor-base-50m."""
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def init_params(config, seed=0):
    """float32 parameters: matrices ~ N(0, 0.02), norm weights 1.

    Drawn on the host from np.random.default_rng(seed) in param_shapes order, then moved to xp,
    so a seed gives the same parameters on NumPy and on CuPy.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:  # an RMSNorm weight: start as the identity scaling
            host = np.ones(shape, dtype=np.float32)
        else:
            host = rng.standard_normal(shape, dtype=np.float32)
            host *= 0.02
        params[name] = xp.asarray(host)
    return params


# -----------------------------------------------------------------------------
# Layers. Shapes: B batch, T time, C hidden, H query heads, KVH key/value heads, D head dim,
# F MLP width, V vocabulary, N = B*T rows. Linear layers are written inline as `x @ w.T`
# (w.T is a strided view: BLAS reads it transposed, nothing is copied), spelled
# `matmul(x, w.T)` in the blocks and the LM head: that is `x @ w.T` on the CPU and by default,
# and in --dtype tf32/bf16/fp16 precision on a GPU (see the GPU kernels section).

# --- embedding ---------------------------------------------------------------


def embedding_forward(wte, idx):
    """One table row per token: wte (V, C), idx (...) int -> (..., C)."""
    return wte[idx]


def embedding_backward(dwte, dout, idx):
    """ADD the gradient of `out = wte[idx]` into dwte (V, C) in place; dout (..., C).

    A token that occurs several times collects the sum of its rows. `add.at` adds repeated
    indices one after another (a plain `dwte[idx] += dout` would keep only one of them), in a
    fixed order on NumPy, so the result is deterministic. (CuPy's add.at uses atomic adds: same
    sums, but the order, and so the last bits, can vary from run to run; on the GPU the
    kernels.cu version runs instead: the same additions in NumPy's order, no atomics.)
    """
    if _use_kernels(dwte, dout):
        return launch_embedding_backward(kernel_module(), xp, dwte, dout, idx)
    # out = wte[idx]
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))


# --- RMSNorm -----------------------------------------------------------------


def rmsnorm_forward(x, weight, eps):
    """out = x / sqrt(mean(x**2) + eps) * weight over the last axis. x (..., C), weight (C,).

    Returns (out, rstd) with rstd (..., 1) = 1 / sqrt(mean(x**2) + eps), which backward needs.
    """
    if _use_kernels(x, weight):
        return launch_rmsnorm_forward(kernel_module(), xp, x, weight, eps)
    C = x.shape[-1]
    mean_square = xp.einsum("...c,...c->...", x, x)[..., None] / C  # (..., 1) one pass, no x*x
    rstd = 1.0 / xp.sqrt(mean_square + eps)  # (..., 1)
    out = x * rstd  # (..., C) the normalized x, "xhat"
    out *= weight
    return out, rstd


def rmsnorm_backward(dout, x, weight, rstd):
    """Gradients of out = (x * rstd) * weight: returns (dx (..., C), dweight (C,))."""
    if _use_kernels(dout, x, weight, rstd):
        return launch_rmsnorm_backward(kernel_module(), xp, dout, x, weight, rstd)
    C = x.shape[-1]
    xhat = x * rstd  # (..., C)
    # out = xhat * weight, summed over every row for dweight (einsum: products and sums in one pass)
    dweight = xp.einsum("nc,nc->c", dout.reshape(-1, C), xhat.reshape(-1, C))  # (C,)
    dxhat = dout * weight  # (..., C)
    # xhat_i = x_i * rstd with rstd = (mean_j x_j**2 + eps) ** -0.5, so
    # d xhat_i / d x_j = rstd * (delta_ij - xhat_i * xhat_j / C), and
    # dx = rstd * (dxhat - xhat * mean_j(dxhat_j * xhat_j)), computed in dxhat's buffer
    row_mean = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    xhat *= row_mean
    dx = dxhat
    dx -= xhat
    dx *= rstd
    return dx, dweight


# --- RoPE --------------------------------------------------------------------


def rope_tables(T, head_dim, theta, dtype=np.float32):
    """cos and sin tables (T, D) for positions 0..T-1, the way HF LLaMA builds them.

    inv_freq = theta ** (-arange(0, D, 2) / D) (D/2 frequencies), angle[t, i] = t * inv_freq[i],
    and the D/2 angles are repeated twice: dims i and i + D/2 rotate together.
    Example: D=4, theta=10000 -> inv_freq = [1, 0.01]; position 3 -> angles [3, 0.03, 3, 0.03].
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # (D/2,)
    angles = np.outer(np.arange(T, dtype=dtype), inv_freq)  # (T, D/2)
    angles = np.concatenate([angles, angles], axis=1)  # (T, D)
    return xp.asarray(np.cos(angles)), xp.asarray(np.sin(angles))


def rope_forward(x, cos, sin):
    """Rotate each (dim i, dim i + D/2) pair of x by its position's angle.

    out = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1] (halves of D).
    x (B, heads, T, D), possibly a strided view; out is a fresh C-contiguous (B, heads, T, D),
    so attention can view it as (B, KVH, group*T, D) without a copy.
    """
    half = x.shape[-1] // 2
    out = xp.empty(x.shape, dtype=x.dtype)  # C order, whatever x's strides are
    xp.multiply(x, cos, out=out)
    out[..., :half] -= x[..., half:] * sin[:, :half]
    out[..., half:] += x[..., :half] * sin[:, half:]
    return out


def rope_backward(dout, cos, sin):
    """Gradient of rope_forward (a rotation, so this is the rotation by minus the angle)."""
    # out1 = x1 * cos - x2 * sin  and  out2 = x2 * cos + x1 * sin  (per half, same angle), so
    # dx1 = dout1 * cos + dout2 * sin  and  dx2 = dout2 * cos - dout1 * sin
    half = dout.shape[-1] // 2
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    xp.multiply(dout, cos, out=dx)
    dx[..., :half] += dout[..., half:] * sin[:, half:]
    dx[..., half:] -= dout[..., :half] * sin[:, :half]
    return dx


# --- causal grouped-query attention -----------------------------------------
# H query heads share KVH key/value heads: query head h reads KV head h // group, group = H // KVH.
# Instead of repeating K and V group times, view q (B, H, T, D) as (B, KVH, group*T, D): the
# group's query heads are stacked along the rows, so one batched matmul per KV head computes all
# their scores, and dK/dV come out already summed over the group. Row r of that view is query
# position t = r % T, which is what the causal mask looks at.


@functools.lru_cache(maxsize=8)
def _causal_mask_bias(T, group, dtype):
    """(group*T, T): 0 where key position s <= query position t = row % T, -inf after it.
    Made once per shape (cached: every layer, forward and backward, reads the same one)."""
    t = xp.arange(group * T) % T  # (group*T,)
    s = xp.arange(T)  # (T,)
    return xp.where(s[None, :] > t[:, None], -xp.inf, 0.0).astype(dtype)


def _attention_shapes(q, k):
    B, H, T, D = q.shape
    KVH = k.shape[1]
    if H % KVH or k.shape != (B, KVH, T, D):
        raise ValueError(f"attention: q {q.shape} and k {k.shape} are not (B,H,T,D) and "
                         f"(B,KVH,T,D) with H divisible by KVH")
    return B, H, T, D, KVH, H // KVH


def attention_forward(q, k, v):
    """Causal softmax attention. q (B, H, T, D), k and v (B, KVH, T, D).

    Returns out (B, H, T, D) and lse (B, H, T), the natural-log sum-exp of each row of scaled,
    masked scores (what a FlashAttention kernel saves: backward rebuilds the softmax from it).
    """
    if _use_kernels(q, k, v) and attention_kernel_fits(q.shape[-1]):
        return launch_attention_forward(kernel_module(), xp, q, k, v)
    B, H, T, D, KVH, group = _attention_shapes(q, k)
    scale = 1.0 / math.sqrt(D)  # a Python float: keeps float32 arrays float32
    qg = q.reshape(B, KVH, group * T, D)  # a view when q is C-contiguous
    scores = qg @ k.transpose(0, 1, 3, 2)  # (B, KVH, group*T, T)
    scores *= scale
    scores += _causal_mask_bias(T, group, scores.dtype)
    row_max = scores.max(axis=-1, keepdims=True)  # (B, KVH, group*T, 1)
    scores -= row_max
    probs = xp.exp(scores, out=scores)  # softmax numerator, in the scores buffer
    row_sum = probs.sum(axis=-1, keepdims=True)
    probs /= row_sum
    out = (probs @ v).reshape(B, H, T, D)  # (B, KVH, group*T, D) -> (B, H, T, D)
    lse = (row_max + xp.log(row_sum)).reshape(B, H, T)
    return out, lse


def attention_backward(dout, q, k, v, out, lse):
    """Gradients of attention_forward: returns dq (B, H, T, D), dk and dv (B, KVH, T, D),
    dk/dv summed over the query heads of each group. dout and out are (B, H, T, D)."""
    if _use_kernels(dout, q, k, v, out, lse) and attention_kernel_fits(q.shape[-1]):
        return launch_attention_backward(kernel_module(), xp, dout, q, k, v, out, lse)
    B, H, T, D, KVH, group = _attention_shapes(q, k)
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B, KVH, group * T, D)
    dout_g = dout.reshape(B, KVH, group * T, D)  # copies only if dout is a strided view
    # rebuild probs = exp(scores - lse) instead of having kept the (.., T, T) matrix
    probs = qg @ k.transpose(0, 1, 3, 2)  # (B, KVH, group*T, T)
    probs *= scale
    probs += _causal_mask_bias(T, group, probs.dtype)
    probs -= lse.reshape(B, KVH, group * T, 1)
    xp.exp(probs, out=probs)
    # out = probs @ v
    dv = probs.transpose(0, 1, 3, 2) @ dout_g  # (B, KVH, T, D), summed over the group's rows
    dprobs = dout_g @ v.transpose(0, 1, 3, 2)  # (B, KVH, group*T, T)
    # probs = softmax(scores): dscores = probs * (dprobs - sum_j dprobs_j * probs_j), and
    # sum_j dprobs_j * probs_j = sum_d dout_d * out_d (because out = probs @ v), a cheap (.., D) sum
    delta = (dout * out).sum(axis=-1).reshape(B, KVH, group * T, 1)
    dscores = dprobs
    dscores -= delta
    dscores *= probs
    # scores = (qg @ k^T) * scale (+ the constant mask)
    dscores *= scale
    dq = (dscores @ k).reshape(B, H, T, D)
    dk = dscores.transpose(0, 1, 3, 2) @ qg  # (B, KVH, T, D), summed over the group's rows
    return dq, dk, dv


# --- SwiGLU ------------------------------------------------------------------
# The MLP is down_proj(silu(gate_proj(x)) * up_proj(x)); this pair is its elementwise middle.


def _sigmoid(x):
    """1 / (1 + exp(-x)), computed in one fresh buffer."""
    s = xp.negative(x)
    xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)
    return s


def swiglu_forward(gate, up, sig=None):
    """h = silu(gate) * up with silu(g) = g * sigmoid(g). gate, up (N, F) -> h (N, F).

    sig: sigmoid(gate) if the caller has it already (block_forward keeps it for the backward,
    so neither pass needs another exp, the costly part on a CPU); else it is computed here.
    The GPU kernels compute their own.
    """
    if _use_kernels(gate, up):
        return launch_swiglu_forward(kernel_module(), xp, gate, up)
    if sig is None:
        sig = _sigmoid(gate)
    h = gate * sig
    h *= up
    return h


def swiglu_backward(dh, gate, up, sig=None):
    """Gradients of h = gate * sigmoid(gate) * up: returns (dgate, dup). sig as in swiglu_forward."""
    if _use_kernels(dh, gate, up):
        return launch_swiglu_backward(kernel_module(), xp, dh, gate, up)
    if sig is None:
        sig = _sigmoid(gate)
    silu = gate * sig
    dup = dh * silu
    # d silu / d gate = sig + gate * sig * (1 - sig) = sig + silu * (1 - sig)
    dsilu = 1.0 - sig
    dsilu *= silu
    dsilu += sig
    dgate = dh * up
    dgate *= dsilu
    return dgate, dup


# --- softmax cross-entropy ---------------------------------------------------
# The logits (N, V) are by far the largest tensor (512 x 32768 floats = 64 MiB at B=4, T=128).
# The forward turns them into softmax probabilities IN PLACE, a block of rows at a time (the
# block stays in the CPU cache through its five passes); the backward turns those into dlogits
# IN PLACE. No second (N, V) array is ever made.

CE_BLOCK_ROWS = 16  # 16 x 32768 float32 = 2 MiB per block


def cross_entropy_forward(logits, targets):
    """Mean of -log softmax(logits)[target] over the rows whose target != IGNORE_INDEX.

    logits (N, V), OVERWRITTEN with the softmax probabilities; targets (N,) int.
    Returns (loss as a Python float, probs = the same buffer, number of counted rows).
    Example: logits all 0 over V classes -> loss = ln(V) whatever the targets.
    (On the GPU path the buffer returned holds dlogits instead: see the GPU kernels section.)
    """
    if _use_kernels(logits):
        return _cross_entropy_forward_kernel(logits, targets)
    N = logits.shape[0]
    valid = targets != IGNORE_INDEX  # (N,)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
    safe_targets = xp.where(valid, targets, 0)  # ignored rows look up class 0, then count 0
    row_loss = xp.empty(N, dtype=logits.dtype)  # -log p[target] per row
    for start in range(0, N, CE_BLOCK_ROWS):
        stop = min(start + CE_BLOCK_ROWS, N)
        block = logits[start:stop]  # (R, V) view into logits
        block -= block.max(axis=1, keepdims=True)  # largest logit now 0: exp cannot overflow
        target_logit = block[xp.arange(stop - start), safe_targets[start:stop]]  # (R,)
        xp.exp(block, out=block)
        row_sum = block.sum(axis=1, keepdims=True)  # (R, 1)
        block /= row_sum  # softmax probabilities
        # -log(exp(target_logit) / row_sum) = log(row_sum) - target_logit
        row_loss[start:stop] = xp.log(row_sum[:, 0]) - target_logit
    loss_sum = xp.where(valid, row_loss, 0.0).sum(dtype=xp.float64)  # float64 for the sum only
    return float(loss_sum) / n_valid, logits, n_valid


def cross_entropy_backward(probs, targets, loss_scale=1.0):
    """Gradient of loss_scale * (mean cross-entropy) w.r.t. the logits, written over probs.

    probs (N, V) from cross_entropy_forward (OVERWRITTEN and returned as dlogits).
    """
    if _use_kernels(probs):
        return _cross_entropy_backward_kernel(probs, loss_scale)
    # loss = (1 / n_valid) * sum over valid rows of -log probs[row, target[row]], so
    # dlogits[row] = (probs[row] - onehot(target[row])) / n_valid, and 0 for ignored rows
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    scale = float(loss_scale) / n_valid  # a Python float: keeps float32 arrays float32
    row_scale = valid.astype(probs.dtype) * scale  # (N,) 0 for ignored rows
    dlogits = probs
    dlogits *= row_scale[:, None]
    rows = xp.nonzero(valid)[0]
    dlogits[rows, targets[rows]] -= scale
    return dlogits


# -----------------------------------------------------------------------------
# The transformer block: attention half, then MLP half, each with a residual add.


def attention_inputs_forward(params, config, layer, x, B, T, cos, sin):
    """The attention half's inputs from the residual stream x (N, C), N = B*T:
    a = rmsnorm(x) (N, C) and its rstd (N, 1); q (B, H, T, D) and k (B, KVH, T, D) projected
    from a and rotated by RoPE; v (B, KVH, T, D) projected (a strided view).
    block_forward and block_step_forward (decoding with a KV cache) share it."""
    p = f"model.layers.{layer}."
    H, KVH, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    a, rstd = rmsnorm_forward(x, params[p + "input_layernorm.weight"], config.rms_norm_eps)
    q = matmul(a, params[p + "self_attn.q_proj.weight"].T)  # (N, H*D)
    k = matmul(a, params[p + "self_attn.k_proj.weight"].T)  # (N, KVH*D)
    v = matmul(a, params[p + "self_attn.v_proj.weight"].T)  # (N, KVH*D)
    q = rope_forward(q.reshape(B, T, H, D).transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, D)
    k = rope_forward(k.reshape(B, T, KVH, D).transpose(0, 2, 1, 3), cos, sin)  # (B, KVH, T, D)
    v = v.reshape(B, T, KVH, D).transpose(0, 2, 1, 3)  # (B, KVH, T, D) view
    return a, rstd, q, k, v


def block_forward(params, config, layer, x, B, T, cos, sin):
    """One block on x (N, C), N = B*T. Returns (x_out (N, C), cache for block_backward)."""
    p = f"model.layers.{layer}."
    N, C = x.shape
    eps = config.rms_norm_eps
    # attention half: x_mid = x + o_proj(attention(rope(q), rope(k), v)) of rmsnorm(x)
    a, rstd_attn, q, k, v = attention_inputs_forward(params, config, layer, x, B, T, cos, sin)
    v = xp.ascontiguousarray(v)  # (B, KVH, T, D)
    att, lse = attention_forward(q, k, v)  # (B, H, T, D), (B, H, T)
    att = att.transpose(0, 2, 1, 3).reshape(N, C)  # heads side by side again (a copy)
    x_mid = x + matmul(att, params[p + "self_attn.o_proj.weight"].T)  # (N, C)
    # MLP half: x_out = x_mid + down_proj(silu(gate_proj(m)) * up_proj(m)), m = rmsnorm(x_mid)
    m, rstd_mlp = rmsnorm_forward(x_mid, params[p + "post_attention_layernorm.weight"], eps)
    gate = matmul(m, params[p + "mlp.gate_proj.weight"].T)  # (N, F)
    up = matmul(m, params[p + "mlp.up_proj.weight"].T)  # (N, F)
    sig = None if _use_kernels(gate) else _sigmoid(gate)  # (N, F) kept: the backward needs no exp
    h = swiglu_forward(gate, up, sig)  # (N, F)
    x_out = x_mid + matmul(h, params[p + "mlp.down_proj.weight"].T)  # (N, C)
    cache = dict(x=x, rstd_attn=rstd_attn, a=a, q=q, k=k, v=v, att=att, lse=lse,
                 x_mid=x_mid, rstd_mlp=rstd_mlp, m=m, gate=gate, up=up, sig=sig)
    return x_out, cache


def _add_grad(grads, name, grad):
    """Store a parameter's gradient: the first contribution is kept as is (nothing is ever
    zeroed), later ones (the next micro-batch, the second use of a tied weight) add in place."""
    if name in grads:
        grads[name] += grad
    else:
        grads[name] = grad


def block_backward(params, config, layer, dx_out, cache, cos, sin, grads):
    """Backward of block_forward: adds the block's weight gradients into grads, returns dx (N, C)."""
    p = f"model.layers.{layer}."
    c = cache
    B, H, T, D = c["q"].shape
    N, C = dx_out.shape
    KVH = config.num_key_value_heads
    # x_out = x_mid + h @ down_proj.T, h = swiglu(gate, up) (not kept: 2 passes to redo with sig)
    h = swiglu_forward(c["gate"], c["up"], c["sig"])  # (N, F)
    _add_grad(grads, p + "mlp.down_proj.weight", matmul(dx_out.T, h))  # (C, F)
    del h
    dh = matmul(dx_out, params[p + "mlp.down_proj.weight"])  # (N, F)
    # h = swiglu(gate, up)
    dgate, dup = swiglu_backward(dh, c["gate"], c["up"], c["sig"])
    # gate = m @ gate_proj.T ; up = m @ up_proj.T
    _add_grad(grads, p + "mlp.gate_proj.weight", matmul(dgate.T, c["m"]))  # (F, C)
    _add_grad(grads, p + "mlp.up_proj.weight", matmul(dup.T, c["m"]))  # (F, C)
    dm = matmul(dgate, params[p + "mlp.gate_proj.weight"])  # (N, C)
    dm += matmul(dup, params[p + "mlp.up_proj.weight"])
    # m = rmsnorm(x_mid), and x_mid also flows straight into x_out (the residual)
    dx_mid, dweight = rmsnorm_backward(dm, c["x_mid"], params[p + "post_attention_layernorm.weight"],
                                       c["rstd_mlp"])
    _add_grad(grads, p + "post_attention_layernorm.weight", dweight)
    dx_mid += dx_out
    # x_mid = x + att @ o_proj.T
    _add_grad(grads, p + "self_attn.o_proj.weight", matmul(dx_mid.T, c["att"]))  # (C, C)
    datt = matmul(dx_mid, params[p + "self_attn.o_proj.weight"])  # (N, C)
    # att = attention(q, k, v), merged from (B, H, T, D)
    datt = datt.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D) view
    att = c["att"].reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = attention_backward(datt, c["q"], c["k"], c["v"], att, c["lse"])
    # q = rope(q_proj(a)), k = rope(k_proj(a)), v = v_proj(a)
    dq = rope_backward(dq, cos, sin).transpose(0, 2, 1, 3).reshape(N, H * D)  # (N, C)
    dk = rope_backward(dk, cos, sin).transpose(0, 2, 1, 3).reshape(N, KVH * D)  # (N, KVH*D)
    dv = dv.transpose(0, 2, 1, 3).reshape(N, KVH * D)  # (N, KVH*D)
    _add_grad(grads, p + "self_attn.q_proj.weight", matmul(dq.T, c["a"]))
    _add_grad(grads, p + "self_attn.k_proj.weight", matmul(dk.T, c["a"]))
    _add_grad(grads, p + "self_attn.v_proj.weight", matmul(dv.T, c["a"]))
    da = matmul(dq, params[p + "self_attn.q_proj.weight"])  # (N, C)
    da += matmul(dk, params[p + "self_attn.k_proj.weight"])
    da += matmul(dv, params[p + "self_attn.v_proj.weight"])
    # a = rmsnorm(x), and x also flows straight into x_mid (the residual)
    dx, dweight = rmsnorm_backward(da, c["x"], params[p + "input_layernorm.weight"], c["rstd_attn"])
    _add_grad(grads, p + "input_layernorm.weight", dweight)
    dx += dx_mid
    return dx


# -----------------------------------------------------------------------------
# The whole model


def _check_tokens(name, ids):
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a (B, T) integer array, got shape {ids.shape} {ids.dtype}")


def forward(params, config, idx, targets=None):
    """Run the model on idx (B, T) token ids.

    Without targets: returns (logits (B, T, V) float32, None).
    With targets (B, T) (IGNORE_INDEX where no prediction counts): returns (mean loss as a
    Python float, cache) and the cache feeds `backward`.

    The cache holds what backward needs and nothing else:
      idx, targets (flattened), the RoPE cos/sin tables,
      per layer: x and x_mid (the residual stream entering each half), rstd_attn and rstd_mlp
        (the RMSNorm scales), a and m (the normalized inputs of the projections), q and k (after
        RoPE), v, att (attention output with heads merged, (N, C)), lse, gate, up, sig = sigmoid(gate)
        (None on the GPU kernel path; the SwiGLU output h is recomputed from these),
      x_final (the residual stream after the last block), rstd_final, xf (its normalized form),
      probs: the (N, V) softmax probabilities, in the logits' buffer (backward overwrites them).
    """
    idx = xp.asarray(idx)
    _check_tokens("idx", idx)
    B, T = idx.shape
    if T > config.max_position_embeddings:
        raise ValueError(f"sequence length {T} > max_position_embeddings {config.max_position_embeddings}")
    if int(idx.min()) < 0 or int(idx.max()) >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    wte = params["model.embed_tokens.weight"]  # (V, C), also the LM head
    N, C, V = B * T, config.hidden_size, config.vocab_size
    cos, sin = rope_tables(T, config.head_dim, config.rope_theta, wte.dtype)  # (T, D) each

    x = embedding_forward(wte, idx).reshape(N, C)  # (N, C)
    layer_caches = []
    for layer in range(config.num_hidden_layers):
        x, layer_cache = block_forward(params, config, layer, x, B, T, cos, sin)
        if targets is not None:
            layer_caches.append(layer_cache)
    xf, rstd_final = rmsnorm_forward(x, params["model.norm.weight"], config.rms_norm_eps)  # (N, C)
    logits = matmul(xf, wte.T)  # (N, V) the tied LM head
    if targets is None:
        return logits.reshape(B, T, V), None

    targets = xp.asarray(targets)
    _check_tokens("targets", targets)
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
    targets = targets.reshape(N)
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {V}) or equal IGNORE_INDEX ({IGNORE_INDEX})")
    loss, probs, _ = cross_entropy_forward(logits, targets)
    cache = dict(idx=idx, targets=targets, cos=cos, sin=sin, layers=layer_caches,
                 x_final=x, rstd_final=rstd_final, xf=xf, probs=probs)
    return loss, cache


def backward(params, config, cache, loss_scale=1.0, grads=None):
    """Gradients of loss_scale * loss for the forward that made `cache`.

    grads=None: returns a fresh dict, same names, shapes and dtype as params.
    grads given: ADDS into its arrays in place (gradient accumulation) and returns it.
    The cache is used up (its logits buffer becomes dlogits); call forward again for another pass.
    """
    if cache.get("probs") is None:
        raise ValueError("this cache was already used by backward(); run forward() again")
    fresh = grads is None
    if fresh:
        grads = {}
    wte = params["model.embed_tokens.weight"]
    cos, sin = cache["cos"], cache["sin"]

    # loss = cross_entropy(logits, targets)
    dlogits = cross_entropy_backward(cache.pop("probs"), cache["targets"], loss_scale)  # (N, V)
    # logits = xf @ wte.T (the tied LM head: wte's first gradient)
    _add_grad(grads, "model.embed_tokens.weight", matmul(dlogits.T, cache["xf"]))  # (V, C)
    dxf = matmul(dlogits, wte)  # (N, C)
    del dlogits
    # xf = rmsnorm(x_final)
    dx, dweight = rmsnorm_backward(dxf, cache["x_final"], params["model.norm.weight"],
                                   cache["rstd_final"])
    _add_grad(grads, "model.norm.weight", dweight)
    for layer in reversed(range(config.num_hidden_layers)):
        dx = block_backward(params, config, layer, dx, cache["layers"][layer], cos, sin, grads)
    # x = wte[idx] (wte's second gradient, added into the first)
    embedding_backward(grads["model.embed_tokens.weight"], dx, cache["idx"])

    if fresh:
        return {name: grads[name] for name in params}  # params' order
    return grads


# -----------------------------------------------------------------------------
# Data parallelism over the CPU's cores
#
# NumPy runs each elementwise operation (exp, the norms, the softmax, the residual adds) on one
# core; BLAS threads speed up only the matmuls. So on a CPU, train.py shares the rows of every
# micro-batch out over the cores instead: one shard of rows per worker thread, each running
# forward + backward of its shard with single-threaded BLAS. NumPy lets go of Python's GIL
# inside its loops and matmuls, so the workers really run at the same time. Each worker adds
# into its own gradients, and at the end of the step `gradients()` sums them: what data-parallel
# training on several GPUs does with an all-reduce. Measured on 2 cores: train.py's steps 4-12%
# faster than one thread with 2-thread BLAS.
# BLAS must be single-threaded for this, and OpenBLAS reads OPENBLAS_NUM_THREADS only when NumPy
# loads it, so train.py and bench.py set it to 1 before importing NumPy.


def cpu_workers():
    """Worker threads for DataParallel: one per core when NumPy's BLAS is single-threaded
    (OPENBLAS_NUM_THREADS=1, as train.py sets it); else 1 (BLAS threads use the cores); 1 on a GPU."""
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if BACKEND != "numpy" or blas_threads != "1":
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

    >>> config = get_config("tiny")
    >>> params = init_params(config)
    >>> idx = xp.zeros((4, 8), dtype=xp.int64)
    >>> workers = DataParallel(2)
    >>> loss = workers.forward_backward(params, config, idx, idx)   # rows 0-1 and 2-3 in two threads
    >>> grads = workers.gradients()                                  # their gradients, summed
    >>> round(loss, 4) == round(forward(params, config, idx, idx)[0], 4)
    True
    """

    def __init__(self, workers):
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.grads = [None] * workers  # each worker's gradient dict (None until its first shard)
        self.seconds = {"forward": 0.0, "backward": 0.0}  # summed over steps, averaged over shards

    def map(self, work, jobs):
        """work(*job) for every job: on the pool's threads, or in this thread with one worker."""
        if self.pool is None:
            return [work(*job) for job in jobs]
        return list(self.pool.map(lambda job: work(*job), jobs))

    def _shards(self, targets):
        """(worker, row slice, counted targets in it) for each shard with a target to count."""
        shards = []
        for worker, rows in enumerate(row_shards(targets.shape[0], self.workers)):
            n_valid = int((targets[rows] != IGNORE_INDEX).sum())
            if n_valid > 0:
                shards.append((worker, rows, n_valid))
        if not shards:
            raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
        return shards

    def loss(self, params, config, idx, targets):
        """The mean loss over the counted targets of idx, targets (B, T): forward only."""
        shards = self._shards(targets)
        n_valid = sum(count for _, _, count in shards)

        def work(worker, rows, count):
            return forward(params, config, idx[rows], targets[rows])[0] * count
        return sum(self.map(work, shards)) / n_valid

    def forward_backward(self, params, config, idx, targets, loss_scale=1.0):
        """Add the gradients of loss_scale * (mean loss over the micro-batch's counted targets)
        into the workers' gradients; return that mean loss. A shard's mean loss counts with
        weight (its counted targets) / (the micro-batch's), and so does its gradient."""
        shards = self._shards(targets)
        n_valid = sum(count for _, _, count in shards)

        def work(worker, rows, count):
            start = time.perf_counter()
            loss, cache = forward(params, config, idx[rows], targets[rows])
            forward_done = time.perf_counter()
            self.grads[worker] = backward(params, config, cache, loss_scale * count / n_valid,
                                          self.grads[worker])
            return loss * count, forward_done - start, time.perf_counter() - forward_done
        results = self.map(work, shards)
        self.seconds["forward"] += sum(seconds for _, seconds, _ in results) / len(results)
        self.seconds["backward"] += sum(seconds for _, _, seconds in results) / len(results)
        return sum(weighted for weighted, _, _ in results) / n_valid

    def gradients(self):
        """The sum of the workers' gradients since the last call (worker 0's dict, the others
        added in, parameters shared out over the threads); the workers start afresh after it."""
        grads = [g for g in self.grads if g is not None]
        self.grads = [None] * self.workers
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
# Sampling: generate text a token at a time, with a KV cache
#
# Generating n tokens with `forward` alone would push the whole, growing sequence through the
# model n times. But attention is causal: position t never looks at t + 1, so the keys and values
# of the positions already seen never change. Decoding keeps them in a KV cache, and each step
# runs only the NEW tokens through the model: their queries attend to the cached keys and values
# and to their own. This is inference only (no backward, nothing kept for one), so these
# functions come without a _backward partner; they reuse the training layers' forwards.
#
#   kv_cache_new     an empty cache: per layer, room for the keys and values of max_len positions
#   forward_step     logits of the new tokens, appending their keys and values to the cache
#   sampling_probs   logits -> the distribution to draw from (temperature, top-k, top-p)
#   sample_next      one token id drawn from it (the argmax at temperature 0)
#   generate         prompt ids -> new ids, until eos_id or max_new_tokens


def kv_cache_new(config, batch, max_len, dtype=np.float32):
    """An empty KV cache for `batch` sequences of up to max_len positions.

    Holds per layer k and v (B, KVH, max_len, D), filled up to `length` (0 so far), and the RoPE
    tables (max_len, D) for positions 0..max_len-1. Example (tiny, batch 1, max_len 100):
    cache["k"][0].shape == (1, 2, 100, 16), cache["length"] == 0.
    """
    if not 1 <= max_len <= config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} must lie in [1, max_position_embeddings "
                         f"{config.max_position_embeddings}]")
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)  # (B, KVH, max_len, D)
    cos, sin = rope_tables(max_len, config.head_dim, config.rope_theta, dtype)  # (max_len, D) each
    return dict(k=[xp.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)],
                v=[xp.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)],
                length=0, cos=cos, sin=sin)


def attention_cached_forward(q, k, v):
    """Causal attention of the LAST Tq positions of a sequence over all S positions so far.

    q (B, H, Tq, D): the queries of positions S-Tq .. S-1; k, v (B, KVH, S, D): the keys and
    values of positions 0 .. S-1 (the cache's filled part). Query t reads keys s <= S - Tq + t.
    Returns out (B, H, Tq, D); with Tq == S it is attention_forward's out (same grouping trick).
    """
    B, H, Tq, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    group = H // KVH
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B, KVH, group * Tq, D)  # the group's query heads stacked along the rows
    scores = qg @ k.transpose(0, 1, 3, 2)  # (B, KVH, group*Tq, S)
    scores *= scale
    t = xp.arange(group * Tq) % Tq + (S - Tq)  # (group*Tq,) each row's query position
    s = xp.arange(S)  # (S,) key positions
    scores += xp.where(s[None, :] > t[:, None], -xp.inf, 0.0).astype(scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ v).reshape(B, H, Tq, D)  # (B, KVH, group*Tq, D) -> (B, H, Tq, D)


def block_step_forward(params, config, layer, x, B, T, kv_cache, cos, sin):
    """block_forward for T new positions, x (N, C) with N = B*T: their keys and values go into
    the cache at positions length .. length+T-1, their queries read every cached position.
    cos, sin (T, D) are the new positions' RoPE rows. Returns x_out (N, C)."""
    p = f"model.layers.{layer}."
    N, C = x.shape
    eps = config.rms_norm_eps
    start, stop = kv_cache["length"], kv_cache["length"] + T
    # attention half: x_mid = x + o_proj(attention(rope(q), rope(k), v)) of rmsnorm(x)
    _, _, q, k, v = attention_inputs_forward(params, config, layer, x, B, T, cos, sin)
    kv_cache["k"][layer][:, :, start:stop] = k
    kv_cache["v"][layer][:, :, start:stop] = v
    att = attention_cached_forward(q, kv_cache["k"][layer][:, :, :stop],
                                   kv_cache["v"][layer][:, :, :stop])  # (B, H, T, D)
    att = att.transpose(0, 2, 1, 3).reshape(N, C)  # heads side by side again
    x_mid = x + matmul(att, params[p + "self_attn.o_proj.weight"].T)  # (N, C)
    # MLP half: x_out = x_mid + down_proj(silu(gate_proj(m)) * up_proj(m)), m = rmsnorm(x_mid)
    m, _ = rmsnorm_forward(x_mid, params[p + "post_attention_layernorm.weight"], eps)
    h = swiglu_forward(matmul(m, params[p + "mlp.gate_proj.weight"].T),
                       matmul(m, params[p + "mlp.up_proj.weight"].T))  # (N, F)
    return x_mid + matmul(h, params[p + "mlp.down_proj.weight"].T)  # (N, C)


def forward_step(params, config, idx_new, kv_cache):
    """Logits (B, T, V) of the T new tokens idx_new (B, T), given the cache of the earlier ones.

    The new tokens sit at positions length .. length+T-1; their keys and values are appended to
    the cache (length grows by T). Feeding a sequence in pieces gives the logits `forward` gives
    for the whole: e.g. forward_step(ids[:, :5]) then forward_step(ids[:, 5:6]) -> the logits of
    position 5 == forward(ids[:, :6])[0][:, 5].
    """
    idx_new = xp.asarray(idx_new)
    _check_tokens("idx_new", idx_new)
    B, T = idx_new.shape
    start, max_len = kv_cache["length"], kv_cache["k"][0].shape[2]
    if B != kv_cache["k"][0].shape[0]:
        raise ValueError(f"idx_new has {B} sequences, the cache was made for {kv_cache['k'][0].shape[0]}")
    if start + T > max_len:
        raise ValueError(f"{T} new tokens after {start} do not fit the cache's {max_len} positions")
    if int(idx_new.min()) < 0 or int(idx_new.max()) >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got "
                         f"[{int(idx_new.min())}, {int(idx_new.max())}]")
    wte = params["model.embed_tokens.weight"]  # (V, C), also the LM head
    cos, sin = kv_cache["cos"][start:start + T], kv_cache["sin"][start:start + T]  # (T, D)
    x = embedding_forward(wte, idx_new).reshape(B * T, config.hidden_size)  # (N, C)
    for layer in range(config.num_hidden_layers):
        x = block_step_forward(params, config, layer, x, B, T, kv_cache, cos, sin)
    kv_cache["length"] = start + T
    xf, _ = rmsnorm_forward(x, params["model.norm.weight"], config.rms_norm_eps)  # (N, C)
    logits = matmul(xf, wte.T)  # (N, V) the tied LM head
    return logits.reshape(B, T, config.vocab_size)


def _check_sampling(temperature, top_k, top_p):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (1: no limit), got {top_p!r}")


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution sample_next draws the next token from: a float64 (V,) host array.

    1. temperature: softmax(logits / temperature); below 1 it sharpens, above 1 it flattens.
       0 puts all the mass on the argmax (greedy decoding).
    2. top_k > 0: only the k most likely tokens keep their mass (ties: the lower id first).
    3. top_p < 1: then only the smallest set of most likely tokens whose mass reaches top_p
       (the "nucleus"). What is kept is renormalized to sum to 1.
    Example: logits [2, 1, 0] -> probs [0.665, 0.245, 0.090]; with top_k=2 -> [0.731, 0.269, 0];
    with top_p=0.5 -> [1, 0, 0]; with temperature 0 -> [1, 0, 0].
    """
    _check_sampling(temperature, top_k, top_p)
    logits = to_numpy(logits).astype(np.float64).reshape(-1)  # (V,)
    V = logits.size
    probs = np.zeros(V)
    if temperature == 0:
        probs[np.argmax(logits)] = 1.0  # argmax: the first (lowest id) of equal maxima
        return probs
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")  # token ids, most likely first
    if 0 < top_k < V:
        scaled[order[top_k:]] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        cumulative = np.cumsum(probs[order])  # mass of the 1, 2, 3, ... most likely tokens
        n_keep = min(int(np.searchsorted(cumulative, top_p)) + 1, V)  # first n reaching top_p
        probs[order[n_keep:]] = 0.0
        probs /= probs.sum()
    return probs


def sample_next(logits, temperature, top_k, top_p, rng):
    """One token id drawn from sampling_probs(logits, ...) with rng (a np.random.Generator).

    Temperature 0 returns the argmax and draws nothing from rng. One uniform number per
    draw, so the same seed gives the same ids.
    """
    probs = sampling_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return int(np.argmax(probs))
    cumulative = np.cumsum(probs)  # (V,)
    u = rng.random() * cumulative[-1]  # uniform in [0, total mass)
    # the token whose slice [cumulative[i-1], cumulative[i]) holds u; empty slices never do
    return int(min(np.searchsorted(cumulative, u, side="right"), probs.size - 1))


def generate(params, config, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, eos_id=None, on_token=None, vocab_size=None):
    """Continue prompt_ids (a list of ints) by up to max_new_tokens tokens; returns the new ids.

    Stops early when it draws eos_id (the end-of-text token; not returned, not passed on).
    on_token(id) is called with each new id as soon as it is drawn (sample.py prints with it).
    The draws come from np.random.default_rng(seed): same seed and settings -> same ids.
    vocab_size: draw only ids below it (a tokenizer smaller than the model's vocabulary cannot
    decode the others); default: all of config.vocab_size.
    A long prompt is cut from the LEFT so that prompt plus new tokens fit the context: the model
    sees the last max_position_embeddings - max_new_tokens prompt tokens.
    """
    prompt = [int(i) for i in prompt_ids]
    context = config.max_position_embeddings
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if not 0 <= max_new_tokens < context:
        raise ValueError(f"max_new_tokens must lie in [0, {context}) (max_position_embeddings "
                         f"{context}, and the prompt needs room), got {max_new_tokens}")
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if not 1 <= vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size must lie in [1, {config.vocab_size}], got {vocab_size}")
    _check_sampling(temperature, top_k, top_p)
    prompt = prompt[-(context - max_new_tokens):]  # cut from the left
    if max_new_tokens == 0:
        return []
    rng = np.random.default_rng(seed)
    dtype = params["model.embed_tokens.weight"].dtype
    cache = kv_cache_new(config, 1, len(prompt) + max_new_tokens, dtype)
    logits = forward_step(params, config, np.array([prompt]), cache)[0, -1]  # (V,) the last position's
    new_ids = []
    while True:
        next_id = sample_next(logits[:vocab_size], temperature, top_k, top_p, rng)
        if next_id == eos_id:
            break
        new_ids.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if len(new_ids) == max_new_tokens:
            break
        logits = forward_step(params, config, np.array([[next_id]]), cache)[0, 0]  # (V,)
    return new_ids


# -----------------------------------------------------------------------------
# GPU kernels: kernels.cu on the GPU, low-precision matmuls, loss scaling, step clocks
#
# On the CuPy backend the layers above hand their work to the hand-written CUDA kernels of
# kernels.cu. Each layer function that has a kernel starts with
#     if _use_kernels(its arrays): return launch_X(kernel_module(), xp, ...)
# and otherwise runs its NumPy/CuPy code, which stays THE reference: the tests check every
# kernel against it, and ALBOR_KERNELS=0 (or `albor.USE_KERNELS = False`) runs it on a GPU as
# well, so the two paths can be compared there. Layers with kernels: embedding_backward,
# rmsnorm_*, attention_*, swiglu_*, cross_entropy_* (one fused kernel) and AdamW.step; the
# matmuls are cuBLAS's (through CuPy, or `matmul` below for --dtype tf32/bf16/fp16) and RoPE
# stays in CuPy.
#
# kernels.cu is compiled once per process, on first use, by cupy.RawModule (NVRTC); CuPy keeps
# the compiled code in its on-disk kernel cache, so a later process only loads it. The launch_*
# functions take that module and xp as arguments: the tests hand them
# tests/kernel_emu.EmuModule (the same kernels.cu compiled for the CPU) and NumPy, which runs
# every launch, and the whole model through them, on a machine without a GPU.
#
# Determinism: the kernels use no atomics (each output is summed by one thread in a fixed
# order), cuBLAS gives the same bits for the same call on the same GPU, and CuPy's reductions
# and sorts are fixed trees. The one atomic-based op the reference path uses, xp.add.at in
# embedding_backward, has a kernel here (embedding_backward). So float32 training on the GPU
# gives the same checkpoint bytes run after run (tests/test_gpu_path.py checks it on a GPU).
#
# Host-device traffic in a training step on the GPU (read off the code, not yet profiled): up go
# the micro-batch's token ids and targets and the RoPE cos/sin tables (rope_tables builds them
# on the host, (T, D) each, every forward); down come Python numbers only where a Python value
# is needed: the loss (forward returns a float), the count of counted targets (the
# cross-entropy kernel's 1/n scale), the grad norm (clip_grad_norm: one sum over all
# parameters, one read), and forward's checks of the token ids' range (idx.min/max, targets).
# Nothing else waits for the GPU; train.py's step clock waits once, at the end of the step.


def _kernels_setting():
    """ALBOR_KERNELS: "1" (default) uses kernels.cu on a GPU, "0" runs the reference code there."""
    value = os.environ.get("ALBOR_KERNELS", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"ALBOR_KERNELS must be 0 (reference code) or 1 (kernels.cu), got {value!r}")
    return value == "1"


KERNELS_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
USE_KERNELS = _kernels_setting() and BACKEND == "cupy"  # read at call time: tests flip it
KERNEL_MODULE = None  # kernels.cu compiled (cupy.RawModule), made on first use; tests put the
                      # CPU emulator (tests/kernel_emu.EmuModule) here


def kernel_module():
    """kernels.cu as a module with get_function(name), compiled on the first call only."""
    global KERNEL_MODULE
    if KERNEL_MODULE is None:
        with open(KERNELS_CU, encoding="utf-8") as f:
            KERNEL_MODULE = xp.RawModule(code=f.read())
    return KERNEL_MODULE


def _use_kernels(*arrays):
    """Whether a layer runs its kernels.cu version: USE_KERNELS is on and every array is
    float32, the kernels' only dtype (float64 runs, like the gradient checks, take the
    reference code)."""
    return USE_KERNELS and all(a.dtype == np.float32 for a in arrays)


# kernels.cu's launch constants (tests/test_kernels.py checks them against its #defines)
ATTN_ROWS = 64           # query (or key) rows per attention block
ATTN_THREADS = 256       # threads per attention block: 4 per row
ATTN_MAX_HEAD_DIM = 128
WARP_ROWS_THREADS = 256  # rmsnorm / delta kernels: a warp per row, 8 rows per block
ELEMENTWISE_THREADS = 256
CE_THREADS = 256         # cross-entropy: one block per row
EMBEDDING_THREADS = 128  # embedding_backward: one block per vocabulary row


def _blocks(n, per_block):
    return max(1, math.ceil(n / per_block))


def _check_float32(**arrays):
    """Arrays a kernel reads or writes in place must be C-contiguous float32."""
    for name, a in arrays.items():
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 array, got {a.dtype} "
                             f"{'contiguous' if a.flags.c_contiguous else 'strided'}")


def attention_kernel_fits(head_dim):
    """The attention kernels hold a row's head dims in registers, 4 threads per row."""
    return head_dim % 4 == 0 and 4 <= head_dim <= ATTN_MAX_HEAD_DIM


def _kernel_attention_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention: q must be (B, H, T, D) and k, v (B, KVH, T, D), got "
                         f"{q.shape} and {k.shape}")
    B, H, T, D = q.shape
    KVH = k.shape[1]
    if KVH == 0 or H % KVH or k.shape != (B, KVH, T, D) or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not (B,H,T,D) "
                         "and (B,KVH,T,D) with H divisible by KVH")
    if not attention_kernel_fits(D):
        raise ValueError(f"attention kernels need a head dim that is a multiple of 4 and at most "
                         f"{ATTN_MAX_HEAD_DIM}, got {D}")
    return B, H, T, D, KVH


# Each launch_X(module, xp, ...) takes and returns arrays shaped like albor's X (named in its
# docstring), makes its inputs C-contiguous (a no-op for the model's arrays), allocates its
# outputs with xp and passes every scalar as np.int32 / np.float32: CuPy would pass a Python
# int as int64 and a float as double, which a kernel taking int / float misreads.


def launch_embedding_backward(module, xp, dwte, dout, idx):
    """embedding_backward: ADD the rows of dout (..., C) into dwte (V, C) at idx (...), in place.

    Sorts keys = token * N + position (int64) so that each token's positions lie together in
    increasing order; the kernel's block v sums token v's rows in that order (see kernels.cu).
    """
    _check_float32(dwte=dwte)
    V, C = dwte.shape
    dout = xp.ascontiguousarray(dout.reshape(-1, C), dtype=xp.float32)  # (N, C)
    N = dout.shape[0]
    keys = idx.reshape(-1).astype(xp.int64) * N + xp.arange(N, dtype=xp.int64)  # (N,)
    keys.sort()
    module.get_function("embedding_backward")(
        (V,), (EMBEDDING_THREADS,), (keys, dout, dwte, np.int32(N), np.int32(C)))


def launch_attention_forward(module, xp, q, k, v):
    """attention_forward: q (B,H,T,D), k, v (B,KVH,T,D) -> out (B,H,T,D), lse (B,H,T)."""
    B, H, T, D, KVH = _kernel_attention_shapes(q, k, v)
    q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
    _check_float32(q=q, k=k, v=v)
    out = xp.empty((B, H, T, D), dtype=xp.float32)
    lse = xp.empty((B, H, T), dtype=xp.float32)
    module.get_function("attention_forward")(
        (_blocks(T, ATTN_ROWS), B * H), (ATTN_THREADS,),
        (q, k, v, out, lse, np.int32(H), np.int32(KVH), np.int32(T), np.int32(D)))
    return out, lse


def launch_attention_backward(module, xp, dout, q, k, v, out, lse):
    """attention_backward: returns dq (B,H,T,D), dk, dv (B,KVH,T,D)."""
    B, H, T, D, KVH = _kernel_attention_shapes(q, k, v)
    dout, q, k, v, out, lse = (xp.ascontiguousarray(a) for a in (dout, q, k, v, out, lse))
    _check_float32(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, H, T):
        raise ValueError(f"attention_backward: dout {dout.shape}, out {out.shape} must be "
                         f"{q.shape} and lse {lse.shape} must be {(B, H, T)}")
    delta = xp.empty((B, H, T), dtype=xp.float32)
    rows = B * H * T
    module.get_function("attention_backward_preprocess")(
        (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
        (out, dout, delta, np.int32(rows), np.int32(D)))
    dq = xp.empty_like(q)
    dk = xp.empty_like(k)
    dv = xp.empty_like(v)
    sizes = (np.int32(H), np.int32(KVH), np.int32(T), np.int32(D))
    module.get_function("attention_backward_dkdv")(
        (_blocks(T, ATTN_ROWS), B * KVH), (ATTN_THREADS,),
        (q, k, v, dout, lse, delta, dk, dv) + sizes)
    module.get_function("attention_backward_dq")(
        (_blocks(T, ATTN_ROWS), B * H), (ATTN_THREADS,),
        (q, k, v, dout, lse, delta, dq) + sizes)
    return dq, dk, dv


def launch_rmsnorm_forward(module, xp, x, weight, eps):
    """rmsnorm_forward: x (..., C), weight (C,) -> out (..., C), rstd (..., 1)."""
    x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
    _check_float32(x=x, weight=weight)
    C = x.shape[-1]
    rows = x.size // C
    out = xp.empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=xp.float32)
    module.get_function("rmsnorm_forward")(
        (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
        (x, weight, out, rstd, np.int32(rows), np.int32(C), np.float32(eps)))
    return out, rstd


def launch_rmsnorm_backward(module, xp, dout, x, weight, rstd):
    """rmsnorm_backward: returns dx (..., C), dweight (C,)."""
    dout, x, weight, rstd = (xp.ascontiguousarray(a) for a in (dout, x, weight, rstd))
    _check_float32(dout=dout, x=x, weight=weight, rstd=rstd)
    C = x.shape[-1]
    rows = x.size // C
    dx = xp.empty_like(x)
    dweight = xp.empty((C,), dtype=xp.float32)
    module.get_function("rmsnorm_backward")(
        (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
        (dout, x, weight, rstd, dx, np.int32(rows), np.int32(C)))
    module.get_function("rmsnorm_backward_weight")(
        (_blocks(C, 32),), (32, 8), (dout, x, rstd, dweight, np.int32(rows), np.int32(C)))
    return dx, dweight


def launch_swiglu_forward(module, xp, gate, up):
    """swiglu_forward: h = silu(gate) * up, any matching shapes."""
    gate, up = xp.ascontiguousarray(gate), xp.ascontiguousarray(up)
    _check_float32(gate=gate, up=up)
    out = xp.empty_like(gate)
    module.get_function("swiglu_forward")(
        (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (gate, up, out, np.int32(gate.size)))
    return out


def launch_swiglu_backward(module, xp, dh, gate, up):
    """swiglu_backward: returns (dgate, dup)."""
    dh, gate, up = (xp.ascontiguousarray(a) for a in (dh, gate, up))
    _check_float32(dh=dh, gate=gate, up=up)
    dgate = xp.empty_like(gate)
    dup = xp.empty_like(up)
    module.get_function("swiglu_backward")(
        (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (dh, gate, up, dgate, dup, np.int32(gate.size)))
    return dgate, dup


def launch_cross_entropy_forward_backward(module, xp, logits, targets, loss_scale=1.0):
    """cross_entropy_forward then cross_entropy_backward, fused.

    logits (N, V) float32 is OVERWRITTEN with dlogits (the gradient of loss_scale * mean loss);
    targets (N,) int. Returns (mean loss over the counted rows as a Python float, dlogits,
    number of counted rows).
    """
    _check_float32(logits=logits)
    N, V = logits.shape
    targets = xp.ascontiguousarray(targets, dtype=xp.int32)
    n_valid = int((targets != IGNORE_INDEX).sum())
    if n_valid == 0:
        raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
    losses = xp.empty((N,), dtype=xp.float32)
    module.get_function("cross_entropy_forward_backward")(
        (N,), (CE_THREADS,),
        (logits, targets, losses, np.int32(V), np.float32(loss_scale / n_valid)))
    loss = float(losses.sum(dtype=xp.float64)) / n_valid
    return loss, logits, n_valid


def launch_adamw_update(module, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """One AdamW.step for one tensor, in place (t = the update number, from 1)."""
    _check_float32(param=param, grad=grad, m=m, v=v)
    module.get_function("adamw_update")(
        (_blocks(param.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (param, grad, m, v, np.int32(param.size), np.float32(lr), np.float32(beta1),
         np.float32(beta2), np.float32(eps), np.float32(weight_decay),
         np.float32(1.0 - beta1 ** t), np.float32(1.0 - beta2 ** t)))


# --- the cross-entropy pair on the kernel path ----------------------------------
# The kernel fuses forward and backward (one read of the (N, V) logits instead of several), so
# on this path cross_entropy_forward leaves in the logits' buffer not the probabilities but
# dlogits of the mean loss (loss_scale 1), and cross_entropy_backward only multiplies that by
# its loss_scale. Both branches test _use_kernels on the same buffer: switch USE_KERNELS
# between steps, not between a forward and its backward.


def _cross_entropy_forward_kernel(logits, targets):
    loss, dlogits, n_valid = launch_cross_entropy_forward_backward(kernel_module(), xp, logits,
                                                                   targets, 1.0)
    return loss, dlogits, n_valid


def _cross_entropy_backward_kernel(dlogits, loss_scale):
    if loss_scale != 1.0:
        dlogits *= np.float32(loss_scale)
    return dlogits


# --- low-precision matmuls: --dtype fp32 | tf32 | bf16 | fp16 -----------------------------
# The weights stay float32 (the "master" copy AdamW updates, with float32 m and v), and so do
# the activations and every layer outside the matmuls. Only the linear layers' products
# (`matmul` below) change: cuBLAS's GemmEx reads the float32 arrays, rounds the inputs to the
# chosen format INSIDE the product, multiplies on the tensor cores, and adds up and writes
# float32 (cublasComputeType_t CUBLAS_COMPUTE_32F_FAST_TF32 / _FAST_16BF / _FAST_16F; cuBLAS may
# also pick TF32 for the last two, "allows down-converting inputs to half or TF32"). No
# float16 copies of the weights are kept, nothing is cast by hand.
#   tf32  10-bit mantissa, float32's range       no loss scaling needed
#   bf16   7-bit mantissa, float32's range       no loss scaling needed
#   fp16  10-bit mantissa, range 6e-8 .. 65504   gradients underflow: LossScaler below
# What a CPU can and cannot check: tests/test_gpu_path.py checks the row-major -> column-major
# argument mapping of the GemmEx call on the CPU (a NumPy model of cuBLAS's GEMM), and that a
# CPU refuses anything but fp32. The call itself, its speed and its rounding are checked only on
# a GPU (the gpu-marked tests).

MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp16")
MATMUL_DTYPE = "fp32"  # set with set_matmul_dtype
_CUBLAS_COMPUTE_TYPES = {"tf32": 77, "bf16": 75, "fp16": 74}  # CUBLAS_COMPUTE_32F_FAST_TF32,
                                                              # _FAST_16BF, _FAST_16F (cublas_api.h)
_CUDA_R_32F = 0                          # cudaDataType_t of float32 (library_types.h)
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1        # cublasOperation_t
_CUBLAS_GEMM_DEFAULT = -1                # cublasGemmAlgo_t: let cuBLAS choose


def set_matmul_dtype(name):
    """Set the precision of the linear layers' matmuls for this process: "fp32" (the default,
    plain float32) or, on a GPU only, "tf32", "bf16" or "fp16"."""
    global MATMUL_DTYPE
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul dtype must be one of {', '.join(MATMUL_DTYPES)}, got {name!r}")
    if name != "fp32" and BACKEND != "cupy":
        raise ValueError(f"dtype {name} needs a GPU (the CuPy backend); on the CPU albor computes "
                         "in float32 only (use fp32)")
    MATMUL_DTYPE = name


def matmul(a, b):
    """a @ b for a linear layer: a (M, K), b (K, N) -> (M, N), in MATMUL_DTYPE's precision.

    fp32 (and anything that is not two float32 matrices): exactly `a @ b`. Otherwise one
    cublasGemmEx call on the float32 arrays (see above); a weight's transposed view w.T is
    read in place, as `@` does.
    """
    if (MATMUL_DTYPE == "fp32" or a.ndim != 2 or b.ndim != 2 or a.dtype != np.float32
            or b.dtype != np.float32 or a.size == 0 or b.size == 0):
        return a @ b
    from cupy.cuda import device  # the GPU path only
    from cupy_backends.cuda.libs import cublas
    out = xp.empty((a.shape[0], b.shape[1]), dtype=xp.float32)
    plan = _gemm_plan(a, b)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)  # host alpha and beta
    cublas.gemmEx(device.get_cublas_handle(), plan["op_b"], plan["op_a"], plan["m"], plan["n"],
                  plan["k"], one.ctypes.data, plan["b"].data.ptr, _CUDA_R_32F, plan["ld_b"],
                  plan["a"].data.ptr, _CUDA_R_32F, plan["ld_a"], zero.ctypes.data, out.data.ptr,
                  _CUDA_R_32F, plan["ld_out"], _CUBLAS_COMPUTE_TYPES[MATMUL_DTYPE],
                  _CUBLAS_GEMM_DEFAULT)
    return out


def _cublas_operand(x):
    """(array, op, leading dimension) that hands the row-major matrix x (R, S) to column-major
    cuBLAS as x^T (S, R). C-contiguous x: its memory read column-major IS x^T (S rows, ld S),
    op N. F-contiguous x (a transposed view like w.T): its memory read column-major is x
    (R rows, ld R), op T. Anything else is copied to C order first."""
    if x.flags.c_contiguous:
        return x, _CUBLAS_OP_N, x.shape[1]
    if x.flags.f_contiguous:
        return x, _CUBLAS_OP_T, x.shape[0]
    x = xp.ascontiguousarray(x)
    return x, _CUBLAS_OP_N, x.shape[1]


def _gemm_plan(a, b):
    """The cublasGemmEx arguments for out (M, N) = a (M, K) @ b (K, N), all row-major.

    cuBLAS is column-major: the row-major out is, read column-major, out^T (N, M). So ask it
    for out^T = b^T @ a^T: first operand b^T (m = N rows, k = K), second a^T (k = K, n = M),
    result leading dimension N.
    Example: a (2, 3) C-contiguous, b = w.T with w (4, 3) C-contiguous: m=4, n=2, k=3;
    b^T = w is w's memory with op T, ld 3; a^T is a's memory with op N, ld 3; ld_out 4.
    """
    M, K = a.shape
    N = b.shape[1]
    b, op_b, ld_b = _cublas_operand(b)
    a, op_a, ld_a = _cublas_operand(a)
    return dict(m=N, n=M, k=K, a=a, op_a=op_a, ld_a=ld_a, b=b, op_b=op_b, ld_b=ld_b, ld_out=N)


# --- dynamic loss scaling (fp16) -------------------------------------------------


class LossScaler:
    """Dynamic loss scaling for float16 matmuls (train.py --dtype fp16). Backend-free.

    float16 holds magnitudes from 6e-8 to 65504, and many gradients are smaller than 6e-8:
    rounded to float16 on their way into a matmul, they would become 0. So the backward is
    run on scale * loss (backward's loss_scale): every gradient is `scale` times larger, clear
    of underflow. Before clipping and the optimizer step they are divided by the scale again
    (`unscale`: the scale is a power of two, so that is exact). Too large a scale overflows:
    some gradient becomes inf or NaN. Then the step is skipped (weights and optimizer state
    stay as they were) and the scale is multiplied by `backoff`; after `growth_interval`
    steps in a row without overflow it is multiplied by `growth`, probing again for the
    largest scale that works.

    Overflow is read off the global gradient norm: the norm of a set of gradients is finite
    exactly when every gradient is, so the one number the step fetches anyway decides.

    >>> scaler = LossScaler(scale=8.0, growth_interval=2)
    >>> scaler.update(grads_finite=False), scaler.scale   # overflow: skip the step, halve
    (False, 4.0)
    >>> scaler.update(True), scaler.update(True), scaler.scale   # 2 good steps: double
    (True, True, 8.0)
    """

    def __init__(self, scale=2.0 ** 16, growth_interval=2000, backoff=0.5, growth=2.0,
                 min_scale=1.0):
        if not (scale > 0 and math.log2(scale).is_integer()):
            raise ValueError(f"loss scale must be a power of two, got {scale}")
        if not (growth_interval >= 1 and 0 < backoff < 1 and growth > 1):
            raise ValueError("LossScaler needs growth_interval >= 1, 0 < backoff < 1, growth > 1")
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.backoff = float(backoff)
        self.growth = float(growth)
        self.min_scale = float(min_scale)
        self.good_steps = 0     # steps in a row without overflow
        self.skipped = 0        # steps skipped so far

    def unscale(self, grads):
        """Divide every gradient by the scale, in place (inf and NaN stay inf and NaN)."""
        inverse = 1.0 / self.scale
        for g in grads.values():
            g *= inverse

    def update(self, grads_finite):
        """Adjust the scale after a step's gradients were computed; True: take the step."""
        if not grads_finite:
            if self.scale <= self.min_scale:
                raise FloatingPointError(f"gradients overflow even at loss scale {self.scale:g}: "
                                         "the model itself diverges, not the float16 range")
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0
        return True

    def step(self, optimizer, params, grads, lr, max_norm):
        """train.py's update with scaled gradients: unscale, clip the global norm, and take the
        optimizer step unless a gradient overflowed. Returns (grad norm, whether it stepped)."""
        self.unscale(grads)
        norm = clip_grad_norm(grads, max_norm)
        stepped = self.update(math.isfinite(norm))
        if stepped:
            optimizer.step(params, grads, lr)
        return norm, stepped

    def state(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])


# --- timing a step's phases without stopping the GPU ----------------------------


class PhaseClock:
    """Seconds per phase of a step (forward, backward, optimizer, ...), summed over steps.

    On the GPU work is queued and runs later, so a host clock read between phases measures
    the queueing unless it waits for the GPU, and waiting at every phase costs time. Here
    `mark(phase)` records a CUDA event on the stream (cupy.cuda.Event: the GPU timestamps it
    when it gets there), and `collect()` waits once, for the last event, and adds up the GPU
    time between consecutive events. On NumPy a mark simply reads time.perf_counter.

    >>> clock = PhaseClock(); clock.start(); clock.mark("forward"); clock.mark("backward")
    >>> sorted(clock.collect())
    ['backward', 'forward']
    """

    def __init__(self):
        self.seconds = {}
        self._marks = []   # (phase, event or time) since start()

    def _now(self):
        if BACKEND == "cupy":
            event = xp.cuda.Event()
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        self._marks = [(None, self._now())]

    def mark(self, phase):
        """The phase that began at the previous mark (or start) ends now."""
        self._marks.append((phase, self._now()))

    def collect(self):
        """Wait for the last mark, add each phase's time into self.seconds; returns this
        step's {phase: seconds}."""
        step = {}
        if BACKEND == "cupy":
            self._marks[-1][1].synchronize()
        for (_, before), (phase, after) in zip(self._marks, self._marks[1:]):
            if BACKEND == "cupy":
                elapsed = xp.cuda.get_elapsed_time(before, after) / 1000.0  # ms -> s
            else:
                elapsed = after - before
            step[phase] = step.get(phase, 0.0) + elapsed
        for phase, elapsed in step.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        self._marks = []
        return step


# -----------------------------------------------------------------------------
# Optimization: AdamW, learning-rate schedule, gradient clipping, checkpoints
#
# Everything train.py needs to update the weights and to save and load them.
# The optimizer state lives next to the parameters (same names, float32, on the
# same backend), so saving a checkpoint is writing three dicts of arrays.


def is_decayed(name, shape):
    """Whether weight decay applies to the parameter `name` of this shape.

    Decay pulls weights towards zero. That suits the matrices (they carry the
    model's capacity), not the RMSNorm gains: those are 1-D scales whose
    resting value is 1, and pulling them to 0 would switch features off.
    The rule is the one nanoGPT uses: decay every tensor with 2 or more dims.

    The tied embedding / LM head (V, C) is decayed too. It is a matrix, it is
    the largest one in the model (16.8M of albor-base-50m's 62.4M parameters),
    and as the LM head it works like any output projection; leaving it
    undecayed would leave a quarter of the model unregularized. (Rows of
    tokens that never occur only shrink, which is what decay should do.)

    >>> is_decayed("model.layers.0.mlp.up_proj.weight", (2048, 512))
    True
    >>> is_decayed("model.norm.weight", (512,))
    False
    """
    return len(shape) >= 2


# The CPU optimizer code below goes through each array a block of rows at a time, about
# BLOCK_NUMBERS numbers (1 MiB of float32): a block's dozen passes then run in the CPU's cache
# instead of each streaming a whole array (the embedding and its AdamW state are 67 MB each)
# through memory. That makes AdamW 1.7x and the gradient norm 1.3x faster for albor-base-50m.
BLOCK_NUMBERS = 1 << 18
OPTIMIZER_THREADS = 2   # threads AdamW.step shares the blocks out to (2: 1.3x faster on 2 cores)


def row_blocks(a):
    """Slices of a's first axis, each about BLOCK_NUMBERS numbers (at least one row): a[block] is
    a view, so in-place updates of it land in a. Example: a (2048, 512) -> 4 slices of 512 rows."""
    rows = max(1, BLOCK_NUMBERS // (a.size // a.shape[0]))
    return [slice(start, start + rows) for start in range(0, a.shape[0], rows)]


class AdamW:
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

    For each parameter p with gradient g, at update number t = 1, 2, ...:

        p = p - lr * weight_decay * p             (decoupled decay, matrices only)
        m = beta1 * m + (1 - beta1) * g           (first moment: running mean)
        v = beta2 * v + (1 - beta2) * g * g       (second moment: running mean of g^2)
        m_hat = m / (1 - beta1 ** t)              (bias correction: m and v start at 0,
        v_hat = v / (1 - beta2 ** t)               so early averages are too small)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    "Decoupled" means the decay is applied to the weights directly, not added
    to the gradient (which Adam would then rescale per coordinate).

    State: `m` and `v`, float32 arrays keyed by parameter name, and the update
    count `t`. The learning rate is not state: train.py passes each update's
    value (from `lr_at`) to `step`.

    >>> params = {"w": xp.ones((1, 2), dtype=xp.float32)}
    >>> opt = AdamW(params, weight_decay=0.0)
    >>> opt.step(params, {"w": xp.asarray([[0.5, -2.0]], dtype=xp.float32)}, lr=0.1)
    >>> [round(float(x), 4) for x in to_numpy(params["w"])[0]]   # first step moves lr * sign(g)
    [0.9, 1.1]
    """

    def __init__(self, params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got ({beta1}, {beta2})")
        if not eps > 0.0:
            raise ValueError(f"AdamW eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW weight_decay must be >= 0, got {weight_decay}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0                                                       # updates done so far
        self.m = {name: xp.zeros_like(p) for name, p in params.items()}  # first moments
        self.v = {name: xp.zeros_like(p) for name, p in params.items()}  # second moments
        largest_block = max(p[block].size for p in params.values() for block in row_blocks(p))
        self._scratch = [xp.empty(largest_block, dtype=xp.float32)      # a work buffer per thread
                         for _ in range(OPTIMIZER_THREADS)]

    def step(self, params, grads, lr):
        """Update every parameter in place with its gradient, at learning rate lr."""
        self.t += 1
        # Python floats throughout: a NumPy float64 scalar would turn the
        # float32 arithmetic below into float64 (and slow it down).
        lr = float(lr)
        bias_correction1 = 1.0 - self.beta1 ** self.t
        bias_correction2 = 1.0 - self.beta2 ** self.t
        # lr * m_hat / (sqrt(v_hat) + eps) = step_size * m / (sqrt(v) + eps_scaled), with
        # m_hat = m / bc1, v_hat = v / bc2, step_size = lr * sqrt(bc2) / bc1, eps_scaled = eps * sqrt(bc2)
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        eps_scaled = self.eps * math.sqrt(bias_correction2)
        blocks = []   # (p, g, m, v, lr * decay) of each block of rows the CPU updates
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            decay = self.weight_decay if is_decayed(name, p.shape) else 0.0
            if _use_kernels(p, g, m, v):                  # GPU: kernels.cu's fused update
                launch_adamw_update(kernel_module(), p, g, m, v, lr, self.beta1, self.beta2,
                                    self.eps, decay, self.t)
                continue
            blocks += [(p[b], g[b], m[b], v[b], lr * decay) for b in row_blocks(p)]  # views

        def update_blocks(share, scratch):
            for p, g, m, v, lr_decay in share:
                self._update(p, g, m, v, scratch[:p.size].reshape(p.shape), lr_decay, step_size,
                             eps_scaled)
        # NumPy runs an elementwise op on one core, but lets other Python threads run meanwhile:
        # OPTIMIZER_THREADS threads, each with its own scratch buffer, share out the blocks
        # (list() waits for them and re-raises an error one of them hit).
        shares = [blocks[i::OPTIMIZER_THREADS] for i in range(OPTIMIZER_THREADS)]
        with ThreadPoolExecutor(OPTIMIZER_THREADS) as pool:
            list(pool.map(update_blocks, shares, self._scratch))

    def _update(self, p, g, m, v, scratch, lr_decay, step_size, eps_scaled):
        """One block's update, in place: 13 passes, no temporary arrays."""
        if lr_decay > 0.0:
            p *= 1.0 - lr_decay                           # p = p - lr * wd * p
        m *= self.beta1                                   # m = beta1 * m + (1 - beta1) * g
        xp.multiply(g, 1.0 - self.beta1, out=scratch)
        m += scratch
        xp.multiply(g, g, out=scratch)                    # v = beta2 * v + (1 - beta2) * g^2
        scratch *= 1.0 - self.beta2
        v *= self.beta2
        v += scratch
        xp.sqrt(v, out=scratch)                           # scratch = sqrt(v) + eps_scaled
        scratch += eps_scaled
        xp.divide(m, scratch, out=scratch)                # scratch = m / (sqrt(v) + eps_scaled)
        scratch *= step_size                              # p = p - lr * m_hat / (sqrt(v_hat) + eps)
        p -= scratch

    def hyperparameters(self):
        return {"betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "t": self.t}

    def state_tensors(self):
        """The state as one flat dict of arrays: "m.<param name>" and "v.<param name>"."""
        tensors = {}
        for name in self.m:
            tensors["m." + name] = self.m[name]
            tensors["v." + name] = self.v[name]
        return tensors


def lr_at(step, max_steps, lr, warmup, min_lr):
    """Learning rate for update number `step` (1-based) of a `max_steps` run.

    Linear warmup over the first `warmup` updates, then a cosine decay from
    `lr` down to the floor `min_lr`, reached at the last update:

        step <= warmup:  lr * step / (warmup + 1)             (never 0, never a wasted step)
        step >  warmup:  min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2,
                         progress = (step - warmup - 1) / (max_steps - warmup - 1)

    Past max_steps the rate stays at min_lr. With warmup 0 the first update
    uses the full lr.

    >>> [round(lr_at(s, 10, 1.0, 3, 0.1), 4) for s in range(1, 11)]
    [0.25, 0.5, 0.75, 1.0, 0.9397, 0.775, 0.55, 0.325, 0.1603, 0.1]
    """
    if step <= warmup:
        return lr * step / (warmup + 1)
    if step > max_steps:
        return min_lr
    decay_steps = max_steps - warmup - 1
    if decay_steps == 0:                                           # a single step after warmup
        return lr
    progress = (step - warmup - 1) / decay_steps                  # 0 at the peak, 1 at the end
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(max_steps):
    """Warmup used when none is asked for: 10% of the run, at most 100 updates.

    The model card used 500 warmup steps, which on its 31-step run meant the
    learning rate never got above 6% of its peak. 10% of the run gives a short
    run (31 updates -> 3 of warmup) a real schedule, and 100 updates is plenty
    for Adam's second-moment estimates to settle on a long run.

    >>> default_warmup(31), default_warmup(500), default_warmup(100_000)
    (3, 50, 100)
    """
    return min(100, max_steps // 10)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    The global norm is sqrt(sum over every parameter of sum(g * g)). One float32 sum over
    62M squares would lose digits (relative error about 1e-3), so on the CPU each cache-sized
    block is one BLAS dot product g . g (float32 over its 262K numbers: error about 1e-7) and
    the blocks add up in float64; on the GPU one float64 sum per parameter. When it
    exceeds max_norm every gradient is multiplied by max_norm / (norm + 1e-6),
    which keeps the direction of the step and bounds its size. max_norm <= 0
    (or None) turns clipping off. Non-finite norms are left alone (the caller
    stops the run). Returns the norm before clipping, as a Python float.

    >>> g = {"a": xp.asarray([3.0, 0.0], dtype=xp.float32), "b": xp.asarray([4.0], dtype=xp.float32)}
    >>> clip_grad_norm(g, 1.0)
    5.0
    >>> [round(float(x), 4) for x in to_numpy(g["a"])], round(float(g["b"][0]), 4)
    ([0.6, 0.0], 0.8)
    """
    sum_of_squares = 0.0   # an xp scalar on a GPU: it stays there until the one float() below
    for g in grads.values():
        if BACKEND == "numpy":
            for block in row_blocks(g):
                sum_of_squares += float(np.vdot(g[block], g[block]))  # a Python float (float64)
        else:
            sum_of_squares = sum_of_squares + xp.sum(xp.square(g), dtype=xp.float64)
    norm = math.sqrt(float(sum_of_squares))
    if max_norm is not None and max_norm > 0.0 and math.isfinite(norm) and norm > max_norm:
        scale = float(max_norm) / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


# --- Checkpoints ---------------------------------------------------------------
#
# A checkpoint folder that Hugging Face `transformers` opens as LlamaForCausalLM:
#   model.safetensors      fp32 weights, HF names and layouts, no lm_head.weight (tied)
#   config.json            HF LlamaConfig fields
#   optimizer.safetensors  AdamW's m and v ("m.<name>", "v.<name>"), its settings in the metadata
# train.py adds tokenizer.json, trainer_state.json and final_model.json.
#
# Writes are atomic: every file is written to a hidden temporary name in the
# same folder, flushed to disk, and only then renamed over the old one
# (os.replace is atomic on POSIX and Windows). A crash mid-save leaves the
# previous files intact. The model and optimizer files both record the step
# they belong to, and loading checks that they agree.

CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def config_to_hf(config):
    """The config.json dict Hugging Face's LlamaConfig reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 256,
        "eos_token_id": 256,
        "pad_token_id": 257,
        "torch_dtype": "float32",
    }


def config_from_hf(hf, source="config.json"):
    """A Config from a config.json dict; a CheckpointError naming `source` if it is not one albor can run."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, albor reads only 'llama'")
    for key, wanted in (("tie_word_embeddings", True), ("hidden_act", "silu"),
                        ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != wanted:
            raise CheckpointError(f"{source}: {key} is {hf[key]!r}, albor needs {wanted!r}")
    if hf.get("rope_scaling") is not None:
        raise CheckpointError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported")
    values = {}
    for field in dataclasses.fields(Config):
        if field.name not in hf:
            raise CheckpointError(f"{source}: missing the field {field.name!r}")
        kind = float if field.type in (float, "float") else int
        value = hf[field.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise CheckpointError(f"{source}: {field.name} must be a {kind.__name__}, got {value!r}")
        values[field.name] = kind(value)
    config = Config(**values)
    if "head_dim" in hf and hf["head_dim"] != config.head_dim:
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                              f"= {config.head_dim}")
    return config


def atomic_write_bytes(path, data):
    """Write bytes to path atomically: a temporary file in the same folder, fsync, rename."""
    path = os.fspath(path)
    tmp = _temporary_name(path)
    try:
        _write_bytes(tmp, data)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _temporary_name(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _write_safetensors(tmp, tensors, metadata):
    """Write float32 tensors to the file tmp in the safetensors format, and flush it to disk.

    The format is simple enough to write by hand (and so the bytes are the same on every run,
    which the library, storing the metadata in a hash map, does not promise):
        8 bytes   N, the header's length, little-endian
        N bytes   JSON: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
                  "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
        the raw little-endian data of each tensor, back to back, at those offsets
    """
    host = {name: np.ascontiguousarray(to_numpy(a), dtype="<f4") for name, a in tensors.items()}
    header = {"__metadata__": {key: str(value) for key, value in metadata.items()}}
    offset = 0
    for name, a in host.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(tmp, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for a in host.values():
            f.write(a.data)
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(tmp, data):
    """Write bytes to the file tmp and flush it to disk."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder, config, params, optimizer=None, step=0, extra_files=None):
    """Save the model (and the optimizer state, and any extra files) into folder, atomically.

    extra_files: {file name: bytes} written in the same go (train.py's
    tokenizer.json, trainer_state.json, ...). All files are staged under
    temporary names first and renamed into place only when all are on disk.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    shapes = param_shapes(config)
    if set(params) != set(shapes):
        raise CheckpointError(f"{folder}: params do not match the config's parameter names")
    model_metadata = {"format": "pt", "step": step}   # transformers expects "format": "pt"
    files = [(CHECKPOINT_MODEL, _write_safetensors, (params, model_metadata)),
             (CHECKPOINT_CONFIG, _write_bytes, ((json.dumps(config_to_hf(config), indent=2) + "\n").encode(),))]
    if optimizer is not None:
        metadata = {"step": step, "hyperparameters": json.dumps(optimizer.hyperparameters())}
        files.append((CHECKPOINT_OPTIMIZER, _write_safetensors, (optimizer.state_tensors(), metadata)))
    for name, data in (extra_files or {}).items():
        files.append((name, _write_bytes, (data,)))
    staged = []   # (temporary path, final path)
    try:
        for name, write, args in files:
            path = os.path.join(folder, name)
            staged.append((_temporary_name(path), path))
            write(staged[-1][0], *args)
    except BaseException:            # a crash or Ctrl-C mid-save: drop the staged files, keep the old ones
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):   # make the renames themselves durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_safetensors(path, expected_shapes=None):
    """Load a .safetensors file as ({name: np.ndarray}, metadata), checking it first.

    Raises a one-line CheckpointError naming the file for a missing, truncated
    or corrupt file, and, given expected_shapes ({name: shape}), for missing,
    unexpected, wrongly shaped or non-float32 tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    # Layout: 8-byte little-endian header length N, N bytes of JSON header, then the raw data.
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                  f"(header says {header_len} header bytes, file has {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = max([entry["data_offsets"][1] for name, entry in header.items()
                    if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry] or [0])
    if 8 + header_len + data_len != size:
        raise CheckpointError(f"{path}: truncated or padded: the header describes "
                              f"{8 + header_len + data_len} bytes, the file has {size}")
    try:
        tensors = _safetensors_load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt safetensors file ({message})") from None
    metadata = header.get("__metadata__") or {}
    if expected_shapes is not None:
        missing = [name for name in expected_shapes if name not in tensors]
        if missing:
            raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r}")
        extra = [name for name in tensors if name not in expected_shapes]
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all)")
        for name, shape in expected_shapes.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the config needs {tuple(shape)}")
            if tensors[name].dtype != np.float32:
                raise CheckpointError(f"{path}: {name} is {tensors[name].dtype}, expected float32")
    return tensors, metadata


def load_config(folder):
    """The Config of a checkpoint folder, from its config.json."""
    path = os.path.join(os.fspath(folder), CHECKPOINT_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (is {os.fspath(folder)!r} a checkpoint folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(hf, source=path)


def load_checkpoint(folder):
    """Load (config, params, step) from a checkpoint folder; params are float32 arrays on xp."""
    config = load_config(folder)
    path = os.path.join(os.fspath(folder), CHECKPOINT_MODEL)
    tensors, metadata = read_safetensors(path, param_shapes(config))
    params = {name: xp.asarray(tensors[name]) for name in param_shapes(config)}   # data-flow order
    return config, params, int(metadata.get("step", 0))


def load_optimizer(folder, params, step=None):
    """An AdamW restored from folder's optimizer.safetensors, for these params.

    Given step (the model file's step), checks the optimizer state belongs to it.
    """
    path = os.path.join(os.fspath(folder), CHECKPOINT_OPTIMIZER)
    shapes = {}
    for name, p in params.items():
        shapes["m." + name] = p.shape
        shapes["v." + name] = p.shape
    tensors, metadata = read_safetensors(path, shapes)
    if step is not None and int(metadata.get("step", -1)) != step:
        raise CheckpointError(f"{path}: saved at step {metadata.get('step')}, but the model file is "
                              f"at step {step} (an interrupted save?)")
    try:
        hyper = json.loads(metadata["hyperparameters"])
        optimizer = AdamW(params, betas=tuple(hyper["betas"]), eps=hyper["eps"],
                          weight_decay=hyper["weight_decay"])
        optimizer.t = int(hyper["t"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: missing or corrupt optimizer settings in the metadata") from None
    for name in params:
        optimizer.m[name] = xp.asarray(tensors["m." + name])
        optimizer.v[name] = xp.asarray(tensors["v." + name])
    return optimizer
