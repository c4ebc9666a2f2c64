"""Checkers for the workshop's exercises: `check_X(your_answer)` says whether it is right.

Each checker runs your function (or, in notebook 4, your CUDA kernel) on inputs of its own and
compares the result with albor's own code, the code train.py runs. It prints its verdict as
the last line:

    not written yet: ...   your cell still holds the stub (it raises NotImplementedError, or
                           the kernel's body is empty): the notebook runs on regardless;
    wrong ✗: <hint>        a wrong result. When it is the result a typical mistake gives (no
                           causal mask, softmax over the wrong axis, no bias correction, ...),
                           the hint names that mistake; otherwise it shows an input it got wrong;
    right ✓                right on every input.

The typical mistakes are written out below as small functions (`_MISTAKES` tables): a checker
recognises one by giving the same wrong result.
"""
import functools
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import albor  # noqa: E402  (after the path)
from albor import to_numpy, xp  # noqa: E402
from tokenizer import Tokenizer, merge_pair, split_text  # noqa: E402

RIGHT, WRONG, NOT_WRITTEN = "right ✓", "wrong ✗", "not written yet"


class NotWritten(Exception):
    """The answer is still the stub."""


class Wrong(Exception):
    """The answer is wrong; the message is the hint."""


def checker(what):
    """Decorator: body(answer) raises NotWritten or Wrong, or returns when the answer is right.
    The decorated function prints the verdict line and returns nothing."""
    def decorate(body):
        @functools.wraps(body)
        def check(answer):
            try:
                body(answer)
            except NotWritten:
                print(f"{NOT_WRITTEN}: fill in {what}, run its cell, then run this one again")
            except Wrong as wrong:
                print(f"{WRONG}: {wrong}")
            else:
                print(RIGHT)
        return check
    return decorate


def call(function, *args):
    """function(*args); NotWritten if it raises NotImplementedError, Wrong if anything else."""
    try:
        return function(*args)
    except NotImplementedError:
        raise NotWritten from None
    except Exception as error:
        raise Wrong(f"calling it raised {type(error).__name__}: {error}") from None


def first(result):
    """The first element of a tuple answer (some return (out, extra) like albor does)."""
    return result[0] if isinstance(result, tuple) else result


def same(got, want, rtol=1e-6, atol=1e-9):
    """Whether two arrays have one shape and agree to rtol (NaN never agrees)."""
    got, want = np.asarray(to_numpy(got), dtype=np.float64), np.asarray(to_numpy(want), dtype=np.float64)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=rtol, atol=atol))


def compare(name, got, want, mistakes, rtol=1e-6, atol=1e-9):
    """Return if got equals want; else raise Wrong naming the first typical mistake whose
    result got equals. mistakes: {hint: the wrong result}. float32 answers need rtol/atol 1e-5."""
    got = np.asarray(to_numpy(got), dtype=np.float64)
    want = np.asarray(to_numpy(want), dtype=np.float64)
    if got.shape != want.shape:
        raise Wrong(f"{name} has shape {got.shape}, it should be {want.shape}")
    if same(got, want, rtol, atol):
        return
    for hint, wrong in mistakes.items():
        if same(got, wrong, rtol, atol):
            raise Wrong(f"{name}: {hint}")
    if np.isnan(got).any():
        raise Wrong(f"{name} holds NaN: look for a division by zero, or a row of scores that "
                    "is -inf everywhere")
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
    raise Wrong(f"{name} is off (relative error {error:.1e}); compare your formula with the "
                "one above, step by step")


def random_arrays(seed, *shapes, scale=1.0):
    """float64 standard-normal arrays on albor's device (a checker's own inputs)."""
    rng = np.random.default_rng(seed)
    return [xp.asarray(rng.standard_normal(shape) * scale) for shape in shapes]


# =============================================================================================
# Notebook 1: BPE merge and encode
# =============================================================================================

MERGE_CASES = [([97, 97, 97, 98], (97, 97), 258), ([1, 2, 3, 1, 2], (1, 2), 300),
               ([5, 1, 2], (1, 2), 9), ([1, 2, 1, 2, 1], (2, 1), 7), ([97] * 4, (97, 97), 258),
               ([1, 2, 3], (3, 1), 8), ([4, 5, 6], (5, 6), 9), ([], (1, 2), 5), ([7], (7, 7), 9)]


