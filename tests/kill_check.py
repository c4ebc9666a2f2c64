"""The kill check (issue 14): SIGKILL `train.py --save-every 1` runs at random moments, resume
each killed run folder, and require that it ends where a run never killed ends, byte for byte.

    python tests/kill_check.py                   # 40 kills of a 10-step tiny run
    python tests/kill_check.py --kills 60 --steps 12 --seed 1

Two kinds of kill, taking turns:
  timed   SIGKILL at a random time of the run, from start-up to the end-of-run evaluation
          (on a busy machine a few come after the run has ended: counted as not killed);
  file    the run kills itself right after its k-th file operation (os.fsync, os.rename,
          os.replace, os.rmdir), k drawn from all of an uninterrupted run's operations, so that
          every point of a save is hit: a file staged, the commit, a file moved in. Every
          fourth of these falls in the final saves (the last checkpoint and the summary).
Then `train.py --resume DIR` finishes each run (or, where no checkpoint was committed yet, the
same fresh command again). Checked: model.safetensors and optimizer.safetensors are the
uninterrupted run's, byte for byte; metrics.jsonl has its steps and losses; final_model.json its
validation loss; and nothing is left of an interrupted save (.saving/, .committed/, .*.tmp).
Prints one line a kill and the totals; exits 1 if a folder failed.
tests/test_robustness.py runs a few kills of each kind with the same functions.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train import stdlib_python_files  # noqa: E402

# The child: train.main(argv) with the file operations counted. It kills itself right after
# operation number KILL_AT (0: never) and, given a REPORT path, writes the list of operations
# there when it ends.
CHILD = r"""
import atexit, json, os, signal, sys
kill_at, report = int(sys.argv[1]), sys.argv[2]
ops = []
def counted(name, real):
    def op(*args, **kwargs):
        result = real(*args, **kwargs)
        ops.append([name] + [str(a) for a in args if isinstance(a, (str, os.PathLike))])
        if len(ops) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return op
for name in ("fsync", "rename", "replace", "rmdir"):
    setattr(os, name, counted(name, getattr(os, name)))
if report != "-":
    atexit.register(lambda: open(report, "w").write(json.dumps(ops)))
import train
sys.exit(train.main(sys.argv[3:]))
"""
LEFTOVERS = (checkpoint.SAVING, checkpoint.COMMITTED)


def make_data(folder, documents=40):
    """A corpus of standard-library snippets and a 400-token tokenizer in folder; returns the
    tiny run's train.py arguments (without --max-steps and --out)."""
    corpus = Path(folder) / "corpus"
    corpus.mkdir()
    texts = []
    for i, path in enumerate([p for p in stdlib_python_files() if p.stat().st_size > 3000][:documents]):
        texts.append(path.read_bytes().decode("utf-8", errors="replace")[:[60, 150, 400, 1500][i % 4]])
        (corpus / f"doc{i:02d}.py").write_text(texts[-1], encoding="utf-8")
    Tokenizer.train(texts, vocab_size=400).save(Path(folder) / "tokenizer.json")
    return ["--config", "tiny", "--data", str(corpus), "--tokenizer", str(Path(folder) / "tokenizer.json"),
            "--rows", "32", "--val-rows", "4", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
            "--save-every", "1", "--eval-samples", "2"]


def start(argv, kill_at=0, report="-"):
    """train.py with these arguments in a child process (CHILD). Every child gets the same
    environment, so the same worker threads: their gradient sums are then the same bytes."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", ALBOR_DEVICE="cpu", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(kill_at), report] + [str(a) for a in argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(folder):
    """What an interrupted save leaves in folder: .saving/, .committed/, .NAME.PID.tmp files."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n in LEFTOVERS or (n.startswith(".") and n.endswith(".tmp")))


def reference_run(train_args, folder):
    """The uninterrupted run into folder: (its file operations, its wall seconds)."""
    report = Path(folder).with_suffix(".ops.json")
    started = time.perf_counter()
    child = start(train_args + ["--out", folder], report=report)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{err[-2000:]}")
    return json.loads(report.read_text()), time.perf_counter() - started


