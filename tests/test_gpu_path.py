"""albor's GPU path: everything a CPU can check, and (gpu-marked) what only a GPU can.

On the CPU the kernel dispatch runs end to end through the emulator: with
`gpu.settings(kernels=gpu.Kernels(tests/kernel_emu.EmuModule, numpy))` (kernels.cu compiled for
the CPU), every layer that has a kernel calls kernels.cu through the same launch code a GPU
runs, with xp = NumPy. The `kernels_on` fixture sets that up (also on a GPU machine: it pins albor to
NumPy for the test). Mixed precision (--dtype tf32/bf16/fp16) runs on the CPU as gpu.py's
emulation: the same half operands and roundings, NumPy's float32 products. And
tests/fake_device.py stands in for a GPU where a CPU can tell: it counts the host's waits for
the device and refuses host arrays mixed with device arrays, as CuPy does.

Tolerances: "close" means max |got - want| <= tol * max |want| per tensor. The kernel path
and the reference path are both float32 but add in different orders; on the tiny model the
measured differences are below 1e-6 of the largest gradient, checked at 1e-5.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import albor
import cpu
import gpu
import train
from tests.fake_device import DeviceArray, FakeDevice
from tests.kernel_emu import KERNELS_CU, EmuModule, parse_kernels

KERNEL_NAMES = set(parse_kernels(KERNELS_CU.read_text()))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


class Recorder:
    """Wraps a kernel module and records the name of every kernel launched through it."""

    def __init__(self, module):
        self.module = module
        self.launched = []

    def get_function(self, name):
        self.launched.append(name)
        return self.module.get_function(name)


@pytest.fixture(scope="module")
def emulator():
    return EmuModule(KERNELS_CU)


def on_backend(monkeypatch, xp, backend):
    """albor and gpu.py on `xp` (NumPy, or the stand-in device's) for a while."""
    for module in (albor, gpu):
        monkeypatch.setattr(module, "xp", xp)
        monkeypatch.setattr(module, "BACKEND", backend)
    monkeypatch.setattr(gpu, "cublas_gemm", gpu.emulated_gemm)  # the GemmEx call's stand-in


@pytest.fixture
def numpy_backend(monkeypatch):
    """albor on NumPy for this test, whatever machine runs it."""
    on_backend(monkeypatch, np, "numpy")
    with gpu.settings(kernels=None, matmul_dtype="fp32"):
        yield


@pytest.fixture
def kernels_on(numpy_backend, emulator, monkeypatch):
    """albor's GPU dispatch switched on, with the CPU emulator as the compiled kernels.cu."""
    recorder = Recorder(emulator)
    with gpu.settings(kernels=gpu.Kernels(recorder, np)):
        yield recorder


def close(got, want, tol=TOL, what=""):
    got, want = albor.to_numpy(got).astype(np.float64), albor.to_numpy(want).astype(np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = float(np.abs(got - want).max())
    bound = tol * float(np.abs(want).max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def batch(config, B=2, T=45, seed=1):
    """Random ids and targets, T not a multiple of the kernels' 32/64-row tiles, and a few
    IGNORE_INDEX targets (padding)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[0, -7:] = albor.IGNORE_INDEX
    return idx, targets


def loss_and_grads(params, config, idx, targets, loss_scale=1.0, grads=None):
    loss, cache = albor.forward(params, config, albor.xp.asarray(idx), albor.xp.asarray(targets))
    return loss, albor.backward(params, config, cache, loss_scale=loss_scale, grads=grads)


# ============================================================================================
# 1. The kernel dispatch, end to end on the CPU emulator
# ============================================================================================

def test_whole_model_through_the_kernels_matches_the_reference(kernels_on, monkeypatch):
    """Forward + backward of the tiny model: every kernel but AdamW's runs, and loss and all
    gradients equal the reference path's within 1e-5."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=3)
    idx, targets = batch(config)
    loss_k, grads_k = loss_and_grads(params, config, idx, targets)
    assert set(kernels_on.launched) == KERNEL_NAMES - {"adamw_update"}
    launched = len(kernels_on.launched)
    with gpu.settings(kernels=None):
        loss_r, grads_r = loss_and_grads(params, config, idx, targets)
    assert len(kernels_on.launched) == launched  # the switch really switches
    assert abs(loss_k - loss_r) <= TOL * abs(loss_r)
    assert list(grads_k) == list(grads_r)
    for name in grads_r:
        assert grads_k[name].dtype == np.float32
        close(grads_k[name], grads_r[name], what=name)


def test_kernels_with_loss_scale_and_accumulation(kernels_on, monkeypatch):
    """backward(loss_scale=..., grads=...) on the kernel path: the fused cross-entropy leaves
    the gradient of the mean loss, backward scales it, and the second micro-batch adds in."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=4)
    (idx1, t1), (idx2, t2) = batch(config, seed=5), batch(config, seed=6)

    def two_micro_batches():
        _, grads = loss_and_grads(params, config, idx1, t1, loss_scale=0.25)
        return loss_and_grads(params, config, idx2, t2, loss_scale=0.75, grads=grads)[1]
    grads_k = two_micro_batches()
    with gpu.settings(kernels=None):
        grads_r = two_micro_batches()
    for name in grads_r:
        close(grads_k[name], grads_r[name], what=name)


def test_logits_through_the_kernels(kernels_on, monkeypatch):
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=7)
    idx, _ = batch(config, B=1, T=70)
    logits_k, _ = albor.forward(params, config, idx)
    with gpu.settings(kernels=None):
        logits_r, _ = albor.forward(params, config, idx)
    close(logits_k, logits_r, what="logits")


def test_training_steps_with_the_fused_adamw(kernels_on, monkeypatch):
    """Three optimizer steps on the kernel path (forward, backward, clip, then the fused
    adamw_update) move the parameters where albor's reference AdamW moves them from the same
    gradients. (Two whole runs are not compared: AdamW's first steps are about lr * sign(g),
    and where a gradient is about 0 its sign is rounding noise, so an lr-sized difference
    would be no bug. The kernel path's gradients are checked against the reference elsewhere.)"""
    config = albor.get_config("tiny")
    params_k = albor.init_params(config, seed=8)
    params_r = {name: p.copy() for name, p in params_k.items()}
    optimizer_k, optimizer_r = albor.AdamW(params_k), albor.AdamW(params_r)
    for step in range(3):
        idx, targets = batch(config, seed=10 + step)
        _, grads = loss_and_grads(params_k, config, idx, targets)
        albor.clip_grad_norm(grads, 1.0)
        grads_r = {name: g.copy() for name, g in grads.items()}
        optimizer_k.step(params_k, grads, lr=1e-3)
        with gpu.settings(kernels=None):
            optimizer_r.step(params_r, grads_r, lr=1e-3)
        for name in params_r:
            close(params_k[name], params_r[name], 1e-6, f"step {step + 1}: {name}")
    assert "adamw_update" in kernels_on.launched


def test_the_kernel_path_gives_the_same_bits_under_every_thread_order(kernels_on, emulator):
    """Whole-model gradients, run twice and with the emulator's fibers in reverse and random
    order: identical bytes (no race, no order-dependent sum anywhere on the kernel path)."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=9)
    idx, targets = batch(config, B=2, T=33)
    runs = []
    try:
        for schedule, seed in [("forward", 0), ("forward", 0), ("reverse", 0), ("random", 4)]:
            emulator.set_schedule(schedule, seed)
            runs.append(loss_and_grads(params, config, idx, targets))
    finally:
        emulator.set_schedule("forward")
    loss0, grads0 = runs[0]
    for loss, grads in runs[1:]:
        assert loss == loss0
        for name in grads0:
            assert grads[name].tobytes() == grads0[name].tobytes(), name


def test_float64_and_unsupported_head_dims_take_the_reference_code(kernels_on):
    """The kernels are float32 only and need head dims that are multiples of 4, at most 128:
    anything else runs the reference code (nothing is launched)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 5, 16))
    albor.attention_forward(q, q[:, :1], q[:, :1])                 # float64
    albor.rmsnorm_forward(q, np.ones(16), 1e-5)
    q = rng.standard_normal((1, 2, 5, 18)).astype(np.float32)     # D = 18
    albor.attention_forward(q, q[:, :1].copy(), q[:, :1].copy())
    assert kernels_on.launched == []
    albor.attention_forward(q[..., :16].copy(), q[:, :1, :, :16].copy(), q[:, :1, :, :16].copy())
    assert kernels_on.launched == ["attention_forward"]


def test_embedding_backward_on_the_kernel_path_is_numpys_add_at_bit_for_bit(kernels_on):
    rng = np.random.default_rng(2)
    dwte = rng.standard_normal((40, 24)).astype(np.float32)
    dout = rng.standard_normal((3, 50, 24)).astype(np.float32)
    idx = rng.integers(0, 9, (3, 50))
    want = dwte.copy()
    np.add.at(want, idx.reshape(-1), dout.reshape(-1, 24))
    albor.embedding_backward(dwte, dout, idx)
    assert kernels_on.launched == ["embedding_backward"]
    np.testing.assert_array_equal(dwte, want)


def test_kernels_cu_is_compiled_once_per_process(numpy_backend):
    """A Kernels builds the RawModule from kernels.cu's text on its first launch only."""
    built = []

    class FakeModule:
        def get_function(self, name):
            return name

    class FakeCupy:
        @staticmethod
        def RawModule(code):
            built.append(code)
            return FakeModule()
    kernels = gpu.Kernels(xp=FakeCupy)
    assert built == []
    assert [kernels.function(name) for name in ("a", "b", "a")] == ["a", "b", "a"]
    assert built == [KERNELS_CU.read_text()]


def test_albor_kernels_switch(monkeypatch):
    for value, expected in [("1", True), ("0", False), ("", True), (" 0 ", False)]:
        monkeypatch.setenv("ALBOR_KERNELS", value)
        assert gpu.kernels_setting() is expected
    monkeypatch.setenv("ALBOR_KERNELS", "yes")
    with pytest.raises(ValueError, match="ALBOR_KERNELS must be 0 .* or 1"):
        gpu.kernels_setting()
    # on the CPU there is no GPU to run kernels on, whatever the switch says
    result = subprocess.run([sys.executable, "-c", "import albor, gpu; print(gpu.kernels())"],
                            cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "ALBOR_DEVICE": "cpu", "ALBOR_KERNELS": "1"})
    assert result.stdout.strip() == "None", result.stderr
    result = subprocess.run([sys.executable, "-c", "import albor"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "ALBOR_KERNELS": "off"})
    assert result.returncode != 0 and "ALBOR_KERNELS must be 0" in result.stderr


# ============================================================================================
# 2. Mixed-precision matmuls: the cuBLAS call's arguments (section 6: the numbers, emulated)
# ============================================================================================

def test_every_dtype_is_accepted_and_nothing_else(numpy_backend):
    for name in ("tf32", "bf16", "fp16", "fp32"):   # on a CPU: emulated
        gpu.configure(matmul_dtype=name)
        assert gpu.matmul_dtype() == name
    with pytest.raises(ValueError, match="one of fp32, tf32, bf16, fp16"):
        gpu.configure(matmul_dtype="fp8")
    assert gpu.matmul_dtype() == "fp32"


def test_fp32_matmul_is_the_at_operator(numpy_backend):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    w = rng.standard_normal((3, 7)).astype(np.float32)
    assert albor.matmul(a, w.T).tobytes() == (a @ w.T).tobytes()


def memory_of(x):
    """The flat buffer of a C- or F-contiguous array, in memory order."""
    return x.ravel(order="C" if x.flags.c_contiguous else "F")


def cublas_gemm(op_a, op_b, m, n, k, a, lda, b, ldb, ldc):
    """NumPy model of cublasGemmEx (alpha 1, beta 0): column-major C (m, n) = op(A) op(B),
    with A and B read from raw memory through their leading dimensions. Returns C's memory."""
    def stored(x, rows, cols, ld):
        flat = memory_of(x)
        return np.stack([flat[j * ld:j * ld + rows] for j in range(cols)], axis=1)  # (rows, cols)
    A = stored(a, m, k, lda) if op_a == gpu.CUBLAS_OP_N else stored(a, k, m, lda).T
    B = stored(b, k, n, ldb) if op_b == gpu.CUBLAS_OP_N else stored(b, n, k, ldb).T
    C = A.astype(np.float64) @ B
    out = np.zeros(ldc * n)
    for j in range(n):
        out[j * ldc:j * ldc + m] = C[:, j]
    return out


@pytest.mark.parametrize("a_layout", ["C", "F"])
@pytest.mark.parametrize("b_layout", ["C", "F", "strided"])
def test_gemm_plan_maps_row_major_onto_column_major_cublas(numpy_backend, a_layout, b_layout):
    """The arguments `matmul` hands cublasGemmEx, run through a NumPy model of cuBLAS's GEMM,
    give a @ b for every layout the model uses: x @ w.T (w.T F-contiguous), dy @ w (both C),
    dy.T @ x (dy.T F-contiguous), and a strided view (copied first)."""
    rng = np.random.default_rng(1)
    M, K, N = 5, 7, 3
    a = rng.standard_normal((M, K)) if a_layout == "C" else rng.standard_normal((K, M)).T
    b = {"C": rng.standard_normal((K, N)), "F": rng.standard_normal((N, K)).T,
         "strided": rng.standard_normal((K, 2 * N))[:, ::2]}[b_layout]
    plan = gpu.gemm_plan(a, b)
    out = cublas_gemm(plan["op_b"], plan["op_a"], plan["m"], plan["n"], plan["k"], plan["b"],
                      plan["ld_b"], plan["a"], plan["ld_a"], plan["ld_out"])
    got = out.reshape(M, N)  # the row-major (M, N) output's memory
    np.testing.assert_allclose(got, a @ b, rtol=1e-12)


def test_gemm_types_for_each_dtype(numpy_backend):
    """The GemmEx data and compute types (cuBLAS's enums) for the operands a GPU hands cuBLAS at
    each --dtype: half operands with float32 sums (CUBLAS_COMPUTE_32F = 68), bfloat16 as its
    bits (CUDA_R_16BF = 14) and float16 (CUDA_R_16F = 2); float32 operands (CUDA_R_32F = 0)
    with CUBLAS_COMPUTE_32F_FAST_TF32 (77) for tf32. Operands of two types are refused."""
    x = np.ones((4, 8), np.float32)
    w = np.ones((3, 8), np.float32)
    on_gpu = {"bf16": gpu.bf16_bits, "fp16": lambda a: a.astype(np.float16), "tf32": lambda a: a}
    for dtype, want_type, want_compute in [("bf16", 14, 68), ("fp16", 2, 68), ("tf32", 0, 77)]:
        with gpu.settings(matmul_dtype=dtype):
            a, b = on_gpu[dtype](x), on_gpu[dtype](w).T
            assert gpu.gemm_types(a, b) == (want_type, want_compute), dtype
    with pytest.raises(TypeError, match="one type"):
        gpu.gemm_types(x, w.T.astype(np.float16))


# ============================================================================================
# 3. Dynamic loss scaling, with injected overflows (section 4: real ones)
# ============================================================================================

def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps():
    scaler = gpu.LossScaler(scale=2.0 ** 16, growth_interval=3)
    assert scaler.update(False) is False and scaler.scale == 2.0 ** 15
    assert scaler.update(False) is False and scaler.scale == 2.0 ** 14
    assert scaler.skipped == 2
    assert [scaler.update(True) for _ in range(2)] == [True, True] and scaler.scale == 2.0 ** 14
    assert scaler.update(False) is False and scaler.scale == 2.0 ** 13  # the run is broken
    assert [scaler.update(True) for _ in range(3)] == [True] * 3 and scaler.scale == 2.0 ** 14
    assert scaler.good_steps == 0
    state = scaler.state()
    other = gpu.LossScaler()
    other.load_state(state)
    assert other.state() == state == {"scale": 2.0 ** 14, "good_steps": 0, "skipped": 3}


def test_loss_scaler_refuses_bad_settings_and_stops_at_its_floor():
    with pytest.raises(ValueError, match="power of two"):
        gpu.LossScaler(scale=1000.0)
    with pytest.raises(ValueError, match="growth_interval"):
        gpu.LossScaler(growth_interval=0)
    scaler = gpu.LossScaler(scale=2.0)
    assert scaler.update(False) is False and scaler.scale == 1.0
    with pytest.raises(FloatingPointError, match="overflow even at loss scale 1"):
        scaler.update(False)


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_unscaled_gradients_equal_the_fp32_ones(path, request, monkeypatch):
    """backward on 2**16 * loss, then unscale: the very bits of the unscaled backward (a power
    of two commutes with every rounding), on the reference and the kernel path."""
    request.getfixturevalue("kernels_on" if path == "kernels" else "numpy_backend")
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=11)
    idx, targets = batch(config)
    _, plain = loss_and_grads(params, config, idx, targets)
    scaler = gpu.LossScaler(scale=2.0 ** 16)
    _, scaled = loss_and_grads(params, config, idx, targets, loss_scale=scaler.scale)
    assert float(np.abs(scaled["model.norm.weight"]).max()) > 1000 * float(
        np.abs(plain["model.norm.weight"]).max())
    scaler.unscale(scaled)
    for name in plain:
        assert scaled[name].tobytes() == plain[name].tobytes(), name


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_an_overflowing_step_is_skipped_and_a_clean_one_is_the_fp32_step(numpy_backend, bad):
    """train.apply_update with a LossScaler, train.py's fp16 update: with an inf or NaN in one gradient nothing
    moves (weights, m, v, the update count) and the scale halves; with clean gradients it is
    exactly clip + AdamW on the unscaled gradients."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=12)
    idx, targets = batch(config)
    scaler = gpu.LossScaler(scale=2.0 ** 10, growth_interval=2)
    optimizer = albor.AdamW(params)
    before = {name: p.copy() for name, p in params.items()}

    _, grads = loss_and_grads(params, config, idx, targets, loss_scale=scaler.scale)
    grads["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    (norm, _), stepped, _ = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
    assert not stepped and not math.isfinite(norm)
    assert scaler.scale == 2.0 ** 9 and scaler.skipped == 1 and optimizer.t == 0
    for name in params:
        assert params[name].tobytes() == before[name].tobytes()
        assert not optimizer.m[name].any() and not optimizer.v[name].any()

    twin = {name: p.copy() for name, p in params.items()}
    twin_optimizer = albor.AdamW(twin)
    for _ in range(2):
        _, grads = loss_and_grads(params, config, idx, targets, loss_scale=scaler.scale)
        (norm, _), stepped, _ = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
        _, plain = loss_and_grads(twin, config, idx, targets)
        plain_norm = albor.clip_grad_norm(plain, 1.0)
        twin_optimizer.step(twin, plain, lr=1e-3)
        assert stepped and norm == plain_norm
        for name in params:
            assert params[name].tobytes() == twin[name].tobytes(), name
    assert scaler.scale == 2.0 ** 10  # two clean steps in a row: grown back


def test_train_py_dtype_flag(numpy_backend, capsys):
    """--dtype takes the four precisions (a CPU emulates the three low ones) and nothing else;
    --help says what each does."""
    for name in ("fp32", "tf32", "bf16", "fp16"):
        args, _ = train.parse_settings(["--dtype", name])
        assert args["dtype"] == name
    assert train.DEFAULTS["dtype"] == "fp32"
    with pytest.raises(SystemExit):
        train.parse_settings(["--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    help_text = " ".join(train.build_parser().format_help().split())
    for words in ("half copies of the weight matrices made once a step", "dynamic loss scaling",
                  "master weights, optimizer state", "On a CPU tf32/bf16/fp16 are emulated"):
        assert words in help_text, words


def test_train_step_with_the_loss_scaler(numpy_backend, monkeypatch):
    """train.py's step with --dtype fp16's scaler (here on fp32 matmuls, which a CPU has):
    the same weights as the unscaled step; with an overflowing gradient injected into
    backward's result, no update, the step reported as not taken, the scale halved."""
    config = albor.get_config("tiny")
    rng = np.random.default_rng(13)
    inputs = rng.integers(0, config.vocab_size, (2, 3, 20))     # 2 micro-batches of 3 rows
    targets = rng.integers(0, config.vocab_size, (2, 3, 20))
    targets[1, 0, 10:] = albor.IGNORE_INDEX
    timing = {"forward_seconds": 0.0, "backward_seconds": 0.0, "optimizer_seconds": 0.0}
    runs = []
    for scaler in (None, gpu.LossScaler()):
        params = albor.init_params(config, seed=14)
        optimizer = albor.AdamW(params)
        result = train.train_step(params, config, optimizer, inputs, targets, 1e-3, 1.0, 1,
                                  timing, scaler)
        runs.append((result, params))
    (plain, plain_params), (scaled, scaled_params) = runs
    assert scaled == plain and scaled[3] is True
    for name in plain_params:
        assert scaled_params[name].tobytes() == plain_params[name].tobytes()
    assert timing["forward_seconds"] > 0 and timing["optimizer_seconds"] > 0

    backward = albor.backward

    def overflowing_backward(*args, **kwargs):
        grads = backward(*args, **kwargs)
        grads["model.norm.weight"][0] = np.inf
        return grads
    monkeypatch.setattr(albor, "backward", overflowing_backward)
    scaler = gpu.LossScaler()
    before = {name: p.copy() for name, p in scaled_params.items()}
    loss, (norm, _), _, stepped = train.train_step(scaled_params, config, optimizer, inputs, targets,
                                              1e-3, 1.0, 2, timing, scaler)
    assert math.isfinite(loss) and not math.isfinite(norm) and stepped is False
    assert scaler.scale == 2.0 ** 15 and optimizer.t == 1
    for name in before:
        assert scaled_params[name].tobytes() == before[name].tobytes()
    scaler.scale = 1.0  # overflow at the floor: the run diverges, as with fp32
    with pytest.raises(train.Diverged, match="overflow even at loss scale 1"):
        train.train_step(scaled_params, config, optimizer, inputs, targets, 1e-3, 1.0, 3, timing,
                         scaler)


