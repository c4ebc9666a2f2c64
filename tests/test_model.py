"""Tests for albor.py: every backward against finite differences, the model's properties
(causality, RoPE, GQA, ignore index), the backend switch, and an independent PyTorch autograd
oracle of the same LLaMA in float64.

Gradient tolerances: central differences in float64 with step 1e-6 (layers) / 1e-5 (model) are
accurate to about 1e-9 relative, so a correct backward passes with room to spare, while a wrong
sign or a missing term is off by O(1) relative.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import albor
import cpu
from albor import xp, to_numpy, IGNORE_INDEX
from tests.oracles import oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER_RTOL = 1e-7  # max |analytic - numeric| / max |numeric| for the layer checks
MODEL_RTOL = 1e-6  # same for the whole-model check (more float64 round-off in a deeper graph)

# a small model with every feature switched on: GQA (4 query heads over 2 KV heads), two layers,
# an odd vocabulary, and non-default RoPE theta and RMSNorm eps (so both settings are exercised)
SMALL = albor.Config(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=24, max_position_embeddings=8,
                     rope_theta=500.0, rms_norm_eps=1e-3)


def rng(seed=0):
    return np.random.default_rng(seed)


def dev(a):
    return xp.asarray(a)


def float64_params(config, seed=0):
    """init_params, but float64 and with random (not all-ones) norm weights, so a mistake that
    only shows with non-unit weights is not hidden."""
    params = {}
    r = rng(seed + 1)
    for name, value in albor.init_params(config, seed).items():
        value = to_numpy(value).astype(np.float64)
        if value.ndim == 1:
            value = value + 0.3 * r.standard_normal(value.shape)
        else:
            value = value * 10  # larger weights: a less linear model, a stricter check
        params[name] = dev(value)
    return params


# -----------------------------------------------------------------------------
# finite-difference helpers


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() w.r.t. every entry of the host array x (mutated
    in place and restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        original = x[i]
        x[i] = original + eps
        f_plus = f()
        x[i] = original - eps
        f_minus = f()
        x[i] = original
        grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def rel_err(analytic, numeric):
    analytic, numeric = to_numpy(analytic), to_numpy(numeric)
    assert analytic.shape == numeric.shape
    return np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-30)


def check_layer(forward_fn, backward_fn, inputs, seed=0):
    """forward_fn(*device inputs) -> out; backward_fn(dout, *device inputs) -> tuple of grads.
    Checks the gradient of sum(out * G), G random, for every input."""
    host = [np.array(a, dtype=np.float64) for a in inputs]
    G = rng(seed + 100).standard_normal(np.shape(to_numpy(forward_fn(*[dev(a) for a in host]))))

    def scalar():
        return float(np.sum(to_numpy(forward_fn(*[dev(a) for a in host])) * G))

    grads = backward_fn(dev(G), *[dev(a) for a in host])
    assert len(grads) == len(host)
    for x, analytic in zip(host, grads):
        assert to_numpy(analytic).dtype == np.float64
        err = rel_err(analytic, numeric_grad(scalar, x))
        assert err < LAYER_RTOL, err


# -----------------------------------------------------------------------------
# every layer's backward against finite differences (float64)


def test_embedding_backward():
    r = rng(1)
    wte = r.standard_normal((7, 5))
    idx = dev(np.array([[1, 3, 1], [6, 1, 0]]))  # token 1 three times: contributions must add up

    def grads(dout, wte):
        dwte = xp.zeros_like(wte)
        albor.embedding_backward(dwte, dout, idx)
        return (dwte,)

    check_layer(lambda w: albor.embedding_forward(w, idx), grads, [wte])
    # it ADDS into the given buffer (accumulation), it does not overwrite it
    dout = dev(r.standard_normal((2, 3, 5)))
    once = xp.zeros((7, 5))
    albor.embedding_backward(once, dout, idx)
    twice = once.copy()
    albor.embedding_backward(twice, dout, idx)
    np.testing.assert_allclose(to_numpy(twice), 2 * to_numpy(once), rtol=1e-15)


def test_rmsnorm_backward():
    r = rng(2)
    x = r.standard_normal((2, 3, 8))
    w = 1 + 0.5 * r.standard_normal(8)
    eps = 1e-3  # large, so a forgotten eps would show
    check_layer(lambda x, w: albor.rmsnorm_forward(x, w, eps)[0],
                lambda d, x, w: albor.rmsnorm_backward(d, x, w, albor.rmsnorm_forward(x, w, eps)[1]),
                [x, w])


def test_rmsnorm_forward_values():
    x = np.array([[3.0, 4.0]])
    out, rstd = albor.rmsnorm_forward(dev(x), dev(np.array([1.0, 2.0])), 0.5)
    expected_rstd = 1 / math.sqrt((9 + 16) / 2 + 0.5)
    np.testing.assert_allclose(to_numpy(rstd), [[expected_rstd]], rtol=1e-14)
    np.testing.assert_allclose(to_numpy(out), [[3 * expected_rstd, 8 * expected_rstd]], rtol=1e-14)


def test_rope_backward():
    x = rng(3).standard_normal((2, 3, 5, 8))  # (B, heads, T, D)
    cos, sin = albor.rope_tables(5, 8, 100.0, np.float64)
    check_layer(lambda x: albor.rope_forward(x, cos, sin),
                lambda d, x: (albor.rope_backward(d, cos, sin),), [x])


def test_rope_matches_hf_formula():
    """rotate-half layout: out = x*cos + rotate_half(x)*sin, inv_freq = theta^(-arange(0,D,2)/D)."""
    T, D, theta = 6, 8, 1000.0
    x = rng(4).standard_normal((1, 2, T, D))
    inv_freq = theta ** (-np.arange(0, D, 2) / D)
    angles = np.arange(T)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], 1))
    sin = np.sin(np.concatenate([angles, angles], 1))
    rotate_half = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    expected = x * cos + rotate_half * sin
    c, s = albor.rope_tables(T, D, theta, np.float64)
    np.testing.assert_allclose(to_numpy(albor.rope_forward(dev(x), c, s)), expected, atol=1e-14)
    # a strided (transposed) input gives the same, C-contiguous, result
    xt = dev(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    out = albor.rope_forward(xt, c, s)
    assert out.flags.c_contiguous
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-14)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_attention_backward(heads, kv_heads):
    r = rng(5)
    B, T, D = 2, 5, 4
    q = r.standard_normal((B, heads, T, D))
    k = r.standard_normal((B, kv_heads, T, D))
    v = r.standard_normal((B, kv_heads, T, D))

    def grads(dout, q, k, v):
        out, lse = albor.attention_forward(q, k, v)
        return albor.attention_backward(dout, q, k, v, out, lse)

    check_layer(lambda q, k, v: albor.attention_forward(q, k, v)[0], grads, [q, k, v])


def test_swiglu_backward():
    r = rng(6)
    gate = 3 * r.standard_normal((4, 6))  # wide range: both tails of the sigmoid
    up = r.standard_normal((4, 6))
    check_layer(albor.swiglu_forward, albor.swiglu_backward, [gate, up])


def test_swiglu_forward_values():
    gate, up = np.array([[-2.0, 0.0, 1.5]]), np.array([[0.5, 3.0, -1.0]])
    expected = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(to_numpy(albor.swiglu_forward(dev(gate), dev(up))), expected, rtol=1e-14)


def test_cross_entropy_backward():
    r = rng(7)
    N, V = 6, 5
    logits = 2 * r.standard_normal((N, V))
    targets = dev(np.array([1, IGNORE_INDEX, 4, 0, IGNORE_INDEX, 2]))
    loss_scale = 0.7
    host = logits.copy()

    def loss():  # forward overwrites its input, so hand it a copy
        return albor.cross_entropy_forward(dev(host.copy()), targets)[0]

    numeric = numeric_grad(loss, host)
    probs = albor.cross_entropy_forward(dev(logits.copy()), targets)[1]
    analytic = albor.cross_entropy_backward(probs, targets, loss_scale)
    assert rel_err(analytic, loss_scale * numeric) < LAYER_RTOL
    # value: mean of -log softmax[target] over the 4 counted rows
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    t = to_numpy(targets)
    expected = -np.mean([log_softmax[i, t[i]] for i in range(N) if t[i] != IGNORE_INDEX])
    assert abs(loss() - expected) < 1e-14
    # ignored rows get exactly zero gradient
    assert np.all(to_numpy(analytic)[[1, 4]] == 0)


def test_cross_entropy_overwrites_logits_in_place_and_is_stable():
    logits = dev(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    loss, probs, n_valid = albor.cross_entropy_forward(logits, dev(np.array([0, 2])))
    assert probs is logits and n_valid == 2
    assert abs(loss - math.log(3) / 2) < 1e-6  # row 0 is certain (loss 0), row 1 is uniform
    dlogits = albor.cross_entropy_backward(probs, dev(np.array([0, 2])))
    assert dlogits is logits


def test_cross_entropy_all_ignored_is_an_error():
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        albor.cross_entropy_forward(dev(np.zeros((2, 3))), dev(np.array([IGNORE_INDEX] * 2)))


# -----------------------------------------------------------------------------
# the whole model's gradient, every parameter (float64)


def model_loss(params, config, idx, targets):
    return albor.forward(params, config, idx, targets)[0]


def test_model_gradient_every_parameter():
    r = rng(8)
    B, T = 2, 6
    idx = r.integers(0, SMALL.vocab_size, (B, T))
    idx[1, 2] = idx[0, 4] = idx[0, 1]  # a repeated token: embedding rows must add up
    targets = r.integers(0, SMALL.vocab_size, (B, T))
    targets[0, 3] = targets[1, 5] = IGNORE_INDEX
    params = float64_params(SMALL)
    loss, cache = albor.forward(params, SMALL, idx, targets)
    grads = albor.backward(params, SMALL, cache)
    assert list(grads) == list(params)
    eps = 1e-5
    for name, p in params.items():
        analytic = to_numpy(grads[name])
        assert analytic.shape == to_numpy(p).shape and analytic.dtype == np.float64
        original = p.copy()
        # 1) the derivative along a random direction covers every entry of the parameter
        direction = r.standard_normal(p.shape)
        params[name] = original + eps * dev(direction)
        plus = model_loss(params, SMALL, idx, targets)
        params[name] = original - eps * dev(direction)
        minus = model_loss(params, SMALL, idx, targets)
        params[name] = original
        numeric = (plus - minus) / (2 * eps)
        directional = float(np.sum(analytic * direction))
        assert abs(directional - numeric) < MODEL_RTOL * abs(numeric), (name, directional, numeric)
        # 2) a few single entries, against the size of the parameter's whole gradient
        flat = to_numpy(original).reshape(-1)
        scale = np.abs(analytic).max()
        for j in r.choice(flat.size, size=min(3, flat.size), replace=False):
            bumped = flat.copy()
            bumped[j] += eps
            params[name] = dev(bumped.reshape(p.shape))
            plus = model_loss(params, SMALL, idx, targets)
            bumped[j] -= 2 * eps
            params[name] = dev(bumped.reshape(p.shape))
            minus = model_loss(params, SMALL, idx, targets)
            params[name] = original
            numeric = (plus - minus) / (2 * eps)
            assert abs(analytic.reshape(-1)[j] - numeric) < MODEL_RTOL * scale, (name, j)


def test_embedding_row_gets_lm_head_and_lookup_gradients():
    """The tied matrix: an unused token's row gets only the LM-head gradient; a used one more."""
    r = rng(9)
    idx = np.array([[1, 2, 3, 1]])
    targets = r.integers(0, SMALL.vocab_size, (1, 4))
    params = float64_params(SMALL)
    grads = albor.backward(params, SMALL, albor.forward(params, SMALL, idx, targets)[1])
    loss, cache = albor.forward(params, SMALL, idx, targets)
    # LM head part alone: dlogits.T @ xf, rebuilt from the cache
    xf = cache["xf"]
    dlogits = albor.cross_entropy_backward(cache["probs"], cache["targets"])
    lm_head_part = to_numpy(dlogits.T @ xf)
    dwte = to_numpy(grads["model.embed_tokens.weight"])
    np.testing.assert_allclose(dwte[5], lm_head_part[5], rtol=1e-12)  # token 5 is not an input
    assert np.abs(dwte[1] - lm_head_part[1]).max() > 1e-3 * np.abs(dwte[1]).max()


