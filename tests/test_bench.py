"""bench.py runs end to end on the tiny config and prints every figure it promises.

Timings are never asserted (the machines are shared and noisy); only that each figure
is printed, is a positive number, and reflects the settings given.
"""
import re
import sys

import pytest

import albor
import bench
import cpu
from tests.oracles import oracle


def number_after(label, out):
    """The first number printed after `label` on its line."""
    match = re.search(re.escape(label) + r"[^\n]*?(\d+(?:\.\d+)?(?:e[-+]\d+)?)", out)
    assert match, f"{label!r} not in the output:\n{out}"
    return float(match.group(1))


def run_bench(argv, capsys):
    assert bench.main(argv) == 0
    return capsys.readouterr().out


def check_albor_figures(out, batch_size, seq_len, repeats):
    tokens = batch_size * seq_len
    assert f"micro-batch {batch_size} x {seq_len} = {tokens} tokens" in out
    assert "BLAS" in out or "blas" in out
    # the GEMM table uses the micro-batch's token count as the rows of the forward products
    assert re.search(rf"q_proj, o_proj forward +\({tokens},64\) @ \(64,64\)", out)
    assert number_after("GEMM mix:", out) > 0
    assert re.search(r"= \d+\.\d+ GFLOP/s", out)
    assert "6 * params * tokens" in out
    assert f"median of {repeats} after" in out
    assert "MFU = the GEMM-bound floor / the time" in out
    assert number_after("the matmuls of a micro-batch alone:", out) > 0
    assert "targets: albor MFU >= 80%" in out
    assert "clip the gradient norm to 1.0, AdamW lr" in out
    assert "albor's worker threads (cpu.DataParallel, as train.py):" in out
    for label in ["forward", "backward", "optimizer / 4", "step / micro-batches", "tokens/s", "MFU"]:
        assert number_after(f"\n  {label} ", out) > 0
    for kind in ["matmuls", "attention", "norms/elementwise", "cross-entropy", "optimizer"]:
        assert re.search(rf"\n  {re.escape(kind)} +\d+\.\d ms +-?\d+\.\d%", out), kind


def test_bench_tiny_with_pytorch(capsys):
    oracle("torch")  # a dev requirement: skipped without it
    out = run_bench(["--config", "tiny", "--repeats", "1", "--batch-size", "2", "--seq-len", "16"], capsys)
    check_albor_figures(out, batch_size=2, seq_len=16, repeats=1)
    # the same loss before the run, and after the same updates (so the optimizers agree too)
    differences = [float(d) for d in re.findall(r"\|difference\| (\S+)\n", out)]
    assert len(differences) == 2 and max(differences) <= 1e-4, differences
    assert "the matmuls alone, albor and PyTorch, in turn" in out
    assert "albor/PyTorch <= 0.9" in out
    ratio = re.search(r"\n  step / micro-batches +\d+\.\d ms +\d+\.\d ms +(\d+\.\d+)\n", out)
    assert ratio and float(ratio.group(1)) > 0


