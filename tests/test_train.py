"""Tests for train.py: data, the loop, checkpoints, resume, and the model card's predictions.

Runs call train.main(argv) in-process on the tiny config with a small corpus of
standard-library snippets and a small tokenizer built once per session, so each
run takes a fraction of a second.
"""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import albor
import checkpoint
import cpu
import train
from tokenizer import EOT_ID, PAD_ID, Tokenizer
from train import stdlib_python_files, stdlib_texts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# fixtures: a small corpus and tokenizer, shared by the whole session


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of 48 Python snippets of varied length (so rows carry different amounts of
    padding), plus one file that is not UTF-8 (skipped)."""
    folder = tmp_path_factory.mktemp("corpus")
    files = [p for p in stdlib_python_files() if p.stat().st_size > 3000][:48]
    for i, path in enumerate(files):
        text = path.read_bytes().decode("utf-8", errors="replace")
        length = [60, 150, 400, 1500][i % 4]
        (folder / f"doc{i:02d}.py").write_text(text[:length], encoding="utf-8")
    (folder / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    return folder


@pytest.fixture(scope="session")
def tok_file(corpus, tmp_path_factory):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("doc*.py"))]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(texts, vocab_size=400).save(path)
    return path


@pytest.fixture
def base(corpus, tok_file):
    """Arguments of a small tiny-config run: 32 training rows, 2 x 4 rows a step."""
    return ["--config", "tiny", "--data", str(corpus), "--tokenizer", str(tok_file), "--rows", "32",
            "--val-rows", "4", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2"]


@pytest.fixture
def clipped_grads(monkeypatch):
    """A list that receives a copy of the gradients each step hands to clip_grad_norm."""
    real_clip = albor.clip_grad_norm
    seen = []

    def record(grads, max_norm):
        seen.append({name: albor.to_numpy(g).copy() for name, g in grads.items()})
        return real_clip(grads, max_norm)

    monkeypatch.setattr(albor, "clip_grad_norm", record)
    return seen


def run(argv):
    assert train.main([str(a) for a in argv]) == 0


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def safetensors_metadata(path):
    with safe_open(path, "np") as f:
        return f.metadata()


# -----------------------------------------------------------------------------
# the command line


def test_defaults_are_the_model_cards_run():
    args, given = train.parse_settings([])
    assert given == set()
    assert (args["config"], args["rows"], args["seq_len"], args["batch_size"], args["grad_accum"]) == \
        ("albor-base-50m", 500, 128, 4, 4)
    assert (args["lr"], args["beta1"], args["beta2"], args["eps"], args["weight_decay"], args["grad_clip"]) == \
        (6e-4, 0.9, 0.95, 1e-8, 0.1, 1.0)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in train.DEFAULTS:
        assert f"--{name.replace('_', '-')}" in text, name
    for shown in ("(default: 500;", "(default: 128;", "(default: 0.0006;", "(default: 0.95)",
                  "(default: 0.1)"):
        assert shown in text


@pytest.mark.parametrize("argv, message", [
    (["--rows", "0"], "--rows must be at least 1"),
    (["--val-rows", "-1"], "--val-rows must be 0 or more"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--data", ""], "--data is empty"),
    (["--resume", ""], "--resume is empty"),
    (["--tokenizer", ""], "--tokenizer is empty"),
    (["--min-lr", "1"], "--min-lr must lie in [0, --lr]"),
    (["--beta1", "1"], "--beta1 must lie in [0, 1)"),
    (["--beta2", "-0.5"], "--beta2 must lie in [0, 1)"),
    (["--eps", "0"], "--eps must be positive"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--grad-clip", "-1"], "--grad-clip must be 0 or more"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--config", "huge"], "'huge' is not a preset"),
    (["--resume", "a", "--init", "b"], "--resume and --init exclude each other"),
    (["--batch-size", "four"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# data


def test_stdlib_python_files_and_texts():
    files = stdlib_python_files()
    assert files == sorted(files)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert any(p.name == "os.py" for p in files)
    texts = list(stdlib_texts(1234))
    assert sum(len(t.splitlines()) for t in texts) == 1234
    assert texts[0] == files[0].read_bytes().decode("utf-8", errors="replace")[:len(texts[0])]


def test_rows_are_tokens_then_eot_then_padding(tok_file):
    tok = Tokenizer.load(tok_file)
    short = "x = 1\n"
    ids = tok.encode(short)
    inputs, targets = train.make_rows(tok, [short, "y" * 500], seq_len=len(ids) + 3)
    assert list(inputs[0]) == ids + [EOT_ID, PAD_ID, PAD_ID]
    assert list(targets[0]) == ids[1:] + [EOT_ID] + [albor.IGNORE_INDEX] * 3   # padding is ignored
    long_ids = tok.encode("y" * 500)
    assert list(inputs[1]) == long_ids[:len(ids) + 3]          # cut: no EOT, no padding
    assert list(targets[1]) == long_ids[1:len(ids) + 4]
    assert inputs.dtype == targets.dtype == np.int32


def test_a_long_documents_row_equals_encoding_the_whole_document(tok_file):
    tok = Tokenizer.load(tok_file)
    text = max(stdlib_python_files()[:200], key=lambda p: p.stat().st_size).read_text(encoding="utf-8")
    assert len(text) > 100 * 65
    assert train.encode_row(tok, text, 64) == tok.encode(text)[:65]


def test_micro_batches_cover_every_row_once_per_pass_in_a_new_order_each_pass():
    args = {"batch_size": 4, "grad_accum": 2, "seed": 3}
    first = [train.micro_batch_rows(s, m, args, 16) for s in (1, 2) for m in (0, 1)]
    second = [train.micro_batch_rows(s, m, args, 16) for s in (3, 4) for m in (0, 1)]
    assert sorted(np.concatenate(first)) == list(range(16)) == sorted(np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    np.testing.assert_array_equal(train.micro_batch_rows(2, 1, args, 16), first[3])   # a pure function


def test_data_formats_txt_and_jsonl(tmp_path, tok_file):
    blocks = [f"def f{i}(x):\n    return x + {i}\n" for i in range(12)]
    (tmp_path / "code.txt").write_text("\n\n".join(blocks), encoding="utf-8")
    lines = [json.dumps({"text": block}) for block in blocks] + ["not json", json.dumps({"no_text": 1})]
    (tmp_path / "code.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, skipped in (("code.txt", 0), ("code.jsonl", 2)):
        out = tmp_path / name.replace(".", "_")
        run(["--config", "tiny", "--data", tmp_path / name, "--tokenizer", tok_file, "--rows", "100",
             "--val-rows", "2", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "1", "--out", out])
        provenance = read_json(out, "final_model.json")["provenance"]
        assert provenance["train_rows"] == 10 and provenance["val_rows"] == 2
        assert provenance["skipped_documents"] == skipped


def test_unusable_files_are_skipped_and_counted(base, tmp_path, capsys):
    run(base + ["--rows", "100", "--max-steps", "1", "--out", tmp_path / "r"])
    provenance = read_json(tmp_path / "r", "final_model.json")["provenance"]
    assert provenance["skipped_documents"] == 1          # latin1.py
    assert provenance["train_rows"] == 44                # 48 good documents - 4 validation rows
    assert "has only 48 usable documents" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    ("empty", "no usable text in"),
    ("binary", "no usable text in"),
    ("missing", "no such file or folder"),
    ("few", "fewer than one batch"),
    ("pdf", "expected a folder, a .txt or a .jsonl"),
])
def test_empty_or_bad_data_is_a_clear_error(setup, message, tmp_path, tok_file):
    data = tmp_path / "data"
    if setup in ("empty", "binary", "few"):
        data.mkdir()
    if setup == "binary":
        (data / "a.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
        (data / "b.py").write_text("   \n\n", encoding="utf-8")
    if setup == "few":
        (data / "a.py").write_text("x = 1\n", encoding="utf-8")
    if setup == "pdf":
        data = tmp_path / "paper.pdf"
        data.write_bytes(b"%PDF")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", "tiny", "--data", str(data), "--tokenizer", str(tok_file),
                    "--out", str(tmp_path / "out")])
    text = str(exit_info.value.code)
    assert text.startswith("train.py: error: ") and message in text and "\n" not in text


def test_tokenizer_is_trained_on_first_use_then_cached(corpus, tmp_path, monkeypatch, capsys):
    argv = ["--config", "tiny", "--data", corpus, "--rows", "8", "--val-rows", "0", "--seq-len", "16",
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "1"]
    run(argv + ["--out", tmp_path / "runs" / "a"])
    cached = list((tmp_path / "runs" / "tokenizers").iterdir())
    assert len(cached) == 1
    tok = Tokenizer.load(cached[0])
    assert 258 < tok.vocab_size <= 512
    assert (tmp_path / "runs" / "a" / "tokenizer.json").read_bytes() == cached[0].read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    capsys.readouterr()
    run(argv + ["--out", tmp_path / "runs" / "b"])
    assert "(cached)" in capsys.readouterr().out


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(corpus, tmp_path):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("doc*.py"))]
    big = tmp_path / "big.json"
    Tokenizer.train(texts, vocab_size=600).save(big)
    with pytest.raises(SystemExit, match="600 tokens, more than the model's vocab_size 512: every id must fit"):
        train.main(["--config", "tiny", "--data", str(corpus), "--tokenizer", str(big), "--out", str(tmp_path / "o")])


# -----------------------------------------------------------------------------
# a whole run, and the model card's falsifiable predictions


@pytest.fixture(scope="module")
def trained(corpus, tok_file, tmp_path_factory):
    """A 24-step tiny run (3 passes over 32 rows) with a high learning rate."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "32", "--val-rows", "4",
         "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "24", "--lr", "3e-3",
         "--out", out])
    return out


