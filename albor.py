"""albor: a LLaMA-style language model with its forward and backward passes written by hand.

The model and its training math in one file, read top to bottom in the order the data flows:

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

In this file's order: configuration, parameters, the layers, the block, the whole model's
forward and backward, the optimizer (AdamW, the learning-rate schedule, gradient clipping),
and decoding with a KV cache. What exists only for a device or for speed lives beside it:
gpu.py (kernels.cu, cuBLAS precision, loss scaling), cpu.py (worker threads, a blocked
AdamW), and checkpoint.py (saving and loading); sample.py draws tokens from the logits.
"""
import math
from dataclasses import dataclass

import numpy as np

import gpu

# Arrays live in `xp`: CuPy when a CUDA GPU is usable, NumPy otherwise (gpu.py picks it;
# ALBOR_DEVICE=cpu forces NumPy). to_numpy(a) is a host copy of an array of either.
xp, BACKEND, to_numpy = gpu.xp, gpu.BACKEND, gpu.to_numpy

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
    # a model that learns to write Python in minutes on a 2-core laptop CPU, with its own 4,096-token
    # tokenizer (train.py's PRESET_SETTINGS hold its training settings; README: the workshop run)
    "workshop": Config(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=352, max_position_embeddings=256),
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
# F MLP width, V vocabulary, N = B*T rows.
#
# A layer that has a CUDA kernel in kernels.cu starts with one branch to it, taken on a GPU
# (gpu.py); the code below that branch is the reference the kernel is tested against.

# --- linear layers -----------------------------------------------------------


def matmul(x, w_t):
    """x (N, K) @ w_t (K, M) -> (N, M), the product of every linear layer `x @ w.T`.

    Weights are stored (out, in) as in Hugging Face, so a layer is matmul(x, w.T); w.T is a
    strided view that BLAS reads transposed, nothing is copied. With --dtype tf32/bf16/fp16
    the product runs at that precision (gpu.py: half operands, float32 sums and result; cuBLAS
    on a GPU, an emulation on a CPU).
    """
    if gpu.low_precision(x, w_t):  # --dtype other than fp32: mixed precision
        return gpu.matmul(x, w_t)
    return x @ w_t


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
    if gpu.kernels_on(dwte, dout):  # kernels.cu on a GPU
        return gpu.kernels().embedding_backward(dwte, dout, idx)
    # out = wte[idx]
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))


# --- RMSNorm -----------------------------------------------------------------


def rmsnorm_forward(x, weight, eps):
    """out = x / sqrt(mean(x**2) + eps) * weight over the last axis. x (..., C), weight (C,).

    Returns (out, rstd) with rstd (..., 1) = 1 / sqrt(mean(x**2) + eps), which backward needs.
    """
    if gpu.kernels_on(x, weight):  # kernels.cu on a GPU
        return gpu.kernels().rmsnorm_forward(x, weight, eps)
    C = x.shape[-1]
    mean_square = xp.einsum("...c,...c->...", x, x)[..., None] / C  # (..., 1) one pass, no x*x
    rstd = 1.0 / xp.sqrt(mean_square + eps)  # (..., 1)
    out = x * rstd  # (..., C) the normalized x, "xhat"
    out *= weight
    return out, rstd


def rmsnorm_backward(dout, x, weight, rstd):
    """Gradients of out = (x * rstd) * weight: returns (dx (..., C), dweight (C,))."""
    if gpu.kernels_on(dout, x, weight, rstd):  # kernels.cu on a GPU
        return gpu.kernels().rmsnorm_backward(dout, x, weight, rstd)
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


def _causal_mask_bias(T, group, dtype):
    """(group*T, T): 0 where key position s <= query position t = row % T, -inf after it."""
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
    if gpu.kernels_on(q, k, v) and gpu.attention_kernel_fits(q.shape[-1]):  # kernels.cu
        return gpu.kernels().attention_forward(q, k, v)
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
    if gpu.kernels_on(dout, q, k, v, out, lse) and gpu.attention_kernel_fits(q.shape[-1]):
        return gpu.kernels().attention_backward(dout, q, k, v, out, lse)
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
    if gpu.kernels_on(gate, up):  # kernels.cu on a GPU
        return gpu.kernels().swiglu_forward(gate, up)
    if sig is None:
        sig = _sigmoid(gate)
    h = gate * sig
    h *= up
    return h


def swiglu_backward(dh, gate, up, sig=None):
    """Gradients of h = gate * sigmoid(gate) * up: returns (dgate, dup). sig as in swiglu_forward."""
    if gpu.kernels_on(dh, gate, up):  # kernels.cu on a GPU
        return gpu.kernels().swiglu_backward(dh, gate, up)
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


