"""kernels.cu, proven on a machine without a GPU.

1. It compiles for the GPU: NVRTC (what CuPy uses, driven through ctypes) and nvcc -cubin, with
   no spills and static shared memory under the 48 KB limit.
2. The emulator (tests/cuda_emu.h + tests/kernel_emu.py) behaves like a GPU where it matters:
   shuffles, barriers, garbage in fresh shared memory, deadlocks reported, launches checked.
3. Every kernel, run UNMODIFIED on the emulator, matches its albor.py twin (the NumPy reference,
   run in float64) on several shapes and on extreme inputs, and gives the same bits under every
   scheduling order of its threads.
4. Removing any one __syncthreads from kernels.cu makes some kernel give a wrong answer or a
   reported deadlock: each barrier in the file is needed, and the emulator can tell.

Tolerances: the kernels compute in float32, the reference in float64. "close" below means
max |got - want| <= tol * max(1, max |want|) with tol = 2e-5 for ordinary inputs (the float32
rounding of sums over a few hundred terms) and looser, stated per test, for extreme inputs.
"""
import ctypes
import math
import re
import subprocess

import numpy as np
import pytest

import albor
import gpu
from tests.kernel_emu import KERNELS_CU, TESTS, EmuError, EmuModule, parse_kernels, strip_comments
from tests.oracles import nvcc, nvrtc_library

SOURCE = KERNELS_CU.read_text()
KERNEL_NAMES = sorted(parse_kernels(SOURCE))
TOL = 2e-5


@pytest.fixture(scope="module")
def module():
    return EmuModule(KERNELS_CU)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def on_albor(function, *args):
    """Run an albor.py reference function in float64 on albor's backend (NumPy here, CuPy on a
    GPU machine) and hand back NumPy arrays: float arrays go in as float64, others as they are."""
    def to_xp(a):
        if not isinstance(a, np.ndarray):
            return a
        return albor.xp.asarray(f64(a) if a.dtype.kind == "f" else a)

    def to_np(a):
        return albor.to_numpy(a) if hasattr(a, "shape") else a

    result = function(*[to_xp(a) for a in args])
    return tuple(to_np(a) for a in result) if isinstance(result, tuple) else to_np(result)


