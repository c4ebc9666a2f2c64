"""Train albor on Python code: `python train.py --rows 500`.

What a run does, in the order of the sections below:

1. Settings: the command line (defaults = the model card's run). `--resume DIR`
   continues a saved run with its saved settings; `--init DIR` starts a new run
   from a checkpoint's weights. Both take the model's shape from DIR/config.json.
2. Data: the documents of a corpus (default: the .py files of this Python's
   standard library, no download needed), in sorted order, then shuffled with
   --seed. The first --val-rows documents are held out for validation, the next
   --rows are the training rows. One document is one row: tokenized,
   <|endoftext|> appended, cut to --seq-len + 1 tokens, padded with <|pad|>.
   A row of T + 1 tokens gives T inputs and T targets (the same row shifted by
   one); targets that are padding are set to IGNORE_INDEX, so the loss skips them.
3. Tokenizer: --tokenizer FILE, or one trained on the corpus's first 100K lines
   (vocabulary = the config's vocab_size) on first use, cached in a
   `tokenizers/` folder next to the run folder.
4. The step: each optimizer step runs --grad-accum micro-batches of
   --batch-size rows, adds up their gradients (each weighted by its share of
   the step's non-pad tokens, so the step's loss is the mean over all of them),
   clips the global norm and takes an AdamW step (albor.py's math). On a CPU each
   micro-batch's rows are shared out over one worker thread per core (cpu.py, with
   single-threaded BLAS: set below, before NumPy loads). On a GPU, --dtype
   tf32/bf16/fp16 runs the matmuls in that precision (gpu.py; fp16 with dynamic
   loss scaling: a step whose gradients overflow is skipped). Under MPI
   (`mpiexec -n N python train.py ...`, distributed.py) the rows of every
   micro-batch are shared out over the N ranks too and their gradients summed
   by an all-reduce: the same steps on the same rows, N processes doing them;
   rank 0 alone writes the run folder and prints.
5. The run: setup (model, data, optimizer), the loop (a step, a line in
   metrics.jsonl, a checkpoint every --save-every steps), and the finish:
   validation loss, the parse rate (the share of --eval-samples sampled
   completions that ast.parse accepts, see sample.py), the checkpoint and a
   summary. `--eval-only --resume DIR` computes just these for DIR.

The run folder (--out, default checkpoints/<config>):
    model.safetensors, config.json, tokenizer.json   a Hugging Face LlamaForCausalLM folder
    optimizer.safetensors, trainer_state.json        what --resume needs
    metrics.jsonl                                    one JSON line per optimizer step
    final_model.json                                 losses, parse rate, timing and provenance of the run

Ctrl-C stops after the current step and saves a checkpoint that --resume
continues exactly (same final weights, byte for byte, as a run never stopped);
under MPI, a Ctrl-C on any rank stops every rank after the same step.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import SimpleNamespace

if "numpy" not in sys.modules:  # OpenBLAS reads this when NumPy loads it: single-threaded BLAS,
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the cores go to cpu.DataParallel's workers
import numpy as np  # noqa: E402  (after the line above)
from tqdm import tqdm  # noqa: E402

import albor  # noqa: E402
import checkpoint  # noqa: E402
import cpu  # noqa: E402
import distributed  # noqa: E402
import gpu  # noqa: E402
import sample  # noqa: E402
from tokenizer import EOT_ID, PAD_ID, Tokenizer  # noqa: E402

TOKENIZER_LINES = 100_000     # a tokenizer trained here sees the corpus's first 100K lines
TOKENIZER_MIN_FREQUENCY = 1   # merge down to pairs seen once: fills all 32,768 ids from those lines
PREFIX_CHARS_PER_TOKEN = 32   # a row needs only a document's first tokens: encode a prefix this
                              # many characters per token long (cut at a line end), not the whole file
TRAINER_STATE = "trainer_state.json"
FINAL_MODEL = "final_model.json"
METRICS = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"


class RunError(Exception):
    """A problem with the run's input; main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# 1. Settings

DEFAULTS = {   # the model card's run
    "config": "albor-base-50m", "data": None, "rows": 500, "val_rows": 50, "seq_len": 128,
    "batch_size": 4, "grad_accum": 4, "max_steps": None, "lr": 6e-4, "min_lr": None,
    "warmup": None, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
    "grad_clip": 1.0, "seed": 0, "out": None, "resume": None, "init": None, "tokenizer": None,
    "save_every": 0, "eval_samples": 8, "eval_only": False, "dtype": "fp32",
}
# With --resume these define the rows a step reads; changing them would not continue the run.
DATA_SETTINGS = ("data", "rows", "val_rows", "seq_len", "seed")