def test_run_leaves_a_complete_checkpoint(trained):
    names = set(os.listdir(trained))
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors",
            "trainer_state.json", "final_model.json", "metrics.jsonl", "loss.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    summary = read_json(trained, "final_model.json")
    for key in ("steps", "final_loss", "best_loss", "loss_curve", "val_loss", "timing", "provenance"):
        assert key in summary, key
    assert summary["steps"] == 24 and len(summary["loss_curve"]) == 24 and summary["finished"]
    assert summary["best_loss"] == min(summary["loss_curve"])
    for key in ("train_rows_sha256", "val_rows_sha256", "tokenizer_sha256", "config_sha256"):
        assert len(summary["provenance"][key]) == 64
    assert summary["provenance"]["tokenizer_sha256"] == train.sha256_hex((trained / "tokenizer.json").read_bytes())
    for key in ("wall_seconds", "train_seconds", "tokens_per_second", "matmul_seconds", "attention_seconds",
                "optimizer_seconds"):
        assert summary["timing"][key] > 0, key
    # the checkpoint loads back and gives the validation loss the run reported
    config, params, step = checkpoint.load_checkpoint(trained)
    assert config == albor.get_config("tiny") and step == 24
    tok = Tokenizer.load(trained / "tokenizer.json")
    state = read_json(trained, "trainer_state.json")
    corpus = train.Corpus(state["args"]["data"])
    val_texts, _ = train.take_documents(corpus, state["args"])
    inputs, targets = train.make_rows(tok, val_texts, 32)
    assert train.evaluate(params, config, inputs, targets, 4) == pytest.approx(summary["val_loss"], rel=1e-6)