def _merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def _merge_without_skipping(ids, pair, new_id):
    return [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:])] + ids[-1:]


def _merge_dropping_the_last(ids, pair, new_id):
    merged = merge_pair(ids, pair, new_id)
    return merged[:-1] if ids and merged[-1] == ids[-1] else merged


def _merge_from_the_right(ids, pair, new_id):
    return merge_pair(ids[::-1], pair[::-1], new_id)[::-1]


MERGE_MISTAKES = {
    "you replaced only the first occurrence: keep scanning to the end": _merge_first_only,
    "after a merge, skip the pair's second id: it is now part of the new token":
        _merge_without_skipping,
    "the last id is lost when it is not part of a merge: copy it too": _merge_dropping_the_last,
    "scan from the left: in [a, a, a] the pair (a, a) that merges is the first two":
        _merge_from_the_right,
}


@checker("my_merge")
def check_merge(my_merge):
    """my_merge(ids, pair, new_id) -> a new list with every pair replaced, left to right."""
    for ids, pair, new_id in MERGE_CASES:
        given = list(ids)
        got = call(my_merge, given, pair, new_id)
        if given != ids:
            raise Wrong("do not change the list you were given: build a new one and return it")
        if got is None:
            raise Wrong("return the new list")
        want = merge_pair(ids, pair, new_id)
        if list(got) == want:
            continue
        shown = f"my_merge({ids}, {pair}, {new_id}) gave {list(got)}, it should be {want}"
        for hint, mistake in MERGE_MISTAKES.items():
            if mistake(ids, pair, new_id) == list(got):
                raise Wrong(f"{shown}; {hint}")
        raise Wrong(shown)


ENCODE_TRAINING_TEXT = """def add(a, b):
    return a + b


def scale(values, factor):
    return [value * factor for value in values]
"""
A, B, C, SPACE = 97, 98, 99, 32
ENCODE_HAND_MADE = [   # (text, merges) that tell the typical mistakes apart
    ("abc", {(A, B): 258, (B, C): 259}),                 # latest-learned first: a + bc
    ("abc", {(B, C): 258, (A, B): 259, (A, 258): 260}),  # leftmost first: ab + c; one merge: a + bc
    ("a b", {(A, SPACE): 258, (SPACE, B): 259}),         # across chunks: "a " + b
]
ENCODE_TEXTS = ["def add(a, b):\n    return a + b\n", "values = scale(values, 2)\n",
                "return self.value\n", "", "naïve → café\n"]

def _encode_chunks(text, merges, encode_chunk, split=True):
    chunks = split_text(text) if split else [text]
    return [i for chunk in chunks for i in encode_chunk(list(chunk.encode("utf-8")), merges)]


def _chunk_leftmost_first(ids, merges):
    """Merge the leftmost learned pair, repeatedly (position order instead of learned order)."""
    while True:
        spots = [i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) in merges]
        if not spots:
            return ids
        i = spots[0]
        ids = ids[:i] + [merges[ids[i], ids[i + 1]]] + ids[i + 2:]


def _chunk_by_rank(ids, merges, pick, repeat=True):
    """Merge the learned pair pick (min or max by id) chooses, everywhere; repeat (or not)."""
    while True:
        present = [pair for pair in zip(ids, ids[1:]) if pair in merges]
        if not present:
            return ids
        chosen = pick(present, key=merges.get)
        ids = merge_pair(ids, chosen, merges[chosen])
        if not repeat:
            return ids


def _chunk_right(ids, merges):
    return _chunk_by_rank(ids, merges, min)


ENCODE_MISTAKES = {
    "you merged the leftmost learned pair first; merge the EARLIEST-LEARNED pair present first "
    "(the smallest new id), as training did: later merges are built on earlier ones":
        lambda text, merges: _encode_chunks(text, merges, _chunk_leftmost_first),
    "you applied the latest-learned merge first; apply the earliest-learned (smallest id) first":
        lambda text, merges: _encode_chunks(text, merges, lambda ids, m: _chunk_by_rank(ids, m, max)),
    "you stopped after one merge; repeat until no neighbouring pair is a learned merge":
        lambda text, merges: _encode_chunks(text, merges, lambda ids, m: _chunk_by_rank(ids, m, min, False)),
    "cut the text with split_text first and merge inside each chunk only (training never "
    "merged across chunks)":
        lambda text, merges: _encode_chunks(text, merges, _chunk_right, split=False),
}


