"""Every exercise checker of the workshop (notebooks/checks.py) rejects typical wrong answers,
each with the hint that names the mistake.

The wrong answers are written as an attendee would write them (the checkers recognise a
mistake by its result, not by its code). The notebooks' own runs (tests/test_notebooks.py)
prove the other two verdicts: "not written yet" for every stub as shipped, "right ✓" for
every answer in notebooks/answers/. The kernel exercises build in the CPU emulator (g++).
"""
import contextlib
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.oracles import oracle

oracle("nbformat")  # notebooks/workshop.py reads the notebooks with it (a dev requirement)
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import checks  # noqa: E402
import workshop  # noqa: E402
from albor import xp  # noqa: E402
from tokenizer import merge_pair, split_text  # noqa: E402


def verdict(check, answer):
    """The last line a checker prints for answer."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check(answer)
    return out.getvalue().strip().splitlines()[-1]


def answer_key(name):
    """The answers of every notebook, run: {exercise name: the answer (function or source)}."""
    namespace = {}
    for notebook in workshop.LEARNER_PATH:
        for source in workshop.answers(notebook).values():
            exec(source, namespace)
    return namespace[name]


def mutated(name, old, new):
    """The answer key's kernel source `name` with old replaced by new (the mistake)."""
    source = answer_key(name)
    assert old in source, (name, old)
    return source.replace(old, new)


# --- notebook 1 ---

def merge_only_first(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2:]
    return ids


def merge_without_skipping(ids, pair, new_id):
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        else:
            out.append(ids[i])
    return out


def merge_dropping_the_last(ids, pair, new_id):
    out, skip = [], False
    for i in range(len(ids) - 1):   # the mistake: the loop never visits the last id on its own
        if not skip:
            merged = (ids[i], ids[i + 1]) == pair
            out.append(new_id if merged else ids[i])
        skip = not skip and merged
    return out


def merge_in_place(ids, pair, new_id):
    i = 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            ids[i:i + 2] = [new_id]
        i += 1
    return ids


def encode_leftmost_first(text, merges):
    ids = []
    for chunk in split_text(text):
        chunk_ids, i = list(chunk.encode("utf-8")), 0
        while i < len(chunk_ids) - 1:
            pair = (chunk_ids[i], chunk_ids[i + 1])
            if pair in merges:
                chunk_ids[i:i + 2] = [merges[pair]]
                i = 0
            else:
                i += 1
        ids += chunk_ids
    return ids


def encode_one_merge(text, merges):
    ids = []
    for chunk in split_text(text):
        chunk_ids = list(chunk.encode("utf-8"))
        learned = [pair for pair in zip(chunk_ids, chunk_ids[1:]) if pair in merges]
        if learned:
            best = min(learned, key=merges.get)
            chunk_ids = merge_pair(chunk_ids, best, merges[best])
        ids += chunk_ids
    return ids


def encode_without_split(text, merges):
    ids = list(text.encode("utf-8"))
    for pair, new_id in merges.items():   # learned order: right, but across chunk boundaries
        ids = merge_pair(ids, pair, new_id)
    return ids


# --- notebook 2 ---

def rmsnorm_layernorm(x, weight, eps):
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / xp.sqrt((centered ** 2).mean(axis=-1, keepdims=True) + eps) * weight


def rmsnorm_eps_outside(x, weight, eps):
    return x / (xp.sqrt((x * x).mean(axis=-1, keepdims=True)) + eps) * weight


def rmsnorm_over_rows(x, weight, eps):
    return x / xp.sqrt((x * x).mean(axis=0, keepdims=True) + eps) * weight


def attention(mask="future", softmax_axis=-1, scale=True, mask_after_softmax=False):
    """An attendee's attention with one choice wrong."""
    def my_attention(q, k, v):
        T, D = q.shape[-2:]
        scores = q @ k.transpose(0, 1, 3, 2)
        if scale:
            scores = scores / math.sqrt(D)
        t, s = xp.arange(T)[:, None], xp.arange(T)[None, :]
        hidden = {"future": s > t, "strict": s >= t, "none": xp.zeros((T, T), dtype=bool)}[mask]
        if not mask_after_softmax:
            scores = xp.where(hidden, -xp.inf, scores)
        with np.errstate(invalid="ignore"):   # a fully masked row (mask="strict") is NaN
            probs = xp.exp(scores - scores.max(axis=softmax_axis, keepdims=True))
            probs = probs / probs.sum(axis=softmax_axis, keepdims=True)
        if mask_after_softmax:
            probs = xp.where(hidden, 0.0, probs)
        return probs @ v
    return my_attention