# ============================================================================================
# 4. Mixed precision on the CPU: gpu.py's emulation of bf16 / fp16 / tf32
# ============================================================================================

def reference_rounding(x, dropped):
    """float32 x rounded to 23 - dropped mantissa bits, the slow way: of the two neighbours
    with zeros in the dropped bits, the nearer (measured in float64, exactly), and at a tie the
    one whose last kept bit is 0; past the largest finite number, inf. As float64."""
    out = []
    for value in np.asarray(x, np.float32).reshape(-1):
        if np.isnan(value):
            out.append(np.nan)
            continue
        bits = int(value.view(np.uint32))
        low = bits & ~((1 << dropped) - 1)           # toward zero
        high = low + (1 << dropped)                  # away from zero
        candidates = []
        for b in (low, high):
            exponent_all_ones = (b >> 23) & 0xFF == 0xFF
            magnitude = 2.0 ** 128 if exponent_all_ones else float(np.uint32(b).view(np.float32))
            candidates.append(-abs(magnitude) if value < 0 else abs(magnitude))
        d_low, d_high = abs(float(value) - candidates[0]), abs(candidates[1] - float(value))
        chosen = 0 if d_low < d_high or (d_low == d_high and (low >> dropped) & 1 == 0) else 1
        result = candidates[chosen]
        out.append(math.copysign(math.inf, result) if abs(result) >= 2.0 ** 128 else result)
    return np.array(out).reshape(np.shape(x))