@checker("my_encode")
def check_encode(my_encode):
    """my_encode(text, merges) -> ids, the same as Tokenizer(merges).encode(text)."""
    trained = Tokenizer.train([ENCODE_TRAINING_TEXT], vocab_size=258 + 40).merges
    for text, merges in ENCODE_HAND_MADE + [(text, trained) for text in ENCODE_TEXTS]:
        got = call(my_encode, text, dict(merges))
        if got is None:
            raise Wrong("return the list of ids")
        got, want = list(got), Tokenizer(merges).encode(text)
        if got == want:
            continue
        shown = f"my_encode({text!r}, merges) gave {got}, it should be {want}"
        for hint, mistake in ENCODE_MISTAKES.items():
            if mistake(text, merges) == got:
                raise Wrong(f"{shown}; {hint}")
        if any(i >= 258 + len(merges) for i in got):
            raise Wrong(f"{shown}; an id that was never learned: only the merges' ids may appear")
        raise Wrong(shown)


# =============================================================================================
# Notebook 2: RMSNorm forward, causal attention forward
# =============================================================================================

def _rmsnorm_variant(x, weight, eps, center=False, eps_outside=False, axis=-1, reduce=np.mean,
                     root=np.sqrt, use_weight=True):
    """RMSNorm with one thing changed (the typical mistakes), in NumPy float64."""
    x, weight = to_numpy(x), to_numpy(weight)
    if center:                                               # LayerNorm's mean subtraction
        x = x - x.mean(axis=axis, keepdims=True)
    square = reduce(x * x, axis=axis, keepdims=True)
    scale = 1.0 / (root(square) + eps) if eps_outside else 1.0 / root(square + eps)
    return x * scale * (weight if use_weight else 1.0)


RMSNORM_MISTAKES = {
    "you subtracted the mean (that is LayerNorm): RMSNorm divides x itself by its root mean square":
        dict(center=True),
    "eps goes inside the square root: 1 / sqrt(mean(x**2) + eps)": dict(eps_outside=True),
    "normalize each row over its C features (axis=-1), not over the rows": dict(axis=0),
    "use the MEAN of x**2 over the features, not the sum": dict(reduce=np.sum),
    "take the square root of mean(x**2) + eps": dict(root=lambda a: a),
    "multiply by weight at the end": dict(use_weight=False),
}


@checker("my_rmsnorm")
def check_rmsnorm(my_rmsnorm):
    """my_rmsnorm(x, weight, eps) -> out, as albor.rmsnorm_forward's first result."""
    eps = 0.25                                        # large, so that where eps goes matters
    x, weight = random_arrays(20, (5, 8), (8,))
    x = x + 0.5                                       # rows with a mean: LayerNorm differs
    got = first(call(my_rmsnorm, x.copy(), weight.copy(), eps))
    want, _ = albor.rmsnorm_forward(x, weight, eps)
    compare("out", got, want, {hint: _rmsnorm_variant(x, weight, eps, **change)
                               for hint, change in RMSNORM_MISTAKES.items()})


def _attention_variant(q, k, v, mask="future", axis=-1, scale="sqrt", mask_after=False):
    """Causal attention with one thing changed (the typical mistakes), in NumPy float64.
    q, k, v (B, H, T, D) with as many KV heads as query heads."""
    q, k, v = to_numpy(q), to_numpy(k), to_numpy(v)
    T, D = q.shape[-2:]
    scores = q @ k.transpose(0, 1, 3, 2) * {"sqrt": 1 / math.sqrt(D), "D": 1 / D, "none": 1.0}[scale]
    hidden = {"future": np.arange(T)[None, :] > np.arange(T)[:, None],   # [query t, key s]: s > t
              "past": np.arange(T)[None, :] < np.arange(T)[:, None],
              "none": np.zeros((T, T), dtype=bool)}[mask]
    if not mask_after:
        scores = np.where(hidden, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=axis, keepdims=True))
    probs /= probs.sum(axis=axis, keepdims=True)
    if mask_after:
        probs = np.where(hidden, 0.0, probs)
    return probs @ v