def assert_close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = float(np.abs(f64(got) - f64(want)).max()) if got.size else 0.0
    bound = tol * max(1.0, float(np.abs(want).max()) if want.size else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# ============================================================================================
# 1. It compiles for the GPU
# ============================================================================================

def nvrtc_compile(source, options):
    """(ok, log, ptx) of NVRTC compiling source with options (no GPU needed)."""
    nvrtc = ctypes.CDLL(str(nvrtc_library()))
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0,
                                    None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = nvrtc.nvrtcCompileProgram(program, len(options), opts)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        ptx = b""
        if result == 0:
            nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetPTX(program, buf)
            ptx = buf.value
        return result == 0, log.value.decode(errors="replace"), ptx.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def test_nvrtc_compiles_every_kernel_without_warnings():
    ok, log, ptx = nvrtc_compile(SOURCE, ["--gpu-architecture=compute_90"])
    assert ok, f"NVRTC rejected kernels.cu:\n{log}"
    assert "warning" not in log.lower(), log
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(KERNEL_NAMES)


def test_nvrtc_rejects_what_cupy_would_reject():
    """The NVRTC check has teeth: INFINITY (a <math.h> macro NVRTC lacks) fails to compile."""
    broken = SOURCE.replace("#define NEG_INF __int_as_float(0xff800000)", "#define NEG_INF (-INFINITY)")
    assert broken != SOURCE
    ok, log, _ = nvrtc_compile(broken, ["--gpu-architecture=compute_90"])
    assert not ok and "INFINITY" in log


def test_nvcc_cubin_sm90_no_spills(tmp_path):
    """nvcc -arch=sm_90 -cubin: every kernel builds with no register spills, static shared memory
    within the 48 KB a block gets without an opt-in, and at most 255 registers."""
    result = subprocess.run([nvcc(), "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o",
                             str(tmp_path / "kernels.cubin"), str(KERNELS_CU)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    assert "warning" not in report.lower(), report
    functions = re.split(r"Compiling entry function '(\w+)'", report)[1:]
    usage = dict(zip(functions[0::2], functions[1::2]))
    assert sorted(usage) == KERNEL_NAMES
    for name, text in usage.items():
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        registers = int(re.search(r"Used (\d+) registers", text).group(1))
        smem = re.search(r"(\d+) bytes smem", text)
        assert spills.groups() == ("0", "0"), f"{name} spills registers: {text}"
        assert registers <= 255, name
        assert (int(smem.group(1)) if smem else 0) <= 48 * 1024, name


def test_no_atomics():
    """Deterministic by construction: no atomics whose order could vary from run to run."""
    assert "atomic" not in strip_comments(SOURCE).lower()


def test_launch_constants_match_kernels_cu():
    defines = dict(re.findall(r"#define (\w+) \(?(-?\d+)\)?", SOURCE))
    assert int(defines["ATTN_ROWS"]) == gpu.ATTN_ROWS
    assert int(defines["ATTN_THREADS"]) == gpu.ATTN_THREADS
    assert int(defines["ATTN_THREADS_PER_ROW"]) * gpu.ATTN_ROWS == gpu.ATTN_THREADS
    assert int(defines["ATTN_MAX_HEAD_DIM"]) == gpu.ATTN_MAX_HEAD_DIM
    assert int(defines["IGNORE_INDEX"]) == albor.IGNORE_INDEX


# ============================================================================================
# 2. The emulator itself
# ============================================================================================

SELFTEST_CU = r"""
extern "C" __global__ void shuffles(const int* x, int* out) {
    const int v = x[threadIdx.x];
    int* o = out + 6 * threadIdx.x;
    o[0] = __shfl_xor_sync(0xffffffff, v, 5);
    o[1] = __shfl_down_sync(0xffffffff, v, 3);
    o[2] = __shfl_up_sync(0xffffffff, v, 2, 8);
    o[3] = __shfl_sync(0xffffffff, v, 5, 16);
    o[4] = __shfl_xor_sync(0xffffffff, v, 8, 8);
    o[5] = __ballot_sync(0xffffffff, v % 3 == 0);
}
extern "C" __global__ void __launch_bounds__(128) block_sums(const float* x, float* out, int n) {
    __shared__ float tile[128];
    extern __shared__ float dynamic_smem[];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    float s = 0.0f;
    for (int j = 0; j < (int)blockDim.x; j++) s += tile[j];
    dynamic_smem[threadIdx.x] = s + threadIdx.x;
    __syncthreads();
    if (i < n) out[i] = dynamic_smem[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void barrier_in_branch(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void barriers_on_two_lines(float* out) {
    if (threadIdx.x < 16)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shuffle_in_branch(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffff, v, 1);
    out[threadIdx.x] = v;
}
extern "C" __global__ void shuffle_reads_lane_outside_mask(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffff, v, 16);
    out[threadIdx.x] = v;
}
extern "C" __global__ void reads_unwritten_shared(float* out) {
    __shared__ float s[64];
    if (threadIdx.x == 0) s[0] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void writes_past_the_end(float* out, int n) {
    out[threadIdx.x] = 1.0f;  // no `if (threadIdx.x < n)`
}
extern "C" __global__ void scalars(float* out, int i, float f, long long big) {
    out[0] = i; out[1] = f; out[2] = (float)big;
}
"""


@pytest.fixture(scope="module")
def selftest():
    return EmuModule(TESTS / "emu_selftest.cu", code=SELFTEST_CU)


def test_emulator_shuffles_and_ballot_follow_the_cuda_guide(selftest):
    n = 64
    x = np.random.default_rng(1).integers(-1000, 1000, n).astype(np.int32)
    out = np.zeros((n, 6), np.int32)
    selftest.get_function("shuffles")((1,), (n,), (x, out))
    lane = np.arange(n) % 32
    base = np.arange(n) - lane  # first thread of each warp
    want = np.zeros((n, 6), np.int64)
    want[:, 0] = x[base + (lane ^ 5)]
    want[:, 1] = x[np.where(lane + 3 < 32, np.arange(n) + 3, np.arange(n))]
    want[:, 2] = x[np.where(lane % 8 >= 2, np.arange(n) - 2, np.arange(n))]  # width 8
    want[:, 3] = x[base + (lane & ~15) + 5]  # width 16: lane 5 of each half-warp
    src = lane ^ 8
    want[:, 4] = x[np.where(src < (lane & ~7) + 8, base + src, np.arange(n))]  # only earlier groups
    for w in range(2):
        bits = sum(1 << i for i in range(32) if x[32 * w + i] % 3 == 0)
        want[32 * w:32 * w + 32, 5] = np.int32(np.uint32(bits).view(np.int32))
    np.testing.assert_array_equal(out, want)


def test_emulator_static_and_dynamic_shared_memory(selftest):
    n = 300
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    out = np.zeros(n, np.float32)
    selftest.get_function("block_sums")((3,), (128,), (x, out, np.int32(n)), shared_mem=128 * 4)
    padded = np.zeros(384, np.float32)
    padded[:n] = x
    sums = padded.reshape(3, 128).sum(axis=1, dtype=np.float64)
    want = sums[:, None] + (np.arange(128) + 1) % 128
    np.testing.assert_allclose(out, want.reshape(-1)[:n], rtol=1e-5, atol=1e-4)
    with pytest.raises(EmuError, match="dynamic shared memory"):
        selftest.get_function("block_sums")((3,), (128,), (x, out, np.int32(n)),
                                            shared_mem=64 * 1024)


def test_emulator_fresh_shared_memory_is_garbage(selftest):
    """A GPU's shared memory starts with garbage; here with NaN, so reading it shows."""
    out = np.zeros(64, np.float32)
    selftest.get_function("reads_unwritten_shared")((2,), (64,), (out,))
    assert out[0] == 1.0 and np.isnan(out[1:]).all()


@pytest.mark.parametrize("kernel, message", [
    ("barrier_in_branch", r"deadlock .* 16 thread\(s\) wait at __syncthreads at line \d+.*"
                          r"48 thread\(s\) have returned"),
    ("barriers_on_two_lines", r"__syncthreads at line \d+ while others wait at __syncthreads"),
    ("shuffle_in_branch", r"deadlock .*__shfl_xor_sync"),
    ("shuffle_reads_lane_outside_mask", r"lane 0 reads lane 16 in __shfl_xor_sync .*not in the mask"),
])
def test_emulator_reports_divergence_errors(selftest, kernel, message):
    out = np.zeros(64, np.float32)
    with pytest.raises(EmuError, match=message):
        selftest.get_function(kernel)((1,), (64,), (out,))


def test_emulator_checks_launches_like_a_gpu(selftest):
    out = np.zeros(64, np.float32)
    with pytest.raises(EmuError, match="wrote outside array argument 0 'out'"):
        selftest.get_function("writes_past_the_end")((1,), (64,), (out[:40].copy(), np.int32(40)))
    x = np.zeros(256, np.float32)
    with pytest.raises(EmuError, match=r"__launch_bounds__\(128\)"):
        selftest.get_function("block_sums")((1,), (256,), (x, x.copy(), np.int32(256)))
    with pytest.raises(EmuError, match="invalid block"):
        selftest.get_function("barrier_in_branch")((1,), (2048,), (out,))
    f = selftest.get_function("scalars")
    f((1,), (1,), (out, np.int32(7), np.float32(2.5), np.int64(1 << 40)))
    assert out[:3].tolist() == [7.0, 2.5, float(1 << 40)]
    bad_args = [
        ((out, 7, np.float32(2.5), np.int64(1)), r"argument 1 'i' \(int\): pass np.int32"),
        ((out, np.int32(7), 2.5, np.int64(1)), r"argument 2 'f' \(float\): pass np.float32"),
        ((out, np.int64(7), np.float32(2.5), np.int64(1)), r"pass np.int32\(...\), got int64"),
        ((out.astype(np.float64), np.int32(7), np.float32(2.5), np.int64(1)), "dtype float32"),
        ((out[::2], np.int32(7), np.float32(2.5), np.int64(1)), "C-contiguous"),
        ((out, np.int32(7), np.float32(2.5)), "takes 4 arguments"),
    ]
    for args, message in bad_args:
        with pytest.raises(TypeError, match=message):
            f((1,), (1,), args)


# ============================================================================================
# 3. Every kernel against its albor.py twin
# ============================================================================================

def attention_inputs(B, H, KVH, T, D, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, H, T, D)) * scale).astype(np.float32)
    k = (rng.standard_normal((B, KVH, T, D)) * scale).astype(np.float32)
    v = rng.standard_normal((B, KVH, T, D)).astype(np.float32)
    dout = rng.standard_normal((B, H, T, D)).astype(np.float32)
    return q, k, v, dout


def check_attention(module, B, H, KVH, T, D, tol=TOL, seed=0, scale=1.0):
    q, k, v, dout = attention_inputs(B, H, KVH, T, D, seed, scale)
    out, lse = gpu.Kernels(module, np).attention_forward(q, k, v)
    want_out, want_lse = on_albor(albor.attention_forward, q, k, v)
    assert_close(out, want_out, tol, "out")
    assert_close(lse, want_lse, tol, "lse")
    dq, dk, dv = gpu.Kernels(module, np).attention_backward(dout, q, k, v, out, lse)
    want = on_albor(albor.attention_backward, dout, q, k, v, want_out, want_lse)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert_close(got, ref, tol, name)
    return out, lse, dq, dk, dv


# (B, H, KVH, T, D): T = 1; T not a multiple of the 32-row tile or the 64-row block; T = 256;
# GQA ratios 1, 2, 4; head dims 16 (the tiny config), 32, 64, 128. Every T > 32 also has
# all-masked tiles: rows 0..31 of a 64-row block see none of the keys 32..63 of its last tile.
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 4, 4, 1, 64),
    (2, 4, 4, 45, 16),
    (1, 8, 2, 100, 32),
    (1, 4, 1, 256, 64),
    (2, 4, 2, 64, 16),   # the tiny preset's heads at T = 64
    (1, 2, 1, 70, 128),
]