def rounding_cases(dropped):
    """float32 values that test a rounding: random ones of every size, exact ties with an even
    and an odd last kept bit, neighbours of ties, the largest finite numbers, subnormals,
    zeros, inf and NaN."""
    rng = np.random.default_rng(dropped)
    random = rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)
    tie = 1 << (dropped - 1)
    base = rng.integers(0, 0x7F000000, 200, dtype=np.uint32) & np.uint32(~((1 << dropped) - 1) & 0xFFFFFFFF)
    special_bits = np.concatenate([base + tie, base + tie + (1 << dropped), base + tie - 1, base + tie + 1,
                                   np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 1, 0x807FFFFF,
                                             0x80000000, 0, 0x7F800000, 0xFF800000, 0x7FC00000,
                                             0x7F800001, 0xFFFFFFFF], dtype=np.uint32)])
    special = special_bits.astype(np.uint32).view(np.float32)
    return np.concatenate([random.astype(np.float32), special, -special[:800]])


def test_bf16_and_tf32_round_to_nearest_even(numpy_backend):
    """gpu.bf16_bits and round_to_tf32 against the slow reference above, on every kind of
    value; NaN stays NaN, past bfloat16's largest number is inf; bf16 is float32's upper half
    (the bits a GPU hands cuBLAS as CUDA_R_16BF)."""
    for dropped, rounded in [(16, lambda x: gpu.to_float32(gpu.bf16_bits(x))), (13, gpu.round_to_tf32)]:
        x = rounding_cases(dropped)
        got = rounded(x)
        assert got.dtype == np.float32
        want = reference_rounding(x, dropped)
        assert np.array_equal(got.astype(np.float64), want, equal_nan=True), dropped
        assert not (got.view(np.uint32)[~np.isnan(got)] & np.uint32((1 << dropped) - 1)).any()
    assert gpu.bf16_bits(np.float32([3.4e38, -np.nan])).tolist()[0] == 0x7F80   # rounds to inf
    assert np.isnan(gpu.to_float32(gpu.bf16_bits(np.float32([np.nan, -np.nan])))).all()
    x = np.float32([1.0, -2.5, 3.4e38])
    assert gpu.bf16_bits(x).tolist() == (x.view(np.uint32) >> 16).tolist()[:2] + [0x7F80]


