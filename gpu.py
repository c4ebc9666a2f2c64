"""What albor needs to run on an NVIDIA GPU, kept out of the model file.

albor.py is the model written once for NumPy and CuPy alike (`xp`). This file holds the rest
of the GPU path, in the order albor.py meets it:

1. the backend: `xp` is CuPy when a CUDA GPU is usable, NumPy otherwise; `fetch` brings device
   scalars to the host, all in one copy (the one wait a training step has);
2. the settings a run picks (`configure`, or `with settings(...)` for a while): whether the
   layers hand their work to kernels.cu, and the precision of the linear layers' matmuls;
3. `Kernels`: kernels.cu's launches, each shaped like the albor layer it replaces;
4. mixed precision (--dtype tf32 / bf16 / fp16): the matmuls' operands in half precision,
   the weights' half copies (`half_weights`), cuBLAS's GemmEx, and the same numbers emulated
   on a CPU;
5. `LossScaler` (dynamic loss scaling for fp16) and `PhaseClock` (a step's phases timed with
   CUDA events, without stopping the GPU).

A layer in albor.py that has a kernel starts with one visible branch:

    if gpu.kernels_on(x, weight):                      # a GPU runs kernels.cu instead
        return gpu.kernels().rmsnorm_forward(x, weight, eps)

and otherwise runs its NumPy/CuPy code, which stays THE reference: the tests check every
kernel against it (on a CPU too, through the emulator in tests/kernel_emu.py), and
ALBOR_KERNELS=0 runs the reference code on a GPU as well, so the two can be compared there.
Layers with kernels: embedding_backward, rmsnorm_*, attention_*, swiglu_*, cross_entropy_*
(one fused kernel) and AdamW's update; the matmuls are cuBLAS's and RoPE stays in CuPy.

Waiting for the GPU: CuPy queues work and returns at once; the host waits only when it reads a
value back (float(), int(), bool(), printing, to_numpy, boolean-mask indexing, nonzero). The
training step reads back once per optimizer step (train.apply_update: the losses and the
gradient norm, in one `fetch`); token ids and targets are checked and counted on the host
before they are copied up (albor.forward), and the loss and the norm stay on the device until
then. tests/test_gpu_path.py counts the waits with a stand-in device (tests/fake_device.py).

Determinism: the kernels use no atomics (each output is summed by one thread in a fixed
order), cuBLAS gives the same bits for the same call on the same GPU, and CuPy's reductions
and sorts are fixed trees. The one atomic-based op of the reference path, xp.add.at in
embedding_backward, has a kernel here. So float32 training on the GPU gives the same
checkpoint bytes run after run (tests/test_gpu_path.py checks it on a GPU).
"""
import contextlib
import math
import os
import time

import numpy as np

# -----------------------------------------------------------------------------
# 1. The backend. ALBOR_DEVICE=cpu forces NumPy; ALBOR_DEVICE=cuda demands a GPU (and says why
# there is none).


def pick_backend():
    """(xp, name): (cupy, "cupy") when a CUDA GPU is usable, else (numpy, "numpy")."""
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


xp, BACKEND = pick_backend()  # BACKEND is "numpy" or "cupy"


def to_numpy(a):
    """A host (NumPy) copy of an array of either backend; a no-op for NumPy arrays."""
    return xp.asnumpy(a) if BACKEND == "cupy" else np.asarray(a)


def fetch(*scalars):
    """Python floats of scalars of xp (0-d arrays; plain numbers pass through), brought to the
    host in ONE copy. On a GPU that copy waits for everything queued before it, once.

    >>> fetch(xp.asarray(0.5), 2)
    (0.5, 2.0)
    """
    stacked = xp.stack([xp.asarray(scalar, dtype=xp.float64) for scalar in scalars])  # (n,)
    return tuple(to_numpy(stacked).tolist())


# -----------------------------------------------------------------------------
# 2. Settings: kernels.cu on or off, and the matmul precision

MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp16")
KERNELS_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")


def kernels_setting():
    """ALBOR_KERNELS: "1" (default) uses kernels.cu on a GPU, "0" runs the reference code there."""
    value = os.environ.get("ALBOR_KERNELS", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"ALBOR_KERNELS must be 0 (reference code) or 1 (kernels.cu), got {value!r}")
    return value == "1"


_settings = {"kernels": None, "matmul_dtype": "fp32"}  # changed only through configure()


def configure(**changes):
    """Change the settings for this process; returns the previous values of those changed.

    kernels: a Kernels (the layers that have a kernel run it) or None (the reference code).
    matmul_dtype: the linear layers' precision (section 4): "fp32" (the default), "tf32",
    "bf16" or "fp16"; on a CPU the last three are emulated (slower than fp32).
    """
    for name, value in changes.items():
        if name == "matmul_dtype":
            if value not in MATMUL_DTYPES:
                raise ValueError(f"matmul dtype must be one of {', '.join(MATMUL_DTYPES)}, got {value!r}")
        elif name == "kernels":
            if value is not None and not isinstance(value, Kernels):
                raise TypeError(f"kernels must be a gpu.Kernels or None, got {type(value).__name__}")
        else:
            raise TypeError(f"unknown setting {name!r}; settings: {', '.join(_settings)}")
    previous = {name: _settings[name] for name in changes}
    _settings.update(changes)
    return previous


@contextlib.contextmanager
def settings(**changes):
    """`configure(**changes)` for the duration of a with-block (the tests use it)."""
    previous = configure(**changes)
    try:
        yield
    finally:
        _settings.update(previous)


def matmul_dtype():
    return _settings["matmul_dtype"]


def kernels():
    """The Kernels the layers hand their work to, or None (the reference code)."""
    return _settings["kernels"]


def kernels_on(*arrays):
    """Whether a layer runs its kernels.cu version: kernels are on and every array is float32,
    the kernels' only dtype (float64 runs, like the gradient checks, take the reference code)."""
    return _settings["kernels"] is not None and all(a.dtype == np.float32 for a in arrays)


# -----------------------------------------------------------------------------
# 3. kernels.cu's launches
#
# kernels.cu is compiled once per process, on first use, by cupy.RawModule (NVRTC); CuPy keeps
# the compiled code in its on-disk kernel cache, so a later process only loads it. A Kernels
# takes the module and xp as arguments: the tests hand it tests/kernel_emu.EmuModule (the same
# kernels.cu compiled for the CPU) and NumPy, which runs every launch, and the whole model
# through them, on a machine without a GPU.
#
# Each method takes and returns arrays shaped like the albor layer it replaces (named in its
# docstring), makes its inputs C-contiguous (a no-op for the model's arrays), allocates its
# outputs with xp and passes every scalar as np.int32 / np.float32: CuPy would pass a Python
# int as int64 and a float as double, which a kernel taking int / float misreads.

# kernels.cu's launch constants (tests/test_kernels.py checks them against its #defines)
ATTN_ROWS = 64           # query (or key) rows per attention block
ATTN_THREADS = 256       # threads per attention block: 4 per row
ATTN_MAX_HEAD_DIM = 128
WARP_ROWS_THREADS = 256  # rmsnorm / delta kernels: a warp per row, 8 rows per block
ELEMENTWISE_THREADS = 256
CE_THREADS = 256         # cross-entropy: one block per row
EMBEDDING_THREADS = 128  # embedding_backward: one block per vocabulary row
IGNORE_INDEX = -100      # albor.IGNORE_INDEX: a target that counts in neither loss nor gradient


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


def _attention_shapes(q, k, v):
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