def cross_entropy_forward(logits, targets, n_valid=None):
    """Mean of -log softmax(logits)[target] over the rows whose target != IGNORE_INDEX.

    logits (N, V), OVERWRITTEN with the softmax probabilities; targets (N,) int; n_valid: how
    many targets count, if the caller has counted them (forward does, on the host: on a GPU
    counting here would wait for the device).
    Returns (loss, probs = the same buffer, n_valid); the loss is a float64 scalar of xp (a
    Python float on NumPy; on a GPU a 0-d array that stays there until float() fetches it).
    Example: logits all 0 over V classes -> loss = ln(V) whatever the targets.
    (On a GPU the kernel fuses forward and backward: the buffer returned holds dlogits.)
    """
    if gpu.kernels_on(logits):  # kernels.cu on a GPU
        return gpu.kernels().cross_entropy_forward(logits, targets, n_valid=n_valid)
    N = logits.shape[0]
    valid = targets != IGNORE_INDEX  # (N,)
    if n_valid is None:
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
    return loss_sum / n_valid, logits, n_valid


def cross_entropy_backward(probs, targets, loss_scale=1.0, n_valid=None):
    """Gradient of loss_scale * (mean cross-entropy) w.r.t. the logits, written over probs.

    probs (N, V) from cross_entropy_forward (OVERWRITTEN and returned as dlogits); n_valid as
    in cross_entropy_forward.
    """
    if gpu.kernels_on(probs):  # kernels.cu on a GPU: probs already holds dlogits
        return gpu.kernels().cross_entropy_backward(probs, loss_scale)
    # loss = (1 / n_valid) * sum over valid rows of -log probs[row, target[row]], so
    # dlogits[row] = (probs[row] - onehot(target[row])) / n_valid, and 0 for ignored rows
    valid = targets != IGNORE_INDEX
    if n_valid is None:
        n_valid = int(valid.sum())
    scale = float(loss_scale) / n_valid  # a Python float: keeps float32 arrays float32
    row_scale = valid.astype(probs.dtype) * scale  # (N,) 0 for ignored rows
    dlogits = probs
    dlogits *= row_scale[:, None]
    # the one-hot part; an ignored row's "target" is class 0 and it subtracts 0 there
    dlogits[xp.arange(len(targets)), xp.where(valid, targets, 0)] -= row_scale
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
    sig = None if gpu.kernels_on(gate) else _sigmoid(gate)  # (N, F) kept: backward needs no exp
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


def _check_shape(name, ids):
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a (B, T) integer array, got shape {ids.shape} {ids.dtype}")


