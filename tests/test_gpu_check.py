"""tests/gpu_check.sh, proven on a machine without a GPU.

A device session is short and hands back at most 8 files, so the script must fit its time
budget on paper, say through its exit status whether every step passed, and return its logs as
one archive plus one summary. Here it runs with a stand-in for Python that answers every step
at once (and fails one), in a copy of the script, so nothing is written into the checkout.
"""
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"
BUDGET = 540  # seconds of GPU time the whole check may take

# A stand-in for python: train.py writes a checkpoint folder (--out), --dtype bf16 fails.
FAKE_PYTHON = """#!/usr/bin/env bash
out=""; previous=""
for arg in "$@"; do [ "$previous" = --out ] && out=$arg; previous=$arg; done
case "$*" in *"--dtype bf16"*) echo "bf16 broke" >&2; exit 3;; esac
if [ -n "$out" ]; then
    mkdir -p "$out" && echo '{"steps": 31, "timing": {"train_seconds": 1.0}}' > "$out/final_model.json"
    echo weights > "$out/model.safetensors"
fi
echo "fake python: $*"
"""


def run_with_fake_python(tmp_path, fake_python):
    """Run a copy of the script (in tmp_path/repo) with PYTHON=fake_python and OUT=tmp_path/out."""
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "tests" / "gpu_check.sh")
    python = tmp_path / "python"
    python.write_text(fake_python)
    python.chmod(0o755)
    return subprocess.run(["bash", str(repo / "tests" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OUT": str(out), "PYTHON": str(python)})


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_plan_fits_the_budget_and_matches_the_table_on_paper():
    """--dry-run prints each step's limit and command; the limits are the ones of the comment
    table at the top, they add up to its "sum" line, and that plus the slack fits 540 s.
    The steps run only train.py, bench.py and pytest: no albor internals by name."""
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = {name: int(limit) for name, limit in re.findall(r"^(\w+) +(\d+) s   ", result.stdout, re.M)}
    table = {name: int(limit) for name, limit in re.findall(r"^#   (\w+) +(\d+) s\b", SCRIPT.read_text(), re.M)}
    steps, slack, budget = table.pop("sum"), table.pop("slack"), table.pop("budget")
    assert plan == table
    assert sum(plan.values()) == steps and f"add up to {steps} s" in result.stdout
    assert steps + slack == budget <= BUDGET
    assert {"gpu_tests", "kernel_tests", "train_cold", "train_warm", "bench", "attention"} <= set(plan)
    for line in result.stdout.splitlines()[:-1]:
        command = line.split(" s   ", 1)[1]
        assert re.search(r"python3 (-$|-m pytest |train\.py |bench\.py )", command), line


def test_a_failed_step_fails_the_check_and_every_log_comes_back_in_one_archive(tmp_path):
    result = run_with_fake_python(tmp_path, FAKE_PYTHON)
    out = tmp_path / "out"
    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^train_bf16 +FAILED \(exit 3\)", summary, re.M), summary
    assert summary.splitlines()[-1].endswith("FAILED: train_bf16"), summary
    assert "determinism: the two fp32 runs wrote the same model.safetensors bytes" in summary
    with tarfile.open(out / "gpu_check_logs.tar.gz") as archive:
        names = set(archive.getnames())
        assert "bf16 broke" in archive.extractfile("logs/train_bf16.log").read().decode()
    for step in ("machine", "gpu_tests", "kernel_tests", "train_cold", "train_reference", "bench", "attention"):
        assert f"logs/{step}.log" in names
    assert "logs/train_cold.final_model.json" in names


def test_every_step_passing_exits_zero(tmp_path):
    result = run_with_fake_python(tmp_path, FAKE_PYTHON.replace('"--dtype bf16"', '"--dtype none"'))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "summary.txt").read_text().splitlines()[-1].endswith("every step ok")