def test_loss_scale_and_accumulation():
    r = rng(10)
    idx = r.integers(0, SMALL.vocab_size, (2, 5))
    targets = r.integers(0, SMALL.vocab_size, (2, 5))
    params = float64_params(SMALL)
    g1 = albor.backward(params, SMALL, albor.forward(params, SMALL, idx, targets)[1])
    half = albor.backward(params, SMALL, albor.forward(params, SMALL, idx, targets)[1], loss_scale=0.5)
    accumulated = {k: v.copy() for k, v in g1.items()}
    buffers = dict(accumulated)
    out = albor.backward(params, SMALL, albor.forward(params, SMALL, idx, targets)[1],
                         loss_scale=0.5, grads=accumulated)
    assert out is accumulated
    for name in params:
        np.testing.assert_allclose(to_numpy(half[name]), 0.5 * to_numpy(g1[name]), rtol=1e-12, atol=1e-15)
        assert accumulated[name] is buffers[name]  # added in place, same arrays
        np.testing.assert_allclose(to_numpy(accumulated[name]), 1.5 * to_numpy(g1[name]),
                                   rtol=1e-12, atol=1e-15)


def test_data_parallel_equals_one_forward_backward_of_the_whole_micro_batch():
    """Rows shared out over 3 worker threads (shards of 1, 2 and 2 rows, counting 6, 10 and 12
    targets), two micro-batches accumulated, loss_scale applied: the same loss (summed over the
    counted targets) and the same summed gradients as forward + backward on whole micro-batches
    (float64)."""
    r = rng(11)
    params = float64_params(SMALL)
    batches = []
    for _ in range(2):
        idx = r.integers(0, SMALL.vocab_size, (5, 6))
        targets = r.integers(0, SMALL.vocab_size, (5, 6))
        targets[1, 2:] = IGNORE_INDEX  # uneven counts over the shards
        batches.append((idx, targets))
    workers = cpu.DataParallel(3)
    expected, losses = None, []
    for idx, targets in batches:
        loss, cache = albor.forward(params, SMALL, idx, targets)
        expected = albor.backward(params, SMALL, cache, loss_scale=0.5, grads=expected)
        counted = int((targets != IGNORE_INDEX).sum())
        assert workers.forward_backward(params, SMALL, idx, targets, loss_scale=0.5) == \
            pytest.approx(loss * counted, rel=1e-12)
        assert workers.loss_sum(params, SMALL, idx, targets) == pytest.approx(loss * counted, rel=1e-12)
    got = workers.gradients()
    assert list(got) == list(params)
    for name in params:
        np.testing.assert_allclose(to_numpy(got[name]), to_numpy(expected[name]), rtol=1e-10, atol=1e-14,
                                   err_msg=name)
    assert workers.grads == [None, None, None]  # the next step starts afresh
    assert workers.seconds["forward"] > 0 and workers.seconds["backward"] > 0