def test_fp16_rounding_is_numpys_float16(numpy_backend):
    """gpu.round_to_fp16 (the CPU's float16, kept in float32) gives exactly NumPy's float16
    cast on every kind of value (subnormals, ties, 65504, overflow to inf, NaN); and to_half on
    a CPU is that, on a GPU a real float16 array (the stand-in GPU's step test shows the two
    give the same bytes)."""
    x = np.concatenate([rounding_cases(13), np.float32([65504, 65519.9, 65520, -7e4, 2.0**-24,
                                                        2.0**-25, 3 * 2.0**-25, 2.0**-14 * (1 - 2**-12)])])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = gpu.round_to_fp16(x)
    assert got.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))
    assert gpu.to_half(x, "fp16").tobytes() == got.tobytes()
    assert gpu.to_half(x, "bf16").tobytes() == gpu.to_float32(gpu.bf16_bits(x)).tobytes()


@pytest.mark.parametrize("dtype, bound", [("tf32", 4e-3), ("bf16", 3e-2), ("fp16", 4e-3)])
def test_mixed_precision_products(numpy_backend, dtype, bound):
    """albor.matmul at each --dtype, for the layouts the model uses (x @ w.T, dy @ w, dy.T @
    x): float32 out; the product of the operands rounded to the format with float32 sums
    (within 1e-5 of float64's product of the rounded operands); against the exact product, an
    error of a few units of the format's rounding (2**-11 for tf32/fp16, 2**-8 for bf16) and
    more than 10x fp32's: the rounding really happens."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    dy = rng.standard_normal((64, 48)).astype(np.float32)
    dropped = {"tf32": 13, "bf16": 16}.get(dtype)
    rounded = ((lambda a: reference_rounding(a, dropped)) if dropped else
               (lambda a: a.astype(np.float16).astype(np.float64)))
    for a, b in [(x, w.T), (dy, w), (dy.T, x)]:
        exact = a.astype(np.float64) @ b.astype(np.float64)
        fp32_error = np.abs(a @ b - exact).max() / np.abs(exact).max()
        with gpu.settings(matmul_dtype=dtype):
            got = albor.matmul(a, b)
        assert got.dtype == np.float32 and got.shape == exact.shape
        close(got, rounded(a) @ rounded(b), 1e-5, f"{dtype}: the rounded operands' product")
        error = np.abs(got - exact).max() / np.abs(exact).max()
        assert 10 * fp32_error < error <= bound, (dtype, error, fp32_error)


def test_fp16_products_overflow_to_inf_and_bf16_ones_do_not(numpy_backend):
    a = np.full((2, 3), 7e4, np.float32)   # beyond float16's 65504
    b = np.ones((3, 2), np.float32)
    with gpu.settings(matmul_dtype="fp16"):
        assert np.isinf(albor.matmul(a, b)).all()
    with gpu.settings(matmul_dtype="bf16"):
        assert np.isfinite(albor.matmul(a, b)).all()


def tiny_step_batch(config, seed, micro_batches=2, B=2, T=24):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, config.vocab_size, (micro_batches, B, T))
    targets = rng.integers(0, config.vocab_size, (micro_batches, B, T))
    targets[0, 0, T // 2:] = albor.IGNORE_INDEX
    return inputs, targets


def new_timing():
    return {"forward_seconds": 0.0, "backward_seconds": 0.0, "optimizer_seconds": 0.0}


def weight_conversions(params, config, optimizer, inputs, targets, step, monkeypatch):
    """The weights gpu.to_half converts during one train_step, each as (name, its half copy)."""
    converted = []
    to_half = gpu.to_half

    def recording(x, dtype):
        half = to_half(x, dtype)
        converted.extend((name, half) for name, w in params.items() if x is w)
        return half
    monkeypatch.setattr(gpu, "to_half", recording)
    train.train_step(params, config, optimizer, inputs, targets, 1e-3, 1.0, step, new_timing())
    monkeypatch.setattr(gpu, "to_half", to_half)
    return converted


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_weights_are_made_once_per_step_from_the_updated_weights(numpy_backend, monkeypatch,
                                                                      dtype):
    """In a step of 3 micro-batches each weight matrix is converted to half once (every product
    reads that copy: else each of its products would convert it again), from the weights the
    last update left, and nothing else in the step converts a weight; the copies are dropped
    at the end of the micro-batches."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=30)
    optimizer = albor.AdamW(params)
    matrices = sorted(name for name, p in params.items() if p.ndim == 2)
    inputs, targets = tiny_step_batch(config, seed=31, micro_batches=3)
    with gpu.settings(matmul_dtype=dtype):
        for step in (1, 2):
            master = {name: p.copy() for name, p in params.items()}
            converted = weight_conversions(params, config, optimizer, inputs, targets, step,
                                           monkeypatch)
            assert sorted(name for name, _ in converted) == matrices
            for name, half in converted:
                want = gpu.to_half(master[name], dtype)
                assert gpu.to_numpy(half).tobytes() == gpu.to_numpy(want).tobytes(), name
            assert gpu._half_copies == {}
        assert optimizer.t == 2


