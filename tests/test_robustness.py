"""A run survives anything (issue 14): checkpoints committed as one unit, every stop signal
saves, no run folder overwritten or shared, and a one-line error for every bad input.

Kills come in three sizes: a save killed after each of its file operations (in a forked child,
in-process, so every point of the protocol is checked), train.py children killed at chosen
moments (tests/kill_check.py's functions; `python tests/kill_check.py` runs 32 and prints
figures), and a fuzz over every file albor reads: each mutation must end in a one-line error
(or an ordinary run), never a traceback, and the folder must be left as it was.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import albor
import checkpoint
import sample
import tokenizer
import train
from tests import kill_check
from tests.oracles import oracle
from tests.test_train import (ROOT, base, corpus, metrics, read_json, run, safetensors_metadata,  # noqa: F401
                              signal_on_call, tok_file)
from tokenizer import Tokenizer

STEPS = ["--max-steps", "6", "--lr", "2e-3", "--eval-samples", "1"]
QUICK = ["--eval-samples", "0"]   # no sampling at the end: where the parse rate is not the point


def folder_bytes(folder):
    """{relative path: bytes} of every file under folder: what "nothing lost" compares."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(argv, main=train.main, prefix="train.py: error: "):
    """The message of the SystemExit main(argv) must end with: one line, starting with prefix."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(prefix) and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def straight(corpus, tok_file, tmp_path_factory):
    """The 6-step run never stopped, that stopped and killed runs must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "32", "--val-rows", "4",
         "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", *STEPS, "--out", out])
    return out


def assert_same_run(folder, reference):
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (Path(folder) / name).read_bytes() == (Path(reference) / name).read_bytes(), name
    assert [(m["step"], m["loss"]) for m in metrics(folder)] == [(m["step"], m["loss"]) for m in metrics(reference)]
    assert read_json(folder, "final_model.json")["val_loss"] == read_json(reference, "final_model.json")["val_loss"]
    assert kill_check.leftovers(folder) == []


# -----------------------------------------------------------------------------
# The commit protocol: a save killed after each of its file operations


def saved_checkpoint(folder, seed, step):
    config = albor.get_config("tiny")
    params = albor.init_params(config, seed=seed)
    optimizer = albor.AdamW(params)
    checkpoint.save_checkpoint(folder, config, params, optimizer, step=step,
                               extra_files={"trainer_state.json": f'{{"step": {step}}}\n'.encode()})
    return config, params, optimizer