def kill_and_resume(train_args, folder, reference, kind, when):
    """One kill: the run into folder killed (kind "timed": after `when` seconds; "file": after
    its `when`-th file operation), then finished. Returns a dict of what happened and
    "problems": [] when the folder ended as the reference did."""
    child = start(train_args + ["--out", folder], kill_at=when if kind == "file" else 0)
    if kind == "timed":
        time.sleep(when)
        child.kill()
    child.communicate()
    result = {"kind": kind, "when": when, "killed": child.returncode == -9,
              "left": leftovers(folder), "step": saved_step(folder)}
    command = ["--resume", folder] if checkpoint.holds_checkpoint(folder) else train_args + ["--out", folder]
    resumed = start(command)
    _, err = resumed.communicate()
    if resumed.returncode != 0:
        result["problems"] = [f"the resume failed: {err.strip().splitlines()[-1] if err.strip() else '?'}"]
        return result
    result["problems"] = differences(folder, reference)
    return result


def saved_step(folder):
    """The step trainer_state.json records in folder (as it is, before any recovery), or None."""
    try:
        return json.loads((Path(folder) / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def differences(folder, reference):
    """How a finished run folder differs from the reference run's: [] if it does not."""
    folder, reference = Path(folder), Path(reference)
    problems = [f"{name} differs" for name in ("model.safetensors", "optimizer.safetensors")
                if (folder / name).read_bytes() != (reference / name).read_bytes()]

    def losses(path):
        return [(m["step"], m["loss"]) for m in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]

    if losses(folder) != losses(reference):
        problems.append("metrics.jsonl differs")
    val = [json.loads((p / "final_model.json").read_text())["val_loss"] for p in (folder, reference)]
    if val[0] != val[1]:
        problems.append(f"val_loss {val[0]} != {val[1]}")
    if leftovers(folder):
        problems.append(f"left over: {leftovers(folder)}")
    return problems


def plan_kills(ops, seconds, kills, rng):
    """[(kind, when)]: kills taking turns between timed and file kills; every fourth file kill in
    the final saves (the operations after the third-last commit)."""
    commits = [i for i, op in enumerate(ops, 1) if op[0] == "rename" and op[-1].endswith(checkpoint.COMMITTED)]
    plan = []
    for n in range(kills):
        if n % 2 == 0:
            plan.append(("timed", round(rng.uniform(0.0, 0.9 * seconds), 2)))
        elif n % 8 == 7:
            plan.append(("file", rng.randint(commits[-3] + 1, len(ops))))
        else:
            plan.append(("file", rng.randint(1, len(ops))))
    return plan


def describe(n, result, ops):
    def short(path):   # "x/run3/.committed/config.json" -> ".committed/config.json"
        folder, name = Path(path).parent.name, Path(path).name
        return f"{folder}/{name}" if folder.startswith(".") else name

    when = (f"after {result['when']:.2f} s" if result["kind"] == "timed"
            else f"after op {result['when']} ({' '.join(short(a) for a in ops[result['when'] - 1])})")
    step = "no trainer_state" if result["step"] is None else f"trainer_state at step {result['step']}"
    state = (f"killed, {step}, left over: {', '.join(result['left']) or 'nothing'}"
             if result["killed"] else "finished before the kill")
    verdict = "same bytes" if not result["problems"] else "FAILED: " + "; ".join(result["problems"])
    return f"kill {n:2d} {result['kind']:5s} {when:46s} {state} -> resumed: {verdict}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40, help="how many runs to kill (default 40)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of a run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan (default 0)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_args = make_data(tmp) + ["--max-steps", str(args.steps)]
        reference = os.path.join(tmp, "reference")
        ops, seconds = reference_run(train_args, reference)
        print(f"reference: {args.steps} steps, {len(ops)} file operations, {seconds:.1f} s wall "
              f"(load average {os.getloadavg()[0]:.2f})")
        results = []
        for n, (kind, when) in enumerate(plan_kills(ops, seconds, args.kills, rng), 1):
            results.append(kill_and_resume(train_args, os.path.join(tmp, f"run{n}"), reference, kind, when))
            print(describe(n, results[-1], ops), flush=True)
    killed = [r for r in results if r["killed"]]
    failed = [r for r in results if r["problems"]]
    print(f"{len(results)} runs, {len(killed)} killed ({sum(r['kind'] == 'file' for r in killed)} at a file "
          f"operation, {sum(r['kind'] == 'timed' for r in killed)} timed), {sum(bool(r['left']) for r in killed)} "
          f"left a save's leftovers behind, {sum(r['step'] is None for r in killed)} had no checkpoint yet; "
          f"{len(results) - len(failed)} of {len(results)} resumed to the same bytes with nothing left over")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