ATTENTION_MISTAKES = {
    "no causal mask: position t must not see the keys after it (set their scores to -inf "
    "before the softmax)": dict(mask="none"),
    "your mask hides the past and shows the future: hide the keys s > t of query t":
        dict(mask="past"),
    "softmax over the wrong axis: each query's row of scores is normalized over the keys "
    "(axis=-1), not over the queries": dict(axis=-2),
    "the scores are q·k / sqrt(D): the 1/sqrt(D) is missing": dict(scale="none"),
    "scale the scores by 1/sqrt(D), not 1/D": dict(scale="D"),
    "you hid the future AFTER the softmax, so the rows no longer sum to 1: set the scores "
    "to -inf BEFORE the softmax": dict(mask_after=True),
}


@checker("my_attention")
def check_attention(my_attention):
    """my_attention(q, k, v) -> out (B, H, T, D), as albor.attention_forward's first result."""
    q, k, v = random_arrays(21, (2, 3, 7, 4), (2, 3, 7, 4), (2, 3, 7, 4), scale=1.5)
    got = first(call(my_attention, q.copy(), k.copy(), v.copy()))
    if got is None:
        raise Wrong("return the output, shape (B, H, T, D)")
    got_array = np.asarray(to_numpy(got), dtype=np.float64)
    if got_array.shape == tuple(q.shape) and np.isnan(got_array).any():
        raise Wrong("NaN in the output: some query has every key masked. Query t sees keys "
                    "0..t, itself included: hide s > t, not s >= t")
    want, _ = albor.attention_forward(q, k, v)
    compare("out", got, want, {hint: _attention_variant(q, k, v, **change)
                               for hint, change in ATTENTION_MISTAKES.items()})


# =============================================================================================
# Notebook 3: RMSNorm backward, SwiGLU backward
# =============================================================================================

def _rmsnorm_backward_variants(dout, x, weight, rstd):
    """{hint: (dx, dweight)} of the typical mistakes, in NumPy float64."""
    dout, x, weight, rstd = (to_numpy(a) for a in (dout, x, weight, rstd))
    xhat = x * rstd
    g = dout * weight
    right_dweight = (dout * xhat).sum(axis=0)
    right_dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return {
        "rstd depends on x too: one x_j moves every output of its row, so dx has a second "
        "term, -rstd * xhat * mean(g * xhat)": (g * rstd, right_dweight),
        "dweight multiplies xhat = x * rstd, not x: sum dout * xhat over the rows":
            (right_dx, (dout * x).sum(axis=0)),
        "the gradient reaching xhat is g = dout * weight (weight is missing)":
            (rstd * (dout - xhat * (dout * xhat).mean(axis=-1, keepdims=True)), right_dweight),
        "the second term of dx is subtracted: rstd * (g - xhat * mean(g * xhat))":
            (rstd * (g + xhat * (g * xhat).mean(axis=-1, keepdims=True)), right_dweight),
        "d rstd / d x_j has a 1/C in it: the second term takes the MEAN of g * xhat, not the sum":
            (rstd * (g - xhat * (g * xhat).sum(axis=-1, keepdims=True)), right_dweight),
    }


def _two_outputs(result, names):
    if not (isinstance(result, tuple) and len(result) == 2):
        raise Wrong(f"return a pair ({names[0]}, {names[1]})")
    return result


def _compare_pair(names, got, want, variants):
    """Check both outputs; a mistake's hint applies to the output it gets wrong."""
    for i, name in enumerate(names):
        compare(name, got[i], want[i], {hint: wrong[i] for hint, wrong in variants.items()})


@checker("my_rmsnorm_backward")
def check_rmsnorm_backward(my_rmsnorm_backward):
    """my_rmsnorm_backward(dout, x, weight, rstd) -> (dx, dweight), as albor.rmsnorm_backward."""
    x, weight, dout = random_arrays(30, (4, 8), (8,), (4, 8))
    _, rstd = albor.rmsnorm_forward(x, weight, 1e-5)
    got = _two_outputs(call(my_rmsnorm_backward, dout.copy(), x.copy(), weight.copy(), rstd.copy()),
                       ("dx", "dweight"))
    if np.ndim(to_numpy(got[1])) == 2:
        raise Wrong("dweight has shape (N, C): weight is shared by every row, so sum over the rows")
    want = albor.rmsnorm_backward(dout, x, weight, rstd)
    _compare_pair(("dx", "dweight"), got, want, _rmsnorm_backward_variants(dout, x, weight, rstd))


