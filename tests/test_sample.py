"""Tests for sampling: albor.py's KV cache and samplers, sample.py's command line and parse_rate.

The KV cache is checked against `forward` on the same tokens (the cached, step-by-step logits
must be the full pass's, in float32 and float64), generate's greedy decoding against a plain
loop that reruns `forward` on the whole sequence each step, and every sampling setting against
its definition. sample.py runs end to end on a tiny checkpoint written here.
"""
import dataclasses
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import albor
import checkpoint
import sample
from tokenizer import EOT_ID, Tokenizer
from train import stdlib_python_files
ROOT = Path(__file__).resolve().parent.parent
TINY = albor.get_config("tiny")
# Small enough for quick generation; a vocabulary larger than the test tokenizer's, and a
# short context so the long-prompt rules are easy to reach.
SMALL = albor.Config(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)


def params_of(config, dtype=np.float32, seed=0):
    """Random weights, larger than init_params' (std 0.02) so the logits are far from uniform
    and the norm weights not all 1: a wrong position or a skipped layer changes the logits."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in albor.param_shapes(config).items():
        if len(shape) == 1:
            host = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            host = 0.3 * rng.standard_normal(shape) / math.sqrt(shape[-1]) * 4
        params[name] = albor.xp.asarray(host.astype(dtype))
    return params


def tokens(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


# -----------------------------------------------------------------------------
# The KV cache


@pytest.mark.parametrize("dtype, atol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])   # 4 query heads: groups of 4, 2 and 1
def test_cached_decoding_equals_the_full_forward(dtype, atol, kv_heads):
    config = dataclasses.replace(TINY, num_key_value_heads=kv_heads)
    params = params_of(config, dtype)
    ids = tokens(config, (2, 40))
    full, _ = albor.forward(params, config, ids)  # (2, 40, V)
    cache = albor.kv_cache_new(config, 2, 48, dtype)
    pieces = [(0, 7)] + [(t, t + 1) for t in range(7, 20)] + [(20, 33), (33, 40)]
    for start, stop in pieces:
        assert cache["length"] == start
        step = albor.forward_step(params, config, ids[:, start:stop], cache)
        assert step.shape == (2, stop - start, config.vocab_size) and step.dtype == dtype
        np.testing.assert_allclose(albor.to_numpy(step), albor.to_numpy(full[:, start:stop]), rtol=0, atol=atol)
    assert cache["length"] == 40


def test_one_step_over_the_whole_context_is_the_forward():
    params = params_of(TINY)
    ids = tokens(TINY, (1, TINY.max_position_embeddings))
    cache = albor.kv_cache_new(TINY, 1, TINY.max_position_embeddings)
    step = albor.forward_step(params, TINY, ids, cache)
    full, _ = albor.forward(params, TINY, ids)
    np.testing.assert_allclose(albor.to_numpy(step), albor.to_numpy(full), rtol=0, atol=2e-5)


def test_kv_cache_shapes_and_errors():
    cache = albor.kv_cache_new(TINY, 3, 10)
    assert len(cache["k"]) == len(cache["v"]) == TINY.num_hidden_layers
    assert cache["k"][0].shape == (3, TINY.num_key_value_heads, 10, TINY.head_dim)
    assert cache["k"][0].dtype == np.float32 and cache["length"] == 0
    params = params_of(TINY)
    with pytest.raises(ValueError, match="max_len"):
        albor.kv_cache_new(TINY, 1, TINY.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="do not fit"):
        albor.forward_step(params, TINY, tokens(TINY, (3, 11)), cache)
    with pytest.raises(ValueError, match="sequences"):
        albor.forward_step(params, TINY, tokens(TINY, (2, 1)), cache)
    with pytest.raises(ValueError, match="token ids"):
        albor.forward_step(params, TINY, np.full((3, 1), TINY.vocab_size), cache)
    assert cache["length"] == 0  # failed steps leave the cache as it was


# -----------------------------------------------------------------------------
# sampling_probs and sample_next


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


LOGITS = np.random.default_rng(1).standard_normal(50) * 2


def test_the_docstring_example():
    logits = np.array([2.0, 1.0, 0.0])
    np.testing.assert_allclose(sample.sampling_probs(logits), softmax(logits))
    np.testing.assert_allclose(sample.sampling_probs(logits, top_k=2), [*softmax(logits[:2]), 0])
    np.testing.assert_array_equal(sample.sampling_probs(logits, top_p=0.5), [1, 0, 0])
    np.testing.assert_array_equal(sample.sampling_probs(logits, temperature=0), [1, 0, 0])


def test_temperature_divides_the_logits_and_sharpens_or_flattens():
    for temperature in (0.25, 0.5, 1.0, 2.0):
        np.testing.assert_allclose(sample.sampling_probs(LOGITS, temperature), softmax(LOGITS / temperature))
    entropies = [entropy(sample.sampling_probs(LOGITS, t)) for t in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert entropies == sorted(entropies) and entropies[0] < entropies[-1] - 1
    greedy = sample.sampling_probs(LOGITS, temperature=0)
    assert greedy[np.argmax(LOGITS)] == 1 and greedy.sum() == 1


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 80])
def test_top_k_keeps_the_k_most_likely(k):
    probs = sample.sampling_probs(LOGITS, top_k=k)
    kept = np.argsort(-LOGITS)[:k]
    assert set(np.flatnonzero(probs)) == set(kept)
    np.testing.assert_allclose(probs[kept], softmax(LOGITS[kept]))


def test_top_k_ties_keep_the_lower_ids():
    probs = sample.sampling_probs(np.array([1.0, 3.0, 3.0, 3.0, 0.0]), top_k=2)
    assert list(np.flatnonzero(probs)) == [1, 2]


@pytest.mark.parametrize("p", [1e-9, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    full = softmax(LOGITS)
    probs = sample.sampling_probs(LOGITS, top_p=p)
    order = np.argsort(-full)
    n = np.count_nonzero(probs)
    assert set(np.flatnonzero(probs)) == set(order[:n])
    assert full[order[:n]].sum() >= p > full[order[:n - 1]].sum()
    np.testing.assert_allclose(probs[order[:n]], full[order[:n]] / full[order[:n]].sum())


def test_top_k_then_top_p():
    probs = sample.sampling_probs(LOGITS, temperature=0.7, top_k=10, top_p=0.8)
    within_k = sample.sampling_probs(LOGITS, temperature=0.7, top_k=10)
    order = np.argsort(-within_k)
    n = np.count_nonzero(probs)
    assert within_k[order[:n]].sum() >= 0.8 > within_k[order[:n - 1]].sum()
    assert set(np.flatnonzero(probs)) <= set(np.flatnonzero(within_k))


def test_sample_next_draws_from_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2, 0.0]) + 1e-300)
    rng = np.random.default_rng(0)
    draws = np.array([sample.sample_next(logits, 1.0, 0, 1.0, rng) for _ in range(20000)])
    counts = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(counts[:3], [0.5, 0.3, 0.2], atol=0.015)
    assert counts[3] == 0
    # temperature 0 draws nothing from the generator
    rng, untouched = np.random.default_rng(5), np.random.default_rng(5)
    assert sample.sample_next(LOGITS, 0, 0, 1.0, rng) == int(np.argmax(LOGITS))
    assert rng.random() == untouched.random()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample.sampling_probs(LOGITS, **kwargs)
    with pytest.raises(ValueError, match=message):
        sample.generate(params_of(SMALL), SMALL, [1, 2], 3, **{"temperature": 1.0, **kwargs})


# -----------------------------------------------------------------------------
# generate


def greedy_by_full_forward(params, config, prompt, n):
    """Greedy decoding the slow, obvious way: forward over the whole sequence every step."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = albor.forward(params, config, np.array([ids]))
        ids.append(int(np.argmax(albor.to_numpy(logits[0, -1]))))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def small_params():
    return params_of(SMALL, seed=3)