def test_bench_tiny_without_pytorch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    out = run_bench(["--config", "tiny", "--repeats", "2"], capsys)
    check_albor_figures(out, batch_size=4, seq_len=128, repeats=2)
    assert "PyTorch: not installed" in out
    assert "albor/PyTorch" not in out


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "257", "--config", "tiny"], "longer than tiny's max_position_embeddings 256"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--grad-accum", "0"], "must be at least 1"),
    (["--train-steps", "0"], "--train-steps must be at least 1"),
    (["--attention", "--train-steps", "2"], "separate benchmarks"),
    (["--tokenizer", "--attention"], "separate benchmarks"),
    (["--tokenizer", "--vocab-size", "100"], "--vocab-size at least 258"),
    (["--config", "nope"], "invalid choice"),
    (["--attention", "--seq-len", "64"], "--attention sweeps --batch-sizes and --seq-lens"),
    (["--seq-lens", "64"], "only apply with --attention"),
    (["--attention", "--batch-sizes", "0"], "must be at least 1"),
])
def test_bench_rejects_bad_settings(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def attention_rows(out):
    """{(B, T): [ms or ratio, ...]} from --attention's table."""
    return {(int(b), int(t)): [float(x) for x in rest.split()]
            for b, t, rest in re.findall(r"\n +(\d+) +(\d+)((?: +\d+\.\d+)+)(?=\n|$)", out)}


def test_bench_attention_with_pytorch(capsys):
    oracle("torch")  # a dev requirement: skipped without it
    out = run_bench(["--attention", "--batch-sizes", "1", "2", "--seq-lens", "16", "33", "--repeats", "1"], capsys)
    assert "H=8 query heads, KVH=2 KV heads, D=64" in out  # albor-base-50m's heads
    assert "median of 1 after 1 warmup" in out
    assert "scaled_dot_product_attention(is_causal=True, enable_gqa=True) on cpu" in out
    # the first shape's agreement check ran and passed (a failure stops the run)
    difference = re.search(r"agreement at B=1, T=16, .*: PyTorch (\S+) \(tolerance", out)
    assert difference and float(difference.group(1)) <= 1e-4, out
    assert re.search(r"B +T +reference ms +PyTorch ms +reference/PyTorch\n", out)
    rows = attention_rows(out)
    assert sorted(rows) == [(1, 16), (1, 33), (2, 16), (2, 33)]
    for reference_ms, torch_ms, ratio in rows.values():
        assert reference_ms > 0 and torch_ms > 0 and ratio > 0  # (printed rounded: not re-derived)


def test_bench_attention_without_pytorch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    out = run_bench(["--attention", "--config", "tiny", "--seq-lens", "8", "--repeats", "2"], capsys)
    assert "H=4 query heads, KVH=2 KV heads, D=16" in out  # tiny's heads: --config applies
    assert "median of 2 after 1 warmup" in out
    assert "PyTorch: not installed" in out and "agreement" not in out
    rows = attention_rows(out)
    assert list(rows) == [(4, 8)]  # the CPU's default batch size, 4
    assert len(rows[(4, 8)]) == 1 and rows[(4, 8)][0] > 0


def test_bench_attention_rejects_a_disagreeing_path(capsys, monkeypatch):
    oracle("torch")
    right = albor.attention_forward

    def off_by_one(q, k, v):
        out, lse = right(q, k, v)
        return out + 1.0, lse
    monkeypatch.setattr(albor, "attention_forward", off_by_one)
    with pytest.raises(SystemExit, match="PyTorch and the reference differ by"):
        bench.main(["--attention", "--batch-sizes", "1", "--seq-lens", "16", "--repeats", "1"])


def test_bench_times_train_pys_step_of_grad_accum_micro_batches(capsys):
    """Each repeat is a train.py step of --grad-accum micro-batches (default: train.py's);
    every figure is per micro-batch, and the phases add up to the step."""
    import train
    assert bench.GRAD_ACCUM == train.DEFAULTS["grad_accum"]
    out = run_bench(["--config", "tiny", "--repeats", "1", "--grad-accum", "8", "--batch-size", "2",
                     "--seq-len", "16"], capsys)
    assert "A step as train.py takes it (its train_step): 8 micro-batches" in out
    row = {phase: number_after(f"\n  {phase} ", out)
           for phase in ["forward", "backward", "optimizer / 8", "step / micro-batches"]}
    parts = row["forward"] + row["backward"] + row["optimizer / 8"]
    assert parts <= row["step / micro-batches"] + 0.2, row  # the step also converts the batches


def test_bench_whole_run_takes_train_pys_steps_beside_pytorch(capsys):
    """--train-steps: both trainers take the same steps (schedule, clipping, AdamW, gradient
    accumulation) from the same start, so they end at the same loss; each prints its time."""
    oracle("torch")  # a dev requirement: skipped without it
    out = run_bench(["--config", "tiny", "--train-steps", "3", "--grad-accum", "2", "--batch-size", "2",
                     "--seq-len", "16"], capsys)
    assert "Whole run: 3 optimizer steps x 2 micro-batches of 2 x 16 tokens = 192 tokens" in out
    assert "loss at step 3" in out
    rows = re.findall(r"\n  (albor|PyTorch) +(\d+\.\d+) +(\d+) +(\d+\.\d)% +(\S+)", out)
    assert [row[0] for row in rows] == ["albor", "PyTorch"], out
    for name, seconds, tokens_per_s, mfu, loss in rows:
        assert float(seconds) > 0 and int(tokens_per_s) > 0 and float(mfu) > 0, name
    losses = [float(row[4]) for row in rows]
    assert abs(losses[0] - losses[1]) <= 1e-3, losses
    assert number_after("albor/PyTorch", out) > 0


def test_bench_tokenizer_beside_hugging_face(capsys):
    out = run_bench(["--tokenizer", "--lines", "1500", "--vocab-size", "600"], capsys)
    assert "first 1500 lines" in out and "(600 tokens)" in out
    assert "MB/s warm" in out
    oracle("tokenizers")  # the comparison with Hugging Face's needs it: skipped here without it
    assert "albor vs tokenizers" in out


def test_bench_ranks_times_train_py_over_mpi_ranks_and_one_process(capsys):
    from tests.oracles import mpiexec
    mpiexec()  # mpi4py and an mpiexec (requirements-mpi.txt): skipped without them
    out = run_bench(["--ranks", "2", "--config", "tiny", "--train-steps", "2", "--batch-size", "2",
                     "--seq-len", "16", "--grad-accum", "2"], capsys)
    assert "2 steps of 2 x 2 x 16 tokens per run: one process and mpiexec -n 2, taking turns" in out
    assert number_after("  one process ", out) > 0
    assert "2 MPI ranks of 1 worker thread each" in out
    assert number_after("mpiexec -n 2 / one process:", out) > 0
    assert re.search(r"model.safetensors of the two: (byte-identical|different bytes)", out)
    assert number_after("load average before:", out) >= 0 and number_after("load average after:", out) >= 0


def test_bench_ranks_needs_two_or_more():
    with pytest.raises(SystemExit):
        bench.parse_args(["--ranks", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--ranks", "2", "--tokenizer"])