def loss_and_grads_at(dtype, params, config, idx, targets, loss_scale=1.0):
    """Loss and gradients (unscaled) with --dtype `dtype`, the weights' half copies made."""
    with gpu.settings(matmul_dtype=dtype), gpu.half_weights(params):
        loss, grads = loss_and_grads(params, config, idx, targets, loss_scale=loss_scale)
    return float(loss), {name: g / np.float32(loss_scale) for name, g in grads.items()}


def gradient_error(grads, reference):
    """The largest per-tensor error, relative to each tensor's largest reference gradient."""
    return max(float(np.abs(grads[name] - g).max() / np.abs(g).max()) for name, g in reference.items())


def test_fp16_and_bf16_forward_backward_are_close_to_fp32(numpy_backend):
    """Loss and every gradient of the tiny model in mixed precision against fp32: fp16 (loss
    scale 2**12) within 1e-3 of the loss and 2e-2 of each gradient tensor's largest entry; bf16
    within 1e-2 and 1e-1, and visibly less exact than fp16 (7 mantissa bits to 10)."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=32)
    idx, targets = batch(config, B=2, T=45, seed=33)
    loss32, grads32 = loss_and_grads_at("fp32", params, config, idx, targets)
    errors = {}
    for dtype, loss_tol, grad_tol in [("fp16", 1e-3, 2e-2), ("bf16", 1e-2, 1e-1)]:
        loss, grads = loss_and_grads_at(dtype, params, config, idx, targets, loss_scale=2.0**12)
        errors[dtype] = (abs(loss - loss32) / loss32, gradient_error(grads, grads32))
        assert errors[dtype][0] <= loss_tol and errors[dtype][1] <= grad_tol, (dtype, errors)
        assert all(g.dtype == np.float32 for g in grads.values())
    assert errors["bf16"][1] > 3 * errors["fp16"][1] > 0, errors


def test_fp16_without_loss_scaling_loses_small_gradients(numpy_backend):
    """Why fp16 scales the loss: the gradient of the logits is about 1 / (vocabulary x tokens)
    (here 1e-6, with albor-base-50m's 32768 x 512 it is 6e-8, float16's smallest number); at
    loss scale 1 such gradients round to float16's coarse subnormals as they enter the
    products, and the weights' gradients come out several times less exact than at scale 2**12
    (unscaled exactly afterwards)."""
    config = albor.Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256)
    params = albor.init_params(config, seed=34)
    idx, targets = batch(config, B=4, T=64, seed=35)
    _, grads32 = loss_and_grads_at("fp32", params, config, idx, targets)
    unscaled = gradient_error(loss_and_grads_at("fp16", params, config, idx, targets)[1], grads32)
    scaled = gradient_error(loss_and_grads_at("fp16", params, config, idx, targets, 2.0**12)[1], grads32)
    assert unscaled > 4 * scaled, (unscaled, scaled)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the overflows
def test_fp16_overflow_is_caught_the_step_skipped_and_the_scale_recovers(numpy_backend):
    """train.py's fp16 steps from a loss scale far too large (2**40), nothing injected: the
    gradients really overflow as they are rounded to float16 (the same scale in fp32 does not),
    each such step is skipped (weights, m and v untouched) and the scale halves, until steps
    go through; after growth_interval clean steps the scale doubles, and where that overflows
    it halves again: it keeps near the largest scale float16 holds. The loss falls."""
    config = albor.get_config("tiny")
    inputs, targets = tiny_step_batch(config, seed=36)
    params = albor.init_params(config, seed=37)
    with gpu.settings(matmul_dtype="fp32"):   # fp32's range: 2**40 is no problem
        result = train.train_step(params, config, albor.AdamW(params), inputs, targets, 1e-3, 1.0, 1,
                                  new_timing(), gpu.LossScaler(scale=2.0**40))
        assert result[3] is True
    params = albor.init_params(config, seed=37)
    optimizer = albor.AdamW(params)
    scaler = gpu.LossScaler(scale=2.0**40, growth_interval=3)
    history, losses = [], []
    with gpu.settings(matmul_dtype="fp16"):
        for step in range(1, 41):
            before = {name: p.copy() for name, p in params.items()}
            scale, t = scaler.scale, optimizer.t
            loss, (norm, _), _, stepped = train.train_step(params, config, optimizer, inputs, targets,
                                                      3e-3, 1.0, step, new_timing(), scaler)
            assert stepped == math.isfinite(norm) and math.isfinite(loss)
            if not stepped:
                assert scaler.scale == scale / 2 and optimizer.t == t
                assert all(params[n].tobytes() == before[n].tobytes() for n in params)
            history.append((scale, stepped))
            losses.append(loss)
    first_step = next(i for i, (_, stepped) in enumerate(history) if stepped)
    assert first_step >= 5                                   # 2**40 really overflowed
    later = history[first_step:]
    assert max(scale for scale, _ in later) > history[first_step][0]   # the scale grew again,
    assert not all(stepped for _, stepped in later)          # overflowed again, was halved,
    assert sum(stepped for _, stepped in later) >= 15 and later[-1][1]  # and steps went on
    assert losses[-1] < losses[first_step] - 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Arguments of a small tiny-config train.py run on a few stdlib snippets (4 steps)."""
    from tokenizer import Tokenizer
    folder = tmp_path_factory.mktemp("dtype_run")
    corpus = folder / "corpus"
    corpus.mkdir()
    files = [p for p in train.stdlib_python_files() if p.stat().st_size > 3000][:24]
    texts = [p.read_bytes().decode("utf-8", errors="replace")[:400] for p in files]
    for i, text in enumerate(texts):
        (corpus / f"doc{i:02d}.py").write_text(text, encoding="utf-8")
    Tokenizer.train(texts, vocab_size=400).save(folder / "tokenizer.json")
    return ["--config", "tiny", "--data", str(corpus), "--tokenizer", str(folder / "tokenizer.json"),
            "--rows", "16", "--val-rows", "4", "--seq-len", "32", "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", "4", "--eval-samples", "0"]