def _swiglu_backward_variants(dh, gate, up):
    """{hint: (dgate, dup)} of the typical mistakes, in NumPy float64."""
    dh, gate, up = (to_numpy(a) for a in (dh, gate, up))
    sig = 1.0 / (1.0 + np.exp(-gate))
    silu = gate * sig
    dgate, dup = dh * up * (sig + silu * (1 - sig)), dh * silu
    return {
        "silu(g) = g * sigmoid(g) is a product: its derivative is sigmoid + g * sigmoid' = "
        "sig + silu * (1 - sig)": (dh * up * sig, dup),
        "that is the derivative of sigmoid; silu(g) = g * sigmoid(g) needs the product rule":
            (dh * up * sig * (1 - sig), dup),
        "h = silu(gate) * up, so dgate carries the factor up": (dh * (sig + silu * (1 - sig)), dup),
        "dup = dh * silu(gate), not dh * gate": (dgate, dh * gate),
        "dup = dh * silu(gate) = dh * gate * sigmoid(gate), not dh * sigmoid(gate)": (dgate, dh * sig),
        "the two gradients are swapped: return (dgate, dup)": (dup, dgate),
    }


@checker("my_swiglu_backward")
def check_swiglu_backward(my_swiglu_backward):
    """my_swiglu_backward(dh, gate, up) -> (dgate, dup), as albor.swiglu_backward."""
    dh, gate, up = random_arrays(31, (3, 6), (3, 6), (3, 6), scale=2.0)
    got = _two_outputs(call(my_swiglu_backward, dh.copy(), gate.copy(), up.copy()), ("dgate", "dup"))
    want = albor.swiglu_backward(dh, gate, up)
    _compare_pair(("dgate", "dup"), got, want, _swiglu_backward_variants(dh, gate, up))


# =============================================================================================
# Notebook 4: CUDA kernels, on the GPU (CuPy) or in the CPU emulator
# =============================================================================================

KERNEL_PRELUDE = """#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // -infinity (NVRTC has no INFINITY)
#line 1
"""  # `#line 1`: compile errors give the line numbers of the answer's own source
SENTINEL = 12345.0   # fills the spare rows after a kernel's output: a thread past the end writes them


def _emulator():
    """tests/kernel_emu.py, the CPU emulator's Python side (it lives with the tests)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import kernel_emu
    return kernel_emu


def _kernel_body(source, name):
    """The text between the braces of kernel `name`, comments removed; None if there is no
    such `extern "C" __global__` kernel."""
    emu = _emulator()
    text = emu.strip_comments(source)
    try:
        if name not in emu.parse_kernels(text):
            return None
    except ValueError:   # no kernel at all, or a parameter it cannot read
        return None
    start = text.index("{", re.search(rf"\b{name}\s*\(", text).end())
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1:end]
    return text[start + 1:]


def build_kernel(source, name, params):
    """Compile source and return kernel `name`: on the GPU with CuPy (NVRTC), else in the CPU
    emulator. NotWritten for an empty body, Wrong for a missing kernel or a compile error."""
    if not isinstance(source, str):
        raise Wrong("the answer is the kernel's CUDA source, as a str")
    body = _kernel_body(source, name)
    if body is None:
        raise Wrong(f'define the kernel: extern "C" __global__ void {name}({params})')
    if not body.strip():
        raise NotWritten
    emu = _emulator()
    declared = ", ".join(f"{p.ctype} {p.name}" for p in emu.parse_kernels(source)[name].params)
    if declared.replace(" ", "") != params.replace(" ", ""):
        raise Wrong(f"keep the parameters as given: {name}({params}), not {name}({declared})")
    code = KERNEL_PRELUDE + source
    if albor.BACKEND == "cupy":
        try:
            return xp.RawModule(code=code).get_function(name)
        except Exception as error:
            raise Wrong(f"it does not compile: {error}") from None
    try:
        return emu.EmuModule(Path(__file__).with_name(f"{name}.cu"), code=code).get_function(name)
    except emu.EmuError as error:
        raise Wrong(f"it does not compile: {first_compile_error(str(error))}") from None


def first_compile_error(message):
    """g++'s first error as 'line N: error: ...' (the path of the generated file dropped)."""
    for line in message.splitlines():
        found = re.search(r":(\d+):\d+: (error: .*)", line)
        if found:
            return f"line {found.group(1)}: {found.group(2)}"
    return message.strip().splitlines()[-1]