FLAGS = [   # (flag, help, argparse options), in --help's order
    ("--config", f"model preset: {', '.join(albor.PRESETS)}; with --resume/--init the model's "
                 "shape comes from the checkpoint and a different --config is an error", {}),
    ("--data", "training text: a folder (every file in it, one row each), a .txt file (one "
               "row per blank-line-separated block) or a .jsonl file (one row per line's "
               "\"text\"); default: the .py files of this Python's standard library",
     dict(metavar="PATH")),
    ("--rows", "training rows (documents); one pass over them is the default run length",
     dict(type=int, metavar="N")),
    ("--val-rows", "documents held out for the validation loss (0: none)", dict(type=int, metavar="N")),
    ("--seq-len", "tokens per row seen by the model (rows are cut to this + 1 and padded)",
     dict(type=int, metavar="T")),
    ("--batch-size", "rows per micro-batch (one forward + backward)", dict(type=int, metavar="B")),
    ("--grad-accum", "micro-batches per optimizer step (their gradients are summed)",
     dict(type=int, metavar="N")),
    ("--max-steps", "optimizer steps; default: one pass over the training rows "
                    "(rows // (batch-size * grad-accum)); more passes reshuffle the rows",
     dict(type=int, metavar="N")),
    ("--lr", "peak learning rate", dict(type=float)),
    ("--min-lr", "learning-rate floor the cosine decays to; default: lr / 10", dict(type=float)),
    ("--warmup", "linear warmup steps (0: start at the peak); default: 10%% of the steps, "
                 "at most 100", dict(type=int, metavar="N")),
    ("--beta1", "AdamW beta1 (first-moment decay)", dict(type=float)),
    ("--beta2", "AdamW beta2 (second-moment decay)", dict(type=float)),
    ("--eps", "AdamW epsilon", dict(type=float)),
    ("--weight-decay", "AdamW decoupled weight decay, applied to the weight matrices (and the "
                       "tied embedding), not to the norm weights", dict(type=float)),
    ("--grad-clip", "clip the global gradient norm to this (0: no clipping)", dict(type=float)),
    ("--seed", "seed of the weights' init and of the data order", dict(type=int)),
    ("--out", "run folder for the checkpoint and logs; default: checkpoints/<config>, or the "
              "--resume folder", dict(metavar="DIR")),
    ("--resume", "continue the run saved in DIR: weights, optimizer, data position and settings "
                 "(flags given now override the saved ones, except the data's)", dict(metavar="DIR")),
    ("--init", "start from the weights in checkpoint folder DIR, with a fresh optimizer",
     dict(metavar="DIR")),
    ("--tokenizer", "tokenizer.json to use; default: the checkpoint's with --resume/--init, "
                    "else one trained on the corpus (cached)", dict(metavar="FILE")),
    ("--save-every", "also save a checkpoint every N steps (0: only at the end and on Ctrl-C)",
     dict(type=int, metavar="N")),
    ("--eval-samples", "at the end, sample N completions of the held-out documents' first lines "
                       "and report the share that ast.parse accepts (the parse rate; 0: skip)",
     dict(type=int, metavar="N")),
    ("--eval-only", "evaluate the --resume checkpoint instead of training: validation loss, "
                    "perplexity and parse rate, printed and written to its final_model.json",
     dict(action="store_true")),
    ("--dtype", "precision of the matmuls, GPU only: fp32, tf32, bf16 or fp16 (fp16 with dynamic "
                "loss scaling); weights, optimizer state and all other layers stay float32",
     dict(choices=gpu.MATMUL_DTYPES)),
]