def test_train_py_runs_each_dtype_on_the_cpu(numpy_backend, tiny_run, tmp_path, capsys):
    """`train.py --dtype X` on a CPU: the emulation runs the whole command (the setup line says
    so), fp16 logs its loss scale; each precision's losses are close to fp32's but not the same
    numbers (the rounding acts), bf16 furthest."""
    curves = {}
    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        out = tmp_path / dtype
        assert train.main(tiny_run + ["--dtype", dtype, "--out", str(out)]) == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[dtype] = [line["loss"] for line in lines]
        assert ("loss_scale" in lines[0]) == (dtype == "fp16")
        if dtype != "fp32":
            assert f"{dtype} matmuls (emulated: slower than fp32)" in capsys.readouterr().out
    for dtype in ("tf32", "bf16", "fp16"):
        differences = [abs(a - b) for a, b in zip(curves[dtype], curves["fp32"])]
        assert 0 < max(differences) < 0.05, (dtype, curves)
    assert max(abs(a - b) for a, b in zip(curves["bf16"], curves["fp32"])) > max(
        abs(a - b) for a, b in zip(curves["fp16"], curves["fp32"]))


# ============================================================================================
# 5. The step clock
# ============================================================================================

def test_phase_clock_adds_up_phases_over_steps(numpy_backend):
    clock = gpu.PhaseClock()
    for _ in range(2):
        clock.start()
        sum(range(10000))
        clock.mark("forward")
        clock.mark("backward")
        sum(range(10000))
        clock.mark("forward")  # a phase may come back (micro-batches)
        step = clock.collect()
        assert set(step) == {"forward", "backward"} and all(s >= 0 for s in step.values())
    assert set(clock.seconds) == {"forward", "backward"}
    assert clock.seconds["forward"] >= step["forward"]


def test_docstring_examples_of_the_gpu_section():
    import doctest
    for obj in (gpu.LossScaler, gpu.PhaseClock):
        runner = doctest.DocTestRunner()
        tests = doctest.DocTestFinder().find(obj, globs=vars(gpu))
        assert sum(len(test.examples) for test in tests) >= 2, obj.__name__
        for test in tests:
            runner.run(test)
        assert runner.failures == 0, obj.__name__


# ============================================================================================
# 6. On the stand-in GPU (tests/fake_device.py): one wait per step, no backend-blind cache
# ============================================================================================

def train_on(backend, monkeypatch, emulator, path, dtype, steps=2):
    """train.py's steps (2 micro-batches each) and an evaluation of the tiny model on NumPy or
    on the stand-in device, on the reference or the kernel path, at `dtype`. Returns (each
    step's result, the validation loss, the final weights as bytes, the device's waits: each
    step's, then the evaluation's, the operand types the GemmEx stand-in got)."""
    device = FakeDevice()
    xp = device.xp if backend == "device" else np
    config = albor.get_config("tiny")
    inputs, targets = tiny_step_batch(config, seed=40, T=16)
    kernels = None
    if path == "kernels":
        kernels = gpu.Kernels(device.kernel_module(emulator) if backend == "device" else emulator, xp)
    with monkeypatch.context() as patch, gpu.settings(kernels=kernels, matmul_dtype=dtype):
        on_backend(patch, xp, "cupy" if backend == "device" else "numpy")
        gemm_operands = set()

        def gemm(a, b):  # the cuBLAS call's stand-in, noting what it is handed
            gemm_operands.add((a.dtype.name, b.dtype.name))
            return gpu.emulated_gemm(a, b)
        patch.setattr(gpu, "cublas_gemm", gemm)
        params = albor.init_params(config, seed=41)
        optimizer = albor.AdamW(params)
        scaler = gpu.LossScaler(scale=2.0**12) if dtype == "fp16" else None
        workers = cpu.DataParallel(1)
        results, waits = [], []
        for step in range(1, steps + 1):
            before = len(device.syncs)
            results.append(train.train_step(params, config, optimizer, inputs, targets, 1e-3, 1.0,
                                            step, new_timing(), scaler, workers))
            waits.append(device.syncs[before:])
        before = len(device.syncs)
        val_loss = train.evaluate(params, config, inputs[0], targets[0], 1, workers)
        waits.append(device.syncs[before:])
        weights = {name: gpu.to_numpy(p).tobytes() for name, p in params.items()}
    return results, val_loss, weights, waits, gemm_operands