def test_data_parallel_is_deterministic_and_skips_shards_with_nothing_to_count():
    r = rng(12)
    params = albor.init_params(SMALL, seed=3)
    idx = r.integers(0, SMALL.vocab_size, (4, 6))
    targets = r.integers(0, SMALL.vocab_size, (4, 6))
    targets[2:] = IGNORE_INDEX  # the second worker's shard counts nothing: it is not run
    runs = []
    for _ in range(2):
        workers = cpu.DataParallel(2)
        loss = workers.forward_backward(params, SMALL, idx, targets)
        assert workers.grads[1] is None
        runs.append((loss, workers.gradients()))
    assert runs[0][0] == runs[1][0]
    for name in params:
        assert runs[0][1][name].tobytes() == runs[1][1][name].tobytes(), name
    reference, cache = albor.forward(params, SMALL, idx[:2], targets[:2])
    assert runs[0][0] == pytest.approx(reference * targets[:2].size, rel=1e-6)
    with pytest.raises(ValueError, match="every target is IGNORE_INDEX"):
        cpu.DataParallel(2).loss_sum(params, SMALL, idx, np.full_like(targets, IGNORE_INDEX))


def test_row_shards_and_worker_count():
    assert cpu.row_shards(5, 2) == [slice(0, 2), slice(2, 5)]
    assert cpu.row_shards(4, 2) == [slice(0, 2), slice(2, 4)]
    assert cpu.row_shards(1, 2) == [slice(0, 1)]
    assert cpu.row_shards(3, 8) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    code = "import os, cpu; print(cpu.cpu_workers(), len(os.sched_getaffinity(0)))"
    single = run_python(code, "cpu", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    workers, cores = map(int, single.stdout.split())
    assert workers == cores  # single-threaded BLAS: a worker thread per core
    threaded = run_python(code, "cpu", extra_env={"OPENBLAS_NUM_THREADS": "2"})
    assert threaded.stdout.split()[0] == "1"  # BLAS threads use the cores: no workers


def test_backward_twice_on_one_cache_is_an_error():
    params = albor.init_params(SMALL)
    idx = np.zeros((1, 3), dtype=np.int64)
    cache = albor.forward(params, SMALL, idx, idx)[1]
    albor.backward(params, SMALL, cache)
    with pytest.raises(ValueError, match="already used"):
        albor.backward(params, SMALL, cache)


# -----------------------------------------------------------------------------
# model properties


def test_param_count():
    assert albor.param_count(albor.get_config("albor-base-50m")) == 62_403_072
    c = SMALL  # 37*16 + 2 * (2*16 + 16*16 + 2*(8*16) + 16*16 + 3*24*16) + 16
    assert albor.param_count(c) == 37 * 16 + 2 * (32 + 256 + 256 + 256 + 3 * 24 * 16) + 16
    shapes = albor.param_shapes(albor.get_config("albor-base-50m"))
    assert shapes["model.layers.11.self_attn.k_proj.weight"] == (128, 512)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (512, 2048)
    assert "lm_head.weight" not in shapes and len(shapes) == 2 + 12 * 9


def test_init_params_seeded_and_distributed():
    config = albor.get_config("tiny")
    a, b, c = albor.init_params(config, 0), albor.init_params(config, 0), albor.init_params(config, 1)
    assert list(a) == list(albor.param_shapes(config))
    for name in a:
        assert a[name].dtype == np.float32 and a[name].shape == albor.param_shapes(config)[name]
        np.testing.assert_array_equal(to_numpy(a[name]), to_numpy(b[name]))
    wte = to_numpy(a["model.embed_tokens.weight"])
    assert not np.array_equal(wte, to_numpy(c["model.embed_tokens.weight"]))
    assert abs(wte.std() - 0.02) < 0.001 and abs(wte.mean()) < 0.001
    np.testing.assert_array_equal(to_numpy(a["model.layers.1.input_layernorm.weight"]), 1.0)


def test_causality():
    config = albor.get_config("tiny")
    params = albor.init_params(config)
    idx = rng(11).integers(0, config.vocab_size, (2, 10))
    before = to_numpy(albor.forward(params, config, idx)[0])
    for t in (0, 4, 9):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1) % config.vocab_size
        after = to_numpy(albor.forward(params, config, changed)[0])
        np.testing.assert_array_equal(after[:, :t], before[:, :t])  # the past is untouched
        assert np.all(np.abs(after[:, t:] - before[:, t:]).max(axis=-1) > 0)  # the rest moves