# --- notebook 3 ---

def rmsnorm_backward_rstd_constant(dout, x, weight, rstd):
    return dout * weight * rstd, (dout * x * rstd).sum(axis=0)


def rmsnorm_backward_dweight_per_row(dout, x, weight, rstd):
    dx, _ = answer_key("my_rmsnorm_backward")(dout, x, weight, rstd)
    return dx, dout * x * rstd


def rmsnorm_backward_dweight_from_x(dout, x, weight, rstd):
    dx, _ = answer_key("my_rmsnorm_backward")(dout, x, weight, rstd)
    return dx, (dout * x).sum(axis=0)


def swiglu_backward_no_product_rule(dh, gate, up):
    sig = 1 / (1 + xp.exp(-gate))
    return dh * up * sig, dh * gate * sig


def swiglu_backward_swapped(dh, gate, up):
    dgate, dup = answer_key("my_swiglu_backward")(dh, gate, up)
    return dup, dgate


# --- notebook 5 ---

def adamw(bias_correction=True, l2=False, eps_inside=False):
    """An attendee's AdamW update with one choice wrong."""
    def my_adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
        if l2:
            g = g + weight_decay * p
        else:
            p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        m_hat = m / (1 - beta1 ** t) if bias_correction else m
        v_hat = v / (1 - beta2 ** t) if bias_correction else v
        denominator = xp.sqrt(v_hat + eps) if eps_inside else xp.sqrt(v_hat) + eps
        return p - lr * m_hat / denominator, m, v
    return my_adamw_update


def lr_schedule(warmup_rate=lambda step, warmup: step / (warmup + 1), floor=True):
    """An attendee's schedule with one choice wrong."""
    def my_lr_at(step, max_steps, lr, warmup, min_lr):
        if step <= warmup:
            return lr * warmup_rate(step, warmup)
        low = min_lr if floor else 0.0
        if step > max_steps:
            return low
        progress = (step - warmup - 1) / max(1, max_steps - warmup - 1)
        return low + (lr - low) * (1 + math.cos(math.pi * progress)) / 2
    return my_lr_at


ROW_MAX_LOOP = "for (int c = lane; c < C; c += 32)"
SHUFFLE_LOOP = "for (int offset = 16; offset > 0; offset /= 2)"

WRONG_ANSWERS = [   # (checker, wrong answer, a words of the hint it must give)
    ("check_merge", merge_only_first, "only the first occurrence"),
    ("check_merge", merge_without_skipping, "skip the pair's second id"),
    ("check_merge", merge_dropping_the_last, "the last id is lost"),
    ("check_merge", merge_in_place, "do not change the list you were given"),
    ("check_encode", encode_leftmost_first, "merged the leftmost learned pair first"),
    ("check_encode", encode_one_merge, "stopped after one merge"),
    ("check_encode", encode_without_split, "split_text first"),
    ("check_rmsnorm", rmsnorm_layernorm, "that is LayerNorm"),
    ("check_rmsnorm", rmsnorm_eps_outside, "eps goes inside the square root"),
    ("check_rmsnorm", rmsnorm_over_rows, "not over the rows"),
    ("check_attention", attention(mask="none"), "no causal mask"),
    ("check_attention", attention(softmax_axis=-2), "softmax over the wrong axis"),
    ("check_attention", attention(scale=False), "1/sqrt(D) is missing"),
    ("check_attention", attention(mask_after_softmax=True), "BEFORE the softmax"),
    ("check_attention", attention(mask="strict"), "itself included"),
    ("check_rmsnorm_backward", rmsnorm_backward_rstd_constant, "rstd depends on x too"),
    ("check_rmsnorm_backward", rmsnorm_backward_dweight_per_row, "sum over the rows"),
    ("check_rmsnorm_backward", rmsnorm_backward_dweight_from_x, "dweight multiplies xhat"),
    ("check_swiglu_backward", swiglu_backward_no_product_rule, "product"),
    ("check_swiglu_backward", swiglu_backward_swapped, "swapped"),
    ("check_adamw_update", adamw(bias_correction=False), "no bias correction"),
    ("check_adamw_update", adamw(l2=True), "Adam with L2"),
    ("check_adamw_update", adamw(eps_inside=True), "eps is added after the square root"),
    ("check_lr_at", lr_schedule(lambda step, warmup: step / warmup), "reaches the peak at step"),
    ("check_lr_at", lr_schedule(lambda step, warmup: (step - 1) / warmup), "first step has learning rate 0"),
    ("check_lr_at", lr_schedule(floor=False), "ends at min_lr"),
]
KERNEL_MISTAKES = [   # (checker, answer key, replaced, replacement, a words of the hint)
    ("check_row_max", "MY_ROW_MAX", "float m = NEG_INF;", "float m = 0.0f;", "start the running max at NEG_INF"),
    ("check_row_max", "MY_ROW_MAX", SHUFFLE_LOOP, "for (int offset = 0; offset > 0; offset /= 2)",
     "combine the 32 lanes first"),
    ("check_row_max", "MY_ROW_MAX", "if (row >= rows) return;", "", "return early when the row index"),
    ("check_row_max", "MY_ROW_MAX", ROW_MAX_LOOP, "for (int c = lane; c < 32; c += 32)",
     "loop over its columns"),
    ("check_naive_attention", "MY_NAIVE_ATTENTION", "s <= t", "s < T", "no causal mask"),
    ("check_naive_attention", "MY_NAIVE_ATTENTION", "h / (H / KVH)", "h % KVH", "not h % KVH"),
    ("check_naive_attention", "MY_NAIVE_ATTENTION", "if (row >= B * H * T) return;", "",
     "return early when the row index"),
    ("check_naive_attention", "MY_NAIVE_ATTENTION", "o[d] /= sum;", "o[d] /= 1.0f;",
     "divide by the sum of the exponentials"),
    ("check_naive_attention", "MY_NAIVE_ATTENTION", "const float scale = rsqrtf((float)D);",
     "const float scale = 1.0f;", "1/sqrt(D) is missing"),
]