@pytest.mark.parametrize("B, H, KVH, T, D", ATTENTION_SHAPES)
def test_attention_matches_albor(module, B, H, KVH, T, D):
    check_attention(module, B, H, KVH, T, D)


def test_attention_large_logits(module):
    """Scores in the thousands: nearly one-hot softmax rows; the online max keeps exp finite.
    Looser tolerance: float32 scores of size ~2000 carry absolute errors ~1e-4."""
    q, k, v, _ = attention_inputs(1, 4, 2, 80, 16, seed=3, scale=15.0)
    want_lse = on_albor(albor.attention_forward, q, k, v)[1]
    assert np.abs(want_lse).max() > 1000
    check_attention(module, 1, 4, 2, 80, 16, tol=1e-3, seed=3, scale=15.0)


def test_attention_long_sequence_forward(module):
    """T = 2048 (the longest context): 32 query blocks, 64 key tiles."""
    q, k, v, _ = attention_inputs(1, 1, 1, 2048, 16, seed=4)
    out, lse = gpu.Kernels(module, np).attention_forward(q, k, v)
    want_out, want_lse = on_albor(albor.attention_forward, q, k, v)
    assert_close(out, want_out, TOL, "out")
    assert_close(lse, want_lse, TOL, "lse")


def test_attention_first_query_attends_only_to_itself(module):
    """Causality in one line: row 0's output is v_0 and its lse its own score, whatever the
    other keys hold (here: huge values that would dominate any leak)."""
    q, k, v, _ = attention_inputs(1, 2, 1, 40, 16, seed=5)
    k[:, :, 1:] *= 1e3
    v[:, :, 1:] = 1e6
    out, lse = gpu.Kernels(module, np).attention_forward(q, k, v)
    np.testing.assert_allclose(out[0, :, 0], np.broadcast_to(v[0, 0, 0], (2, 16)), rtol=1e-6)
    np.testing.assert_allclose(lse[0, :, 0], (q[0, :, 0] @ k[0, 0, 0]) / 4.0, rtol=1e-5)