def test_rope_score_depends_only_on_offset():
    D, T = 8, 12
    r = rng(12)
    q, k = r.standard_normal(D), r.standard_normal(D)
    cos, sin = albor.rope_tables(T, D, 10000.0, np.float64)
    # the same vector at every position: (1, 1, T, D)
    q_rot = to_numpy(albor.rope_forward(dev(np.tile(q, (1, 1, T, 1))), cos, sin))[0, 0]
    k_rot = to_numpy(albor.rope_forward(dev(np.tile(k, (1, 1, T, 1))), cos, sin))[0, 0]
    scores = q_rot @ k_rot.T  # scores[m, n]: query at m, key at n
    for offset in range(-3, 4):
        diagonal = np.array([scores[m, m - offset] for m in range(max(offset, 0), min(T, T + offset))])
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-12, atol=1e-12)
    assert abs(scores[5, 5] - scores[5, 3]) > 1e-3  # ...and it does depend on the offset
    assert abs(np.dot(q, k) - scores[7, 7]) < 1e-12  # offset 0: the plain dot product


def naive_attention(q, k, v):
    """Plain multi-head causal attention, one head at a time (q, k, v all (B, H, T, D))."""
    B, H, T, D = q.shape
    out = np.zeros_like(q)
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T / math.sqrt(D)
            s[mask] = -np.inf
            p = np.exp(s - s.max(1, keepdims=True))
            out[b, h] = p / p.sum(1, keepdims=True) @ v[b, h]
    return out