def test_greedy_generate_equals_full_forward_argmax(small_params):
    prompt = [5, 17, 300, 2, 99]
    ids = sample.generate(small_params, SMALL, prompt, 30, temperature=0)
    assert ids == greedy_by_full_forward(small_params, SMALL, prompt, 30)
    assert ids == sample.generate(small_params, SMALL, prompt, 30, temperature=0, seed=123)


def test_same_seed_same_ids_other_seed_other_ids(small_params):
    runs = [sample.generate(small_params, SMALL, [1, 2, 3], 30, temperature=1.0, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and len(runs[0]) == 30


def test_top_k_1_and_a_tiny_top_p_are_greedy(small_params):
    greedy = sample.generate(small_params, SMALL, [4, 5], 25, temperature=0)
    for seed in (0, 1):
        assert sample.generate(small_params, SMALL, [4, 5], 25, temperature=1.5, top_k=1, seed=seed) == greedy
        assert sample.generate(small_params, SMALL, [4, 5], 25, temperature=1.5, top_p=1e-6, seed=seed) == greedy
    assert sample.generate(small_params, SMALL, [4, 5], 25, temperature=1.5, seed=0) != greedy


def test_each_setting_changes_the_draws(small_params):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    reference = sample.generate(small_params, SMALL, [9], 30, **base)
    for change in (dict(temperature=0.5), dict(top_k=5), dict(top_p=0.5), dict(seed=1)):
        assert sample.generate(small_params, SMALL, [9], 30, **{**base, **change}) != reference, change


def test_stops_at_the_end_of_text_token_and_reports_each_token(small_params):
    free = sample.generate(small_params, SMALL, [1, 2], 40, temperature=1.0, seed=4)
    eos = free[12]
    first = free.index(eos)
    seen = []
    stopped = sample.generate(small_params, SMALL, [1, 2], 40, temperature=1.0, seed=4, eos_id=eos,
                             on_token=seen.append)
    assert stopped == free[:first] and seen == stopped and eos not in stopped


def test_max_new_tokens_is_applied(small_params):
    for n in (0, 1, 9):
        assert len(sample.generate(small_params, SMALL, [1], n, temperature=1.0)) == n


def test_only_ids_below_vocab_size_are_drawn(small_params):
    ids = sample.generate(small_params, SMALL, [1], 60, temperature=3.0, vocab_size=260)
    assert max(ids) < 260
    assert max(sample.generate(small_params, SMALL, [1], 60, temperature=3.0)) >= 260
    with pytest.raises(ValueError, match="vocab_size"):
        sample.generate(small_params, SMALL, [1], 5, vocab_size=SMALL.vocab_size + 1)


def test_a_long_prompt_is_cut_from_the_left(small_params):
    context, n = SMALL.max_position_embeddings, 10
    prompt = list(tokens(SMALL, (100,), seed=9))
    kept = prompt[-(context - n):]
    cut = sample.generate(small_params, SMALL, prompt, n, temperature=0)
    assert cut == sample.generate(small_params, SMALL, kept, n, temperature=0)
    assert cut == greedy_by_full_forward(small_params, SMALL, kept, n)
    # one token more of the prompt would have changed the answer: the cut is where it says
    assert cut != sample.generate(small_params, SMALL, prompt[-(context - n) + 1:], n, temperature=0)


def test_generate_errors(small_params):
    with pytest.raises(ValueError, match="empty"):
        sample.generate(small_params, SMALL, [], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample.generate(small_params, SMALL, [1], SMALL.max_position_embeddings)
    with pytest.raises(ValueError, match="token ids"):
        sample.generate(small_params, SMALL, [SMALL.vocab_size], 5)


# -----------------------------------------------------------------------------
# sample.py: streaming text


@pytest.mark.parametrize("text", ["€🙂 naïve", "def f():\n    return 'ü'\n", "日本語"])
def test_text_stream_writes_whole_characters_only(text):
    data = text.encode("utf-8")
    tok = Tokenizer()  # no merges: one token per byte, so tokens cut characters apart
    out = io.StringIO()
    stream = sample.TextStream(tok, out)
    writes = []
    for byte in data:
        before = out.getvalue()
        stream.add(byte)
        writes.append(out.getvalue()[len(before):])
        assert sample.REPLACEMENT not in out.getvalue()
    stream.finish()
    assert out.getvalue() == text == "".join(writes)


def test_text_stream_writes_bad_bytes_at_the_end():
    out = io.StringIO()
    stream = sample.TextStream(Tokenizer(), out)
    for byte in b"ok\xe2\x82":  # a cut "€"
        stream.add(byte)
    assert out.getvalue() == "ok"
    stream.finish()
    assert out.getvalue() == "ok" + sample.REPLACEMENT


# -----------------------------------------------------------------------------
# sample.py: the command line, on a tiny checkpoint made here


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in stdlib_python_files()[:30]]
    return Tokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="module")
def run_folder(tok, small_params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    tok_path = folder.parent / "tokenizer.json"
    tok.save(tok_path)
    checkpoint.save_checkpoint(folder, SMALL, small_params, step=3,
                          extra_files={"tokenizer.json": tok_path.read_bytes()})
    return folder


def run_cli(args, capsys):
    """(exit status, stdout, stderr) of sample.main(args) in-process."""
    try:
        status = sample.main([str(a) for a in args])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_end_to_end(run_folder, tok, small_params):
    prompt = "def fib(n):"
    command = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(run_folder), "--prompt", prompt,
               "--max-new-tokens", "25", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "11"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    ids = sample.generate(small_params, SMALL, tok.encode(prompt), 25, 0.9, 40, 0.9, seed=11,
                         eos_id=EOT_ID, vocab_size=tok.vocab_size)
    assert result.stdout == prompt + tok.decode(ids) + "\n"
    assert f"[{len(ids)} tokens in" in result.stderr


def test_cli_settings_are_applied(run_folder, capsys):
    def text(*flags):
        status, out, err = run_cli(["--checkpoint", run_folder, "--prompt", "import os\n", "--max-new-tokens", "30", *flags],
                                   capsys)
        assert status == 0, err
        return out

    greedy = text("--temperature", "0")
    assert text("--temperature", "0", "--seed", "5") == greedy
    assert text("--top-k", "1", "--temperature", "2") == greedy
    assert text("--top-p", "1e-6", "--temperature", "2") == greedy
    sampled = text("--temperature", "1.5", "--top-p", "1", "--seed", "1")
    assert sampled == text("--temperature", "1.5", "--top-p", "1", "--seed", "1") != greedy
    assert text("--temperature", "1.5", "--top-p", "1", "--seed", "2") != sampled
    for flags in (["--top-k", "3"], ["--top-p", "0.5"], ["--temperature", "0.5"]):
        assert text("--temperature", "1.5", "--top-p", "1", "--seed", "1", *flags) != sampled, flags
    for n in (1, 7):
        status, out, err = run_cli(["--checkpoint", run_folder, "--prompt", "x", "--max-new-tokens", n,
                                    "--temperature", "1.5", "--top-p", "1"], capsys)
        assert f"[{n} tokens in" in err and "stopped by --max-new-tokens" in err


def test_cli_stops_at_the_end_of_text_token(run_folder, tok, small_params, capsys):
    # find a seed whose sample draws <|endoftext|> early (the test tokenizer knows it, id 256)
    for seed in range(200):
        ids = sample.generate(small_params, SMALL, tok.encode("x"), 30, 3.0, 0, 1.0, seed=seed,
                             eos_id=EOT_ID, vocab_size=tok.vocab_size)
        if len(ids) < 30:
            break
    assert len(ids) < 30
    status, out, err = run_cli(["--checkpoint", run_folder, "--prompt", "x", "--max-new-tokens", 30,
                                "--temperature", "3", "--top-p", "1", "--seed", seed], capsys)
    assert out == "x" + tok.decode(ids) + "\n"
    assert f"[{len(ids)} tokens in" in err and "stopped by <|endoftext|>" in err


def test_cli_long_prompt_note(run_folder, tok, capsys):
    prompt = "x = 1\n" * 40
    status, out, err = run_cli(["--checkpoint", run_folder, "--prompt", prompt, "--max-new-tokens", "10",
                                "--temperature", "0"], capsys)
    room = SMALL.max_position_embeddings - 10
    assert status == 0 and f"the model sees its last {room}" in err and out.startswith(prompt)


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"):
        assert flag in out


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-2"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "64"], "leaves no room for the prompt"),
])
def test_cli_bad_flags(run_folder, flags, message, capsys):
    status, out, err = run_cli(["--checkpoint", run_folder, "--prompt", "x", *flags], capsys)
    assert status != 0 and message in err