def build_parser():
    """The command line. Defaults live in DEFAULTS (argparse keeps them out of the namespace,
    so main() can tell the flags given on the command line from the defaults)."""
    parser = argparse.ArgumentParser(
        prog="train.py", argument_default=argparse.SUPPRESS,
        description="Train albor (a LLaMA-style model, NumPy on the CPU, CuPy on a GPU) on code. "
                    "The defaults are the model card's run: albor-base-50m, 500 rows of 128 tokens "
                    "of the Python standard library, 31 optimizer steps.",
        epilog="examples:\n"
               "  python train.py --rows 500                         the model card's run\n"
               "  python train.py --config tiny --rows 200 --out runs/tiny\n"
               "  python train.py --resume checkpoints/albor-base-50m --max-steps 100\n"
               "  python train.py --eval-only --resume checkpoints/albor-base-50m\n"
               "  python train.py --init checkpoints/albor-base-50m --data my_code/ --out runs/ft\n"
               "  mpiexec -n 2 python train.py --rows 500            the same run over 2 MPI ranks "
               "(README: More than one process)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, help, options in FLAGS:
        default = DEFAULTS[name.lstrip("-").replace("-", "_")]
        parser.add_argument(name, help=help + (f" (default: {default})" if default is not None else ""),
                            **options)
    return parser


def parse_settings(argv):
    """(settings dict, names of the flags given on the command line); bad values -> parser.error."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    args = {**DEFAULTS, **given}
    checks = [
        (args["rows"] >= 1, "--rows must be at least 1"),
        (args["val_rows"] >= 0, "--val-rows must be 0 or more"),
        (args["seq_len"] >= 1, "--seq-len must be at least 1"),
        (args["batch_size"] >= 1, "--batch-size must be at least 1"),
        (args["grad_accum"] >= 1, "--grad-accum must be at least 1"),
        (args["max_steps"] is None or args["max_steps"] >= 1, "--max-steps must be at least 1"),
        (args["lr"] > 0, "--lr must be positive"),
        (args["min_lr"] is None or 0 <= args["min_lr"] <= args["lr"], "--min-lr must lie in [0, --lr]"),
        (args["warmup"] is None or args["warmup"] >= 0, "--warmup must be 0 or more"),
        (0 <= args["beta1"] < 1, "--beta1 must lie in [0, 1)"),
        (0 <= args["beta2"] < 1, "--beta2 must lie in [0, 1)"),
        (args["eps"] > 0, "--eps must be positive"),
        (args["weight_decay"] >= 0, "--weight-decay must be 0 or more"),
        (args["grad_clip"] >= 0, "--grad-clip must be 0 or more"),
        (args["save_every"] >= 0, "--save-every must be 0 or more"),
        (args["eval_samples"] >= 0, "--eval-samples must be 0 or more"),
        (not args["eval_only"] or args["resume"], "--eval-only needs --resume DIR (the checkpoint to evaluate)"),
        (args["config"] in albor.PRESETS, f"--config {args['config']!r} is not a preset; "
                                          f"choose from {', '.join(albor.PRESETS)}"),
        (not (args["resume"] and args["init"]), "--resume and --init exclude each other"),
        (args["dtype"] == "fp32" or albor.BACKEND == "cupy",
         f"--dtype {args['dtype']} needs a GPU (albor runs on {albor.BACKEND}, which computes in fp32 only)"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    for name in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):
        if args[name] is not None and not math.isfinite(args[name]):
            parser.error(f"--{name.replace('_', '-')} must be a finite number")
    return args, set(given)


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: file not found ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: cannot read {what}: {e}") from None


def merge_resumed_settings(args, given):
    """With --resume: the saved run's settings, overridden by the flags given now.

    Flags that decide which rows a step reads (DATA_SETTINGS) cannot change: that
    would not be the same run any more (start a new one from the weights with --init).
    """
    state = read_json(os.path.join(args["resume"], TRAINER_STATE), "the saved run's state")
    saved = state.get("args")
    if not isinstance(saved, dict) or "step" not in state:
        raise RunError(f"{os.path.join(args['resume'], TRAINER_STATE)}: not a trainer state (no args/step)")
    for name in DATA_SETTINGS:
        if name in given and args[name] != saved.get(name):
            raise RunError(f"--{name.replace('_', '-')} {args[name]} differs from the resumed run's "
                           f"{saved.get(name)}: --resume continues that run on its data "
                           "(use --init to train these weights on other data)")
    merged = {**DEFAULTS, **saved}
    for name in given:
        if name not in DATA_SETTINGS and merged.get(name) != args[name]:
            if name not in ("resume", "out", "config", "tokenizer", "eval_only") and name in saved:
                print(f"note: --{name.replace('_', '-')} {args[name]} (the saved run had {saved[name]})")
            merged[name] = args[name]
    merged["resume"] = args["resume"]
    merged["init"] = None
    merged["out"] = args["out"] if "out" in given else args["resume"]
    return merged, state


# -----------------------------------------------------------------------------
# 2. Data


def stdlib_python_files():
    """Sorted paths of the running interpreter's standard library .py files
    (site-packages excluded: installed packages are not the stdlib)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, filenames in os.walk(root):
        # Prune installed packages in place so os.walk never descends into them.
        subfolders[:] = [name for name in subfolders if name not in ("site-packages", "dist-packages")]
        paths += [Path(folder, name) for name in filenames if name.endswith(".py")]
    return sorted(paths)


def stdlib_texts(max_lines=None):
    """Yield the stdlib source one file at a time (as str), stopping after
    `max_lines` lines in total (all of it if None); the last file may be cut.

    Files are read as UTF-8 with undecodable bytes (4 test files use other
    encodings on purpose) replaced by U+FFFD; line endings are kept as they are.
    """
    lines_left = max_lines
    for path in stdlib_python_files():
        if lines_left is not None and lines_left <= 0:
            return
        text = path.read_bytes().decode("utf-8", errors="replace")
        if lines_left is not None:
            lines = text.splitlines(keepends=True)[:lines_left]
            lines_left -= len(lines)
            text = "".join(lines)
        yield text


class Corpus:
    """A corpus's documents in a fixed order, read only when asked for.

    data None: the standard library's .py files; a folder: every file under it
    (sorted paths); a .txt: its blank-line-separated blocks; a .jsonl: the "text"
    field of each line. Files that cannot be read or are not UTF-8, and .jsonl
    lines that are not JSON objects with a string "text", are skipped and counted.
    """

    def __init__(self, data):
        self.skipped = 0      # unreadable / not UTF-8 files, malformed .jsonl lines
        if data is None:
            self.description = f"Python {sys.version.split()[0]} standard library (.py files)"
            self.items = stdlib_python_files()
            return
        path = Path(data)
        self.description = str(path)
        if path.is_dir():
            self.items = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.suffix == ".jsonl":
            self.items = []
            for line in self._read_text(path).splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.items.append(record["text"] if isinstance(record["text"], str) else None)
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.items.append(None)
        elif path.suffix == ".txt":
            text = self._read_text(path)
            self.items = [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
        elif path.exists():
            raise RunError(f"--data {data}: expected a folder, a .txt or a .jsonl file")
        else:
            raise RunError(f"--data {data}: no such file or folder")

    @staticmethod
    def _read_text(path):
        try:
            return path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"--data {path}: cannot read it as UTF-8 text ({type(e).__name__})") from None

    def read(self, index):
        """Document `index` as a str, or None if it cannot be used (counted in self.skipped)."""
        item = self.items[index]
        if isinstance(item, Path):
            try:
                item = item.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                item = None
        if item is None:
            self.skipped += 1
        return item

    def documents(self, order):
        """Yield the non-blank documents in the given order of indices."""
        for index in order:
            text = self.read(index)
            if text is not None and text.strip():
                yield text

    def first_lines(self, max_lines):
        """The corpus's first max_lines lines (in sorted order), as one text per document."""
        texts = []
        for text in self.documents(range(len(self.items))):
            lines = text.splitlines(keepends=True)[:max_lines]
            texts.append("".join(lines))
            max_lines -= len(lines)
            if max_lines <= 0:
                break
        return texts


def take_documents(corpus, args):
    """(validation texts, training texts): the first --val-rows + --rows documents of the
    corpus shuffled with --seed (the validation ones first, so they never change with --rows)."""
    order = np.random.default_rng(args["seed"]).permutation(len(corpus.items))
    wanted = args["val_rows"] + args["rows"]
    texts = []
    for text in corpus.documents(order):
        texts.append(text)
        if len(texts) == wanted:
            break
    if not texts:
        raise RunError(f"no usable text in {corpus.description} ({corpus.skipped} files or lines "
                       "skipped: unreadable or not UTF-8)")
    if len(texts) - args["val_rows"] < args["batch_size"]:
        raise RunError(f"{corpus.description} has {len(texts)} usable documents: after --val-rows "
                       f"{args['val_rows']} that is fewer than one batch of --batch-size "
                       f"{args['batch_size']} rows")
    if len(texts) < wanted:
        print(f"note: {corpus.description} has only {len(texts)} usable documents: "
              f"{len(texts) - args['val_rows']} training rows instead of {args['rows']}")
    return texts[:args["val_rows"]], texts[args["val_rows"]:]


def encode_row(tok, text, seq_len):
    """A document as one row of seq_len + 1 ids: its first tokens, <|endoftext|>, then padding.

    Example (seq_len 7, "x = 1\\n" as 4 tokens a b c d): [a, b, c, d, EOT, PAD, PAD, PAD].
    Only the first seq_len + 1 tokens are kept, so only a prefix of a long document
    is encoded (cut at a line end far beyond them: encoding splits text into pieces
    that are encoded independently, so the kept tokens are the same).
    """
    n = seq_len + 1
    prefix = text
    if len(text) > PREFIX_CHARS_PER_TOKEN * n:
        line_end = text.rfind("\n", 0, PREFIX_CHARS_PER_TOKEN * n)
        prefix = text[:line_end + 1] if line_end > 0 else text[:PREFIX_CHARS_PER_TOKEN * n]
    ids = tok.encode(prefix)
    if len(ids) < n and len(prefix) < len(text):
        ids = tok.encode(text)                     # the prefix was not enough: the whole document
    ids = (ids + [EOT_ID])[:n]
    return ids + [PAD_ID] * (n - len(ids))


def make_rows(tok, texts, seq_len):
    """(inputs, targets), both (N, seq_len) int32: targets are inputs shifted by one,
    IGNORE_INDEX where the target is padding."""
    rows = np.array([encode_row(tok, text, seq_len) for text in texts], dtype=np.int32).reshape(-1, seq_len + 1)
    inputs = np.ascontiguousarray(rows[:, :-1])
    targets = rows[:, 1:].copy()
    targets[targets == PAD_ID] = albor.IGNORE_INDEX
    return inputs, targets


def micro_batch_rows(step, micro, args, n_rows):
    """Indices of the rows in micro-batch `micro` (0-based) of optimizer step `step` (1-based).

    A pure function of the step, so a resumed run reads exactly the rows the
    uninterrupted run would have: micro-batch k = (step - 1) * grad_accum + micro
    of the whole run falls in pass (epoch) k // per_pass over the rows, each pass
    in its own order drawn from (seed, pass).
    """
    batch_size = args["batch_size"]
    k = (step - 1) * args["grad_accum"] + micro
    per_pass = n_rows // batch_size
    epoch, position = divmod(k, per_pass)
    order = np.random.default_rng([args["seed"], epoch]).permutation(n_rows)
    return order[position * batch_size:(position + 1) * batch_size]


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# 3. Tokenizer


def get_tokenizer(args, config, corpus, source_folder):
    """(Tokenizer, its tokenizer.json bytes, where it came from).

    --tokenizer FILE; else the checkpoint folder's (--resume/--init); else the one
    trained on this corpus's first TOKENIZER_LINES lines with vocab_size tokens,
    cached in <out>/../tokenizers/ under a name derived from that text and size.
    """
    if args["tokenizer"]:
        path = Path(args["tokenizer"])
        origin = str(path)
    elif source_folder:
        path = Path(source_folder) / TOKENIZER_FILE
        origin = str(path)
    else:
        texts = corpus.first_lines(TOKENIZER_LINES)
        if not texts:
            raise RunError(f"no usable text in {corpus.description} to train a tokenizer on")
        key = hashlib.sha256(f"vocab_size={config.vocab_size}\nmin_frequency={TOKENIZER_MIN_FREQUENCY}\n".encode())
        for text in texts:
            key.update(text.encode("utf-8"))
            key.update(b"\0")
        path = Path(args["out"]).parent / "tokenizers" / f"tokenizer-{config.vocab_size}-{key.hexdigest()[:16]}.json"
        if path.is_file():
            origin = f"{path} (cached)"
        else:
            started = time.perf_counter()
            lines = sum(text.count("\n") for text in texts)
            print(f"training a {config.vocab_size:,}-token tokenizer on the first {lines:,} lines of "
                  f"{corpus.description} ...")
            tok = Tokenizer.train(texts, config.vocab_size, min_frequency=TOKENIZER_MIN_FREQUENCY, progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_bytes(path, tokenizer_bytes(tok))
            origin = f"{path} (trained in {time.perf_counter() - started:.1f} s)"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    try:
        tok = Tokenizer.load(path, max_vocab_size=config.vocab_size)
    except ValueError as e:
        raise RunError(str(e).splitlines()[0]) from None
    return tok, data, origin


def tokenizer_bytes(tok):
    return (json.dumps(tok.to_json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


# -----------------------------------------------------------------------------
# 4. The step, and evaluation


class Diverged(Exception):
    """A non-finite loss or gradient norm."""


def train_step(params, config, optimizer, inputs, targets, lr, grad_clip, step, timing, scaler=None,
               workers=None, group=distributed.SINGLE):
    """One optimizer step on the micro-batches inputs[m], targets[m] (each (B, T)).

    Returns (loss, pre-clip gradient norm, number of non-pad targets, whether the optimizer
    stepped). The loss is the mean over the non-pad targets of all micro-batches together: a
    micro-batch's mean loss counts with weight n_valid[m] / n_valid_step, and backward's
    loss_scale gives its gradient the same weight, added into one gradient dict (so 4
    micro-batches of 4 rows = one batch of 16 rows). workers (a cpu.DataParallel; default one
    thread) share each micro-batch's rows out, their gradients summed before clipping. With MPI
    (group: distributed.py) every rank gets the whole step and its workers take the rank's share
    of the rows; the ranks' loss sums and gradients are added up, so every rank clips the same
    gradients and takes the same step.
    With --dtype fp16 the scaler's scale multiplies that loss_scale too (see apply_update).
    Phase times go into timing; they come from gpu.PhaseClock (CUDA events on the GPU: no
    waiting between phases; the step waits for the GPU once, at its end).
    """
    workers = workers or cpu.DataParallel(1)
    n_valid = [int((t != albor.IGNORE_INDEX).sum()) for t in targets]
    n_valid_step = sum(n_valid)
    loss_scale = scaler.scale if scaler else 1.0
    worker_seconds = dict(workers.seconds)
    clock = gpu.PhaseClock()
    clock.start()
    loss_sums = []   # per micro-batch: the loss summed over its counted targets (this process's rows)
    for m in range(len(inputs)):
        idx, tgt = albor.xp.asarray(inputs[m]), albor.xp.asarray(targets[m])
        weight = loss_scale * n_valid[m] / n_valid_step  # this micro-batch's share of the step
        loss_sums.append(workers.forward_backward(params, config, idx, tgt, loss_scale=weight))
    loss_sums = group.sum_floats(loss_sums)   # every rank's rows
    grads = workers.gradients()
    for m, loss_sum in enumerate(loss_sums):
        if not math.isfinite(loss_sum):   # (the step's partial gradients are dropped)
            raise Diverged(f"the loss is {loss_sum / n_valid[m]} at step {step} (micro-batch {m + 1} of "
                           f"{len(inputs)})")
    grads = group.sum_gradients(grads, params)   # every rank's gradients, added up
    clock.mark("model_seconds")
    grad_norm, stepped = apply_update(optimizer, params, grads, lr, grad_clip, scaler, step)
    clock.mark("optimizer_seconds")
    phases = clock.collect()
    # forward and backward ran interleaved in the workers: split as their own clocks did
    model = phases.pop("model_seconds")
    forward = workers.seconds["forward"] - worker_seconds["forward"]
    backward = workers.seconds["backward"] - worker_seconds["backward"]
    phases["forward_seconds"] = model * forward / (forward + backward)
    phases["backward_seconds"] = model * backward / (forward + backward)
    for phase, seconds in phases.items():
        timing[phase] += seconds
    return sum(loss_sums) / n_valid_step, grad_norm, n_valid_step, stepped


def apply_update(optimizer, params, grads, lr, grad_clip, scaler, step):
    """Clip the gradients' global norm and take the optimizer step; returns (the norm before
    clipping, whether the optimizer stepped). With an fp16 loss scaler (gpu.LossScaler) the
    gradients are unscaled first, and a step whose gradients overflowed is skipped."""
    if scaler:
        scaler.unscale(grads)
    grad_norm = albor.clip_grad_norm(grads, grad_clip)
    stepped = True
    if scaler:
        try:
            stepped = scaler.update(math.isfinite(grad_norm))
        except FloatingPointError as e:
            raise Diverged(f"{e} (step {step})") from None
    elif not math.isfinite(grad_norm):
        raise Diverged(f"the gradient norm is {grad_norm} at step {step}")
    if stepped:
        optimizer.step(params, grads, lr)
    return grad_norm, stepped


def evaluate(params, config, inputs, targets, batch_size, workers=None, group=distributed.SINGLE):
    """Mean loss over all non-pad target tokens of (inputs, targets), or None for no rows.
    Each batch's rows are shared out over `workers` (a cpu.DataParallel; by default one
    per core when BLAS is single-threaded, see cpu.cpu_workers), and with MPI over the ranks
    (every rank of `group` takes part)."""
    workers = workers or cpu.DataParallel(cpu.cpu_workers())
    loss_sums, count = [], 0
    for start in range(0, len(inputs), batch_size):
        idx = albor.xp.asarray(inputs[start:start + batch_size])
        tgt = albor.xp.asarray(targets[start:start + batch_size])
        n_valid = int((targets[start:start + batch_size] != albor.IGNORE_INDEX).sum())
        if n_valid == 0:
            continue
        loss_sums.append(workers.loss_sum(params, config, idx, tgt))
        count += n_valid
    return sum(group.sum_floats(loss_sums)) / count if count else None


def perplexity(loss):
    return math.exp(min(loss, 700.0)) if loss is not None else None


def parse_eval(params, config, tok, val_texts, args):
    """The parse rate (sample.parse_rate): the share of --eval-samples completions of the held-out
    documents' first lines that ast.parse accepts, up to 128 new tokens each (fewer if the
    context is short), seeded with --seed."""
    max_new_tokens = min(128, config.max_position_embeddings // 2)
    return sample.parse_rate(params, config, tok, sample.eval_prompts(val_texts), args["eval_samples"],
                             max_new_tokens=max_new_tokens, seed=args["seed"])


# -----------------------------------------------------------------------------
# 5. The run: setup, loop, finish
#
# A run's state travels in one object, `run` (a SimpleNamespace), filled in by setup():
#   args, config, config_name, out, state (the resumed run's trainer_state, or None),
#   corpus, tok, tok_data, tok_origin, val_texts, train_inputs/targets, val_inputs/targets,
#   max_steps, warmup, min_lr, steps_per_pass, tokens_per_step, provenance,
#   params, optimizer, scaler, workers, start_step, loss_curve, timing, last_saved.


def setup(args, given, group=distributed.SINGLE):
    """Everything the loop needs, from the settings: model shape, data, tokenizer, weights.
    group: the processes training together (distributed.py; one process by default)."""
    run = SimpleNamespace(args=args, state=None, group=group)
    source_folder = args["resume"] or args["init"]
    if args["resume"]:
        run.args, run.state = merge_resumed_settings(args, given)
    if run.args["batch_size"] < group.size:
        raise RunError(f"--batch-size {run.args['batch_size']} is smaller than the {group.size} ranks: each "
                       "rank takes a share of every micro-batch's rows (raise --batch-size; lower "
                       "--grad-accum to keep the rows per step)")
    run.config, run.config_name = model_config(run.args, given, source_folder)
    run.args["config"] = run.config_name
    if run.args["out"] is None:
        run.args["out"] = os.path.join("checkpoints", run.config_name)
    run.out = run.args["out"]
    if run.args["seq_len"] > run.config.max_position_embeddings:
        raise RunError(f"--seq-len {run.args['seq_len']} exceeds the model's max_position_embeddings "
                       f"{run.config.max_position_embeddings}")
    load_data(run, source_folder)
    load_weights(run)
    return run


def model_config(args, given, source_folder):
    """(Config, its name): the checkpoint's with --resume/--init, else the --config preset."""
    if not source_folder:
        return albor.get_config(args["config"]), args["config"]
    config = checkpoint.load_config(source_folder)
    if "config" in given and albor.get_config(args["config"]) != config:
        raise RunError(f"--config {args['config']} contradicts {os.path.join(source_folder, 'config.json')} "
                       "(the model's shape comes from the checkpoint; drop --config)")
    name = os.path.basename(os.path.normpath(source_folder))
    return config, next((n for n, c in albor.PRESETS.items() if c == config), name)


def load_data(run, source_folder):
    """The tokenizer, the validation and training rows, the schedule and their provenance."""
    args, config = run.args, run.config
    run.corpus = Corpus(args["data"])
    run.tok, run.tok_data, run.tok_origin = get_tokenizer(args, config, run.corpus, source_folder)
    if args["resume"] and args["tokenizer"]:
        saved_tok = (Path(args["resume"]) / TOKENIZER_FILE).read_bytes()
        if sha256_hex(saved_tok) != sha256_hex(run.tok_data):
            raise RunError(f"--tokenizer {args['tokenizer']} is not the tokenizer of the resumed run "
                           f"({os.path.join(args['resume'], TOKENIZER_FILE)})")
    data_start = time.perf_counter()
    run.val_texts, train_texts = take_documents(run.corpus, args)
    run.train_inputs, run.train_targets = make_rows(run.tok, train_texts, args["seq_len"])
    run.val_inputs, run.val_targets = make_rows(run.tok, run.val_texts, args["seq_len"])
    run.data_seconds = time.perf_counter() - data_start
    run.steps_per_pass = max(1, len(run.train_inputs) // (args["batch_size"] * args["grad_accum"]))
    run.max_steps = args["max_steps"] or run.steps_per_pass
    run.warmup = args["warmup"] if args["warmup"] is not None else albor.default_warmup(run.max_steps)
    run.min_lr = args["min_lr"] if args["min_lr"] is not None else args["lr"] / 10
    run.tokens_per_step = args["batch_size"] * args["grad_accum"] * args["seq_len"]
    run.provenance = {
        "data": run.corpus.description,
        "train_rows": len(run.train_inputs), "val_rows": len(run.val_inputs),
        "train_rows_sha256": sha256_hex(run.train_inputs.tobytes() + run.train_targets.tobytes()),
        "val_rows_sha256": sha256_hex(run.val_inputs.tobytes() + run.val_targets.tobytes()),
        "tokenizer_sha256": sha256_hex(run.tok_data),
        "config_sha256": sha256_hex(json.dumps(checkpoint.config_to_hf(config), sort_keys=True).encode()),
        "skipped_documents": run.corpus.skipped,
    }


def load_weights(run):
    """Weights and optimizer: the resumed run's, or --init's weights, or fresh ones."""
    args, state = run.args, run.state
    run.loss_curve, run.timing, run.start_step = [], {}, 0
    if args["resume"]:
        _, run.params, run.start_step = checkpoint.load_checkpoint(args["resume"])
        if run.start_step != state["step"]:
            raise RunError(f"{os.path.join(args['resume'], TRAINER_STATE)} is at step {state['step']} but "
                           f"model.safetensors at step {run.start_step} (an interrupted save?)")
        if state.get("provenance", {}).get("train_rows_sha256") != run.provenance["train_rows_sha256"]:
            raise RunError(f"the training rows differ from those of the run saved in {args['resume']} "
                           "(has the data changed?); --resume needs the same rows")
        run.optimizer = checkpoint.load_optimizer(args["resume"], run.params, step=run.start_step,
                                                  optimizer_class=cpu.FastAdamW)
        run.optimizer.beta1, run.optimizer.beta2 = args["beta1"], args["beta2"]
        run.optimizer.eps, run.optimizer.weight_decay = args["eps"], args["weight_decay"]
        run.loss_curve = list(state.get("loss_curve", []))[:run.start_step]
        run.timing = dict(state.get("timing", {}))
    else:
        if args["init"]:
            _, run.params, _ = checkpoint.load_checkpoint(args["init"])
        else:
            run.params = albor.init_params(run.config, seed=args["seed"])
        run.optimizer = cpu.FastAdamW(run.params, betas=(args["beta1"], args["beta2"]), eps=args["eps"],
                                      weight_decay=args["weight_decay"])
    gpu.configure(matmul_dtype=args["dtype"])   # fp32 unless --dtype (GPU only)
    run.scaler = gpu.LossScaler() if args["dtype"] == "fp16" else None
    if run.scaler and state and state.get("loss_scaler"):
        run.scaler.load_state(state["loss_scaler"])
    run.workers = cpu.DataParallel(run.group.threads(cpu.cpu_workers()), run.group.rank, run.group.size)


def check_ranks_agree(run):
    """With MPI: every rank must have read the same rows and tokenizer and hold the same weights
    (the same files, and the same Python for the standard library, on every machine)."""
    if run.group.size == 1:
        return
    mine = {name: run.provenance[name] for name in ("train_rows_sha256", "val_rows_sha256", "tokenizer_sha256",
                                                    "config_sha256")}
    mine.update(weights_sha256=distributed.digest(run.params[name] for name in sorted(run.params)),
                step=str(run.start_step))
    difference = run.group.first_difference(mine)
    if difference:
        raise RunError(f"{difference}: every rank must read the same data, tokenizer and checkpoint "
                       "(the same files, and the same Python, on every machine)")


def print_setup(run):
    args, workers = run.args, run.workers
    on = f"{albor.BACKEND}, {workers.workers} worker threads" if workers.workers > 1 else albor.BACKEND
    if run.group.size > 1:
        on = (f"{albor.BACKEND}, {run.group.size} MPI ranks of {workers.workers} worker "
              f"thread{'s' if workers.workers > 1 else ''} each")
    print(f"albor {run.config_name}: {albor.param_count(run.config):,} parameters on {on}; "
          f"data: {run.corpus.description}")
    print(f"tokenizer: {run.tok_origin}, {run.tok.vocab_size:,} tokens")
    if args["eval_only"]:
        print(f"evaluating {args['resume']} (step {run.start_step})")
        return
    counted = int((run.train_targets != albor.IGNORE_INDEX).sum())
    print(f"{len(run.train_inputs)} training rows, {len(run.val_inputs)} validation rows, "
          f"{args['seq_len']} tokens each ({counted:,} non-pad training targets); "
          f"{run.max_steps} steps of {args['grad_accum']} x {args['batch_size']} rows "
          f"(one pass = {run.steps_per_pass} steps); lr {args['lr']:g} warmup {run.warmup} "
          f"min-lr {run.min_lr:g}")
    if run.start_step:
        print(f"resuming {args['resume']} at step {run.start_step}")
    if run.start_step >= run.max_steps:
        print(f"note: the run is already at step {run.start_step} of {run.max_steps}; nothing to train")


def start_metrics_log(run):
    """metrics.jsonl in the run folder: the resumed run's lines up to its step, then ours
    (rank 0 writes it)."""
    same_folder = run.args["resume"] and os.path.abspath(run.out) == os.path.abspath(run.args["resume"])
    run.last_saved = run.start_step if same_folder else None
    if not run.group.is_root:
        return
    os.makedirs(run.out, exist_ok=True)
    old_lines = []
    resumed = os.path.join(run.args["resume"] or "", METRICS)
    if run.args["resume"] and os.path.exists(resumed):
        with open(resumed, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= run.start_step:
                        old_lines.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass   # a line cut by a crash
    checkpoint.atomic_write_bytes(os.path.join(run.out, METRICS), "".join(old_lines).encode("utf-8"))


def save(run, step, val_loss=None, finished=False, parse=None):
    """Write the checkpoint (atomically) for the state after `step` optimizer steps. Rank 0
    writes it; the other ranks (which hold the same state) only note that it is there."""
    if not run.group.is_root:
        run.last_saved = step
        return
    save_start = time.perf_counter()
    curve, timing = run.loss_curve, run.timing
    trainer_state = {"step": step, "args": run.args, "loss_curve": curve, "timing": timing,
                     "provenance": run.provenance,
                     "loss_scaler": run.scaler.state() if run.scaler else None}
    final_model = {
        "config": run.config_name, "finished": finished, "steps": step, "max_steps": run.max_steps,
        "warmup": run.warmup, "lr": run.args["lr"], "min_lr": run.min_lr,
        "final_loss": curve[-1] if curve else None, "best_loss": min(curve) if curve else None,
        "perplexity": perplexity(curve[-1]) if curve else None,
        "val_loss": val_loss, "val_perplexity": perplexity(val_loss),
        "parse_rate": parse["parse_rate"] if parse else None, "parse_eval": parse,
        "loss_curve": curve, "tokens": step * run.tokens_per_step,
        "timing": timing, "provenance": run.provenance, "args": run.args,
    }
    extra = {TOKENIZER_FILE: run.tok_data,
             TRAINER_STATE: (json.dumps(trainer_state, indent=1) + "\n").encode(),
             FINAL_MODEL: (json.dumps(final_model, indent=1) + "\n").encode()}
    checkpoint.save_checkpoint(run.out, run.config, run.params, run.optimizer, step=step,
                               extra_files=extra)
    run.last_saved = step
    timing["save_seconds"] = timing.get("save_seconds", 0.0) + time.perf_counter() - save_start


class StopRequest:
    """Ctrl-C: the first one lets the current step finish, then the run saves a
    resumable checkpoint and exits; a second one quits at once (the last saved
    checkpoint stays as it was: saves are atomic)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint "
                   "(press Ctrl-C again to quit without saving)")


def train_loop(run):
    """Steps from run.start_step until max_steps or a Ctrl-C; returns (last step, stopped)."""
    for key in ("train_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds",
                "attention_seconds", "other_layers_seconds", "data_seconds"):
        run.timing.setdefault(key, 0.0)
    run.timing["data_seconds"] += run.data_seconds
    stop = StopRequest()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, stop) if in_main_thread else None
    # a layer clock on the CPU only: on a GPU it would have to wait for every layer
    layer_clock = cpu.LayerClock() if albor.BACKEND == "numpy" else None
    step, stopping = run.start_step, False
    bar = tqdm(total=run.max_steps, initial=step, unit="step", dynamic_ncols=True)
    metrics_path = os.path.join(run.out, METRICS) if run.group.is_root else os.devnull  # rank 0 writes
    try:
        with layer_clock or contextlib.nullcontext(), open(metrics_path, "a", encoding="utf-8") as metrics:
            while step < run.max_steps and not stopping:
                step += 1
                record = one_step(run, step, layer_clock)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{run.tokens_per_step / record['seconds']:.0f}")
                if run.args["save_every"] and step % run.args["save_every"] == 0 and step < run.max_steps:
                    save(run, step)
                stopping = run.group.any(stop.requested)   # a Ctrl-C on any rank stops every rank
    except Diverged as e:
        kept = (f"the last good checkpoint (step {run.last_saved}) stays in {run.out}"
                if run.last_saved is not None else f"no checkpoint of this run was saved ({run.out} is left as it was)")
        raise RunError(f"{e}; stopping: {kept}") from None
    except KeyboardInterrupt:
        kept = (f"the last checkpoint (step {run.last_saved}) stays in {run.out}"
                if run.last_saved is not None else "nothing was saved")
        raise SystemExit(f"train.py: interrupted; {kept}") from None
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
    return step, stopping and step < run.max_steps


def one_step(run, step, layer_clock):
    """Optimizer step number `step` (1-based): its rows, train_step, the timing; returns its
    metrics.jsonl record."""
    args, timing = run.args, run.timing
    step_start = time.perf_counter()
    lr = albor.lr_at(step, run.max_steps, args["lr"], run.warmup, run.min_lr)
    rows = np.stack([micro_batch_rows(step, m, args, len(run.train_inputs))
                     for m in range(args["grad_accum"])])      # (grad_accum, B)
    scale = run.scaler.scale if run.scaler else None
    loss, grad_norm, n_valid, stepped = train_step(
        run.params, run.config, run.optimizer, run.train_inputs[rows], run.train_targets[rows],
        lr, args["grad_clip"], step, timing, run.scaler, run.workers, run.group)
    if not stepped:
        tqdm.write(f"step {step}: a gradient overflowed in fp16 at loss scale {scale:g}; "
                   f"step skipped, loss scale now {run.scaler.scale:g}")
    seconds = time.perf_counter() - step_start
    timing["train_seconds"] += seconds
    if layer_clock:  # the layer clock adds up every worker thread's time: per thread, on average
        threads = len(run.workers.my_rows(args["batch_size"]))
        layers = layer_clock.take()
        attention = layers.pop("attention", 0.0)
        timing["attention_seconds"] += attention / threads
        timing["other_layers_seconds"] += sum(layers.values()) / threads
    run.loss_curve.append(loss)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "tokens": run.tokens_per_step, "valid_tokens": n_valid, "seconds": seconds}
    if run.scaler:
        record.update(loss_scale=scale, skipped=not stepped)
    return record


def finish(run, step, wall_start):
    """After the last step: validation loss, parse rate, the checkpoint, the summary."""
    timing = run.timing
    eval_start = time.perf_counter()
    val_loss = evaluate(run.params, run.config, run.val_inputs, run.val_targets,
                        run.args["batch_size"], run.workers, run.group)
    if not run.group.is_root:
        return   # rank 0 samples, saves and reports
    parse = parse_eval(run.params, run.config, run.tok, run.val_texts, run.args)
    timing["eval_seconds"] = timing.get("eval_seconds", 0.0) + time.perf_counter() - eval_start
    timing["wall_seconds"] = timing.get("wall_seconds", 0.0) + time.perf_counter() - wall_start
    train_seconds = timing["train_seconds"]
    timing["tokens_per_second"] = step * run.tokens_per_step / train_seconds if train_seconds else None
    split_time(timing)
    save(run, step, val_loss=val_loss, finished=True, parse=parse)
    print_summary(run.config_name, step, run.tokens_per_step, run.loss_curve, val_loss,
                  len(run.val_inputs), timing, run.out, parse)


def evaluate_only(run):
    """--eval-only: validation loss, perplexity and parse rate of the --resume checkpoint, printed
    and written into final_model.json (in --out, by default the checkpoint's folder)."""
    args = run.args
    start = time.perf_counter()
    val_loss = evaluate(run.params, run.config, run.val_inputs, run.val_targets, args["batch_size"],
                        run.workers, run.group)
    if not run.group.is_root:
        return 0   # rank 0 samples, writes and reports
    parse = parse_eval(run.params, run.config, run.tok, run.val_texts, args)
    source = os.path.join(args["resume"], FINAL_MODEL)
    final_model = read_json(source, "the run's summary") if os.path.exists(source) else {}
    final_model.update(val_loss=val_loss, val_perplexity=perplexity(val_loss),
                       parse_rate=parse["parse_rate"], parse_eval=parse)
    os.makedirs(args["out"], exist_ok=True)
    checkpoint.atomic_write_bytes(os.path.join(args["out"], FINAL_MODEL),
                                  (json.dumps(final_model, indent=1) + "\n").encode())
    print_losses(None, val_loss, len(run.val_inputs))
    print(sample.describe_parse_rate(parse))
    print(f"evaluated in {time.perf_counter() - start:.1f} s; written to {os.path.join(args['out'], FINAL_MODEL)}")
    return 0


def split_time(timing):
    """Where the training time went, as the model card reported it: matmuls, attention,
    other layers, optimizer (attention/other measured by cpu.LayerClock on the CPU)."""
    layers = timing["attention_seconds"] + timing["other_layers_seconds"]
    model = timing["forward_seconds"] + timing["backward_seconds"]
    if layers > 0:
        timing["matmul_seconds"] = model - layers
    return timing


def print_losses(loss_curve, val_loss, val_rows):
    if loss_curve:
        print(f"loss {loss_curve[0]:.4f} -> {loss_curve[-1]:.4f} (perplexity {perplexity(loss_curve[-1]):,.1f}), "
              f"best {min(loss_curve):.4f}")
    if val_loss is not None:
        print(f"validation loss {val_loss:.4f} (perplexity {perplexity(val_loss):,.1f}) on {val_rows} rows")
    else:
        print("validation: none (--val-rows 0)")


def print_summary(config_name, step, tokens_per_step, loss_curve, val_loss, val_rows, timing, out, parse=None):
    train = timing["train_seconds"]
    tokens = step * tokens_per_step
    print_losses(loss_curve, val_loss, val_rows)
    if parse is not None:
        print(sample.describe_parse_rate(parse))
    if train:
        print(f"{config_name}: {step} steps, {tokens:,} tokens in {train:.1f} s of training: "
              f"{tokens / train:,.0f} tokens/s; wall time {timing['wall_seconds']:.1f} s")
        if "matmul_seconds" in timing:
            parts = [("matmuls", timing["matmul_seconds"]), ("attention", timing["attention_seconds"]),
                     ("other layers", timing["other_layers_seconds"]), ("optimizer", timing["optimizer_seconds"])]
        else:
            parts = [("forward", timing["forward_seconds"]), ("backward", timing["backward_seconds"]),
                     ("optimizer", timing["optimizer_seconds"])]
        parts.append(("data/bookkeeping", train - sum(seconds for _, seconds in parts)))
        print("time: " + ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / train:.0f}%)" for name, seconds in parts))
    print(f"checkpoint: {out}")


def main(argv=None):
    try:
        group = distributed.start()   # one process; or, under mpiexec, this rank's place among them
    except distributed.LaunchError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    with group.stop_all_on_failure():   # with MPI: an error on any rank ends every rank
        try:
            return execute(argv, group)
        except (RunError, checkpoint.CheckpointError) as e:
            raise SystemExit(f"train.py: error: {e}") from None
        except KeyboardInterrupt:   # Ctrl-C before the training loop (which handles its own)
            raise SystemExit("train.py: interrupted before training started; nothing was saved") from None


def execute(argv, group=distributed.SINGLE):
    """The whole run: settings, setup, the loop, and the finish (or a save when stopped)."""
    wall_start = time.perf_counter()
    args, given = parse_settings(argv)
    cpu.keep_freed_memory()  # the CPU step's temporaries are reused, not page-faulted in anew
    with group.root_first():   # with MPI, rank 0 first: a tokenizer is trained (and cached) once
        run = setup(args, given, group)
    check_ranks_agree(run)
    print_setup(run)
    if run.args["eval_only"]:
        return evaluate_only(run)
    start_metrics_log(run)
    step, stopped = train_loop(run)
    if stopped:
        save(run, step)
        print(f"stopped at step {step} of {run.max_steps}; saved a checkpoint in {run.out}. "
              f"Continue with: python train.py --resume {run.out}")
        return 0
    finish(run, step, wall_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