@pytest.mark.parametrize("check, answer, hint", WRONG_ANSWERS,
                         ids=[f"{c}-{getattr(a, '__name__', '?')}-{i}" for i, (c, a, _) in enumerate(WRONG_ANSWERS)])
def test_checker_rejects_a_typical_mistake_with_its_hint(check, answer, hint):
    said = verdict(getattr(checks, check), answer)
    assert said.startswith(checks.WRONG) and hint in said, said


@pytest.mark.parametrize("check, name, old, new, hint", KERNEL_MISTAKES,
                         ids=[f"{c}-{i}" for i, (c, *_) in enumerate(KERNEL_MISTAKES)])
def test_kernel_checker_rejects_a_typical_mistake_with_its_hint(check, name, old, new, hint):
    said = verdict(getattr(checks, check), mutated(name, old, new))
    assert said.startswith(checks.WRONG) and hint in said, said


def test_kernel_checker_reports_a_compile_error_and_wrong_parameters():
    broken = mutated("MY_ROW_MAX", "float m = NEG_INF;", "float m = NEG_INF")   # a missing ;
    said = verdict(checks.check_row_max, broken)
    assert said.startswith(checks.WRONG) and "does not compile: line 7: error:" in said, said   # the line after the missing ;
    renamed = mutated("MY_ROW_MAX", "int rows, int C", "int C, int rows")
    assert "keep the parameters as given" in verdict(checks.check_row_max, renamed)
    assert "define the kernel" in verdict(checks.check_row_max, "// nothing here")


def test_checker_says_what_an_answer_that_raises_did():
    def crashes(*args):
        return [][0]
    said = verdict(checks.check_merge, crashes)
    assert said.startswith(checks.WRONG) and "IndexError" in said, said


def test_every_exercise_has_a_checker_and_a_wrong_answer_here():
    """>= 2 exercises a notebook, >= 10 in all, and each one's checker is tested above."""
    exercises = {name: workshop.exercise_cells(workshop.read(name)) for name in workshop.LEARNER_PATH}
    assert all(len(cells) >= 2 for cells in exercises.values()), {n: list(c) for n, c in exercises.items()}
    assert sum(len(cells) for cells in exercises.values()) >= 10
    tested = {check for check, *_ in WRONG_ANSWERS + KERNEL_MISTAKES}
    for name in workshop.LEARNER_PATH:
        nb = workshop.read(name)
        checked = [cell.source for cell in nb.cells if "check" in workshop.tags(cell)]
        assert len(checked) == len(exercises[name])
        for source in checked:
            assert any(f"checks.{check}(" in source for check in tested), source