def broken_copies(run_folder, tmp_path):
    """(name, folder, expected message) for checkpoints broken in one way each."""
    def copy(name):
        folder = tmp_path / name
        folder.mkdir()
        for f in run_folder.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    folder = copy("truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    yield folder, "truncated"
    folder = copy("garbage")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    yield folder, "corrupt"
    folder = copy("no-model")
    (folder / "model.safetensors").unlink()
    yield folder, "model.safetensors: file not found"
    folder = copy("bad-config")
    (folder / "config.json").write_text("{not json")
    yield folder, "not valid JSON"
    folder = copy("no-tokenizer")
    (folder / "tokenizer.json").unlink()
    yield folder, "tokenizer.json: file not found"
    folder = copy("bad-tokenizer")
    (folder / "tokenizer.json").write_text('{"model": 3}')
    yield folder, "tokenizer.json"
    yield tmp_path / "nowhere", "no such checkpoint folder"


def test_cli_broken_checkpoints_are_one_line_errors(run_folder, tmp_path, capsys):
    for folder, message in broken_copies(run_folder, tmp_path):
        status, out, err = run_cli(["--checkpoint", folder, "--prompt", "x", "--max-new-tokens", "5"], capsys)
        assert status == 1 and message in err, (folder, err)
        assert err.strip().count("\n") == 0 and err.startswith("sample.py: error:")
        assert out == ""


# -----------------------------------------------------------------------------
# Evaluation: parse_rate


def test_is_valid_python_and_eval_prompts():
    assert sample.is_valid_python("def f(x):\n    return x\n")
    assert not sample.is_valid_python("def f(x):\n")
    assert not sample.is_valid_python("x = 1\x00\n")
    assert sample.is_valid_python("s = '\\d'\n")  # a SyntaxWarning, still valid
    assert sample.eval_prompts(["import os\nx = 1\n", "  \n", "# hi"]) == ["import os\n", "# hi"]
    assert sample.eval_prompts([]) == sample.DEFAULT_PROMPTS


def test_code_lines_and_completion_text():
    assert sample.code_lines("# setup\n\n   \nx = 1\n    y = 2  # two\n  # indented comment\n") == 2
    assert sample.code_lines("") == 0
    assert sample.completion_text("x = 1\n", "y = 2\nz = (", finished=False) == "x = 1\ny = 2\n"
    assert sample.completion_text("x = 1\n", "y = 2\nz = (", finished=True) == "x = 1\ny = 2\nz = ("


def test_parse_rate_counts_non_trivial_code_that_ast_parse_accepts(monkeypatch):
    # A stand-in model that writes fixed completions, to check the counting and the cut.
    code = "x = 1\ny = 2\nz = 3\n"
    completions = {"a = ": ("1\n" + code, True),                   # ended by <|endoftext|>, 4 lines: counts
                   "b = ": ("(\n" + code, True),                   # ended, invalid
                   "c = ": ("2\n" + code + "if x:\n    y = (", False),  # ran out: "...if x:\n" invalid
                   "d = ": ("3\n" + code + "f = (", False),        # ran out: the cut text is valid
                   "e = ": ("4\n# one\n\n# two\n   \n", True),    # valid, but 1 line of code
                   "f = ": ("5\nx = 1\n", True),                  # valid, 2 lines of code
                   "# ": ("hi\n\n" + code, True)}                 # the prompt's line is not counted
    tok = Tokenizer()
    max_new = 40

    def fake_generate(params, config, prompt_ids, max_new_tokens, *args, **kwargs):
        text, ended = completions[tok.decode(prompt_ids)]
        ids = tok.encode(text)
        assert max_new_tokens == max_new and len(ids) < max_new
        return ids if ended else ids + [ord(" ")] * (max_new - len(ids))

    monkeypatch.setattr(sample, "generate", fake_generate)
    result = sample.parse_rate(None, SMALL, tok, list(completions), 14, max_new_tokens=max_new)
    assert (result["parsed"], result["parsed_any"], result["samples"]) == (6, 10, 14)
    assert result["parse_rate"] == 6 / 14 and result["min_code_lines"] == sample.MIN_CODE_LINES == 3
    assert result["texts"][3] == "d = 3\n" + code and result["texts"][7] == result["texts"][0]
    assert result["verdicts"][:7] == ["valid", "invalid", "invalid", "valid", "trivial", "trivial", "valid"]
    assert sample.describe_parse_rate(result) == (
        "parse rate 43%: 6 of 14 sampled completions are valid Python with at least 3 lines of code "
        "(ast.parse; 10 of 14 parse at all)")
    assert sample.parse_rate(None, SMALL, tok, ["a = "], 0, max_new_tokens=max_new)["parse_rate"] is None


def test_parse_rate_on_a_model(small_params, tok):
    prompts = ["import os\n", "x = 1\n"]
    settings = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=0.9, seed=3)
    result = sample.parse_rate(small_params, SMALL, tok, prompts, 5, **settings)
    texts, verdicts = [], []
    for i in range(5):
        ids = sample.generate(small_params, SMALL, tok.encode(prompts[i % 2]), 12, 1.0, 0, 0.9, seed=3 + i,
                             eos_id=EOT_ID, vocab_size=tok.vocab_size)
        text = prompts[i % 2] + tok.decode(ids)
        texts.append(text if len(ids) < 12 else text[:text.rfind("\n") + 1])
        parses = sample.is_valid_python(texts[-1])
        verdicts.append("invalid" if not parses else
                        "valid" if sample.code_lines(texts[-1][len(prompts[i % 2]):]) >= 3 else "trivial")
    parsed = verdicts.count("valid")
    assert result == {"parse_rate": parsed / 5, "parsed": parsed, "parsed_any": 5 - verdicts.count("invalid"),
                      "samples": 5, "texts": texts, "verdicts": verdicts, "min_code_lines": 3, **settings}