OUT_OF_RANGE = ("threads past the last row wrote after the end of the output: return early "
                "when the row index is out of range")


def launch(kernel, grid, block, args):
    """Run a kernel; a launch the emulator stops (an out-of-bounds write, a deadlock) is Wrong."""
    try:
        kernel(grid, block, args)
    except Exception as error:
        message = str(error)
        if "wrote outside" in message:
            raise Wrong(f"{OUT_OF_RANGE} ({message})") from None
        raise Wrong(f"the launch failed: {message}") from None


def output_with_spare_rows(shape, spare):
    """A float32 output of `shape` plus `spare` rows after it, all SENTINEL: a kernel that forgets
    its bounds check writes into the spare rows (on a GPU as in the emulator)."""
    return xp.full((shape[0] + spare,) + tuple(shape[1:]), SENTINEL, dtype=xp.float32)


def without_spare_rows(out, rows):
    """out[:rows], after checking that the spare rows still hold SENTINEL."""
    if not bool((out[rows:] == SENTINEL).all()):
        raise Wrong(OUT_OF_RANGE)
    return out[:rows]


def _kernel_array(a):
    """float32 C-contiguous array on the kernels' device (CuPy on a GPU, NumPy in the emulator)."""
    return xp.asarray(np.ascontiguousarray(to_numpy(a), dtype=np.float32))


ROW_MAX_PARAMS = "const float* x, float* out, int rows, int C"


def _row_max_variants(x):
    """{hint: out} of the typical mistakes of a warp-per-row max, in NumPy."""
    lane0 = x[:, 0::32].max(axis=1)
    return {
        "start the running max at NEG_INF, not 0: a row of negative numbers has a negative max":
            np.maximum(x.max(axis=1), 0.0),
        "lane 0 wrote only its own columns' max: combine the 32 lanes first, with "
        "__shfl_xor_sync(FULL_MASK, m, offset) for offset 16, 8, 4, 2, 1 (a butterfly)": lane0,
        "the butterfly needs five steps (offsets 16, 8, 4, 2, 1) to reach all 32 lanes":
            x[:, np.arange(x.shape[1]) % 32 < 16].max(axis=1),
        "each lane must loop over its columns lane, lane + 32, lane + 64, ... up to C":
            x[:, :32].max(axis=1),
        "that is the row's sum (warp_sum adds); a max combines with fmaxf": x.sum(axis=1),
    }


@checker("MY_ROW_MAX")
def check_row_max(source):
    """row_max: out[r] = max(x[r, :]), one warp of 32 threads per row, 8 rows per 256-thread block."""
    kernel = build_kernel(source, "row_max", ROW_MAX_PARAMS)
    rng = np.random.default_rng(40)
    rows, C = 13, 70                                   # 13 rows: the last block is partly empty
    x = rng.standard_normal((rows, C)).astype(np.float32)
    x[3] -= 10.0                                       # a row of negative numbers
    x[5, 69] = 9.0                                     # a max in the last column
    blocks = math.ceil(rows / 8)                      # 8 warps = 8 rows a block
    out = output_with_spare_rows((rows,), 8 * blocks - rows)
    launch(kernel, (blocks,), (256,), (_kernel_array(x), out, np.int32(rows), np.int32(C)))
    out = without_spare_rows(out, rows)
    compare("out", out, x.max(axis=1), _row_max_variants(x.astype(np.float64)))


NAIVE_ATTENTION_PARAMS = "const float* q, const float* k, const float* v, float* out, int B, int H, int KVH, int T, int D"


def _naive_attention_variants(q, k, v):
    """{hint: out} of the typical mistakes, in NumPy float64 (q (B, H, T, D), k, v (B, KVH, T, D))."""
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    H, KVH = q.shape[1], k.shape[1]
    group = H // KVH
    repeat = lambda a: np.repeat(a, group, axis=1)                 # KV head h // group
    interleave = lambda a: np.tile(a, (1, group, 1, 1))            # KV head h % KVH (wrong)
    variants = {
        "no causal mask: query t reads keys 0..t only (loop s <= t)":
            _attention_variant(q, repeat(k), repeat(v), mask="none"),
        "the scores are q·k / sqrt(D): the 1/sqrt(D) is missing":
            _attention_variant(q, repeat(k), repeat(v), scale="none"),
        "query head h reads KV head h / (H / KVH) (grouped-query attention), not h % KVH":
            _attention_variant(q, interleave(k), interleave(v)),
    }
    T = q.shape[2]
    unnormalized = np.zeros_like(q)
    for t in range(T):   # out without the division by the softmax's sum
        scores = q[:, :, t:t + 1] @ repeat(k)[:, :, :t + 1].transpose(0, 1, 3, 2) / math.sqrt(q.shape[3])
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        unnormalized[:, :, t] = (weights @ repeat(v)[:, :, :t + 1])[:, :, 0]
    variants["divide by the sum of the exponentials at the end: the weights must sum to 1"] = unnormalized
    return variants