def test_attention_with_kv_heads_equal_heads_is_plain_mha():
    r = rng(13)
    q, k, v = (r.standard_normal((2, 3, 7, 4)) for _ in range(3))
    out, lse = albor.attention_forward(dev(q), dev(k), dev(v))
    np.testing.assert_allclose(to_numpy(out), naive_attention(q, k, v), rtol=1e-12, atol=1e-13)
    s = np.einsum("bhtd,bhsd->bhts", q, k) / 2.0 + np.where(np.triu(np.ones((7, 7)), 1) > 0, -np.inf, 0)
    np.testing.assert_allclose(to_numpy(lse), np.log(np.exp(s).sum(-1)), rtol=1e-12)


def test_gqa_heads_of_a_group_read_the_same_kv_head():
    r = rng(14)
    B, H, KVH, T, D = 2, 6, 2, 5, 4  # group of 3: heads 0-2 read KV head 0, heads 3-5 KV head 1
    q = r.standard_normal((B, H, T, D))
    k, v = r.standard_normal((B, KVH, T, D)), r.standard_normal((B, KVH, T, D))
    out, lse = albor.attention_forward(dev(q), dev(k), dev(v))
    k_rep, v_rep = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)  # head h -> KV head h // 3
    np.testing.assert_allclose(to_numpy(out), naive_attention(q, k_rep, v_rep), rtol=1e-12, atol=1e-13)
    # changing KV head 1 changes only query heads 3..5
    v2 = v.copy()
    v2[:, 1] += 1.0
    out2 = to_numpy(albor.attention_forward(dev(q), dev(k), dev(v2))[0])
    np.testing.assert_array_equal(out2[:, :3], to_numpy(out)[:, :3])
    assert np.all(np.abs(out2[:, 3:] - to_numpy(out)[:, 3:]) > 0.5)
    # and dk/dv are the MHA gradients of the repeated K/V, summed over each group
    dout = r.standard_normal((B, H, T, D))
    dq, dk, dv = albor.attention_backward(dev(dout), dev(q), dev(k), dev(v), out, lse)
    out_rep, lse_rep = albor.attention_forward(dev(q), dev(k_rep), dev(v_rep))
    dq_rep, dk_rep, dv_rep = albor.attention_backward(dev(dout), dev(q), dev(k_rep), dev(v_rep),
                                                      out_rep, lse_rep)
    np.testing.assert_allclose(to_numpy(dq), to_numpy(dq_rep), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_numpy(dk), to_numpy(dk_rep).reshape(B, KVH, 3, T, D).sum(2),
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_numpy(dv), to_numpy(dv_rep).reshape(B, KVH, 3, T, D).sum(2),
                               rtol=1e-12, atol=1e-13)