def test_metrics_log_one_line_per_step_with_the_schedule(trained):
    lines = metrics(trained)
    assert [line["step"] for line in lines] == list(range(1, 25))
    warmup = albor.default_warmup(24)
    assert warmup == 2
    for line in lines:
        assert set(line) >= {"step", "loss", "lr", "grad_norm", "tokens", "seconds"}
        assert line["lr"] == pytest.approx(albor.lr_at(line["step"], 24, 3e-3, warmup, 3e-4))
        assert line["tokens"] == 2 * 4 * 32 and 0 < line["valid_tokens"] <= line["tokens"]
    assert lines[0]["lr"] == pytest.approx(1e-3) and lines[2]["lr"] == pytest.approx(3e-3)
    assert lines[-1]["lr"] == pytest.approx(3e-4)
    assert [line["loss"] for line in lines] == read_json(trained, "final_model.json")["loss_curve"]


def test_falsify_001_loss_decreases(trained):
    curve = read_json(trained, "final_model.json")["loss_curve"]
    first, last = np.mean(curve[:3]), np.mean(curve[-3:])
    assert curve[0] == pytest.approx(math.log(512), abs=0.3)        # about ln(vocab) at init
    assert last < first - 0.5, (first, last)


def test_falsify_002_grad_norms_finite_and_clipped(base, tmp_path, monkeypatch):
    real_clip = albor.clip_grad_norm
    after = []

    def clip_and_measure(grads, max_norm):
        before = real_clip(grads, max_norm)
        after.append((before, math.sqrt(sum(float((albor.to_numpy(g).astype(np.float64) ** 2).sum())
                                            for g in grads.values()))))
        return before

    monkeypatch.setattr(albor, "clip_grad_norm", clip_and_measure)
    run(base + ["--max-steps", "8", "--lr", "3e-3", "--grad-clip", "0.5", "--out", tmp_path / "clipped"])
    logged = [line["grad_norm"] for line in metrics(tmp_path / "clipped")]
    assert logged == [before for before, _ in after]                 # the log has the pre-clip norm
    assert [line["grad_norm_clipped"] for line in metrics(tmp_path / "clipped")] == \
        pytest.approx([post for _, post in after], rel=1e-9)        # and the norm measured after clipping
    assert all(math.isfinite(n) for n in logged)
    assert any(before > 0.5 for before, _ in after)                   # clipping had work to do
    assert all(post <= 0.5 * (1 + 1e-6) for _, post in after)
    after.clear()
    run(base + ["--max-steps", "3", "--grad-clip", "0", "--out", tmp_path / "unclipped"])
    assert all(post == pytest.approx(before, rel=1e-6) for before, post in after)   # 0 turns it off
    assert any(before > 0.5 for before, _ in after)