@checker("MY_NAIVE_ATTENTION")
def check_naive_attention(source):
    """naive_attention: causal GQA attention, one thread per query row (b, h, t), as
    albor.attention_forward's out."""
    kernel = build_kernel(source, "naive_attention", NAIVE_ATTENTION_PARAMS)
    B, H, KVH, T, D = 2, 4, 2, 19, 8
    q, k, v = random_arrays(41, (B, H, T, D), (B, KVH, T, D), (B, KVH, T, D), scale=1.5)
    rows = B * H * T                                    # 152 rows in 5 blocks of 32 threads
    blocks = math.ceil(rows / 32)
    out = output_with_spare_rows((rows, D), 32 * blocks - rows)
    launch(kernel, (blocks,), (32,), (_kernel_array(q), _kernel_array(k), _kernel_array(v), out,
                                      *(np.int32(n) for n in (B, H, KVH, T, D))))
    out = without_spare_rows(out, rows).reshape(B, H, T, D)
    if np.isnan(to_numpy(out)).any():
        raise Wrong("NaN in the output: a thread read memory nobody wrote, or divided by a sum "
                    "of 0 (query t sees keys 0..t, itself included)")
    want, _ = albor.attention_forward(q, k, v)
    compare("out", out, want, _naive_attention_variants(q, k, v), rtol=1e-4, atol=1e-5)


# =============================================================================================
# Notebook 5: the AdamW update, the warmup + cosine schedule
# =============================================================================================

ADAMW_SETTINGS = dict(lr=0.1, beta1=0.9, beta2=0.95, eps=1e-2, weight_decay=0.1)


def _adamw_variant(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay, correct=True, l2=False,
                   decay="before", square=True, eps_inside=False, t_offset=0):
    """One AdamW update with one thing changed (the typical mistakes), in NumPy float64."""
    if l2:
        g = g + weight_decay * p                          # Adam + L2, not decoupled
    if decay == "before":
        p = p * (1 - lr * weight_decay)
    elif decay == "without lr":
        p = p * (1 - weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g if square else g)
    n = t + t_offset
    m_hat = m / (1 - beta1 ** n) if correct else m
    v_hat = v / (1 - beta2 ** n) if correct else v
    step = m_hat / (np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps)
    p = p - lr * step
    if decay == "after":
        p = p * (1 - lr * weight_decay)
    return p, m, v


ADAMW_MISTAKES = {
    "no bias correction: m and v start at 0, so divide them by (1 - beta1**t) and "
    "(1 - beta2**t)": dict(correct=False),
    "weight decay added to the gradient is Adam with L2; AdamW's decay is decoupled: "
    "p = p - lr * weight_decay * p, apart from the Adam step": dict(l2=True, decay="none"),
    "decay the weights before the Adam step (p = p * (1 - lr * weight_decay), then the step), "
    "as albor.AdamW and PyTorch do": dict(decay="after"),
    "the decay is p * (1 - lr * weight_decay): it is scaled by the learning rate too":
        dict(decay="without lr"),
    "v is the running mean of g**2, the gradient SQUARED": dict(square=False),
    "eps is added after the square root: m_hat / (sqrt(v_hat) + eps)": dict(eps_inside=True),
    "t counts updates from 1: the first update divides by (1 - beta1**1)": dict(t_offset=1),
}


