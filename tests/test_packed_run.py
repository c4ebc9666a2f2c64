"""Tests for the run that learns Python (issue 15): packed data, periodic validation, bits per
byte, --minutes, the workshop preset and the loss plot.

Runs call train.main(argv) in-process on the tiny config, on a corpus of small generated
Python files (each one unique, so a leak of a validation document into training shows).
"""
import contextlib
import json
import math
import os
import re
import signal

import numpy as np
import pytest

import albor
import bench
import checkpoint
import train
from test_train import metrics, read_json, run  # the helpers a run's tests share
from tokenizer import EOT_ID, PAD_ID, Tokenizer

IGNORE = albor.IGNORE_INDEX


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 Python files of 1 to 12 functions each (so documents differ in length), every line unique."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        functions = [f"def f_{i}_{j}(x):\n    return x * {i} + {j}\n\n" for j in range(1 + (i * 7) % 12)]
        (folder / f"mod{i:02d}.py").write_text(f"# module {i}\n" + "".join(functions), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok_file(corpus, tmp_path_factory):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.py"))]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(texts, vocab_size=360).save(path)
    return path


@pytest.fixture
def packed(corpus, tok_file, tmp_path):
    """Arguments of a small packed tiny-config run: all documents but 6, windows of 32 tokens
    (--out in tmp_path, so the token cache lands beside it; a later --out replaces it)."""
    return ["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--data-mode", "packed",
            "--rows", "all", "--val-rows", "6", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
            "--eval-samples", "0", "--out", tmp_path / "runs" / "packed"]


def setup_run(argv):
    """train.py's setup (settings, data, weights) without training: the run's arrays."""
    args, given = train.parse_settings([str(a) for a in argv])
    with contextlib.ExitStack() as held:   # the run folder's lock, let go at once
        return train.setup(args, given, held)


# -----------------------------------------------------------------------------
# packed windows


def test_pack_windows_is_the_docstring_example():
    tok = Tokenizer()                                     # bytes only: "a" is 97
    a, b, c = 97, 98, 99
    inputs, targets = train.pack_windows(tok, ["ab", "c"], 3)
    assert inputs.tolist() == [[EOT_ID, a, b], [EOT_ID, c, PAD_ID]]
    assert targets.tolist() == [[a, b, EOT_ID], [c, IGNORE, IGNORE]]
    assert inputs.dtype == targets.dtype == np.int32
    empty_inputs, empty_targets = train.pack_windows(tok, [], 3)
    assert empty_inputs.shape == empty_targets.shape == (0, 3)


def test_every_token_of_the_stream_is_a_target_exactly_once(tok_file, corpus):
    tok = Tokenizer.load(tok_file)
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.py"))]
    inputs, targets = train.pack_windows(tok, texts, 32)
    stream = np.concatenate([[EOT_ID] + tok.encode(text) for text in texts])
    assert len(inputs) == math.ceil((len(stream) - 1) / 32)
    counted = targets[targets != IGNORE]
    np.testing.assert_array_equal(counted, stream[1:])                     # each once, in order
    np.testing.assert_array_equal(inputs.reshape(-1)[:len(stream) - 1], stream[:-1])
    np.testing.assert_array_equal(inputs[1:, 0], targets[:-1, -1])          # windows overlap by one token
    assert (targets == IGNORE).sum() == len(inputs) * 32 - (len(stream) - 1)   # padding only at the end


def test_the_training_stream_is_cached_for_the_next_run(packed, tmp_path, monkeypatch):
    first = setup_run(packed)
    cached = list((tmp_path / "runs" / "tokens").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("stream-")
    encoded = []
    real_stream = train.token_stream
    monkeypatch.setattr(train, "token_stream", lambda tok, texts, progress=False: encoded.append(len(texts))
                        or real_stream(tok, texts, progress))
    again = setup_run(packed)
    assert encoded == [6]                                   # only the validation documents
    np.testing.assert_array_equal(again.train_inputs, first.train_inputs)
    np.testing.assert_array_equal(again.train_targets, first.train_targets)
    setup_run(packed + ["--val-rows", "5"])                 # other documents: another stream
    assert encoded[1:] == [34 + 1, 5] and len(list((tmp_path / "runs" / "tokens").iterdir())) == 2


def test_no_token_of_a_validation_document_is_trained_on(packed):
    run_ = setup_run(packed)
    tok = run_.tok
    assert len(run_.val_texts) == 6
    train_text = tok.decode(run_.train_targets[run_.train_targets != IGNORE].tolist())
    val_text = tok.decode(run_.val_targets[run_.val_targets != IGNORE].tolist())
    for document in run_.val_texts:
        header = document.splitlines(keepends=True)[0]     # "# module 17\n": unique to its file
        assert header not in train_text and header in val_text
        assert document in val_text
    # every training document is in the training stream, whole
    all_documents = [p.read_text(encoding="utf-8") for p in sorted(run_.corpus.items)]
    trained = [d for d in all_documents if d not in run_.val_texts]
    assert len(trained) == 34 and all(document in train_text for document in trained)


def test_every_training_window_is_reached_in_a_seeded_order(packed):
    run_ = setup_run(packed)
    n = len(run_.train_inputs)
    args = run_.args
    per_pass = n // args["batch_size"]
    visits = [train.micro_batch_rows(s, m, args, n) for s in range(1, 40) for m in range(args["grad_accum"])]
    first_pass = np.concatenate(visits[:per_pass])
    assert len(set(first_pass.tolist())) == per_pass * args["batch_size"] > n - args["batch_size"]
    assert set(np.concatenate(visits).tolist()) == set(range(n))             # every window, over passes
    again = setup_run(packed)
    np.testing.assert_array_equal(again.train_inputs, run_.train_inputs)    # same seed: same windows
    np.testing.assert_array_equal(train.micro_batch_rows(3, 1, again.args, n), visits[5])
    other = setup_run(packed + ["--seed", "1"])
    assert other.train_inputs.shape != run_.train_inputs.shape or \
        not np.array_equal(other.train_inputs, run_.train_inputs)           # another document order


def test_packed_run_stopped_and_resumed_ends_byte_for_byte(packed, tmp_path, monkeypatch, capsys):
    argv = packed + ["--max-steps", "6", "--lr", "2e-3", "--eval-every", "2"]
    run(argv + ["--out", tmp_path / "straight"])
    real_backward = albor.backward
    calls = []

    def backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:                                  # during step 3 (2 micro-batches a step)
            signal.raise_signal(signal.SIGINT)
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(albor, "backward", backward)
    run(argv + ["--out", tmp_path / "stopped"])
    assert "stopped at step 3 of 6" in capsys.readouterr().out
    assert (tmp_path / "stopped" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # a stop plots too
    monkeypatch.undo()
    run(["--resume", tmp_path / "stopped"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    drop_seconds = lambda lines: [{k: v for k, v in line.items() if k != "seconds"} for line in lines]  # noqa: E731
    assert drop_seconds(metrics(tmp_path / "stopped")) == drop_seconds(metrics(tmp_path / "straight"))


def test_rows_mode_stays_the_default_and_the_model_cards_run():
    args, _ = train.parse_settings([])
    assert (args["data_mode"], args["rows"], args["eval_every"], args["minutes"]) == ("rows", 500, 0, None)
    assert args == train.parse_settings(["--rows", "500"])[0]


# -----------------------------------------------------------------------------
# periodic validation, bits per byte


def test_evaluate_is_the_mean_over_every_non_pad_token_across_batches():
    """Three batches with very different padding: the mean over all counted tokens, not the
    mean of the batches' means (which this data makes clearly different)."""
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=0)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 512, (6, 16))
    targets = rng.integers(0, 512, (6, 16))
    targets[0:2, 2:] = IGNORE                           # batch 1: 4 counted tokens
    targets[2, 9:] = IGNORE                             # batch 2: 25; batch 3: 32
    whole, _ = albor.forward(params, config, inputs, targets)     # one forward over every row
    assert train.evaluate(params, config, inputs, targets, 2) == pytest.approx(whole, rel=1e-6)
    per_batch = [albor.forward(params, config, inputs[i:i + 2], targets[i:i + 2])[0] for i in (0, 2, 4)]
    assert abs(np.mean(per_batch) - whole) > 1e-3         # the wrong average would fail above


def test_eval_every_logs_validation_over_several_batches(corpus, tok_file, tmp_path):
    """Row mode with documents of different lengths: validation batches of 2 rows with different
    padding; the logged validation loss is the whole set's mean (one forward over every row)."""
    out = tmp_path / "run"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "16", "--val-rows", "6",
         "--seq-len", "48", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "5", "--eval-every", "2",
         "--eval-samples", "0", "--out", out])
    lines = metrics(out)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert [line["step"] for line in lines if "val_loss" in line] == [0, 2, 4, 5]   # and after the last
    assert "loss" not in lines[0] and lines[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)
    config, params, _ = checkpoint.load_checkpoint(out)
    run_ = setup_run(["--resume", out])
    counted = (run_.val_targets != IGNORE).sum(axis=1)
    assert len(set(counted[0::2] + counted[1::2])) > 1                      # batches differ in padding
    whole, _ = albor.forward(params, config, run_.val_inputs, run_.val_targets)
    assert lines[-1]["val_loss"] == pytest.approx(whole, rel=1e-5)
    summary = read_json(out, "final_model.json")
    assert summary["val_loss"] == lines[-1]["val_loss"] and summary["val_bpb"] == lines[-1]["val_bpb"]
    n_bytes = sum(len(run_.tok.token_bytes[t]) for t in run_.val_targets[run_.val_targets != IGNORE]
                  if t not in (EOT_ID, PAD_ID))
    assert lines[-1]["val_bpb"] == pytest.approx(whole * counted.sum() / n_bytes / math.log(2), rel=1e-5)


def test_bits_per_byte_and_target_bytes():
    assert train.bits_per_byte(math.log(256), 100, 100) == pytest.approx(8.0)
    assert train.bits_per_byte(None, 1, 1) is None and train.bits_per_byte(1.0, 1, 0) is None
    tok = Tokenizer()
    assert train.target_bytes(tok, np.array([[ord("é") % 256, EOT_ID, IGNORE, 65]])) == 2   # EOT: no bytes


# -----------------------------------------------------------------------------
# --minutes


def test_steps_that_fit_the_budget():
    assert train.steps_that_fit(100, 1.0, 5.0, 10) == 63        # 63 steps + 7 validations: 98 s
    assert train.steps_that_fit(100, 1.0, 5.0, 0) == 100         # no validation to pay for
    assert train.steps_that_fit(1, 2.0, 0.0, 0) == 1             # always at least one step


def test_minutes_fits_the_schedule_and_leaves_the_weights_as_max_steps_would(packed, tmp_path, monkeypatch,
                                                                           capsys):
    """--minutes times steps on a scratch copy, fixes max_steps, and the run is then exactly the
    --max-steps run of that length (the deadline is switched off here, so load cannot cut it)."""
    monkeypatch.setattr(train, "past_deadline", lambda run_: False)
    monkeypatch.setattr(train, "refit_to_budget", lambda run_, step, seconds: None)
    run(packed + ["--minutes", "0.02", "--out", tmp_path / "budget"])
    out = capsys.readouterr().out
    assert "--minutes 0.02: a step takes" in out and "loss plot:" in out
    fitted = read_json(tmp_path / "budget", "trainer_state.json")["args"]["max_steps"]
    summary = read_json(tmp_path / "budget", "final_model.json")
    assert summary["finished"] and summary["steps"] == summary["max_steps"] == fitted >= 1
    assert summary["args"]["minutes"] == 0.02
    run(packed + ["--max-steps", fitted, "--out", tmp_path / "steps"])
    assert (tmp_path / "budget" / "model.safetensors").read_bytes() == \
        (tmp_path / "steps" / "model.safetensors").read_bytes()
    assert (tmp_path / "budget" / "loss.png").is_file()


def test_the_deadline_ends_the_run_cleanly_and_saves(packed, tmp_path, monkeypatch, capsys):
    def fit_then_run_out(run_, wall_start):                   # fits 1000 steps; the time is already up
        run_.args["max_steps"] = 1000
        train.set_schedule(run_, 1000)
        run_.deadline = 0.0
    monkeypatch.setattr(train, "fit_to_budget", fit_then_run_out)
    run(packed + ["--minutes", "10", "--out", tmp_path / "r"])
    assert "ran out after step 1 of 1000" in capsys.readouterr().out
    summary = read_json(tmp_path / "r", "final_model.json")
    assert summary["finished"] and summary["steps"] == 1 and summary["val_loss"] is not None
    assert [line["step"] for line in metrics(tmp_path / "r")] == [1]
    # no command repeats a run fitted to the machine's pace: the card says so, and why
    assert summary["reproduce"] is None
    assert "fitted to a time budget (--minutes)" in summary["falsify"]["FALSIFY-ALBOR-003"]["evidence"]
    assert "No single command reproduces this checkpoint: its steps and schedule were fitted to a time budget" \
        in (tmp_path / "r" / "README.md").read_text(encoding="utf-8")


def test_a_packed_runs_card_describes_windows_not_file_heads(packed, tmp_path):
    run(packed + ["--max-steps", "2", "--out", tmp_path / "r"])
    card = (tmp_path / "r" / "README.md").read_text(encoding="utf-8")
    summary = read_json(tmp_path / "r", "final_model.json")
    windows = summary["provenance"]["train_rows"]
    assert f"cut into {windows:,} windows of 32 tokens: the model saw whole files" in card
    assert "Packed: each set of documents is one token stream" in card
    assert "the first 6 are held out for validation, all the rest are the training documents" in card
    assert "file heads" not in card and "first 32 tokens" not in card
    assert summary["data"]["cut_train_rows"] is None


def test_the_steps_left_are_fitted_again_to_the_pace_measured(packed, tmp_path, monkeypatch):
    """Every REFIT_EVERY steps the steps left are fitted to the time left at the measured pace:
    max_steps and so the cosine follow it, the warmup stays, and the run ends where the last fit
    says (here a fake fit: 4 steps left after step 2, 1 after step 4)."""
    def fit(run_, wall_start):
        run_.args["max_steps"] = 1000
        train.set_schedule(run_, 1000)
        run_.warmup, run_.deadline = 2, train.time.perf_counter() + 3600
    fits = iter([4, 1])
    paces = []

    def steps_left(seconds_left, step_seconds, eval_seconds, eval_every):
        paces.append(step_seconds)
        return next(fits)
    monkeypatch.setattr(train, "fit_to_budget", fit)
    monkeypatch.setattr(train, "steps_that_fit", steps_left)
    monkeypatch.setattr(train, "REFIT_EVERY", 2)
    run(packed + ["--minutes", "60", "--out", tmp_path / "r"])
    summary = read_json(tmp_path / "r", "final_model.json")
    assert summary["steps"] == summary["max_steps"] == 5 and summary["warmup"] == 2
    assert read_json(tmp_path / "r", "trainer_state.json")["args"]["max_steps"] == 5
    lrs = [line["lr"] for line in metrics(tmp_path / "r")]
    schedule = [1000, 1000, 6, 6, 5]   # max_steps when each step ran
    assert lrs == [albor.lr_at(step, n, summary["lr"], 2, summary["min_lr"]) for step, n in enumerate(schedule, 1)]
    assert len(paces) == 2 and all(p > 0 for p in paces)


def test_minutes_and_max_steps_on_the_command_line_and_with_resume(packed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--minutes", "1", "--max-steps", "3"])
    assert "--minutes and --max-steps exclude each other" in capsys.readouterr().err
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            train.main(["--minutes", bad])
    run(packed + ["--max-steps", "2", "--out", tmp_path / "a"])
    args, _ = train.merge_resumed_settings({**train.DEFAULTS, "resume": str(tmp_path / "a"), "minutes": 3.0},
                                           {"resume", "minutes"})
    assert args["max_steps"] is None and args["minutes"] == 3.0            # fitted again, to the new budget
    args, _ = train.merge_resumed_settings({**train.DEFAULTS, "resume": str(tmp_path / "a")}, {"resume"})
    assert args["max_steps"] == 2                                           # the saved schedule


# -----------------------------------------------------------------------------
# the workshop preset, the loss plot, the held-out benchmark


def test_the_workshop_preset_brings_its_training_settings(capsys):
    args, given = train.parse_settings(["--config", "workshop"])
    assert given == {"config"}
    assert {name: args[name] for name in train.PRESET_SETTINGS["workshop"]} == train.PRESET_SETTINGS["workshop"]
    assert args["data_mode"] == "packed" and args["rows"] is None
    args, _ = train.parse_settings(["--config", "workshop", "--seq-len", "64", "--data-mode", "rows"])
    assert (args["seq_len"], args["data_mode"], args["batch_size"]) == (64, "rows", 4)   # flags win
    config = albor.get_config("workshop")
    assert config.vocab_size == 4096 and args["seq_len"] <= config.max_position_embeddings
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, shown in (("seq-len", "(default: 128; workshop: 256)"), ("rows", "(default: 500; workshop: all)"),
                        ("data-mode", "(default: rows; workshop: packed)"), ("eval-every", "workshop: 250")):
        assert shown in text, flag


def test_a_workshop_run_uses_its_settings(corpus, tok_file, tmp_path):
    out = tmp_path / "w"
    run(["--config", "workshop", "--data", corpus, "--tokenizer", tok_file, "--val-rows", "4", "--seq-len", "32",
         "--max-steps", "2", "--eval-samples", "1", "--out", out])     # short windows: a small corpus
    summary = read_json(out, "final_model.json")
    settings = train.PRESET_SETTINGS["workshop"]
    given = {"seq_len": 32, "eval_samples": 1, "val_rows": 4}
    assert {name: summary["args"][name] for name in settings} == {**settings, **given}
    assert summary["parse_eval"]["samples"] == 1
    resumed = setup_run(["--resume", out])
    assert summary["provenance"]["train_rows"] == len(resumed.train_inputs)
    assert len(resumed.val_texts) == 4 and resumed.train_inputs.shape[1] == 32
    lines = metrics(out)
    assert lines[-1]["tokens"] == settings["batch_size"] * 32 and lines[-1]["lr"] == pytest.approx(
        albor.lr_at(2, 2, settings["lr"], albor.default_warmup(2), settings["lr"] / 10))
    assert [line["step"] for line in lines if "val_loss" in line] == [0, 2]     # before and after the last
    assert summary["warmup"] == albor.default_warmup(2) and lines[0]["val_loss"] is not None


def test_the_end_of_run_report_prints_samples_and_the_plot(corpus, tok_file, tmp_path, capsys):
    out = tmp_path / "r"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "8", "--val-rows", "3",
         "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--eval-samples", "4",
         "--out", out])
    printed = capsys.readouterr().out
    parse = read_json(out, "final_model.json")["parse_eval"]
    assert len(parse["texts"]) == len(parse["verdicts"]) == 4
    for i in range(train.SAMPLES_SHOWN):
        assert f"---- sample {i + 1} of 4 ({parse['verdicts'][i]})" in printed
        assert parse["texts"][i].rstrip("\n") in printed
    assert "---- sample 4 of 4" not in printed
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and f"loss plot: {out / 'loss.png'}" in printed