def test_ignore_index_is_ignored_in_loss_and_gradient():
    r = rng(15)
    params = float64_params(SMALL)
    idx = r.integers(0, SMALL.vocab_size, (2, 6))
    targets = r.integers(0, SMALL.vocab_size, (2, 6))
    targets[:, -1] = IGNORE_INDEX  # the last position predicts nothing
    targets[0, 2] = IGNORE_INDEX
    # loss = mean of per-token losses over the counted positions only
    logits = to_numpy(albor.forward(params, SMALL, idx)[0])
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    counted = [-log_softmax[b, t, targets[b, t]] for b in range(2) for t in range(6)
               if targets[b, t] != IGNORE_INDEX]
    loss, cache = albor.forward(params, SMALL, idx, targets)
    assert abs(loss - np.mean(counted)) < 1e-12
    grads = albor.backward(params, SMALL, cache)
    # the last input token only feeds the (ignored) last prediction: changing it changes nothing
    changed = idx.copy()
    changed[:, -1] = (changed[:, -1] + 5) % SMALL.vocab_size
    loss2, cache2 = albor.forward(params, SMALL, changed, targets)
    grads2 = albor.backward(params, SMALL, cache2)
    assert abs(loss2 - loss) < 1e-13
    for name in params:
        np.testing.assert_allclose(to_numpy(grads2[name]), to_numpy(grads[name]), rtol=1e-10, atol=1e-14)