def _check_tokens(name, ids, vocab_size):
    """ids must be a (B, T) integer array of token ids in [0, vocab_size)."""
    _check_shape(name, ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def _count_targets(targets, shape, vocab_size):
    """Check targets (B, T) against idx's shape and the vocabulary; return how many count."""
    _check_shape("targets", targets)
    if targets.shape != shape:
        raise ValueError(f"targets shape {targets.shape} != idx shape {shape}")
    counted = targets != IGNORE_INDEX
    if bool((counted & ((targets < 0) | (targets >= vocab_size))).any()):
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal IGNORE_INDEX ({IGNORE_INDEX})")
    n_valid = int(counted.sum())
    if n_valid == 0:
        raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
    return n_valid


def forward(params, config, idx, targets=None):
    """Run the model on idx (B, T) token ids.

    Without targets: returns (logits (B, T, V) float32, None).
    With targets (B, T) (IGNORE_INDEX where no prediction counts): returns (mean loss, cache) and
    the cache feeds `backward`. The loss is a float64 scalar of xp: a Python float on NumPy; on a
    GPU a 0-d array left on the device (float(loss) fetches it, waiting for the GPU).

    idx and targets are checked (and the targets counted) before they are copied to xp: hand
    in NumPy arrays, as train.py does, and on a GPU the checks cost no wait for the device.

    The cache holds what backward needs and nothing else:
      idx, targets (flattened) and n_valid (how many count), the RoPE cos/sin tables,
      per layer: x and x_mid (the residual stream entering each half), rstd_attn and rstd_mlp
        (the RMSNorm scales), a and m (the normalized inputs of the projections), q and k (after
        RoPE), v, att (attention output with heads merged, (N, C)), lse, gate, up, sig = sigmoid(gate)
        (None on the GPU kernel path; the SwiGLU output h is recomputed from these),
      x_final (the residual stream after the last block), rstd_final, xf (its normalized form),
      probs: the (N, V) softmax probabilities, in the logits' buffer (backward overwrites them).
    """
    _check_tokens("idx", idx, config.vocab_size)
    B, T = idx.shape
    if T > config.max_position_embeddings:
        raise ValueError(f"sequence length {T} > max_position_embeddings {config.max_position_embeddings}")
    n_valid = None if targets is None else _count_targets(targets, idx.shape, config.vocab_size)
    idx = xp.asarray(idx)
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

    targets = xp.asarray(targets).reshape(N)
    loss, probs, _ = cross_entropy_forward(logits, targets, n_valid)
    cache = dict(idx=idx, targets=targets, n_valid=n_valid, cos=cos, sin=sin, layers=layer_caches,
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
    dlogits = cross_entropy_backward(cache.pop("probs"), cache["targets"], loss_scale,
                                     cache["n_valid"])  # (N, V)
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
# Optimization: AdamW, the learning-rate schedule, gradient clipping
#
# The optimizer state lives next to the parameters (same names, float32, on the
# same backend), so saving it is writing two more dicts of arrays (checkpoint.py).


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

    def step(self, params, grads, lr):
        """Update every parameter in place with its gradient, at learning rate lr.
        (On a CPU train.py uses cpu.FastAdamW: the same update, in cache-sized blocks.)"""
        self.t += 1
        lr = float(lr)  # Python floats: a NumPy float64 scalar would make float32 math float64
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            decay = self.weight_decay if is_decayed(name, p.shape) else 0.0
            if gpu.kernels_on(p, g, m, v):  # a GPU runs the whole update in one kernel
                gpu.kernels().adamw_update(p, g, m, v, lr, self.beta1, self.beta2, self.eps,
                                           decay, self.t)
                continue
            p -= (lr * decay) * p                                 # decoupled weight decay
            m *= self.beta1                                       # m = beta1 * m + (1 - beta1) * g
            m += (1.0 - self.beta1) * g
            v *= self.beta2                                       # v = beta2 * v + (1 - beta2) * g^2
            v += (1.0 - self.beta2) * (g * g)
            m_hat = m / (1.0 - self.beta1 ** self.t)
            v_hat = v / (1.0 - self.beta2 ** self.t)
            p -= lr * m_hat / (xp.sqrt(v_hat) + self.eps)

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


def global_norm(grads):
    """The L2 norm of all gradients together: sqrt(sum over every parameter of sum(g * g)), the
    squares summed in float64 (a float32 sum over 62M squares would lose digits). A float64
    scalar of xp: a Python float on NumPy; on a GPU it stays on the device (no wait here)."""
    sum_of_squares = sum(xp.sum(xp.square(g, dtype=xp.float64)) for g in grads.values())
    return xp.sqrt(sum_of_squares)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so their global L2 norm (global_norm) is at most max_norm.

    When it exceeds max_norm every gradient is multiplied by max_norm / (norm + 1e-6), which
    keeps the direction of the step and bounds its size. max_norm <= 0 (or None) turns clipping
    off. Non-finite norms are left alone (the caller stops the run or skips the step).
    Returns the norm before clipping, a scalar as global_norm's: on a GPU the decision to clip
    stays on the device too.

    >>> g = {"a": xp.asarray([3.0, 0.0], dtype=xp.float32), "b": xp.asarray([4.0], dtype=xp.float32)}
    >>> float(clip_grad_norm(g, 1.0))
    5.0
    >>> [round(float(x), 4) for x in to_numpy(g["a"])], round(float(g["b"][0]), 4)
    ([0.6, 0.0], 0.8)
    """
    norm = global_norm(grads)
    if max_norm is not None and max_norm > 0.0:
        # scale = max_norm / (norm + 1e-6) if the norm is finite and above max_norm, else 1
        clip = xp.isfinite(norm) & (norm > max_norm)
        scale = xp.where(clip, max_norm / (norm + 1e-6), 1.0).astype(xp.float32)
        for g in grads.values():
            g *= scale
    return norm


# -----------------------------------------------------------------------------
# Decoding with a KV cache: the model's forward, one new token at a time
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
# sample.py draws the next token from those logits (temperature, top-k, top-p) and loops.


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
    _check_tokens("idx_new", idx_new, config.vocab_size)  # on the host array sample.py passes
    idx_new = xp.asarray(idx_new)
    B, T = idx_new.shape
    start, max_len = kv_cache["length"], kv_cache["k"][0].shape[2]
    if B != kv_cache["k"][0].shape[0]:
        raise ValueError(f"idx_new has {B} sequences, the cache was made for {kv_cache['k'][0].shape[0]}")
    if start + T > max_len:
        raise ValueError(f"{T} new tokens after {start} do not fit the cache's {max_len} positions")
    wte = params["model.embed_tokens.weight"]  # (V, C), also the LM head
    cos, sin = kv_cache["cos"][start:start + T], kv_cache["sin"][start:start + T]  # (T, D)
    x = embedding_forward(wte, idx_new).reshape(B * T, config.hidden_size)  # (N, C)
    for layer in range(config.num_hidden_layers):
        x = block_step_forward(params, config, layer, x, B, T, kv_cache, cos, sin)
    kv_cache["length"] = start + T
    xf, _ = rmsnorm_forward(x, params["model.norm.weight"], config.rms_norm_eps)  # (N, C)
    logits = matmul(xf, wte.T)  # (N, V) the tied LM head
    return logits.reshape(B, T, config.vocab_size)