def test_falsify_003_same_seed_same_bytes(base, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run(base + ["--max-steps", "3", "--seed", seed, "--out", tmp_path / name])
    model = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert model["a"] == model["b"]
    assert model["a"] != model["c"]


def test_gradient_accumulation_equals_one_big_batch(base, tmp_path, clipped_grads):
    """4 micro-batches of 2 rows give the gradient (and loss) of one batch of 8 rows.

    The step's gradients are compared where train.py hands them to clipping. (The
    weights after AdamW are not compared bit for bit: Adam divides by sqrt(v), so
    float32 rounding in a near-zero gradient can move a weight by a fraction of lr.)
    """
    run(base + ["--batch-size", "2", "--grad-accum", "4", "--max-steps", "2", "--out", tmp_path / "acc"])
    run(base + ["--batch-size", "8", "--grad-accum", "1", "--max-steps", "2", "--out", tmp_path / "big"])
    acc, big = metrics(tmp_path / "acc"), metrics(tmp_path / "big")
    assert [m["valid_tokens"] for m in acc] == [m["valid_tokens"] for m in big]
    assert acc[0]["valid_tokens"] < 8 * 32                  # the step has padding to weigh correctly
    for a, b in zip(acc, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    grads_acc, grads_big = clipped_grads[0], clipped_grads[2]  # step 1 of each run
    for name in grads_acc:
        scale = np.abs(grads_big[name]).max()
        np.testing.assert_allclose(grads_acc[name], grads_big[name], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)


def test_train_step_on_worker_threads_equals_one_thread(clipped_grads):
    """train_step with the rows of each micro-batch shared out over 2 worker threads
    (cpu.DataParallel) hands clipping the same summed gradients, and returns the same loss
    and norm, as one thread does; it times forward, backward and optimizer as usual."""
    config = albor.get_config("tiny")
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 512, (2, 4, 16))
    targets = rng.integers(0, 512, (2, 4, 16))
    targets[0, 1, 5:] = albor.IGNORE_INDEX                 # uneven shards within a micro-batch
    results = []
    for workers in (None, cpu.DataParallel(2)):
        params = albor.init_params(config, seed=0)
        timing = {"forward_seconds": 0.0, "backward_seconds": 0.0, "optimizer_seconds": 0.0}
        results.append(train.train_step(params, config, albor.AdamW(params), list(inputs), list(targets),
                                        1e-3, 1.0, 1, timing, None, workers))
        assert min(timing.values()) > 0, timing
    (loss_1, norm_1, valid_1, _), (loss_2, norm_2, valid_2, _) = results
    assert loss_2 == pytest.approx(loss_1, rel=1e-6) and valid_2 == valid_1
    assert norm_2 == pytest.approx(norm_1, rel=1e-5)
    one_thread, two_workers = clipped_grads
    for name in one_thread:
        scale = np.abs(one_thread[name]).max()
        np.testing.assert_allclose(two_workers[name], one_thread[name], rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=name)


def test_a_diverged_step_on_worker_threads_leaves_no_partial_gradients(monkeypatch):
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    real_forward = albor.forward

    def nan_forward(*args, **kwargs):
        loss, cache = real_forward(*args, **kwargs)
        return float("nan"), cache

    monkeypatch.setattr(albor, "forward", nan_forward)
    workers = cpu.DataParallel(2)
    batch = list(np.random.default_rng(2).integers(0, 512, (1, 4, 16)))
    timing = {"forward_seconds": 0.0, "backward_seconds": 0.0, "optimizer_seconds": 0.0}
    with pytest.raises(train.Diverged, match="the loss is nan at step 5"):
        train.train_step(params, config, albor.AdamW(params), batch, batch, 1e-3, 1.0, 5, timing, None, workers)
    assert workers.grads == [None, None]


def test_train_py_runs_a_worker_thread_per_core_and_stays_deterministic(base, tmp_path):
    """`python train.py` itself (a fresh process: it sets OPENBLAS_NUM_THREADS=1 before NumPy
    loads) shares the rows out over a worker thread per core; the same seed, the same bytes."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["ALBOR_DEVICE"] = "cpu"
    outputs = []
    for name in ("a", "b"):
        result = subprocess.run([sys.executable, "train.py"] + [str(a) for a in base]
                                + ["--max-steps", "2", "--out", str(tmp_path / name)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    cores = len(os.sched_getaffinity(0))
    if cores > 1:
        assert f"parameters on numpy, {cores} worker threads" in outputs[0], outputs[0]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_micro_batches_are_weighted_by_their_non_pad_tokens():
    """Two micro-batches with very different padding: accumulating with loss_scale =
    n_valid_micro / n_valid_step gives the gradient of the mean over all tokens."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 512, (4, 16))
    targets = rng.integers(0, 512, (4, 16))
    targets[:2, 3:] = albor.IGNORE_INDEX                   # the first micro-batch is mostly padding
    n_valid = [int((targets[i:i + 2] != albor.IGNORE_INDEX).sum()) for i in (0, 2)]
    grads = None
    for m, i in enumerate((0, 2)):
        _, cache = albor.forward(params, config, idx[i:i + 2], targets[i:i + 2])
        grads = albor.backward(params, config, cache, loss_scale=n_valid[m] / sum(n_valid), grads=grads)
    _, cache = albor.forward(params, config, idx, targets)
    whole = albor.backward(params, config, cache)
    for name in params:
        np.testing.assert_allclose(albor.to_numpy(grads[name]), albor.to_numpy(whole[name]),
                                   rtol=1e-4, atol=1e-7, err_msg=name)


def test_every_optimizer_flag_reaches_the_optimizer(base, tmp_path):
    run(base + ["--max-steps", "2", "--beta1", "0.8", "--beta2", "0.99", "--eps", "1e-6",
                "--weight-decay", "0.3", "--out", tmp_path / "o"])
    hyper = json.loads(safetensors_metadata(tmp_path / "o" / "optimizer.safetensors")["hyperparameters"])
    assert hyper == {"betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.3, "t": 2}
    lines = metrics(tmp_path / "o")
    run(base + ["--max-steps", "2", "--warmup", "0", "--lr", "1e-3", "--min-lr", "2e-4", "--out", tmp_path / "p"])
    assert [m["lr"] for m in metrics(tmp_path / "p")] == pytest.approx([1e-3, 2e-4])
    assert lines[0]["lr"] != pytest.approx(1e-3)


# -----------------------------------------------------------------------------
# stopping, resuming, starting from weights


def signal_on_call(monkeypatch, module, name, call_numbers, signum=signal.SIGINT):
    """Make the call_numbers-th calls of module.name first send this process signum (SIGINT: a
    Ctrl-C)."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) in call_numbers:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_saves_and_resume_continues_byte_for_byte(signum, base, tmp_path, monkeypatch, capsys):
    """Ctrl-C, SIGTERM (kill, timeout, a scheduler) and SIGHUP (the terminal closed) alike."""
    argv = base + ["--max-steps", "6", "--lr", "2e-3"]
    run(argv + ["--out", tmp_path / "straight"])
    signal_on_call(monkeypatch, albor, "backward", {5}, signum)   # during step 3 (2 micro-batches a step)
    run(argv + ["--out", tmp_path / "stopped"])
    assert f"stopped at step 3 of 6 ({signal.Signals(signum).name})" in capsys.readouterr().out
    assert safetensors_metadata(tmp_path / "stopped" / "model.safetensors")["step"] == "3"
    assert not read_json(tmp_path / "stopped", "final_model.json")["finished"]
    monkeypatch.undo()
    run(["--resume", tmp_path / "stopped"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert metrics(tmp_path / "stopped") == [
        dict(m, seconds=s["seconds"]) for m, s in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "stopped"))]
    resumed = read_json(tmp_path / "stopped", "final_model.json")
    assert resumed["loss_curve"] == read_json(tmp_path / "straight", "final_model.json")["loss_curve"]
    assert resumed["val_loss"] == read_json(tmp_path / "straight", "final_model.json")["val_loss"]


def test_a_second_ctrl_c_quits_at_once():
    stop = train.StopRequest()
    stop.at_once = False                       # while training
    stop(signal.SIGINT, None)
    assert stop.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGTERM, None)


def test_resume_into_another_folder_and_with_a_longer_schedule(base, tmp_path):
    run(base + ["--max-steps", "2", "--out", tmp_path / "a"])
    run(["--resume", tmp_path / "a", "--max-steps", "4", "--out", tmp_path / "b"])
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert len(metrics(tmp_path / "a")) == 2
    state = read_json(tmp_path / "b", "trainer_state.json")
    assert state["step"] == 4 and state["args"]["max_steps"] == 4 and state["args"]["rows"] == 32


def test_resume_refuses_changed_data_or_a_contradicting_config(base, tmp_path):
    run(base + ["--max-steps", "1", "--out", tmp_path / "a"])
    for argv, message in (
            (["--rows", "16"], "--rows 16 differs from the resumed run's 32"),
            (["--config", "albor-base-50m"], "--config albor-base-50m contradicts"),
            (["--seed", "5"], "--seed 5 differs")):
        with pytest.raises(SystemExit, match=message):
            train.main(["--resume", str(tmp_path / "a")] + argv)
    with pytest.raises(SystemExit, match="nowhere: no such folder"):
        train.main(["--resume", str(tmp_path / "nowhere")])


def test_resume_of_a_truncated_checkpoint_names_the_file(base, tmp_path):
    run(base + ["--max-steps", "1", "--out", tmp_path / "a"])
    path = tmp_path / "a" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(tmp_path / "a")])
    text = str(exit_info.value.code)
    assert "model.safetensors" in text and "truncated" in text and "\n" not in text
    with pytest.raises(SystemExit, match="model.safetensors: truncated"):
        train.main(base[2:] + ["--init", str(tmp_path / "a"), "--out", str(tmp_path / "b")])


def test_init_starts_from_the_weights_with_a_fresh_optimizer(base, trained, tmp_path):
    run(base[2:] + ["--init", trained, "--max-steps", "2", "--out", tmp_path / "ft"])
    hyper = json.loads(safetensors_metadata(tmp_path / "ft" / "optimizer.safetensors")["hyperparameters"])
    assert hyper["t"] == 2                                   # a fresh optimizer: 2 updates, not 26
    assert [m["step"] for m in metrics(tmp_path / "ft")] == [1, 2]
    trained_loss = read_json(trained, "final_model.json")["final_loss"]
    assert metrics(tmp_path / "ft")[0]["loss"] < trained_loss + 0.5 < math.log(512)   # not from scratch
    with pytest.raises(SystemExit, match="contradicts"):
        train.main(["--init", str(trained), "--config", "albor-base-50m", "--out", str(tmp_path / "x")])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    real_forward = albor.forward
    calls = []

    def forward(*args, **kwargs):
        loss, cache = real_forward(*args, **kwargs)
        calls.append(1)
        return (float("nan") if len(calls) >= 5 else loss), cache

    monkeypatch.setattr(albor, "forward", forward)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        train.main(base + ["--grad-accum", "1", "--max-steps", "8", "--save-every", "2", "--out", str(out)])
    text = str(exit_info.value.code)
    assert "the loss is nan at step 5" in text and "last good checkpoint (step 4)" in text
    assert safetensors_metadata(out / "model.safetensors")["step"] == "4"
    assert read_json(out, "trainer_state.json")["step"] == 4
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