def test_plot_losses_draws_training_and_validation(tmp_path, monkeypatch):
    lines = [{"step": 0, "val_loss": 6.0}] + [{"step": s, "loss": 6.0 - s / 10} for s in range(1, 11)]
    lines[5]["val_loss"] = 5.6
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"cut')
    drawn = []
    from matplotlib.axes import Axes
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((a, k["label"])) or real_plot(self, *a, **k))
    path = train.plot_losses(tmp_path, (10, 5.1))
    assert path == os.path.join(tmp_path, "loss.png") and os.path.getsize(path) > 1000
    (train_x, train_y), train_label = drawn[0]
    assert list(train_x) == list(range(1, 11)) and train_y[-1] == pytest.approx(5.0)
    (val_x, val_y), val_label = drawn[1]
    assert list(val_x) == [0, 5, 10] and list(val_y) == [6.0, 5.6, 5.1]
    assert "training" in train_label and "validation" in val_label
    # 100 steps: the running mean over 2 steps is drawn too
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": float(s % 2)}) + "\n"
                                                    for s in range(1, 101)))
    drawn.clear()
    train.plot_losses(tmp_path)
    (mean_x, mean_y), mean_label = drawn[1]
    assert "running mean over 2 steps" in mean_label
    assert list(mean_x) == list(range(1, 101)) and mean_y[0] == 1.0 and set(mean_y[1:]) == {0.5}


