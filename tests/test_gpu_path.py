"""albor's GPU path: everything a CPU can check, and (gpu-marked) what only a GPU can.

On the CPU the kernel dispatch runs end to end through the emulator: with
`gpu.settings(kernels=gpu.Kernels(tests/kernel_emu.EmuModule, numpy))` (kernels.cu compiled for
the CPU), every layer that has a kernel calls kernels.cu through the same launch code a GPU
runs, with xp = NumPy. The `kernels_on` fixture sets that up (also on a GPU machine: it pins albor to
NumPy for the test).

Tolerances: "close" means max |got - want| <= tol * max |want| per tensor. The kernel path
and the reference path are both float32 but add in different orders; on the tiny model the
measured differences are below 1e-6 of the largest gradient, checked at 1e-5.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import albor
import gpu
import train
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


@pytest.fixture
def numpy_backend(monkeypatch):
    """albor on NumPy for this test, whatever machine runs it."""
    monkeypatch.setattr(albor, "xp", np)
    monkeypatch.setattr(albor, "BACKEND", "numpy")
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
# 2. Low-precision matmuls: what a CPU can check
# ============================================================================================

def test_dtype_other_than_fp32_needs_a_gpu(numpy_backend):
    gpu.configure(matmul_dtype="fp32")
    for name in ("tf32", "bf16", "fp16"):
        with pytest.raises(ValueError, match=f"dtype {name} needs a GPU"):
            gpu.configure(matmul_dtype=name)
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


# ============================================================================================
# 3. Dynamic loss scaling, with injected overflows
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
    (norm, _), stepped = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
    assert not stepped and not math.isfinite(norm)
    assert scaler.scale == 2.0 ** 9 and scaler.skipped == 1 and optimizer.t == 0
    for name in params:
        assert params[name].tobytes() == before[name].tobytes()
        assert not optimizer.m[name].any() and not optimizer.v[name].any()

    twin = {name: p.copy() for name, p in params.items()}
    twin_optimizer = albor.AdamW(twin)
    for _ in range(2):
        _, grads = loss_and_grads(params, config, idx, targets, loss_scale=scaler.scale)
        (norm, _), stepped = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
        _, plain = loss_and_grads(twin, config, idx, targets)
        plain_norm = albor.clip_grad_norm(plain, 1.0)
        twin_optimizer.step(twin, plain, lr=1e-3)
        assert stepped and norm == plain_norm
        for name in params:
            assert params[name].tobytes() == twin[name].tobytes(), name
    assert scaler.scale == 2.0 ** 10  # two clean steps in a row: grown back


def test_train_py_dtype_needs_a_gpu(numpy_backend, capsys):
    with pytest.raises(SystemExit):
        train.parse_settings(["--dtype", "fp16"])
    assert "--dtype fp16 needs a GPU" in capsys.readouterr().err
    args, _ = train.parse_settings(["--dtype", "fp32"])
    assert args["dtype"] == "fp32" and train.DEFAULTS["dtype"] == "fp32"


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
# 4. The step clock
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
# 5. On a GPU (deselected without one)
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
            loss, grads = loss_and_grads(params, config, idx, targets, loss_scale=scale)
            (norm, _), stepped = train.apply_update(optimizer, params, grads, 3e-3, 1.0, scaler, 1)
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
    (norm, _), stepped = train.apply_update(optimizer, params, grads, 1e-3, 1.0, scaler, 1)
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