def test_attention_rejects_bad_shapes(module):
    q, k, v, _ = attention_inputs(1, 3, 2, 8, 16)
    with pytest.raises(ValueError, match="H divisible by KVH"):
        gpu.Kernels(module, np).attention_forward(q, k, v)
    q, k, v, _ = attention_inputs(1, 2, 1, 8, 18)
    with pytest.raises(ValueError, match="multiple of 4"):
        gpu.Kernels(module, np).attention_forward(q, k, v)


@pytest.mark.parametrize("rows, C, scale", [(1, 16, 1.0), (37, 64, 1.0), (300, 512, 1.0),
                                            (9, 100, 1e15), (9, 100, 1e-20)])
def test_rmsnorm_matches_albor(module, rows, C, scale):
    """Includes rows not a multiple of 8, C not a multiple of 32, and x so large or so small
    (x^2 underflows; eps decides) that a careless kernel overflows or divides by zero."""
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, C)) * scale).astype(np.float32)
    weight = (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    dout = rng.standard_normal((rows, C)).astype(np.float32)
    eps = 1e-5
    out, rstd = gpu.Kernels(module, np).rmsnorm_forward(x, weight, eps)
    want_out, want_rstd = on_albor(albor.rmsnorm_forward, x, weight, eps)
    assert_close(out, want_out, TOL, "out")
    np.testing.assert_allclose(rstd, want_rstd, rtol=1e-5)  # relative: rstd spans 1e-15..1e20
    dx, dweight = gpu.Kernels(module, np).rmsnorm_backward(dout, x, weight, rstd)
    want_dx, want_dweight = on_albor(albor.rmsnorm_backward, dout, x, weight, want_rstd)
    assert_close(dx, want_dx, TOL, "dx")
    assert_close(dweight, want_dweight, TOL, "dweight")


@pytest.mark.parametrize("shape, scale", [((1,), 1.0), ((37, 160), 3.0), ((5, 1000), 1e4)])
def test_swiglu_matches_albor(module, shape, scale):
    """Sizes not a multiple of 256; gates of +-1e4 saturate the sigmoid (exp overflows to inf,
    which must give silu = 0 or g, not NaN)."""
    rng = np.random.default_rng(7)
    gate = (rng.standard_normal(shape) * scale).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    dh = rng.standard_normal(shape).astype(np.float32)
    with np.errstate(over="ignore"):
        want_h = on_albor(albor.swiglu_forward, gate, up)
        want_dgate, want_dup = on_albor(albor.swiglu_backward, dh, gate, up)
    assert_close(gpu.Kernels(module, np).swiglu_forward(gate, up), want_h, TOL, "h")
    dgate, dup = gpu.Kernels(module, np).swiglu_backward(dh, gate, up)
    assert_close(dgate, want_dgate, TOL, "dgate")
    assert_close(dup, want_dup, TOL, "dup")


def albor_cross_entropy(logits, targets, loss_scale):
    """albor's forward + backward in float64: (mean loss, dlogits)."""
    def both(logits, targets):
        loss, probs, _ = albor.cross_entropy_forward(logits, targets)  # overwrites logits
        return loss, albor.cross_entropy_backward(probs, targets, loss_scale)
    return on_albor(both, logits, targets)


@pytest.mark.parametrize("N, V, scale", [(1, 7, 1.0), (6, 512, 1.0), (9, 1000, 5.0),
                                         (3, 32768, 1.0), (5, 300, 1e4)])
def test_cross_entropy_matches_albor(module, N, V, scale):
    """V below the block size, not a multiple of it, and the full vocabulary; ignored rows;
    logits of +-1e4 (exp overflows unless the max is subtracted first)."""
    rng = np.random.default_rng(N * V)
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[1::3] = albor.IGNORE_INDEX
    loss_scale = 0.5
    want_loss, want_dlogits = albor_cross_entropy(logits, targets, loss_scale)
    dlogits = logits.copy()
    loss, returned, n_valid = gpu.Kernels(module, np).cross_entropy_forward(dlogits, targets,
                                                                            loss_scale)
    assert returned is dlogits  # in place
    assert n_valid == int((targets != albor.IGNORE_INDEX).sum())
    tol = 1e-3 if scale > 100 else TOL
    assert abs(loss - want_loss) <= tol * max(1.0, abs(want_loss))
    assert_close(dlogits, want_dlogits, tol, "dlogits")
    assert not dlogits[targets == albor.IGNORE_INDEX].any()


def test_cross_entropy_equal_logits_and_bad_targets(module):
    """All-equal logits: loss = ln(V) exactly as albor's docstring says. A target outside
    [0, V) that is not IGNORE_INDEX gives a NaN loss, never a plausible number."""
    V = 600
    logits = np.zeros((3, V), np.float32)
    targets = np.array([5, V + 3, -7], np.int32)
    losses = np.empty(3, np.float32)
    module.get_function("cross_entropy_forward_backward")(
        (3,), (256,), (logits, targets, losses, np.int32(V), np.float32(1.0)))
    assert abs(losses[0] - math.log(V)) < 1e-5
    assert np.isnan(losses[1:]).all()
    with pytest.raises(ValueError, match="every target is IGNORE_INDEX"):
        gpu.Kernels(module, np).cross_entropy_forward(np.zeros((2, V), np.float32),
                                                    np.full(2, -100, np.int32))


def test_adamw_matches_albor(module):
    """Three updates of a decayed matrix and an undecayed norm weight, against albor.AdamW."""
    rng = np.random.default_rng(9)
    kernel_params = {"w": rng.standard_normal((30, 17)).astype(np.float32),
                     "model.norm.weight": np.ones(300, np.float32)}
    params = {name: albor.xp.asarray(p) for name, p in kernel_params.items()}  # albor's copy
    opt = albor.AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m = {name: np.zeros_like(p) for name, p in kernel_params.items()}
    v = {name: np.zeros_like(p) for name, p in kernel_params.items()}
    for t, lr in enumerate([1e-2, 3e-3, 1e-3], start=1):
        grads = {name: rng.standard_normal(p.shape).astype(np.float32) * 10.0 ** (t - 2)
                 for name, p in kernel_params.items()}
        opt.step(params, {name: albor.xp.asarray(g) for name, g in grads.items()}, lr)
        for name in params:
            wd = opt.weight_decay if albor.is_decayed(name, params[name].shape) else 0.0
            gpu.Kernels(module, np).adamw_update(kernel_params[name], grads[name], m[name],
                                                 v[name], lr, opt.beta1, opt.beta2, opt.eps, wd, t)
        # float32 both sides, but the kernel forms 1 - beta1 from float32 beta1 (0.100000024)
        # where NumPy rounds the double 1 - 0.9 (0.1): relative differences of a few 1e-7,
        # more where m's two terms nearly cancel
        for name in params:
            for got, want in [(kernel_params[name], params[name]), (m[name], opt.m[name]),
                              (v[name], opt.v[name])]:
                want = albor.to_numpy(want)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(kernel_params["model.norm.weight"], 1.0)  # it did move


@pytest.mark.parametrize("B, T, V, C, tokens", [(1, 1, 5, 16, 5), (2, 45, 50, 40, 12),
                                                 (3, 70, 300, 300, 300)])
def test_embedding_backward_matches_albor(module, B, T, V, C, tokens):
    """Tokens drawn from the first `tokens` ids: many repeats (12 ids over 90 positions), ids
    that never occur (their rows must stay as they were), C below, above and not a multiple of
    the 128 threads. The kernel adds each token's rows in position order, as NumPy's add.at
    (albor's reference line) does: the same bits, not only close."""
    rng = np.random.default_rng(V + C)
    dwte = rng.standard_normal((V, C)).astype(np.float32)  # it ADDS into what is there
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    idx = rng.integers(0, tokens, (B, T))
    want = dwte.copy()
    np.add.at(want, idx.reshape(-1), dout.reshape(-1, C))  # albor.embedding_backward's NumPy line
    got = dwte.copy()
    gpu.Kernels(module, np).embedding_backward(got, dout, idx)
    np.testing.assert_array_equal(got, want)

    def albor_embedding_backward(dwte, dout, idx):
        albor.embedding_backward(dwte, dout, idx)  # in place
        return dwte
    assert_close(got, on_albor(albor_embedding_backward, dwte, dout, idx), TOL, "dwte")
    unused = np.setdiff1d(np.arange(V), idx)
    np.testing.assert_array_equal(got[unused], dwte[unused])


def to_host(a):
    return a.get() if hasattr(a, "get") else a  # cupy -> numpy


def run_all_kernels(module, xp=np):
    """One small launch of every kernel (multi-tile, partial tiles, GQA, several blocks);
    returns {name: NumPy output arrays} and checks nothing. xp = numpy (emulator) or cupy."""
    q, k, v, dout = (xp.asarray(a) for a in attention_inputs(1, 4, 2, 80, 16, seed=11))
    kernels = gpu.Kernels(module, xp)
    results = {}
    out, lse = kernels.attention_forward(q, k, v)
    results["attention_forward"] = (out, lse)
    results["attention_backward"] = kernels.attention_backward(dout, q, k, v, out, lse)
    rng = np.random.default_rng(12)
    x = xp.asarray(rng.standard_normal((20, 40)).astype(np.float32))
    w = xp.asarray(rng.standard_normal(40).astype(np.float32))
    y, rstd = kernels.rmsnorm_forward(x, w, 1e-5)
    results["rmsnorm"] = (y, rstd) + kernels.rmsnorm_backward(x * 0.5, x, w, rstd)
    results["swiglu"] = ((kernels.swiglu_forward(x, y),)
                         + kernels.swiglu_backward(rstd * x, x, y))
    logits = xp.asarray(rng.standard_normal((3, 300)).astype(np.float32))
    targets = xp.asarray(np.array([4, -100, 299], np.int32))
    results["cross_entropy"] = kernels.cross_entropy_forward(logits, targets)[1:2]
    p, m, vv = x.copy(), xp.zeros_like(x), xp.zeros_like(x)
    kernels.adamw_update(p, y, m, vv, 1e-2, 0.9, 0.95, 1e-8, 0.1, 1)
    results["adamw"] = (p, m, vv)
    dwte = xp.asarray(rng.standard_normal((70, 40)).astype(np.float32))  # 70 tokens, C = 40
    idx = xp.asarray(rng.integers(0, 30, (4, 5)))  # 20 positions: repeats, and absent tokens
    kernels.embedding_backward(dwte, x, idx)
    results["embedding_backward"] = (dwte,)
    return {name: tuple(to_host(a) for a in arrays) for name, arrays in results.items()}


def wrong_results(results, baseline):
    """Names of the results that are not finite or differ from the baseline's."""
    wrong = []
    for name, arrays in results.items():
        for got, want in zip(arrays, baseline[name]):
            got, want = f64(got), f64(want)
            if not np.isfinite(got).all() or np.abs(got - want).max() > TOL * max(1.0, np.abs(want).max()):
                wrong.append(name)
                break
    return wrong


@pytest.mark.parametrize("schedule, seed", [("reverse", 0), ("random", 1), ("random", 2)])
def test_same_bits_under_every_thread_order(module, schedule, seed):
    """The fibers of a block run in another order: a race-free kernel gives the same bits."""
    baseline = run_all_kernels(module)
    try:
        module.set_schedule(schedule, seed)
        other = run_all_kernels(module)
    finally:
        module.set_schedule("forward")
    for name in baseline:
        for a, b in zip(baseline[name], other[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} under {schedule} order")


def test_emulator_portable_fiber_switch(module):
    """Off x86-64 the emulator switches fibers with swapcontext (-DEMU_USE_UCONTEXT forces it
    here): same bits for every kernel, same deadlock report."""
    portable = EmuModule(KERNELS_CU, extra_flags=["-DEMU_USE_UCONTEXT"])
    baseline, results = run_all_kernels(module), run_all_kernels(portable)
    for name in baseline:
        for a, b in zip(baseline[name], results[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    selftest = EmuModule(TESTS / "emu_selftest.cu", code=SELFTEST_CU,
                         extra_flags=["-DEMU_USE_UCONTEXT"])
    with pytest.raises(EmuError, match="deadlock"):
        selftest.get_function("barrier_in_branch")((1,), (64,), (np.zeros(64, np.float32),))


# ============================================================================================
# 4. Every __syncthreads is needed, and the emulator notices a missing one
# ============================================================================================

SYNC_LINES = [number for number, line in enumerate(SOURCE.splitlines(), start=1)
              if re.match(r"\s*__syncthreads\(\);", line)]


def test_found_the_barriers():
    """SYNC_LINES holds every __syncthreads statement of kernels.cu (not the mentions in comments)."""
    assert len(SYNC_LINES) == strip_comments(SOURCE).count("__syncthreads()") >= 8


@pytest.mark.parametrize("line", SYNC_LINES)
def test_removing_a_syncthreads_is_caught(module, line):
    """Delete the __syncthreads on `line` (in a copy of kernels.cu), rebuild, run every kernel:
    some result must differ from the intact kernels' (NaN from unwritten shared memory, or a
    tile overwritten while still in use) or the emulator must report an error, under at least
    one of three thread orders. (One order is not enough: with thread 0 scheduled last, the
    rmsnorm_backward_weight race happens to read the right values.)"""
    lines = SOURCE.splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace("__syncthreads();", "/* removed */")
    broken = EmuModule(TESTS / "build" / f"kernels_without_sync_line{line}.cu",
                       code="".join(lines))
    reference = run_all_kernels(module)  # the intact kernels (checked against albor above)
    failures = []
    for schedule, seed in [("forward", 0), ("reverse", 0), ("random", 3)]:
        broken.set_schedule(schedule, seed)
        try:
            wrong = wrong_results(run_all_kernels(broken), reference)
        except EmuError as error:
            wrong = [str(error)]
        if wrong:
            failures.append((schedule, wrong))
    assert failures, f"kernels.cu still gives right answers without the __syncthreads on line {line}"


# ============================================================================================
# 5. On a GPU (deselected without one): the same kernels through cupy.RawModule
# ============================================================================================

@pytest.mark.gpu
def test_gpu_kernels_match_emulator_and_albor(module):
    """cupy.RawModule runs kernels.cu: every kernel close to the emulator's result (the GPU's
    __expf and fused multiply-adds differ in the last bits, hence 1e-4), attention close to
    albor's float64 reference on every test shape, and two runs give the same bits."""
    import cupy
    compiled = cupy.RawModule(code=SOURCE)
    first, second = run_all_kernels(compiled, cupy), run_all_kernels(compiled, cupy)
    cpu = run_all_kernels(module)
    for name in cpu:
        for a, b, c in zip(first[name], second[name], cpu[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} not deterministic")
            assert_close(a, c, 1e-4, name)
    for B, H, KVH, T, D in ATTENTION_SHAPES + [(4, 8, 2, 2048, 64)]:
        q, k, v, dout = attention_inputs(B, H, KVH, T, D)
        kernels = gpu.Kernels(compiled, cupy)
        out, lse = kernels.attention_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v))
        grads = kernels.attention_backward(cupy.asarray(dout), cupy.asarray(q), cupy.asarray(k),
                                           cupy.asarray(v), out, lse)
        want_out, want_lse = on_albor(albor.attention_forward, q, k, v)
        want = on_albor(albor.attention_backward, dout, q, k, v, want_out, want_lse)
        for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads,
                                  (want_out, want_lse) + want):
            assert_close(to_host(got), ref, 1e-4, f"{name} at {(B, H, KVH, T, D)}")