def test_bench_learning_prints_bits_per_byte_beside_gzip_and_xz(corpus, tok_file, tmp_path, capsys):
    import gzip
    import lzma
    out = tmp_path / "r"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "8", "--val-rows", "3",
         "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--eval-samples", "0",
         "--out", out])
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    texts = {"a.py": "import os\n\nprint(os.getcwd())\n" * 5, "b.py": "x = [i * i for i in range(10)]\n" * 9}
    for name, text in texts.items():
        (held_out / name).write_text(text)
    capsys.readouterr()
    assert bench.main(["--learning", str(out), "--held-out", str(held_out)]) == 0
    printed = capsys.readouterr().out
    data = [text.encode() for text in texts.values()]
    total = sum(len(d) for d in data)
    gzip_bpb = 8 * sum(len(gzip.compress(d, compresslevel=9)) for d in data) / total
    xz_bpb = 8 * sum(len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in data) / total
    assert f"2 files under {held_out} ({total:,} bytes" in printed
    figures = dict(re.findall(r"^  (albor|gzip|xz)\b.*? (\d+\.\d+)$", printed, re.MULTILINE))
    assert float(figures["gzip"]) == pytest.approx(gzip_bpb, abs=6e-4)
    assert float(figures["xz"]) == pytest.approx(xz_bpb, abs=6e-4)
    # the model's figure: the files' losses, each file alone, summed
    config, params, _ = checkpoint.load_checkpoint(out)
    tok = Tokenizer.load(out / "tokenizer.json")
    nats = 0.0
    for text in texts.values():
        inputs, targets = train.pack_windows(tok, [text], 32)
        nats += albor.forward(params, config, inputs, targets)[0] * (targets != IGNORE).sum()
    assert float(figures["albor"]) == pytest.approx(nats / math.log(2) / total, abs=6e-4)
    assert "the run's own validation" in printed


def test_bench_times_a_presets_own_step():
    args, _ = bench.parse_args(["--config", "workshop"])
    settings = train.PRESET_SETTINGS["workshop"]
    assert (args.batch_size, args.seq_len, args.grad_accum) == \
        (settings["batch_size"], settings["seq_len"], settings["grad_accum"])
    args, _ = bench.parse_args([])
    assert (args.batch_size, args.seq_len, args.grad_accum) == (4, 128, 4)