def test_loss_at_init_is_about_ln_vocab():
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=3)
    idx = rng(16).integers(0, config.vocab_size, (2, 32))
    loss, _ = albor.forward(params, config, idx, np.roll(idx, -1, axis=1))
    assert abs(loss - math.log(config.vocab_size)) < 0.1, loss


def test_float32_throughout():
    """No float64 sneaks into the fp32 path: outputs, gradients and everything in the cache."""
    config = albor.get_config("tiny")
    params = albor.init_params(config)
    idx = rng(17).integers(0, config.vocab_size, (2, 8))
    logits, cache = albor.forward(params, config, idx)
    assert logits.dtype == np.float32 and logits.shape == (2, 8, config.vocab_size) and cache is None
    loss, cache = albor.forward(params, config, idx, idx)
    assert isinstance(loss, float)

    def arrays(obj):
        if isinstance(obj, dict):
            for value in obj.values():
                yield from arrays(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from arrays(value)
        elif hasattr(obj, "dtype"):
            yield obj

    float_arrays = [a for a in arrays(cache) if a.dtype.kind == "f"]
    assert len(float_arrays) > 20 and all(a.dtype == np.float32 for a in float_arrays)
    grads = albor.backward(params, config, cache, loss_scale=np.float64(0.25))
    assert all(g.dtype == np.float32 for g in grads.values())
    # and the fp32 model agrees with the same model run in float64
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    logits64 = to_numpy(albor.forward(params64, config, idx)[0])
    np.testing.assert_allclose(to_numpy(logits), logits64, rtol=0, atol=1e-5)


def test_bad_input_errors():
    config = albor.get_config("tiny")
    params = albor.init_params(config)
    with pytest.raises(ValueError, match="presets: albor-base-50m, tiny"):
        albor.get_config("huge")
    with pytest.raises(ValueError, match="not divisible"):
        albor.Config(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        albor.forward(params, config, np.zeros((1, 257), dtype=np.int64))
    with pytest.raises(ValueError, match="token ids"):
        albor.forward(params, config, np.array([[1, 512]]))
    with pytest.raises(ValueError, match="token ids"):
        albor.forward(params, config, np.array([[1, -1]]))
    with pytest.raises(ValueError, match="targets"):
        albor.forward(params, config, np.array([[1, 2]]), np.array([[1, 512]]))
    with pytest.raises(ValueError, match="integer"):
        albor.forward(params, config, np.array([[1.0, 2.0]]))


# -----------------------------------------------------------------------------
# backend selection (in fresh interpreters)

BLOCK_CUPY = """
import sys
class BlockCupy:
    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith("cupy.") or name.startswith("cupyx"):
            raise ImportError("cupy blocked by the test")
sys.meta_path.insert(0, BlockCupy())
"""


def run_python(code, device=None, extra_env=None):
    env = dict(os.environ)
    env.pop("ALBOR_DEVICE", None)
    env.update(extra_env or {})
    if device is not None:
        env["ALBOR_DEVICE"] = device
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_backend_forced_cpu():
    result = run_python("import albor, numpy; assert albor.xp is numpy; print(albor.BACKEND)", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_imports_without_cupy():
    result = run_python(BLOCK_CUPY + "import albor, numpy; assert albor.xp is numpy; print(albor.BACKEND)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_forcing_cuda_without_a_gpu_is_a_clear_error():
    result = run_python(BLOCK_CUPY + "import albor", "cuda")
    assert result.returncode != 0
    assert "RuntimeError: ALBOR_DEVICE=cuda, but no usable GPU" in result.stderr


FAULTS_OF_REALLOCATION = """
import platform, resource, sys
import numpy as np
import cpu
if sys.argv[1] == "keep":
    assert cpu.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
def allocate():  # 64 MiB in 16 blocks of 4 MiB, each touched (like a step's temporaries)
    return [np.ones(1 << 20, dtype=np.float32) for _ in range(16)]
blocks = allocate()
del blocks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = allocate()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    """Without it, glibc unmaps freed 4 MiB blocks and the next allocation faults their pages
    back in (here about 8,000 faults for 64 MiB); with it, the blocks are reused (0 faults)."""
    import platform
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATION, mode], capture_output=True,
                                text=True, cwd=ROOT, env={**os.environ, "ALBOR_DEVICE": "cpu"})
        assert result.returncode == 0, result.stderr
        faults[mode] = int(result.stdout)
    if platform.libc_ver()[0] == "glibc":
        # (fewer faults than pages where the kernel maps huge pages; at least one a block)
        assert faults["default"] >= 16 and faults["keep"] <= faults["default"] // 10, faults
    else:
        assert cpu.keep_freed_memory() is False


def test_bad_device_name_is_a_clear_error():
    result = run_python("import albor", "tpu")
    assert result.returncode != 0
    assert "ALBOR_DEVICE must be 'cpu', 'cuda' or 'auto'" in result.stderr


# -----------------------------------------------------------------------------
# an independent oracle: the same LLaMA written with PyTorch autograd, in float64


def torch_llama_loss(torch, params, config, idx, targets):
    """Loss and logits from a direct PyTorch transcription of HF's LlamaForCausalLM."""
    F = torch.nn.functional
    H, KVH, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    B, T = idx.shape

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):
        rotated = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rotated * sin

    x = F.embedding(idx, params["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = rmsnorm(x, params[p + "input_layernorm.weight"])
        q = F.linear(a, params[p + "self_attn.q_proj.weight"]).view(B, T, H, D).transpose(1, 2)
        k = F.linear(a, params[p + "self_attn.k_proj.weight"]).view(B, T, KVH, D).transpose(1, 2)
        v = F.linear(a, params[p + "self_attn.v_proj.weight"]).view(B, T, KVH, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // KVH, dim=1)
        v = v.repeat_interleave(H // KVH, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + F.linear(att, params[p + "self_attn.o_proj.weight"])
        m = rmsnorm(x, params[p + "post_attention_layernorm.weight"])
        h = F.silu(F.linear(m, params[p + "mlp.gate_proj.weight"])) * F.linear(m, params[p + "mlp.up_proj.weight"])
        x = x + F.linear(h, params[p + "mlp.down_proj.weight"])
    logits = F.linear(rmsnorm(x, params["model.norm.weight"]), params["model.embed_tokens.weight"])
    loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, logits


def test_matches_torch_autograd_float64():
    torch = oracle("torch")  # an oracle only (requirements-dev.txt)

    r = rng(18)
    config = SMALL
    idx = r.integers(0, config.vocab_size, (3, 8))
    targets = r.integers(0, config.vocab_size, (3, 8))
    targets[2, :3] = IGNORE_INDEX
    params = float64_params(config, seed=5)
    torch_params = {k: torch.tensor(to_numpy(v), requires_grad=True) for k, v in params.items()}
    t_loss, t_logits = torch_llama_loss(torch, torch_params, config, torch.tensor(idx), torch.tensor(targets))
    (0.3 * t_loss).backward()

    logits = to_numpy(albor.forward(params, config, idx)[0])
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-11, atol=1e-12)
    loss, cache = albor.forward(params, config, idx, targets)
    assert abs(loss - t_loss.item()) < 1e-12
    grads = albor.backward(params, config, cache, loss_scale=0.3)
    for name in params:
        expected = torch_params[name].grad.numpy()
        assert rel_err(grads[name], expected) < 1e-10, name