@checker("my_adamw_update")
def check_adamw_update(my_adamw_update):
    """my_adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v),
    three updates compared with albor.AdamW on a (4, 5) matrix."""
    p0, *grads = random_arrays(50, (4, 5), (4, 5), (4, 5), (4, 5))
    s = ADAMW_SETTINGS
    params = {"w": p0.astype(xp.float32)}
    optimizer = albor.AdamW(params, betas=(s["beta1"], s["beta2"]), eps=s["eps"],
                            weight_decay=s["weight_decay"])
    p, m, v = to_numpy(p0), np.zeros((4, 5)), np.zeros((4, 5))
    for t, g in enumerate(grads, start=1):
        mine = p.copy(), m.copy(), v.copy()          # the right state before this update
        result = call(my_adamw_update, xp.asarray(p), g.copy(), xp.asarray(m), xp.asarray(v), t,
                      s["lr"], s["beta1"], s["beta2"], s["eps"], s["weight_decay"])
        if not (isinstance(result, tuple) and len(result) == 3):
            raise Wrong("return the new (p, m, v)")
        optimizer.step(params, {"w": g.astype(xp.float32)}, s["lr"])
        want = params["w"], optimizer.m["w"], optimizer.v["w"]
        with np.errstate(invalid="ignore", divide="ignore"):   # some mistakes make NaN
            variants = {hint: _adamw_variant(*mine[:1], to_numpy(g), *mine[1:], t, **s, **change)
                        for hint, change in ADAMW_MISTAKES.items()}
        for i, name in reversed(list(enumerate(("p", "m", "v")))):   # v and m first: their hints are sharper
            compare(f"{name} after update {t}", result[i], want[i],
                    {hint: wrong[i] for hint, wrong in variants.items()}, rtol=1e-5, atol=1e-7)
        p, m, v = (np.asarray(to_numpy(a), dtype=np.float64) for a in want)


LR_RUNS = [(10, 1.0, 3, 0.1), (31, 6e-4, 3, 6e-5), (12, 1.0, 0, 0.0), (200, 1e-2, 20, 1e-3)]


def _lr_variant(step, max_steps, lr, warmup, min_lr, warm="plus one", floor=True, cosine=True,
                progress="right", clamp=True):
    """The schedule with one thing changed (the typical mistakes)."""
    if step <= warmup:
        return lr * {"plus one": step / (warmup + 1), "peak at warmup": step / warmup,
                     "from zero": (step - 1) / warmup}[warm]
    if clamp and step > max_steps:
        return min_lr if floor else 0.0
    low = min_lr if floor else 0.0
    if progress == "right":
        done = (step - warmup - 1) / max(1, max_steps - warmup - 1)
    else:
        done = (step - warmup) / (max_steps - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * done)) if cosine else 1 - done
    return low + (lr - low) * shape


LR_MISTAKES = {
    "warmup off by one: yours reaches the peak at step `warmup` already; albor's rises as "
    "lr * step / (warmup + 1), so the first step after warmup is the peak": dict(warm="peak at warmup"),
    "warmup off by one: your first step has learning rate 0, a wasted step; use "
    "lr * step / (warmup + 1)": dict(warm="from zero"),
    "the cosine ends at min_lr, not at 0": dict(floor=False),
    "the decay is a cosine: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2":
        dict(cosine=False),
    "progress off by one: it is 0 at the first step after warmup (the peak) and 1 at the last "
    "step: (step - warmup - 1) / (max_steps - warmup - 1)": dict(progress="shifted"),
    "past max_steps the rate stays at min_lr (yours goes back up the cosine)": dict(clamp=False),
}


@checker("my_lr_at")
def check_lr_at(my_lr_at):
    """my_lr_at(step, max_steps, lr, warmup, min_lr) == albor.lr_at(...) for every step (1-based)."""
    for max_steps, lr, warmup, min_lr in LR_RUNS:
        for step in range(1, max_steps + 3):
            got = call(my_lr_at, step, max_steps, lr, warmup, min_lr)
            want = albor.lr_at(step, max_steps, lr, warmup, min_lr)
            if got is None:
                raise Wrong("return the learning rate, a number")
            if math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-15):
                continue
            shown = (f"my_lr_at(step={step}, max_steps={max_steps}, lr={lr}, warmup={warmup}, "
                     f"min_lr={min_lr}) gave {float(got):.6g}, it should be {want:.6g}")
            for hint, change in LR_MISTAKES.items():
                try:
                    wrong = _lr_variant(step, max_steps, lr, warmup, min_lr, **change)
                except ZeroDivisionError:
                    continue
                if math.isclose(float(got), wrong, rel_tol=1e-9, abs_tol=1e-15):
                    raise Wrong(f"{shown}; {hint}")
            raise Wrong(shown)