def save_killed_after(folder, kill_at):
    """In a forked child: save the step-2 checkpoint into folder, SIGKILL after file op kill_at."""
    pid = os.fork()
    if pid == 0:   # the child: count the operations, die at kill_at
        ops = []

        def counted(real):
            def op(*args, **kwargs):
                result = real(*args, **kwargs)
                ops.append(1)
                if len(ops) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return op

        for name in ("fsync", "rename", "replace", "rmdir"):
            setattr(os, name, counted(getattr(os, name)))
        try:
            saved_checkpoint(folder, seed=2, step=2)
        finally:
            os._exit(len(ops))   # not killed: report how many operations a save takes
    _, status = os.waitpid(pid, 0)
    return None if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_save_killed_at_any_point_leaves_the_old_checkpoint_or_the_new_one(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    saved_checkpoint(old, seed=1, step=1)
    saved_checkpoint(new, seed=2, step=2)
    versions = {1: folder_bytes(old), 2: folder_bytes(new)}
    total = save_killed_after(tmp_path / "count", kill_at=0)
    assert total >= 12                       # each file staged, the commit, each file moved in
    outcomes = []
    for kill_at in range(1, total + 1):
        folder = tmp_path / f"k{kill_at}"
        shutil.copytree(old, folder)
        assert save_killed_after(folder, kill_at) is None           # it was killed
        with checkpoint.lock(folder):                               # the next start recovers
            assert kill_check.leftovers(folder) == []
            step = checkpoint.load_checkpoint(folder)[2]
            assert folder_bytes(folder) == versions[step], kill_at   # all old or all new
        outcomes.append(step)
    assert outcomes == sorted(outcomes) and outcomes[0] == 1 and outcomes[-1] == 2   # old until the commit


def test_a_committed_save_cut_short_is_finished_and_an_uncommitted_one_dropped(tmp_path):
    folder = tmp_path / "run"
    saved_checkpoint(folder, seed=1, step=1)
    old = folder_bytes(folder)
    (folder / checkpoint.SAVING).mkdir()
    (folder / checkpoint.SAVING / "model.safetensors").write_bytes(b"half")
    (folder / ".metrics.jsonl.123.tmp").write_bytes(b"x")
    checkpoint.recover(folder)
    assert folder_bytes(folder) == old and kill_check.leftovers(folder) == []
    (folder / checkpoint.COMMITTED).mkdir()                    # committed, one file moved in already
    (folder / checkpoint.COMMITTED / "trainer_state.json").write_bytes(b'{"step": 2}\n')
    checkpoint.recover(folder)
    assert (folder / "trainer_state.json").read_bytes() == b'{"step": 2}\n'
    assert kill_check.leftovers(folder) == []


def test_a_full_disk_during_a_save_is_a_one_line_error_and_keeps_the_last_checkpoint(base, tmp_path, monkeypatch):
    real_write = checkpoint.write_safetensors
    calls = []

    def disk_fills_up(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 5:   # the third save (model, optimizer, model, optimizer, model...)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_fills_up)
    out = tmp_path / "full"
    message = one_line_error(base + QUICK + ["--max-steps", "6", "--save-every", "1", "--out", out])
    assert "No space left on device" in message and "(step 2)" in message, message
    assert safetensors_metadata(out / "model.safetensors")["step"] == "2" and kill_check.leftovers(out) == []
    monkeypatch.undo()
    run(["--resume", out])   # and it continues


# -----------------------------------------------------------------------------
# Stop signals


def test_sigterm_to_a_train_py_process_saves_and_says_which_step(base, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TQDM_DISABLE="1")
    child = subprocess.Popen([sys.executable, "train.py", *base, "--max-steps", "100000", "--out", str(out)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert child.poll() is None, child.communicate()
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr
    step = read_json(out, "trainer_state.json")["step"]
    assert step >= 2 and f"stopped at step {step} of 100000 (SIGTERM)" in stdout
    assert safetensors_metadata(out / "model.safetensors")["step"] == str(step)


@pytest.mark.parametrize("phase", ["validation loss", "sampling"])
def test_ctrl_c_in_the_end_of_run_evaluation_keeps_the_trained_checkpoint(phase, base, straight, tmp_path,
                                                                           monkeypatch, capsys):
    if phase == "validation loss":
        signal_on_call(monkeypatch, train, "evaluate", {1})
    else:
        signal_on_call(monkeypatch, sample, "generate", {1})
    run(base + STEPS + ["--out", tmp_path / "run"])
    assert "evaluation stopped (SIGINT); the checkpoint of step 6 is saved" in capsys.readouterr().out
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (straight / name).read_bytes()
    summary = read_json(tmp_path / "run", "final_model.json")
    assert summary["finished"] and summary["steps"] == 6 and summary["val_loss"] is None
    monkeypatch.undo()
    run(["--resume", tmp_path / "run"])      # already at step 6: evaluates
    assert_same_run(tmp_path / "run", straight)


def test_ctrl_c_during_a_save_lets_it_commit_then_stops(base, straight, tmp_path, monkeypatch, capsys):
    signal_on_call(monkeypatch, checkpoint, "write_safetensors", {3})   # the model file of step 2's save
    run(base + STEPS + ["--save-every", "1", "--out", tmp_path / "once"])
    assert "stopped at step 2 of 6 (SIGINT)" in capsys.readouterr().out
    assert read_json(tmp_path / "once", "trainer_state.json")["step"] == 2
    monkeypatch.undo()
    signal_on_call(monkeypatch, checkpoint, "write_safetensors", {3, 4})  # and a second Ctrl-C: quits,
    message = one_line_error(base + STEPS + ["--save-every", "1", "--out", tmp_path / "twice"],
                             prefix="train.py: interrupted; ")             # once the save is committed
    assert "the last checkpoint (step 2) is in" in message
    assert read_json(tmp_path / "twice", "trainer_state.json")["step"] == 2
    assert kill_check.leftovers(tmp_path / "twice") == []
    monkeypatch.undo()
    run(["--resume", tmp_path / "twice"])
    assert_same_run(tmp_path / "twice", straight)


def test_a_stop_signal_before_training_ends_at_once(base, tmp_path, monkeypatch):
    signal_on_call(monkeypatch, train, "make_rows", {1}, signal.SIGTERM)
    message = one_line_error(base + ["--out", str(tmp_path / "r")], prefix="train.py: interrupted")
    assert "no checkpoint of this run was saved" in message


def test_resume_from_a_periodic_checkpoint_continues_byte_for_byte(base, straight, tmp_path, monkeypatch):
    """The periodic save holds the weights after its step's update: a run that crashes (an error
    that does not save) after step 4 of 6, with --save-every 2, resumes from step 4's checkpoint
    and ends as the run that never stopped (a save moved before the update would not)."""
    real_step = train.one_step

    class Crash(Exception):
        pass

    def crash_in_step_5(run_, step, layer_clock):
        if step == 5:
            raise Crash
        return real_step(run_, step, layer_clock)

    monkeypatch.setattr(train, "one_step", crash_in_step_5)
    with pytest.raises(Crash):
        train.main([str(a) for a in base + STEPS + ["--save-every", "2", "--out", tmp_path / "crashed"]])
    monkeypatch.undo()
    assert read_json(tmp_path / "crashed", "trainer_state.json")["step"] == 4
    run(["--resume", tmp_path / "crashed"])
    assert_same_run(tmp_path / "crashed", straight)


# -----------------------------------------------------------------------------
# The run folder: locked while in use, never taken from another run unasked


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_not(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with checkpoint.lock(out):   # as a running train.py holds it
        message = one_line_error(base + QUICK + ["--max-steps", "1", "--out", out])
    assert "is in use by another run" in message
    holder = subprocess.Popen([sys.executable, "-c", "import checkpoint, sys, time\n"
                               "with checkpoint.lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
                               out], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    one_line_error(base + QUICK + ["--max-steps", "1", "--out", out])
    holder.kill()            # SIGKILL: the kernel lets go of its lock
    holder.wait()
    run(base + QUICK + ["--max-steps", "1", "--out", out])


def test_a_fresh_run_never_takes_another_runs_folder_unless_told(base, tmp_path):
    out = tmp_path / "run"
    run(base + QUICK + ["--max-steps", "2", "--out", out])
    before = folder_bytes(out)
    message = one_line_error(base + QUICK + ["--max-steps", "1", "--seed", "3", "--out", out])
    assert "holds the checkpoint of another run" in message and "--overwrite" in message
    assert folder_bytes(out) == before                       # metrics.jsonl too
    run(base + QUICK + ["--max-steps", "1", "--seed", "3", "--out", out, "--overwrite"])
    assert read_json(out, "trainer_state.json")["args"]["seed"] == 3 and len(metrics(out)) == 1
    # --overwrite is not a setting of the run: a resume into another run's folder is refused too
    run(base + QUICK + ["--max-steps", "1", "--out", tmp_path / "other"])
    one_line_error(["--resume", str(out), "--max-steps", "2", "--out", str(tmp_path / "other")])


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty"),
    ("file", "is a file, not a folder"),
    ("/proc/albor-run", "cannot create the folder"),
])
def test_a_bad_out_is_a_one_line_error(out, message, base, tmp_path, capsys):
    if out == "file":
        out = tmp_path / "file"
        out.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        train.main(base + ["--out", str(out)])
    code = exit_info.value.code   # a one-line message, or argparse's status 2 with it on stderr
    assert code != 0 and message in (code if isinstance(code, str) else capsys.readouterr().err)


# -----------------------------------------------------------------------------
# Bad inputs: one line naming the file and the field, and nothing lost


@pytest.fixture(scope="module")
def pristine(corpus, tok_file, tmp_path_factory):
    """A finished 2-step run folder (periodic saves on, no parse rate) to mutate copies of."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    run(["--config", "tiny", "--data", corpus, "--tokenizer", tok_file, "--rows", "32", "--val-rows", "4",
         "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "2", "--save-every", "1",
         "--eval-samples", "0", "--out", out])
    return out


def json_edit(change):
    def mutate(path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return mutate


def set_key(*keys, value):
    def change(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return json_edit(change)


def header_edit(change):
    """Mutate a safetensors file's header (its JSON), keeping the file's framing."""
    def mutate(path):
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        change(header)
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return mutate


def set_in_header(name, key, value):
    def change(header):
        header[name][key] = value
    return header_edit(change)


def replace_with(data):
    def mutate(path):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        if data == "folder":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)
    return mutate


EMBED = "model.embed_tokens.weight"
# (file, mutation, what the one-line error must say). train.py --resume reads them all.
BAD_FILES = [
    ("config.json", set_key("num_hidden_layers", value=10**7), "num_hidden_layers 10000000 does not fit"),
    ("config.json", set_key("num_hidden_layers", value=10**400), "num_hidden_layers must be an int"),
    ("config.json", set_key("hidden_size", value=0), "hidden_size must be an int in [1,"),
    ("config.json", set_key("num_attention_heads", value=-4), "num_attention_heads must be an int"),
    ("config.json", set_key("intermediate_size", value="160"), "intermediate_size must be an int"),
    ("config.json", set_key("rms_norm_eps", value=float("nan")), "rms_norm_eps must be a finite number > 0"),
    ("config.json", set_key("rope_theta", value=float("inf")), "rope_theta must be a finite number > 0"),
    ("config.json", set_key("num_key_value_heads", value=3), "not divisible by num_key_value_heads"),
    ("config.json", set_key("vocab_size", value=1000), "has shape (512, 64), the config needs (1000, 64)"),
    ("config.json", json_edit(lambda d: d.pop("vocab_size")), "missing the field 'vocab_size'"),
    ("config.json", replace_with(b"[" * 200000), "not valid JSON"),
    ("config.json", replace_with(b"\xff\xfe"), "not valid JSON"),
    ("config.json", replace_with(b"[1, 2]"), "expected a JSON object"),
    ("config.json", replace_with("folder"), "config.json: file not found"),
    ("model.safetensors", set_in_header(EMBED, "data_offsets", "0 131072"), "data_offsets '0 131072' do not fit"),
    ("model.safetensors", set_in_header(EMBED, "shape", [512, -64]), "is not a list of sizes"),
    ("model.safetensors", set_in_header(EMBED, "dtype", "F16"), "albor reads only float32"),
    ("model.safetensors", header_edit(lambda h: h["__metadata__"].update(step="4.5")), "metadata step is '4.5'"),
    ("model.safetensors", header_edit(lambda h: h.update(__metadata__=[1])), "__metadata__ is not an object"),
    ("model.safetensors", replace_with(b"\xff" * 8 + b"{}"), "truncated or not a safetensors file"),
    ("model.safetensors", replace_with(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"), "not a JSON object"),
    ("model.safetensors", replace_with(None), "model.safetensors: file not found"),
    ("model.safetensors", replace_with("folder"), "model.safetensors: cannot read it"),
    ("optimizer.safetensors", header_edit(lambda h: h["__metadata__"].update(step="two")), "metadata step is 'two'"),
    ("optimizer.safetensors", header_edit(lambda h: h["__metadata__"].update(hyperparameters="{")),
     "corrupt optimizer settings"),
    ("optimizer.safetensors", set_in_header("m." + EMBED, "data_offsets", [0, 4]), "do not fit its shape"),
    ("trainer_state.json", replace_with(b"[]"), "trainer_state.json: expected a JSON object, got list"),
    ("trainer_state.json", set_key("step", value="2"), "step must be an int >= 0, got '2'"),
    ("trainer_state.json", set_key("step", value=-1), "step must be an int >= 0"),
    ("trainer_state.json", set_key("args", value=[]), "args must be an object"),
    ("trainer_state.json", set_key("args", "grad_accum", value="4"), "args.grad_accum must be an int, got '4'"),
    ("trainer_state.json", set_key("args", "grad_accum", value=0), "--grad-accum must be at least 1"),
    ("trainer_state.json", set_key("args", "dtype", value="fp64"), "--dtype must be one of fp32"),
    ("trainer_state.json", set_key("args", "lr", value=None), "args.lr must be a float, got None"),
    ("trainer_state.json", set_key("args", "seed", value=-1), "--seed must be 0 or more"),
    ("trainer_state.json", set_key("loss_curve", value="low"), "loss_curve must be a list of numbers"),
    ("trainer_state.json", set_key("timing", value=[1]), "timing must map names to numbers"),
    ("trainer_state.json", set_key("loss_scaler", value="x"), "loss_scaler must be null or an object"),
    ("trainer_state.json", replace_with(b"{"), "trainer_state.json: not valid JSON"),
    ("trainer_state.json", replace_with("folder"), "trainer_state.json: cannot read"),
    ("tokenizer.json", set_key("pre_tokenizer", value=[]), "its pre_tokenizer is not albor's"),
    ("tokenizer.json", json_edit(lambda d: d["model"]["vocab"].update(a="97")), "vocab ids must be ints"),
    ("tokenizer.json", json_edit(lambda d: d["model"]["vocab"].update(a=97.0)), "vocab ids must be ints"),
    ("tokenizer.json", set_key("added_tokens", value={"a": 1}), "added_tokens is not a list"),
    ("tokenizer.json", replace_with(b"[" * 200000), "not valid JSON: nested too deeply"),
    ("tokenizer.json", replace_with(b"\x80abc"), "tokenizer.json: cannot read a tokenizer.json"),
    ("tokenizer.json", replace_with(None), "tokenizer.json: cannot read"),
    ("metrics.jsonl", replace_with(bytes(range(256)) * 4), "metrics.jsonl: not UTF-8 text"),
    ("metrics.jsonl", replace_with(b'{"step": 1}\nnot json\n'), "metrics.jsonl: line 2 is not a JSON object"),
    ("metrics.jsonl", replace_with(b'{"step": "1"}\n'), "metrics.jsonl: line 1 is not a JSON object"),
    ("metrics.jsonl", replace_with("folder"), "metrics.jsonl: cannot read the metrics"),
]


@pytest.mark.parametrize("name, mutate, message", BAD_FILES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(BAD_FILES)])
def test_each_bad_file_is_a_one_line_error_that_names_it_and_loses_nothing(name, mutate, message, pristine,
                                                                          tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(pristine, folder)
    mutate(folder / name)
    before = folder_bytes(folder)
    text = one_line_error(["--resume", str(folder), "--max-steps", "3"])
    assert name in text and message in text, text
    assert folder_bytes(folder) == before
    if name in ("config.json", "model.safetensors", "tokenizer.json"):   # sample.py reads these too
        text = one_line_error(["--checkpoint", folder, "--prompt", "x"], sample.main, "sample.py: error: ")
        assert name in text, text


def random_value(rng):
    return rng.choice([None, True, -1, 0, 0.5, 10**400, float("nan"), float("inf"), "", "x", [], {}, [1], {"a": 1}])


def fuzz_json(path, rng):
    """Replace one value anywhere in the JSON file with a random odd one."""
    data = json.loads(path.read_text())
    holders = [data]
    spots = []
    while holders:
        holder = holders.pop()
        keys = list(holder) if isinstance(holder, dict) else range(len(holder))
        for key in keys:
            spots.append((holder, key))
            if isinstance(holder[key], (dict, list)):
                holders.append(holder[key])
    holder, key = rng.choice(spots)
    holder[key] = random_value(rng)
    path.write_text(json.dumps(data))


def fuzz_binary(path, rng):
    """Flip, cut or grow a .safetensors file's bytes, mostly in its header."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    cut = rng.randrange(len(data))
    action = rng.choice(["flip", "flip", "cut", "grow"])
    if action == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8 + n)] = rng.randrange(256)
    data = data[:cut] if action == "cut" else data + bytes(rng.randint(1, 64)) if action == "grow" else data
    path.write_bytes(bytes(data))


def test_fuzz_every_file_albor_reads(pristine, tmp_path, capsys):
    """40 random mutations of the files --resume reads: each run ends in a one-line error that
    leaves the folder as it was, or runs normally (a harmless change); never a traceback."""
    rng = random.Random(14)
    names = ["config.json", "trainer_state.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors"]
    outcomes = {"error": 0, "ran": 0}
    for i in range(40):
        folder = tmp_path / f"f{i}"
        shutil.copytree(pristine, folder)
        name = names[i % len(names)]
        (fuzz_binary if name.endswith(".safetensors") else fuzz_json)(folder / name, rng)
        before = folder_bytes(folder)
        try:
            status = train.main(["--resume", str(folder), "--max-steps", "3"])
        except SystemExit as e:
            assert isinstance(e.code, str) and "\n" not in e.code, (name, e.code)
            assert folder_bytes(folder) == before, name
            outcomes["error"] += 1
        else:
            assert status == 0
            outcomes["ran"] += 1
        capsys.readouterr()
        shutil.rmtree(folder)
    assert outcomes["error"] >= 20, outcomes


def test_a_moved_external_tokenizer_is_not_needed_to_resume(base, tmp_path):
    moved = tmp_path / "tokenizer.json"
    shutil.copy(base[base.index("--tokenizer") + 1], moved)
    argv = base[:base.index("--tokenizer")] + base[base.index("--tokenizer") + 2:]
    run(argv + QUICK + ["--tokenizer", moved, "--max-steps", "2", "--out", tmp_path / "run"])
    moved.unlink()
    run(["--resume", tmp_path / "run", "--max-steps", "3"])   # with the checkpoint's own tokenizer.json
    assert read_json(tmp_path / "run", "trainer_state.json")["step"] == 3


def test_final_model_json_that_is_not_an_object_is_a_one_line_error_in_eval_only(pristine, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(pristine, folder)
    (folder / "final_model.json").write_text("[]")
    text = one_line_error(["--eval-only", "--resume", str(folder)])
    assert "final_model.json: expected a JSON object" in text


def test_sample_py_refuses_a_negative_seed_and_a_prompt_that_is_not_utf8(pristine, capsys):
    for argv, message in ((["--seed", "-1"], "--seed must be 0 or more"),
                          (["--prompt", "x = '\udcff'"], "--prompt is not UTF-8 text")):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--checkpoint", str(pristine), "--prompt", "x", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_files(base, tmp_path, tok_file):
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(12)]
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(lines + ['{"text": "x = \\ud800"}']) + "\n", encoding="utf-8")
    argv = ["--config", "tiny", "--tokenizer", str(tok_file), "--rows", "100", "--val-rows", "2", "--seq-len", "16",
            "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--eval-samples", "0"]
    run(argv + ["--data", data, "--out", tmp_path / "run"])
    assert read_json(tmp_path / "run", "final_model.json")["provenance"]["skipped_documents"] == 1   # the surrogate
    text = one_line_error(argv + ["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert "missing.jsonl: no such file or folder" in text


def test_numeric_warnings_do_not_come_before_the_divergence_error(base, tmp_path):
    """A diverging run overflows first (NumPy warns); it ends with the one-line error alone."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        text = one_line_error(base + ["--max-steps", "20", "--lr", "1e6", "--warmup", "0",
                                                          "--grad-clip", "0", "--out", str(tmp_path / "r")])
    assert "stopping" in text and ("nan" in text or "inf" in text)
    assert [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)] == []


# -----------------------------------------------------------------------------
# Huge inputs: bounded work


def test_a_row_encodes_only_what_it_needs(tok_file, monkeypatch):
    tok = Tokenizer.load(tok_file)
    encoded = []
    real = tok.encode_chunk
    monkeypatch.setattr(tok, "encode_chunk", lambda chunk: encoded.append(len(chunk)) or real(chunk))
    text = "import os\n" + "x = [1, 2, 3]; " * 1_000_000          # a short line, then 15 MB
    row = train.encode_row(tok, text, 64)
    assert row == tok.encode(text[:4000])[:65]                      # the same ids as the whole text
    assert sum(encoded) < 2000                                       # from its first bytes only
    encoded.clear()
    row = train.encode_row(tok, "x = " + "a" * 1_000_000, 64)        # one 1 MB pre-token
    longest = max(len(t) for t in tok.token_bytes)
    assert len(row) == 65 and max(encoded) <= 65 * longest


def test_a_huge_config_is_refused_before_anything_is_allocated(pristine, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(pristine, folder)
    set_key("num_hidden_layers", value=10**7)(folder / "config.json")
    monkeypatch.setattr(checkpoint, "param_shapes", lambda config: pytest.fail("param_shapes of the huge config"))
    with pytest.raises(checkpoint.CheckpointError, match="num_hidden_layers 10000000 does not fit"):
        checkpoint.load_checkpoint(folder)


# -----------------------------------------------------------------------------
# tokenizer.py's command line


@pytest.mark.parametrize("out, message", [("/nonexistent/t.json", "does not exist"), ("folder", "is a folder")])
def test_tokenizer_train_checks_out_before_training(out, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Tokenizer, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(["train", "--lines", "100", "--out", str(tmp_path) if out == "folder" else out])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Kills of real train.py processes (tests/kill_check.py runs many more)


def test_killed_runs_resume_to_the_same_bytes(tmp_path):
    """One timed SIGKILL, and kills right after chosen file operations: after optimizer.safetensors
    is moved in (the issue's repro: there the old protocol left the model a step ahead of the
    trainer state), and right after the final save's commit."""
    train_args = kill_check.make_data(tmp_path) + ["--max-steps", "4"]
    reference = tmp_path / "reference"
    ops, seconds = kill_check.reference_run(train_args, reference)
    commits = [i for i, op in enumerate(ops, 1) if op[0] == "rename" and op[-1].endswith(checkpoint.COMMITTED)]
    moved_optimizer = [i for i, op in enumerate(ops, 1) if op[0] == "replace" and op[1].endswith(
        os.path.join(checkpoint.COMMITTED, "optimizer.safetensors"))]
    plan = [("timed", seconds / 2), ("file", moved_optimizer[2]), ("file", commits[-2])]
    for n, (kind, when) in enumerate(plan):
        result = kill_check.kill_and_resume(train_args, tmp_path / f"run{n}", reference, kind, when)
        assert result["problems"] == [], (kind, when, result)
        assert result["killed"] or kind == "timed"


def test_a_recovered_run_folder_opens_in_transformers(pristine, tmp_path):
    transformers = oracle("transformers")
    folder = tmp_path / "run"
    shutil.copytree(pristine, folder)
    (folder / checkpoint.COMMITTED).mkdir()   # a committed save cut short by a kill, then recovered
    shutil.copy(folder / "config.json", folder / checkpoint.COMMITTED / "config.json")
    with checkpoint.lock(folder):
        pass
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok("def f():").input_ids == Tokenizer.load(folder / "tokenizer.json").encode("def f():")
