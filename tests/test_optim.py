"""Tests for albor.py's optimization section: AdamW, the LR schedule, clipping, checkpoints.

Every AdamW setting is checked against a hand-computed reference (plain Python floats,
one coordinate at a time) and shown to act: changing it changes the result exactly as
the formula says. The checkpoint tests cover the round trip, atomic writes and the
one-line errors for broken files.
"""
import dataclasses
import doctest
import json
import math
import os

import numpy as np
import pytest

import albor
import checkpoint
import cpu
from albor import AdamW, clip_grad_norm, default_warmup, lr_at
from checkpoint import CheckpointError
from tests.oracles import oracle

# A matrix (decayed) and a norm weight (not decayed), with gradients that change sign and
# size from step to step so that beta2 and the bias corrections matter (with a constant
# gradient m_hat = g and v_hat = g^2 whatever the betas are).
P0 = {"model.layers.0.mlp.up_proj.weight": [[0.5, -0.25], [1.0, 0.125]],
      "model.norm.weight": [1.0, 0.75]}
GRADS = [
    {"model.layers.0.mlp.up_proj.weight": [[0.1, -0.2], [0.003, 1.5]], "model.norm.weight": [0.2, -0.01]},
    {"model.layers.0.mlp.up_proj.weight": [[-0.3, 0.05], [0.002, -0.5]], "model.norm.weight": [0.4, 0.02]},
    {"model.layers.0.mlp.up_proj.weight": [[0.2, 0.1], [-0.004, 2.0]], "model.norm.weight": [-0.1, 0.03]},
]
LRS = [1e-2, 2e-2, 5e-3]
DEFAULTS = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def reference_adamw(p0, grads, lrs, beta1, beta2, eps, weight_decay, decay, bias_correction=True):
    """AdamW on one coordinate, written from the paper with Python floats."""
    p, m, v = p0, 0.0, 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if decay:
            p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t) if bias_correction else m
        v_hat = v / (1 - beta2 ** t) if bias_correction else v
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def run_albor(beta1, beta2, eps, weight_decay):
    params = {name: albor.xp.asarray(np.array(value, dtype=np.float32)) for name, value in P0.items()}
    optimizer = AdamW(params, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    for grads, lr in zip(GRADS, LRS):
        optimizer.step(params, {n: albor.xp.asarray(np.array(g, dtype=np.float32)) for n, g in grads.items()}, lr)
    return {name: albor.to_numpy(p).astype(np.float64) for name, p in params.items()}


def reference(beta1, beta2, eps, weight_decay, bias_correction=True):
    out = {}
    for name, value in P0.items():
        p0 = np.array(value, dtype=np.float64)
        result = np.empty_like(p0)
        for index in np.ndindex(p0.shape):
            grads = [float(np.array(g[name])[index]) for g in GRADS]
            result[index] = reference_adamw(float(p0[index]), grads, LRS, beta1, beta2, eps,
                                            weight_decay, decay=p0.ndim >= 2,
                                            bias_correction=bias_correction)
        out[name] = result
    return out


def assert_close(actual, expected, rtol=2e-6, atol=1e-7):
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def test_adamw_defaults_match_the_hand_computed_reference():
    assert_close(run_albor(**DEFAULTS), reference(**DEFAULTS))


@pytest.mark.parametrize("setting, value", [("beta1", 0.5), ("beta1", 0.0), ("beta2", 0.5),
                                            ("beta2", 0.999), ("eps", 1e-2), ("weight_decay", 2.0),
                                            ("weight_decay", 0.0)])
def test_each_adamw_setting_acts_as_the_formula_says(setting, value):
    changed = dict(DEFAULTS, **{setting: value})
    result = run_albor(**changed)
    assert_close(result, reference(**changed))
    baseline = run_albor(**DEFAULTS)
    # The setting really changed something (eps only matters where |g| is small: the 0.003 entry;
    # weight decay only on the matrix).
    matrix = "model.layers.0.mlp.up_proj.weight"
    assert np.abs(result[matrix] - baseline[matrix]).max() > 1e-5
    if setting == "weight_decay":   # ... and never on the norm weight
        np.testing.assert_array_equal(result["model.norm.weight"], baseline["model.norm.weight"])
    else:
        assert np.abs(result["model.norm.weight"] - baseline["model.norm.weight"]).max() > 1e-6


def test_bias_correction_makes_the_first_step_lr_times_sign_of_g():
    # At t=1, m_hat = g and v_hat = g^2, so every coordinate moves by lr * g / (|g| + eps):
    # lr, whatever the gradient's size. Without the correction the step would be
    # lr * (1 - beta1) / sqrt(1 - beta2) = 0.447 lr.
    params = {"w": albor.xp.zeros((1, 4), dtype=albor.xp.float32)}
    grads = {"w": albor.xp.asarray([[1e-3, -0.5, 7.0, -300.0]], dtype=albor.xp.float32)}
    AdamW(params, weight_decay=0.0).step(params, grads, lr=0.01)
    np.testing.assert_allclose(albor.to_numpy(params["w"]), [[-0.01, 0.01, -0.01, 0.01]], rtol=1e-5)
    uncorrected = reference(**DEFAULTS, bias_correction=False)
    with pytest.raises(AssertionError):
        assert_close(run_albor(**DEFAULTS), uncorrected)


def test_weight_decay_applies_to_matrices_and_the_tied_embedding_not_to_norms():
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    before = {name: albor.to_numpy(p).copy() for name, p in params.items()}
    zero = {name: albor.xp.zeros_like(p) for name, p in params.items()}
    AdamW(params, weight_decay=0.1).step(params, zero, lr=0.5)   # zero gradient: only decay moves
    for name, p in params.items():
        expected = before[name] * np.float32(1 - 0.5 * 0.1) if before[name].ndim >= 2 else before[name]
        np.testing.assert_allclose(albor.to_numpy(p), expected, rtol=1e-6, err_msg=name)
    assert albor.is_decayed("model.embed_tokens.weight", (512, 64))
    assert not albor.is_decayed("model.layers.0.input_layernorm.weight", (64,))


def test_adamw_state_is_float32_keyed_by_parameter_name():
    params = albor.init_params(albor.get_config("tiny"), seed=1)
    optimizer = AdamW(params)
    grads = {name: albor.xp.ones_like(p) for name, p in params.items()}
    optimizer.step(params, grads, lr=1e-3)
    optimizer.step(params, grads, lr=1e-3)
    assert optimizer.t == 2
    assert set(optimizer.m) == set(optimizer.v) == set(params)
    for name, p in params.items():
        assert p.dtype == optimizer.m[name].dtype == optimizer.v[name].dtype == np.float32
        assert optimizer.m[name].shape == p.shape


def test_adamw_matches_torch():
    torch = oracle("torch")  # an oracle only (requirements-dev.txt): skipped without it
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((8, 5)).astype(np.float32), "n": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(5)]
    params = {k: albor.xp.asarray(v.copy()) for k, v in start.items()}
    optimizer = AdamW(params, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    tw = torch.tensor(start["w"], requires_grad=True)
    tn = torch.tensor(start["n"], requires_grad=True)
    torch_opt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.3}, {"params": [tn], "weight_decay": 0.0}],
                                  lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    for step, g in enumerate(grads):
        lr = 0.1 / (step + 1)
        optimizer.step(params, {k: albor.xp.asarray(v) for k, v in g.items()}, lr)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        tw.grad, tn.grad = torch.tensor(g["w"]), torch.tensor(g["n"])
        torch_opt.step()
    np.testing.assert_allclose(albor.to_numpy(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(albor.to_numpy(params["n"]), tn.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fast_adamw_is_adamw_block_by_block():
    """cpu.FastAdamW (train.py's optimizer on a CPU: cache-sized blocks on two threads, eps and
    the bias corrections folded into two scalars) takes the steps albor.AdamW's formula takes:
    the same weights and state within float32 rounding (1e-6 of each tensor's scale), over
    several steps, with decay on the matrices only, arrays larger than one block included."""
    config = albor.get_config("tiny")
    rng = np.random.default_rng(21)
    plain_params = albor.init_params(config, seed=4)
    plain_params["big"] = rng.standard_normal((3 * cpu.BLOCK_NUMBERS // 64 + 5, 64)).astype(np.float32)
    fast_params = {name: p.copy() for name, p in plain_params.items()}
    plain = AdamW(plain_params, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    fast = cpu.FastAdamW(fast_params, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    for step in range(1, 5):
        grads = {name: rng.standard_normal(p.shape).astype(np.float32) * 10.0 ** -step
                 for name, p in plain_params.items()}
        plain.step(plain_params, {name: g.copy() for name, g in grads.items()}, lr=1e-2 / step)
        fast.step(fast_params, grads, lr=1e-2 / step)
        for name in plain_params:
            for got, want in ((fast_params[name], plain_params[name]), (fast.m[name], plain.m[name]),
                              (fast.v[name], plain.v[name])):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                           err_msg=f"step {step}: {name}")
    assert fast.t == plain.t == 4


def test_adamw_rejects_bad_settings():
    params = {"w": albor.xp.zeros((2, 2), dtype=albor.xp.float32)}
    for kwargs in (dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(eps=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            AdamW(params, **kwargs)


# --- schedule -------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_the_peak():
    assert lr_at(1, 100, 6e-4, 9, 6e-5) == pytest.approx(6e-4 * 1 / 10)
    assert lr_at(5, 100, 6e-4, 9, 6e-5) == pytest.approx(6e-4 * 5 / 10)
    assert lr_at(9, 100, 6e-4, 9, 6e-5) == pytest.approx(6e-4 * 9 / 10)
    assert lr_at(10, 100, 6e-4, 9, 6e-5) == pytest.approx(6e-4)   # first step after warmup: the peak


def test_cosine_decay_values_and_floor():
    lr, floor, warmup, steps = 6e-4, 6e-5, 9, 101
    # decay runs over steps 10..101: progress = (step - 10) / 91
    assert lr_at(10, steps, lr, warmup, floor) == pytest.approx(lr)
    mid = 10 + 91 // 2
    expected_mid = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 91))
    assert lr_at(mid, steps, lr, warmup, floor) == pytest.approx(expected_mid)
    assert lr_at(10 + 91 // 2, steps, lr, warmup, floor) == pytest.approx((lr + floor) / 2, rel=0.02)
    assert lr_at(steps, steps, lr, warmup, floor) == pytest.approx(floor)      # the last step: the floor
    assert lr_at(steps + 50, steps, lr, warmup, floor) == pytest.approx(floor)
    values = [lr_at(s, steps, lr, warmup, floor) for s in range(warmup + 1, steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))                   # never goes back up


def test_no_warmup_starts_at_the_peak_and_floor_setting_acts():
    assert lr_at(1, 31, 6e-4, 0, 0.0) == pytest.approx(6e-4)
    assert lr_at(31, 31, 6e-4, 0, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(31, 31, 6e-4, 0, 1e-4) == pytest.approx(1e-4)
    assert lr_at(1, 1, 6e-4, 0, 0.0) == pytest.approx(6e-4)                    # a 1-step run


def test_default_warmup_suits_short_and_long_runs():
    assert default_warmup(31) == 3          # the --rows 500 run: 31 steps
    assert default_warmup(5) == 0
    assert default_warmup(10_000) == 100
    # the 31-step run spends most of its updates near the peak, not at 6% of it
    lrs = [lr_at(s, 31, 6e-4, default_warmup(31), 6e-5) for s in range(1, 32)]
    assert max(lrs) == pytest.approx(6e-4)
    assert sum(lr > 3e-4 for lr in lrs) >= 15


# --- clipping -------------------------------------------------------------------


def make_grads(scale):
    rng = np.random.default_rng(3)
    return {"a": albor.xp.asarray(rng.standard_normal((30, 7)).astype(np.float32) * scale),
            "b": albor.xp.asarray(rng.standard_normal(11).astype(np.float32) * scale)}


def float64_norm(grads):
    return math.sqrt(sum(float((albor.to_numpy(g).astype(np.float64) ** 2).sum()) for g in grads.values()))


def test_clipping_scales_down_to_the_limit_and_returns_the_pre_clip_norm():
    grads = make_grads(10.0)
    before = {k: albor.to_numpy(v).copy() for k, v in grads.items()}
    expected = float64_norm(grads)
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(expected, rel=1e-6)   # float32 dots of blocks, summed in float64
    assert float64_norm(grads) <= 1.0
    assert float64_norm(grads) == pytest.approx(1.0, rel=1e-5)
    for k in grads:   # same direction: every entry scaled by the same factor
        np.testing.assert_allclose(albor.to_numpy(grads[k]), before[k] / expected, rtol=1e-5)


def test_clipping_leaves_small_gradients_and_can_be_turned_off():
    small = make_grads(1e-3)
    before = {k: albor.to_numpy(v).copy() for k, v in small.items()}
    clip_grad_norm(small, 1.0)
    for k in small:
        np.testing.assert_array_equal(albor.to_numpy(small[k]), before[k])
    large = make_grads(10.0)
    before = {k: albor.to_numpy(v).copy() for k, v in large.items()}
    for off in (0.0, None):
        norm = clip_grad_norm(large, off)
        assert norm > 1.0
        for k in large:
            np.testing.assert_array_equal(albor.to_numpy(large[k]), before[k])


def test_clipping_reports_non_finite_norms():
    grads = make_grads(1.0)
    grads["b"][0] = np.nan
    assert math.isnan(clip_grad_norm(grads, 1.0))
    grads["b"][0] = np.inf
    assert math.isinf(clip_grad_norm(grads, 1.0))


def test_docstring_examples_of_the_optimization_section():
    for fn in (AdamW, lr_at, default_warmup, clip_grad_norm, albor.is_decayed):
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner()
        for test in finder.find(fn, globs=vars(albor)):
            runner.run(test)
        assert runner.failures == 0, fn.__name__


# --- checkpoints ----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A tiny checkpoint with an optimizer that has taken two steps."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=5)
    optimizer = AdamW(params, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = {n: albor.xp.asarray(rng.standard_normal(p.shape).astype(np.float32)) for n, p in params.items()}
        optimizer.step(params, grads, lr=1e-3)
    folder = tmp_path / "ckpt"
    checkpoint.save_checkpoint(folder, config, params, optimizer, step=2, extra_files={"notes.json": b"{}\n"})
    return folder, config, params, optimizer


def test_checkpoint_round_trip_is_exact(saved):
    folder, config, params, optimizer = saved
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "notes.json", "optimizer.safetensors"]
    loaded_config, loaded, step = checkpoint.load_checkpoint(folder)
    assert loaded_config == config and step == 2
    assert list(loaded) == list(params)
    for name in params:
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(albor.to_numpy(loaded[name]), albor.to_numpy(params[name]))
    restored = checkpoint.load_optimizer(folder, loaded, step=2)
    assert restored.hyperparameters() == optimizer.hyperparameters() == \
        {"betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.2, "t": 2}
    for name in params:
        np.testing.assert_array_equal(albor.to_numpy(restored.m[name]), albor.to_numpy(optimizer.m[name]))
        np.testing.assert_array_equal(albor.to_numpy(restored.v[name]), albor.to_numpy(optimizer.v[name]))


def test_checkpoint_is_a_hugging_face_llama_folder(saved):
    folder, config, params, _ = saved
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert hf["tie_word_embeddings"] is True and hf["hidden_act"] == "silu"
    assert hf["hidden_size"] == 64 and hf["num_key_value_heads"] == 2 and hf["head_dim"] == 16
    assert hf["eos_token_id"] == 256 and hf["pad_token_id"] == 257 and hf["torch_dtype"] == "float32"
    assert checkpoint.config_from_hf(hf) == config
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "np") as f:
        assert f.metadata()["format"] == "pt"            # transformers refuses files without it
        assert set(f.keys()) == set(albor.param_shapes(config))   # no lm_head.weight: tied
        assert "lm_head.weight" not in f.keys()


def test_safetensors_written_by_hand_read_back_by_the_library_and_are_deterministic(saved, tmp_path):
    folder, config, params, optimizer = saved
    from safetensors.numpy import load_file
    loaded = load_file(folder / "model.safetensors")
    assert set(loaded) == set(params)
    for name in params:
        np.testing.assert_array_equal(loaded[name], albor.to_numpy(params[name]))
    checkpoint.save_checkpoint(tmp_path / "again", config, params, optimizer, step=2, extra_files={"notes.json": b"{}\n"})
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()


def test_save_is_atomic_when_interrupted(saved, monkeypatch):
    folder, config, params, optimizer = saved
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    changed = {n: p + 1 for n, p in params.items()}
    real_write = checkpoint.write_safetensors
    calls = []

    def crash_on_second_file(tmp, tensors, metadata):
        calls.append(tmp)
        if len(calls) == 2:          # the model file is staged, the optimizer file is half written
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(tmp, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(folder, config, changed, optimizer, step=3)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before  # untouched, no temp files
    checkpoint.load_optimizer(folder, checkpoint.load_checkpoint(folder)[1], step=2)


def test_truncated_model_file_is_a_one_line_error_naming_it(saved):
    folder = saved[0]
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as error:
        checkpoint.load_checkpoint(folder)
    message = str(error.value)
    assert "model.safetensors" in message and "truncated" in message and "\n" not in message
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        checkpoint.load_checkpoint(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        checkpoint.load_checkpoint(folder)


def test_mismatched_checkpoint_errors_name_the_file_and_the_problem(saved):
    folder, config, params, _ = saved
    hf = json.loads((folder / "config.json").read_text())
    hf["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*mlp.gate_proj.weight has shape \(160, 64\), "
                                              r"the config needs \(128, 64\)"):
        checkpoint.load_checkpoint(folder)
    del hf["hidden_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="config.json: missing the field 'hidden_size'"):
        checkpoint.load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        checkpoint.load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        checkpoint.load_checkpoint(folder / "nowhere")


def test_optimizer_from_another_step_or_model_is_refused(saved, tmp_path):
    folder, config, params, optimizer = saved
    with pytest.raises(CheckpointError, match="optimizer.safetensors: saved at step 2, but the model file is at step 7"):
        checkpoint.load_optimizer(folder, params, step=7)
    other = albor.init_params(dataclasses.replace(config, hidden_size=32))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: "):
        checkpoint.load_optimizer(folder, other, step=2)