# -----------------------------------------------------------------------------
# Evaluation in train.py: the parse rate at the end of a run, and --eval-only


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    files = [p for p in stdlib_python_files() if p.stat().st_size > 2000][:16]
    for i, path in enumerate(files):
        (folder / f"doc{i:02d}.py").write_text(path.read_text(encoding="utf-8", errors="replace")[:800],
                                               encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run_args(corpus, tok, tmp_path_factory):
    tok_path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(tok_path)
    return ["--config", "tiny", "--data", corpus, "--tokenizer", tok_path, "--rows", 8, "--val-rows", 3,
            "--seq-len", 32, "--batch-size", 4, "--grad-accum", 1, "--max-steps", 2, "--lr", 3e-3]


def train_main(argv, capsys):
    import train
    assert train.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def read_final_model(folder):
    import json
    return json.loads((Path(folder) / "final_model.json").read_text())


def expected_parse_eval(folder, n_samples):
    """parse_rate recomputed from the saved checkpoint, the way train.py documents it."""
    import train
    import json
    config, params, _ = checkpoint.load_checkpoint(folder)
    tok = Tokenizer.load(Path(folder) / "tokenizer.json")
    args = json.loads((Path(folder) / "trainer_state.json").read_text())["args"]
    val_texts, _ = train.take_documents(train.Corpus(args["data"]), args)
    return sample.parse_rate(params, config, tok, sample.eval_prompts(val_texts), n_samples,
                             max_new_tokens=min(128, config.max_position_embeddings // 2), seed=args["seed"])


def test_a_run_ends_with_the_parse_rate(run_args, tmp_path, capsys):
    out = train_main([*run_args, "--eval-samples", 3, "--out", tmp_path / "run"], capsys)
    summary = read_final_model(tmp_path / "run")
    assert summary["parse_eval"] == expected_parse_eval(tmp_path / "run", 3)
    assert summary["parse_rate"] == summary["parse_eval"]["parse_rate"] == summary["parse_eval"]["parsed"] / 3
    assert sample.describe_parse_rate(summary["parse_eval"]) in out
    # --eval-samples 0 skips it
    train_main([*run_args, "--eval-samples", 0, "--out", tmp_path / "none"], capsys)
    assert read_final_model(tmp_path / "none")["parse_rate"] is None


def test_eval_only_evaluates_a_checkpoint_without_training(run_args, tmp_path, capsys):
    run = tmp_path / "run"
    train_main([*run_args, "--eval-samples", 2, "--out", run], capsys)
    before = {name: (run / name).read_bytes() for name in ("model.safetensors", "optimizer.safetensors",
                                                           "trainer_state.json", "metrics.jsonl")}
    trained = read_final_model(run)
    out = train_main(["--eval-only", "--resume", run, "--eval-samples", 4], capsys)
    summary = read_final_model(run)
    assert summary["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    assert summary["val_perplexity"] == pytest.approx(math.exp(trained["val_loss"]), rel=1e-6)
    assert summary["parse_eval"] == expected_parse_eval(run, 4) and summary["parse_eval"]["samples"] == 4
    assert summary["loss_curve"] == trained["loss_curve"]  # the rest of the summary is kept
    assert f"validation loss {trained['val_loss']:.4f}" in out and sample.describe_parse_rate(summary["parse_eval"]) in out
    assert "note: --eval-only" not in out and "note: --eval-samples 4 (the saved run had 2)" in out
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name  # no training, no new checkpoint
    # --out: the summary goes there, the checkpoint's stays as it was
    train_main(["--eval-only", "--resume", run, "--eval-samples", 1, "--out", tmp_path / "eval"], capsys)
    assert read_final_model(tmp_path / "eval")["parse_eval"]["samples"] == 1
    assert read_final_model(run)["parse_eval"]["samples"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--eval-only"], "--eval-only needs --resume DIR"),
    (["--eval-samples", "-1"], "--eval-samples must be 0 or more"),
])
def test_eval_flag_errors(argv, message, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
