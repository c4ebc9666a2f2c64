"""kernels.cu's launches as Python functions, written once for both places they run.

`module` is anything with RawModule's call shape: `cupy.RawModule(code=...)` on a GPU (with
`xp` = cupy) or `tests.kernel_emu.EmuModule()` on a CPU (with `xp` = numpy). The tests run
these functions on the emulator; albor.py's GPU path can copy them as they are.

Each function takes and returns arrays shaped like its albor.py twin's (named in its
docstring), allocates its outputs with xp, and passes every scalar as np.int32 / np.float32
(CuPy would pass a Python int as int64 and a float as double, which the kernels misread).
"""
import math

import numpy as np

# The launch constants of kernels.cu (tests/test_kernels.py checks they match its #defines)
ATTN_ROWS = 64           # query (or key) rows per attention block
ATTN_THREADS = 256       # threads per attention block: 4 per row
ATTN_MAX_HEAD_DIM = 128
WARP_ROWS_THREADS = 256  # rmsnorm / delta kernels: a warp per row, 8 rows per block
ELEMENTWISE_THREADS = 256
CE_THREADS = 256         # cross-entropy: one block per row
IGNORE_INDEX = -100


def _blocks(n, per_block):
    return max(1, math.ceil(n / per_block))


def _check_float32(**arrays):
    for name, a in arrays.items():
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 array, got {a.dtype} "
                             f"{'contiguous' if a.flags.c_contiguous else 'strided'}")


def _attention_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention: q must be (B, H, T, D) and k, v (B, KVH, T, D), got "
                         f"{q.shape} and {k.shape}")
    B, H, T, D = q.shape
    KVH = k.shape[1]
    if KVH == 0 or H % KVH or k.shape != (B, KVH, T, D) or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not (B,H,T,D) "
                         "and (B,KVH,T,D) with H divisible by KVH")
    if D % 4 or not 4 <= D <= ATTN_MAX_HEAD_DIM:
        raise ValueError(f"attention kernels need a head dim that is a multiple of 4 and at most "
                         f"{ATTN_MAX_HEAD_DIM}, got {D}")
    return B, H, T, D, KVH


def attention_forward(module, xp, q, k, v):
    """albor.attention_forward: q (B,H,T,D), k, v (B,KVH,T,D) -> out (B,H,T,D), lse (B,H,T)."""
    B, H, T, D, KVH = _attention_shapes(q, k, v)
    _check_float32(q=q, k=k, v=v)
    out = xp.empty((B, H, T, D), dtype=xp.float32)
    lse = xp.empty((B, H, T), dtype=xp.float32)
    module.get_function("attention_forward")(
        (_blocks(T, ATTN_ROWS), B * H), (ATTN_THREADS,),
        (q, k, v, out, lse, np.int32(H), np.int32(KVH), np.int32(T), np.int32(D)))
    return out, lse


def attention_backward(module, xp, dout, q, k, v, out, lse):
    """albor.attention_backward: returns dq (B,H,T,D), dk, dv (B,KVH,T,D)."""
    B, H, T, D, KVH = _attention_shapes(q, k, v)
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


def rmsnorm_forward(module, xp, x, weight, eps):
    """albor.rmsnorm_forward: x (..., C), weight (C,) -> out (..., C), rstd (..., 1)."""
    _check_float32(x=x, weight=weight)
    C = x.shape[-1]
    rows = x.size // C
    out = xp.empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=xp.float32)
    module.get_function("rmsnorm_forward")(
        (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
        (x, weight, out, rstd, np.int32(rows), np.int32(C), np.float32(eps)))
    return out, rstd


def rmsnorm_backward(module, xp, dout, x, weight, rstd):
    """albor.rmsnorm_backward: returns dx (..., C), dweight (C,)."""
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


def swiglu_forward(module, xp, gate, up):
    """albor.swiglu_forward: h = silu(gate) * up, any matching shapes."""
    _check_float32(gate=gate, up=up)
    out = xp.empty_like(gate)
    module.get_function("swiglu_forward")(
        (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (gate, up, out, np.int32(gate.size)))
    return out


def swiglu_backward(module, xp, dh, gate, up):
    """albor.swiglu_backward: returns (dgate, dup)."""
    _check_float32(dh=dh, gate=gate, up=up)
    dgate = xp.empty_like(gate)
    dup = xp.empty_like(up)
    module.get_function("swiglu_backward")(
        (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (dh, gate, up, dgate, dup, np.int32(gate.size)))
    return dgate, dup


def cross_entropy_forward_backward(module, xp, logits, targets, loss_scale=1.0):
    """albor.cross_entropy_forward then cross_entropy_backward, fused.

    logits (N, V) float32 is OVERWRITTEN with dlogits (the gradient of loss_scale * mean loss);
    targets (N,) int32. Returns (mean loss over the counted rows as a Python float, dlogits).
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
    return loss, logits


def adamw_update(module, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """One albor.AdamW.step for one tensor, in place (t = the update number, from 1)."""
    _check_float32(param=param, grad=grad, m=m, v=v)
    module.get_function("adamw_update")(
        (_blocks(param.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
        (param, grad, m, v, np.int32(param.size), np.float32(lr), np.float32(beta1),
         np.float32(beta2), np.float32(eps), np.float32(weight_decay),
         np.float32(1.0 - beta1 ** t), np.float32(1.0 - beta2 ** t)))