class Kernels:
    """kernels.cu's kernels, launched on `module` (cupy.RawModule of kernels.cu, made on first
    use when None; or tests/kernel_emu.EmuModule) with arrays of `xp` (CuPy; NumPy with the
    emulator)."""

    def __init__(self, module=None, xp=xp):
        self.module = module
        self.xp = xp

    def function(self, name):
        if self.module is None:  # compile kernels.cu, once per Kernels (and so per process)
            with open(KERNELS_CU, encoding="utf-8") as f:
                self.module = self.xp.RawModule(code=f.read())
        return self.module.get_function(name)

    def embedding_backward(self, dwte, dout, idx):
        """albor.embedding_backward: ADD the rows of dout (..., C) into dwte (V, C) at idx (...).

        Sorts keys = token * N + position (int64) so that each token's positions lie together
        in increasing order; the kernel's block v sums token v's rows in that order, as
        NumPy's add.at does (see kernels.cu).
        """
        xp = self.xp
        _check_float32(dwte=dwte)
        V, C = dwte.shape
        dout = xp.ascontiguousarray(dout.reshape(-1, C), dtype=xp.float32)  # (N, C)
        N = dout.shape[0]
        keys = idx.reshape(-1).astype(xp.int64) * N + xp.arange(N, dtype=xp.int64)  # (N,)
        keys.sort()
        self.function("embedding_backward")(
            (V,), (EMBEDDING_THREADS,), (keys, dout, dwte, np.int32(N), np.int32(C)))

    def attention_forward(self, q, k, v):
        """albor.attention_forward: q (B,H,T,D), k, v (B,KVH,T,D) -> out (B,H,T,D), lse (B,H,T)."""
        xp = self.xp
        B, H, T, D, KVH = _attention_shapes(q, k, v)
        q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
        _check_float32(q=q, k=k, v=v)
        out = xp.empty((B, H, T, D), dtype=xp.float32)
        lse = xp.empty((B, H, T), dtype=xp.float32)
        self.function("attention_forward")(
            (_blocks(T, ATTN_ROWS), B * H), (ATTN_THREADS,),
            (q, k, v, out, lse, np.int32(H), np.int32(KVH), np.int32(T), np.int32(D)))
        return out, lse

    def attention_backward(self, dout, q, k, v, out, lse):
        """albor.attention_backward: returns dq (B,H,T,D), dk, dv (B,KVH,T,D)."""
        xp = self.xp
        B, H, T, D, KVH = _attention_shapes(q, k, v)
        dout, q, k, v, out, lse = (xp.ascontiguousarray(a) for a in (dout, q, k, v, out, lse))
        _check_float32(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
        if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, H, T):
            raise ValueError(f"attention_backward: dout {dout.shape}, out {out.shape} must be "
                             f"{q.shape} and lse {lse.shape} must be {(B, H, T)}")
        delta = xp.empty((B, H, T), dtype=xp.float32)  # rowsum(dout * out), as the reference
        rows = B * H * T
        self.function("attention_backward_preprocess")(
            (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
            (out, dout, delta, np.int32(rows), np.int32(D)))
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        sizes = (np.int32(H), np.int32(KVH), np.int32(T), np.int32(D))
        self.function("attention_backward_dkdv")(
            (_blocks(T, ATTN_ROWS), B * KVH), (ATTN_THREADS,),
            (q, k, v, dout, lse, delta, dk, dv) + sizes)
        self.function("attention_backward_dq")(
            (_blocks(T, ATTN_ROWS), B * H), (ATTN_THREADS,),
            (q, k, v, dout, lse, delta, dq) + sizes)
        return dq, dk, dv

    def rmsnorm_forward(self, x, weight, eps):
        """albor.rmsnorm_forward: x (..., C), weight (C,) -> out (..., C), rstd (..., 1)."""
        xp = self.xp
        x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
        _check_float32(x=x, weight=weight)
        C = x.shape[-1]
        rows = x.size // C
        out = xp.empty_like(x)
        rstd = xp.empty(x.shape[:-1] + (1,), dtype=xp.float32)
        self.function("rmsnorm_forward")(
            (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
            (x, weight, out, rstd, np.int32(rows), np.int32(C), np.float32(eps)))
        return out, rstd

    def rmsnorm_backward(self, dout, x, weight, rstd):
        """albor.rmsnorm_backward: returns dx (..., C), dweight (C,)."""
        xp = self.xp
        dout, x, weight, rstd = (xp.ascontiguousarray(a) for a in (dout, x, weight, rstd))
        _check_float32(dout=dout, x=x, weight=weight, rstd=rstd)
        C = x.shape[-1]
        rows = x.size // C
        dx = xp.empty_like(x)
        dweight = xp.empty((C,), dtype=xp.float32)
        self.function("rmsnorm_backward")(
            (_blocks(rows, WARP_ROWS_THREADS // 32),), (WARP_ROWS_THREADS,),
            (dout, x, weight, rstd, dx, np.int32(rows), np.int32(C)))
        self.function("rmsnorm_backward_weight")(
            (_blocks(C, 32),), (32, 8), (dout, x, rstd, dweight, np.int32(rows), np.int32(C)))
        return dx, dweight

    def swiglu_forward(self, gate, up):
        """albor.swiglu_forward: h = silu(gate) * up, any matching shapes."""
        xp = self.xp
        gate, up = xp.ascontiguousarray(gate), xp.ascontiguousarray(up)
        _check_float32(gate=gate, up=up)
        out = xp.empty_like(gate)
        self.function("swiglu_forward")(
            (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
            (gate, up, out, np.int32(gate.size)))
        return out

    def swiglu_backward(self, dh, gate, up):
        """albor.swiglu_backward: returns (dgate, dup)."""
        xp = self.xp
        dh, gate, up = (xp.ascontiguousarray(a) for a in (dh, gate, up))
        _check_float32(dh=dh, gate=gate, up=up)
        dgate, dup = xp.empty_like(gate), xp.empty_like(up)
        self.function("swiglu_backward")(
            (_blocks(gate.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
            (dh, gate, up, dgate, dup, np.int32(gate.size)))
        return dgate, dup

    def cross_entropy_forward(self, logits, targets, loss_scale=1.0, n_valid=None):
        """albor.cross_entropy_forward and _backward, fused: one read of the (N, V) logits.

        logits (N, V) float32 is OVERWRITTEN with dlogits (the gradient of loss_scale * mean
        loss), not with the probabilities; targets (N,) int; n_valid: the number of targets
        that count, if the caller has it (albor.forward counts them on the host; else they are
        counted here, a wait on a GPU). Returns (mean loss over the counted rows as a float64
        scalar of xp, left on the device; dlogits; n_valid). So on this path
        albor.cross_entropy_backward only multiplies dlogits by its loss_scale.
        """
        xp = self.xp
        _check_float32(logits=logits)
        N, V = logits.shape
        targets = xp.ascontiguousarray(targets, dtype=xp.int32)
        if n_valid is None:
            n_valid = int((targets != IGNORE_INDEX).sum())
        if n_valid == 0:
            raise ValueError("every target is IGNORE_INDEX: the mean loss over no tokens is undefined")
        losses = xp.empty((N,), dtype=xp.float32)
        self.function("cross_entropy_forward_backward")(
            (N,), (CE_THREADS,),
            (logits, targets, losses, np.int32(V), np.float32(loss_scale / n_valid)))
        loss = losses.sum(dtype=xp.float64) / n_valid
        return loss, logits, n_valid

    def cross_entropy_backward(self, dlogits, loss_scale=1.0):
        """albor.cross_entropy_backward on this path: dlogits of the mean loss, times loss_scale."""
        if loss_scale != 1.0:
            dlogits *= np.float32(loss_scale)
        return dlogits

    def adamw_update(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
        """albor.AdamW's update of one tensor, in place (t = the update number, from 1)."""
        _check_float32(param=param, grad=grad, m=m, v=v)
        self.function("adamw_update")(
            (_blocks(param.size, ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
            (param, grad, m, v, np.int32(param.size), np.float32(lr), np.float32(beta1),
             np.float32(beta2), np.float32(eps), np.float32(weight_decay),
             np.float32(1.0 - beta1 ** t), np.float32(1.0 - beta2 ** t)))


if kernels_setting() and BACKEND == "cupy":
    configure(kernels=Kernels())  # compiled on first use

# -----------------------------------------------------------------------------
# 4. Mixed precision: --dtype fp32 | tf32 | bf16 | fp16
#
# Only the products of the linear layers (albor.matmul) change; every other number is float32:
# the weights AdamW updates (the "master" weights) with its m and v, the gradients, the
# residual stream and its sums, RMSNorm (statistics and all), RoPE, attention and its softmax,
# SwiGLU, the softmax cross-entropy, every reduction.
#
#   fp32  float32 operands and sums (cuBLAS SGEMM; NumPy's BLAS on a CPU)
#   tf32  float32 operands rounded to 10 mantissa bits inside the product, float32 sums
#   bf16  operands stored as bfloat16 (7+1 mantissa bits, float32's range), float32 sums
#   fp16  operands stored as float16 (10+1 mantissa bits, range 6e-8 .. 65504), float32 sums,
#         with dynamic loss scaling (LossScaler, section 5): small gradients would round to 0
#
# bf16 and fp16 keep a half copy of every weight matrix: `half_weights(params)` makes them once
# per optimizer step, from the weights the last update left (train.train_step), and a product
# reads its weight from there. The other operand (an activation, or the gradient flowing back)
# is rounded to half as it enters the product (`half_operand`). The product sums in float32 and
# is written in float32: cuBLAS GemmEx with A and B half, C float32, compute type 32F, the
# tensor cores' mixed-precision mode. Not in half, because every reader of a product computes in
# float32 (kernels.cu reads float32 only, and so do the residual adds and the softmax): a half
# output would be converted straight back, one more pass and one more rounding for nothing. So a
# weight's gradient, the product of two half-rounded operands, is float32 too and adds into the
# float32 gradients.
#
# On a GPU the half operands are real half arrays: float16, and bfloat16 as its bits in uint16
# (cuBLAS reads them as CUDA_R_16BF; CuPy has no bfloat16 of its own). A CPU runs the same
# numbers, emulated (slower than fp32: for tests and teaching): `to_half` rounds to the same
# values but keeps them in float32, and `emulated_gemm` multiplies them with NumPy's BLAS. The
# product of two half numbers is exact in float32, so the emulation differs from the tensor
# cores only in the order of the float32 sums. tf32's operands are rounded in emulated_gemm
# (on a GPU cuBLAS rounds them itself). The tests check each rounding against NumPy's float16
# and a slow reference, and the stand-in GPU of tests/fake_device.py runs the GPU's storage
# (float16 arrays, bfloat16 bits) through a training step to the same bytes as the CPU's.
# What only a GPU checks (the gpu-marked tests): the GemmEx call itself, and that it gives the
# emulation's numbers up to the order of the sums.

HALF_DTYPES = ("bf16", "fp16")   # the --dtypes with half copies of the weights


def _rounded_bits(x, dropped):
    """The upper bits of float32 x (uint32, shifted down) after rounding off its lowest
    `dropped` mantissa bits: to nearest, ties to even (adding 0x7FF..F plus the lowest kept bit
    carries exactly when the dropped part is above half, or half with an odd kept part). A NaN
    becomes the quiet NaN (its payload could carry into inf); beyond the largest finite number
    of the shorter format, inf."""
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    lowest_kept = (bits >> np.uint32(dropped)) & np.uint32(1)
    kept = (bits + lowest_kept + np.uint32((1 << (dropped - 1)) - 1)) >> np.uint32(dropped)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return xp.where(nan, np.uint32(0x7FC00000 >> dropped), kept)


def bf16_bits(x):
    """x (float32) rounded to bfloat16, as its 16 bits (uint16). bfloat16 is the upper half of a
    float32: sign, 8 exponent bits, 7 mantissa bits.

    >>> bf16_bits(np.float32([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.0, np.inf]))  # ties go to even
    array([16256, 16256, 16258, 49152, 32640], dtype=uint16)
    """
    return _rounded_bits(x, 16).astype(xp.uint16)


def round_to_tf32(x):
    """x (float32) rounded to tf32's 10 mantissa bits (to nearest, ties to even), as float32."""
    return (_rounded_bits(x, 13) << np.uint32(13)).view(xp.float32)


def round_to_fp16(x):
    """x (float32) rounded to float16's numbers (to nearest, ties to even), kept in float32:
    10 mantissa bits as far down as float16's exponents reach (2**-14), below that its
    subnormals (steps of 2**-24; rint rounds ties to even), beyond 65504 inf."""
    with np.errstate(over="ignore", invalid="ignore"):  # x * 2**24 of the large x: not used
        subnormal = xp.rint(x * 2.0**24) * 2.0**-24
    rounded = xp.where(xp.abs(x) < 2.0**-14, subnormal, round_to_tf32(x))
    return xp.where(xp.abs(rounded) > 65504.0, xp.copysign(xp.inf, x), rounded)


def to_half(x, dtype):
    """float32 x rounded to the half format of `dtype` ("fp16": float16, beyond 65504 inf, the
    overflow the LossScaler watches for; "bf16": bfloat16). On a GPU real half arrays, as
    cuBLAS reads them: float16, bfloat16 as its bits in uint16. On a CPU the same numbers kept
    in float32, as NumPy's BLAS reads them (NumPy converts to float16 slowly, very slowly for
    float16's subnormals, and has no bfloat16)."""
    if BACKEND == "cupy":
        return x.astype(xp.float16) if dtype == "fp16" else bf16_bits(x)
    return round_to_fp16(x) if dtype == "fp16" else to_float32(bf16_bits(x))


def to_float32(x):
    """A half operand back in float32, exactly (every half number is a float32 number); float32
    passes through."""
    if x.dtype == np.float16:
        return x.astype(xp.float32)
    if x.dtype == np.uint16:  # bfloat16 bits: the upper half of a float32
        return (x.astype(xp.uint32) << np.uint32(16)).view(xp.float32)
    return x


_half_copies = {}   # inside half_weights(): (address, shape, strides) of a weight -> its half copy


def _memory(x):
    """Where x's numbers start and how x steps through them: (address, shape, strides)."""
    interface = getattr(x, "__cuda_array_interface__", None) or x.__array_interface__
    return interface["data"][0], x.shape, x.strides


@contextlib.contextmanager
def half_weights(params):
    """With --dtype bf16/fp16: half copies of the weight matrices of params, read by every
    product inside the with-block (fp32/tf32: nothing to do). train.py makes them once per
    optimizer step, before its micro-batches: the weights must not change inside the block."""
    dtype = _settings["matmul_dtype"]
    if dtype not in HALF_DTYPES:
        yield
        return
    copies = {_memory(w): to_half(w, dtype) for w in params.values()
              if w.ndim == 2 and w.dtype == np.float32}
    _half_copies.update(copies)
    try:
        yield
    finally:
        for key in copies:
            _half_copies.pop(key, None)


def half_operand(x):
    """x as a bf16/fp16 product reads it: a weight's half copy (or its transpose, for w.T) when
    half_weights made one, else x rounded to half now."""
    address, shape, strides = _memory(x)
    half = _half_copies.get((address, shape, strides))
    if half is None and x.ndim == 2:
        transposed = _half_copies.get((address, shape[::-1], strides[::-1]))
        half = None if transposed is None else transposed.T
    return half if half is not None else to_half(x, _settings["matmul_dtype"])


def low_precision(a, b):
    """Whether albor.matmul(a, b) goes through `matmul` below: a --dtype other than fp32 and two
    non-empty float32 matrices (float64 runs, like the gradient checks, stay exact)."""
    return (_settings["matmul_dtype"] != "fp32" and a.ndim == 2 and b.ndim == 2
            and a.dtype == np.float32 and b.dtype == np.float32 and a.size > 0 and b.size > 0)


def matmul(a, b):
    """a (M, K) @ b (K, N) -> (M, N) float32 at the --dtype's precision: bf16/fp16 on half
    operands, tf32 on float32 ones rounded in the product. On a GPU one cublasGemmEx call (a
    weight's transposed view w.T is read in place, as `@` does); on a CPU its emulation."""
    if _settings["matmul_dtype"] in HALF_DTYPES:
        a, b = half_operand(a), half_operand(b)
    if BACKEND == "cupy":
        return cublas_gemm(a, b)
    return emulated_gemm(a, b)


def emulated_gemm(a, b):
    """The CPU's stand-in for cuBLAS's product: half operands converted back to float32 (exact),
    tf32's operands rounded to 10 mantissa bits, then a float32 product with float32 sums."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed operand: inf, NaN, no warning
        if _settings["matmul_dtype"] == "tf32":
            return round_to_tf32(a) @ round_to_tf32(b)
        return to_float32(a) @ to_float32(b)


# GemmEx's enums (library_types.h, cublas_api.h)
_CUDA_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 2, np.dtype(np.uint16): 14}
#              CUDA_R_32F,              CUDA_R_16F,              CUDA_R_16BF (bfloat16 bits)
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1          # cublasOperation_t
_CUBLAS_GEMM_DEFAULT = -1                # cublasGemmAlgo_t: let cuBLAS choose


def gemm_types(a, b):
    """(cudaDataType of A and B, cublasComputeType) for a GemmEx product of these operands at
    the current --dtype. The output C is always CUDA_R_32F.

    float16 -> CUDA_R_16F, bfloat16 bits (uint16) -> CUDA_R_16BF, float32 -> CUDA_R_32F;
    compute CUBLAS_COMPUTE_32F (float32 sums; with half operands the tensor cores' mode), or
    CUBLAS_COMPUTE_32F_FAST_TF32 for tf32 (cuBLAS rounds the float32 operands to tf32).
    """
    if a.dtype != b.dtype:
        raise TypeError(f"GemmEx operands must have one type, got {a.dtype} and {b.dtype}")
    tf32 = _settings["matmul_dtype"] == "tf32"
    return _CUDA_TYPES[np.dtype(a.dtype)], _CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else _CUBLAS_COMPUTE_32F


def cublas_gemm(a, b):
    """a @ b -> float32 in one cublasGemmEx call (gemm_plan, gemm_types). GPU only."""
    from cupy.cuda import device  # the GPU path only
    from cupy_backends.cuda.libs import cublas
    data_type, compute_type = gemm_types(a, b)
    plan = gemm_plan(a, b)
    out = xp.empty((a.shape[0], b.shape[1]), dtype=xp.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)  # host alpha and beta
    cublas.gemmEx(device.get_cublas_handle(), plan["op_b"], plan["op_a"], plan["m"], plan["n"],
                  plan["k"], one.ctypes.data, plan["b"].data.ptr, data_type, plan["ld_b"],
                  plan["a"].data.ptr, data_type, plan["ld_a"], zero.ctypes.data, out.data.ptr,
                  _CUDA_TYPES[np.dtype(np.float32)], plan["ld_out"], compute_type,
                  _CUBLAS_GEMM_DEFAULT)
    return out


def _cublas_operand(x):
    """(array, op, leading dimension) that hands the row-major matrix x (R, S) to column-major
    cuBLAS as x^T (S, R). C-contiguous x: its memory read column-major IS x^T (S rows, ld S),
    op N. F-contiguous x (a transposed view like w.T): its memory read column-major is x
    (R rows, ld R), op T. Anything else is copied to C order first."""
    if x.flags.c_contiguous:
        return x, CUBLAS_OP_N, x.shape[1]
    if x.flags.f_contiguous:
        return x, CUBLAS_OP_T, x.shape[0]
    x = x.copy()  # C order
    return x, CUBLAS_OP_N, x.shape[1]


def gemm_plan(a, b):
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


# -----------------------------------------------------------------------------
# 5. Dynamic loss scaling (fp16) and a step's clock


class LossScaler:
    """Dynamic loss scaling for float16 matmuls (train.py --dtype fp16). Backend-free.

    float16 holds magnitudes from 6e-8 to 65504, and many gradients are smaller than 6e-8:
    rounded to float16 on their way into a matmul (section 4), they would become 0. So the backward is
    run on scale * loss (backward's loss_scale): every gradient is `scale` times larger, clear
    of underflow. Before clipping and the optimizer step they are divided by the scale again
    (`unscale`: the scale is a power of two, so that is exact). Too large a scale overflows:
    some gradient becomes inf or NaN. Then the step is skipped (weights and optimizer state
    stay as they were) and the scale is multiplied by `backoff`; after `growth_interval`
    steps in a row without overflow it is multiplied by `growth`, probing again for the
    largest scale that works.

    Overflow is read off the global gradient norm: the norm of a set of gradients is finite
    exactly when every gradient is, so the one number the step fetches anyway decides. (A
    gradient overflows where it is rounded to float16 on its way into a product: beyond 65504
    it becomes inf, and inf flows on into the weights' gradients.)

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

    def state(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])


class PhaseClock:
    """Seconds per phase of a step (forward, backward, optimizer, ...), summed over steps.

    On the GPU work is queued and runs later, so a host clock read between phases measures
    the queueing unless it waits for the GPU, and waiting at every phase costs time. Here
    `mark(phase)` records a CUDA event on the stream (cupy.cuda.Event: the GPU timestamps it
    when it gets there), and `collect()` adds up the GPU time between consecutive events. On
    NumPy a mark simply reads time.perf_counter.

    collect(wait=False) waits for nothing: it adds up the phases whose closing event the GPU
    has reached and keeps the rest for a later collect. train.py's step reads the clock after
    its one wait (for the loss and the norm), so the optimizer phase queued after that wait is
    added one step later (keep one clock for the run: DataParallel.clock).

    >>> clock = PhaseClock(); clock.start(); clock.mark("forward"); clock.mark("backward")
    >>> sorted(clock.collect())
    ['backward', 'forward']
    """

    def __init__(self):
        self.seconds = {}
        self._marks = []   # (phase, event or time), oldest first; phase None: a start

    def _now(self):
        if BACKEND == "cupy":
            event = xp.cuda.Event()
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        """A step begins: the time since the previous mark belongs to no phase."""
        self._marks.append((None, self._now()))

    def mark(self, phase):
        """The phase that began at the previous mark (or start) ends now."""
        self._marks.append((phase, self._now()))

    def collect(self, wait=True):
        """Add the finished phases' times into self.seconds and return them ({phase: seconds}).
        wait=True: wait for the last mark first (then every phase is finished)."""
        gpu_events = BACKEND == "cupy"
        if wait and gpu_events and self._marks:
            self._marks[-1][1].synchronize()
        step, done = {}, 0
        for i in range(1, len(self._marks)):
            (_, before), (phase, after) = self._marks[i - 1], self._marks[i]
            if gpu_events and not after.done:   # the GPU has not got there yet
                break
            if phase is not None:
                elapsed = (xp.cuda.get_elapsed_time(before, after) / 1000.0 if gpu_events  # ms -> s
                           else after - before)
                step[phase] = step.get(phase, 0.0) + elapsed
            done = i
        self._marks = self._marks[done:]   # the last finished mark opens the next phase
        for phase, elapsed in step.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return step