@pytest.mark.parametrize("path", ["reference", "kernels"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_a_training_step_waits_for_the_gpu_once(path, dtype, emulator, monkeypatch):
    """On the stand-in GPU each of train.py's steps (two, of two micro-batches each) waits for
    the device exactly once: in apply_update, one copy of the micro-batches' losses and the
    gradient norm (ids and targets are checked and counted on the host, losses and norm stay on
    the device until then, the clip is decided there, the phase clock does not wait). A
    float(), int(), bool(), to_numpy() or boolean mask on a device value anywhere in a step
    would add a wait and fail this. evaluate() waits once too. And the stand-in changes no
    number: the same results and weights as on NumPy, byte for byte, though it takes the GPU's
    storage for bf16/fp16 (float16 arrays, bfloat16 bits) where NumPy keeps the same numbers
    in float32."""
    on_numpy = train_on("numpy", monkeypatch, emulator, path, dtype)
    on_device = train_on("device", monkeypatch, emulator, path, dtype)
    waits = on_device[3]
    assert waits == [["asnumpy"]] * 3, waits
    assert on_device[:3] == on_numpy[:3]
    loss, (norm_before, norm_after) = on_device[0][0][:2]
    assert all(isinstance(value, float) for value in (loss, norm_before, norm_after))
    assert on_device[4] == ({("float16", "float16")} if dtype == "fp16" else
                            {("uint16", "uint16")} if dtype == "bf16" else set())  # what cuBLAS gets


def test_the_step_clock_reads_the_optimizer_phase_a_step_late_on_a_gpu(monkeypatch):
    """The phase clock never waits: after a step its forward and backward (finished before the
    step's one wait) are counted; its optimizer phase (queued after that wait) is counted at
    the next step, when the GPU has got there."""
    device = FakeDevice()
    on_backend(monkeypatch, device.xp, "cupy")
    config = albor.get_config("tiny")
    inputs, targets = tiny_step_batch(config, seed=42)
    with gpu.settings(kernels=None, matmul_dtype="fp32"):
        params = albor.init_params(config, seed=43)
        optimizer, workers, timing = albor.AdamW(params), cpu.DataParallel(1), new_timing()
        train.train_step(params, config, optimizer, inputs, targets, 1e-3, 1.0, 1, timing, None, workers)
        assert timing["forward_seconds"] > 0 and timing["backward_seconds"] > 0
        assert timing["optimizer_seconds"] == 0
        train.train_step(params, config, optimizer, inputs, targets, 1e-3, 1.0, 2, timing, None, workers)
        assert timing["optimizer_seconds"] > 0
    assert "Event.synchronize" not in device.syncs


def test_the_stand_in_device_counts_waits_and_refuses_host_arrays():
    """The stand-in itself: what waits, what does not, and a NumPy array meeting a device array
    raises TypeError as in CuPy (so the tests above would see both)."""
    device = FakeDevice()
    xp = device.xp
    a = xp.asarray(np.arange(6.0).reshape(2, 3))
    total = (a * 2).sum() + xp.exp(a).max()
    mask = a > 2
    assert device.syncs == [] and type(total) is DeviceArray and total.ndim == 0
    float(total), int(a[0, 1]), bool(mask.any()), a[mask], xp.nonzero(mask), xp.asnumpy(a)
    f"{total:.1f}"
    assert device.syncs == ["float", "int", "bool", "boolean-mask index", "nonzero", "asnumpy", "format"]
    for mix in (lambda: a + np.ones(3), lambda: np.ones(3) * a, lambda: xp.where(mask, a, np.zeros(3)),
                lambda: a.__setitem__(0, np.ones(3)), lambda: np.concatenate([a, a])):
        with pytest.raises(TypeError):
            mix()


def model_outputs(config, idx, targets):
    """Forward, backward and KV-cache decoding of the tiny model, on whatever albor.xp is."""
    params = albor.init_params(config, seed=44)
    loss, cache = albor.forward(params, config, idx, targets)
    grads = albor.backward(params, config, cache)
    kv = albor.kv_cache_new(config, 1, 16)
    logits = albor.forward_step(params, config, idx[:1, :10], kv)
    logits_next = albor.forward_step(params, config, idx[:1, 10:12], kv)
    return [loss, logits, logits_next] + list(grads.values())


def test_no_array_cache_outlives_a_change_of_backend(monkeypatch):
    """The model on NumPy, then on the stand-in GPU, then on NumPy again: each run's arrays are
    its own backend's, and no run meets an array of the other. An array cached without the
    backend in its key (like the old functools.lru_cache'd causal mask, keyed by (T, group,
    dtype)) would hand the second run the first run's array, and the stand-in refuses that as
    CuPy does (TypeError). Also no wait in a forward and backward: the ids and targets are
    checked on the host."""
    config = albor.get_config("tiny")
    idx, targets = batch(config, B=2, T=20, seed=45)
    runs = []
    for backend in ("numpy", "device", "numpy"):
        device = FakeDevice()
        with monkeypatch.context() as patch, gpu.settings(kernels=None, matmul_dtype="fp32"):
            on_backend(patch, device.xp if backend == "device" else np, backend.replace("device", "cupy"))
            outputs = model_outputs(config, idx, targets)
            host = [gpu.to_numpy(a) for a in outputs]
        if backend == "device":
            assert all(type(a) is DeviceArray for a in outputs)
        else:
            assert type(outputs[0]) is np.float64 and all(type(a) is np.ndarray for a in outputs[1:])
        assert device.syncs == (["asnumpy"] * len(outputs) if backend == "device" else []), device.syncs
        runs.append([a.tobytes() for a in host])
    assert runs[0] == runs[1] == runs[2]


# ============================================================================================
# 7. On a GPU (deselected without one)
# ============================================================================================

def gpu_batch(config, B, T, seed):
    idx, targets = batch(config, B, T, seed)
    return albor.xp.asarray(idx), albor.xp.asarray(targets)


@pytest.mark.gpu
@pytest.mark.parametrize("config, B, T", [
    (albor.get_config("tiny"), 2, 45),
    (albor.Config(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=512), 4, 300),
])
def test_gpu_kernel_path_matches_the_reference_path(config, B, T, monkeypatch):
    """cupy.RawModule kernels vs ALBOR_KERNELS=0's reference code on the same GPU: loss and
    every gradient within 1e-4 (the GPU's __expf and FMA contraction differ in the last bits),
    and logits without targets."""
    assert albor.BACKEND == "cupy" and gpu.kernels() is not None
    params = albor.init_params(config, seed=1)
    idx, targets = gpu_batch(config, B, T, seed=2)
    loss_k, grads_k = loss_and_grads(params, config, idx, targets)
    logits_k, _ = albor.forward(params, config, idx)
    with gpu.settings(kernels=None):
        loss_r, grads_r = loss_and_grads(params, config, idx, targets)
        logits_r, _ = albor.forward(params, config, idx)
    assert abs(loss_k - loss_r) <= 1e-5 * abs(loss_r)
    close(logits_k, logits_r, 1e-4, "logits")
    for name in grads_r:
        close(grads_k[name], grads_r[name], 1e-4, name)


@pytest.mark.gpu
def test_gpu_fp32_training_is_deterministic():
    """Two runs of three training steps from the same seed on the GPU (kernels, cuBLAS, CuPy
    reductions and sorts, fused AdamW): the same bytes. The kernels are compiled once."""
    config = albor.Config(vocab_size=2048, hidden_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)
    kernels = gpu.kernels()

    def run_steps():
        params = albor.init_params(config, seed=5)
        optimizer = albor.AdamW(params)
        for step in range(3):
            idx, targets = gpu_batch(config, 4, 128, seed=step)
            _, grads = loss_and_grads(params, config, idx, targets)
            albor.clip_grad_norm(grads, 1.0)
            optimizer.step(params, grads, lr=1e-3)
        return {name: albor.to_numpy(p).tobytes() for name, p in params.items()}
    assert run_steps() == run_steps()
    assert gpu.kernels() is kernels and kernels.module is not None


@pytest.mark.gpu
def test_gpu_embedding_backward_is_numpys_add_at_bit_for_bit():
    rng = np.random.default_rng(3)
    dwte = rng.standard_normal((32768, 64)).astype(np.float32)
    dout = rng.standard_normal((16, 512, 64)).astype(np.float32)
    idx = rng.zipf(1.3, (16, 512)) % 32768  # a few very frequent tokens, like real text
    want = dwte.copy()
    np.add.at(want, idx.reshape(-1), dout.reshape(-1, 64))
    got = albor.xp.asarray(dwte)
    albor.embedding_backward(got, albor.xp.asarray(dout), albor.xp.asarray(idx))
    np.testing.assert_array_equal(albor.to_numpy(got), want)


@pytest.mark.gpu
@pytest.mark.parametrize("name, tol", [("fp32", 1e-5), ("tf32", 4e-3), ("bf16", 3e-2),
                                       ("fp16", 4e-3)])
def test_gpu_matmul_precisions(name, tol):
    """Each --dtype's matmul against a float64 product, for the layouts the model uses
    (x @ w.T, dy @ w, dy.T @ x). Relative error bounds: a few units of each format's rounding
    (2**-11 for tf32/fp16 inputs, 2**-8 for bf16) over sums of 512 terms. And bf16 must be
    visibly less exact than fp32: the inputs really are rounded."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    dy = rng.standard_normal((512, 384)).astype(np.float32)
    cases = [(x, w.T), (dy, w), (dy.T, x)]
    errors = {}
    try:
        for dtype in ("fp32", name):
            gpu.configure(matmul_dtype=dtype)
            worst = 0.0
            for a, b in cases:
                got = albor.to_numpy(albor.matmul(albor.xp.asarray(a), albor.xp.asarray(b)))
                want = a.astype(np.float64) @ b.astype(np.float64)
                assert got.dtype == np.float32 and got.shape == want.shape
                worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
            errors[dtype] = worst
    finally:
        gpu.configure(matmul_dtype="fp32")
    assert errors[name] <= tol, errors
    if name == "bf16":
        assert errors["bf16"] > 10 * errors["fp32"], errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_gpu_gemm_equals_the_cpu_emulation(name):
    """cuBLAS GemmEx on half operands (float16 as CUDA_R_16F, bfloat16 bits as CUDA_R_16BF)
    gives the numbers the CPU's emulation gives from the same operands (converted back to
    float32, multiplied with float32 sums) up to the order of the sums: within 1e-5 of the
    largest entry, for the layouts the model uses. A wrong type or layout would be far off."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    dy = rng.standard_normal((512, 384)).astype(np.float32)
    try:
        gpu.configure(matmul_dtype=name)
        for a, b in [(x, w.T), (dy, w), (dy.T, x)]:
            a, b = albor.xp.asarray(a), albor.xp.asarray(b)
            got = albor.to_numpy(albor.matmul(a, b))
            half_a, half_b = gpu.half_operand(a), gpu.half_operand(b)
            assert half_a.dtype == (np.float16 if name == "fp16" else np.uint16)
            emulated = albor.to_numpy(gpu.to_float32(half_a) @ gpu.to_float32(half_b))
            close(got, emulated, 1e-5, f"{name}: cuBLAS vs the emulation")
    finally:
        gpu.configure(matmul_dtype="fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_half_weights_are_made_once_per_step(dtype, monkeypatch):
    """On CuPy arrays too (the copies are found through __cuda_array_interface__): each weight
    matrix converted once per step of 3 micro-batches, from the updated weights."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=30)
    optimizer = albor.AdamW(params)
    inputs, targets = tiny_step_batch(config, seed=31, micro_batches=3)
    try:
        gpu.configure(matmul_dtype=dtype)
        for step in (1, 2):
            master = {name: p.copy() for name, p in params.items()}
            converted = weight_conversions(params, config, optimizer, inputs, targets, step,
                                           monkeypatch)
            assert sorted(n for n, _ in converted) == sorted(n for n, p in params.items() if p.ndim == 2)
            for name, half in converted:
                want = gpu.to_half(master[name], dtype)
                assert albor.to_numpy(half).tobytes() == albor.to_numpy(want).tobytes(), name
    finally:
        gpu.configure(matmul_dtype="fp32")


@pytest.mark.gpu
def test_gpu_fp16_training_with_the_loss_scaler():
    """A few fp16 steps of a small model with dynamic loss scaling, started at a scale far too
    large: every step either overflows (skipped: weights unchanged, scale halved) or steps,
    exactly as the gradient norm says, the scale comes down, the loss goes down."""
    config = albor.Config(vocab_size=2048, hidden_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)
    params = albor.init_params(config, seed=6)
    optimizer = albor.AdamW(params)
    scaler = gpu.LossScaler(scale=2.0 ** 40, growth_interval=1000)
    idx, targets = gpu_batch(config, 4, 128, seed=7)
    losses = []
    try:
        gpu.configure(matmul_dtype="fp16")
        for _ in range(40):
            before = albor.to_numpy(params["model.norm.weight"]).copy()
            scale = scaler.scale
            with gpu.half_weights(params):
                loss, grads = loss_and_grads(params, config, idx, targets, loss_scale=scale)
            (norm, _), stepped, (loss,) = train.apply_update(optimizer, params, grads, 3e-3, 1.0,
                                                             scaler, 1, [loss])
            assert stepped == math.isfinite(norm)
            if not stepped:
                assert scaler.scale == scale / 2
                assert albor.to_numpy(params["model.norm.weight"]).tobytes() == before.tobytes()
            losses.append(loss)
    finally:
        gpu.configure(matmul_dtype="fp32")
    assert all(math.isfinite(loss) for loss in losses)
    assert scaler.skipped < 40 and losses[-1] < losses[0]


@pytest.mark.gpu
def test_gpu_injected_overflow_skips_the_step():
    """The CPU's injected-overflow check, on CuPy arrays."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=8)
    optimizer = albor.AdamW(params)
    scaler = gpu.LossScaler()
    idx, targets = gpu_batch(config, 2, 45, seed=9)
    _, grads = loss_and_grads(params, config, idx, targets, loss_scale=scaler.scale)
    grads["model.embed_tokens.weight"][7, 3] = np.nan
    before = {name: albor.to_numpy(p).tobytes() for name, p in params.items()}
    (norm, _), stepped, _ = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
    assert not stepped and math.isnan(norm) and scaler.scale == 2.0 ** 15
    assert {name: albor.to_numpy(p).tobytes() for name, p in params.items()} == before


@pytest.mark.gpu
def test_gpu_phase_clock_times_with_cuda_events():
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=10)
    idx, targets = gpu_batch(config, 4, 128, seed=11)
    clock = gpu.PhaseClock()
    clock.start()
    loss, cache = albor.forward(params, config, idx, targets)
    clock.mark("forward")
    albor.backward(params, config, cache)
    clock.mark("backward")
    step = clock.collect()
    assert step["forward"] > 0 and step["backward"] > 0
