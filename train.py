"""Train albor on Python code: `python train.py --rows 500`.

What a run does, in the order of the functions below:

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
4. Model and optimizer from albor.py: init_params, AdamW, lr_at (linear warmup,
   cosine decay), clip_grad_norm.
5. The loop: each optimizer step runs --grad-accum micro-batches of
   --batch-size rows, adds up their gradients (each weighted by its share of
   the step's non-pad tokens, so the step's loss is the mean over all of them),
   clips the global norm, takes an AdamW step and logs a line to metrics.jsonl.
   On a CPU each micro-batch's rows are shared out over one worker thread per
   core (albor.DataParallel, with single-threaded BLAS: set below, before NumPy loads).
   On a GPU, --dtype tf32/bf16/fp16 runs the matmuls in that precision (fp16
   with dynamic loss scaling: a step whose gradients overflow is skipped).
6. At the end: validation loss, the parse rate (the share of --eval-samples
   sampled completions that ast.parse accepts, see sample.py), a summary, and
   the checkpoint. `--eval-only --resume DIR` computes just these for DIR.

The run folder (--out, default checkpoints/<config>):
    model.safetensors, config.json, tokenizer.json   a Hugging Face LlamaForCausalLM folder
    optimizer.safetensors, trainer_state.json        what --resume needs
    metrics.jsonl                                    one JSON line per optimizer step
    final_model.json                                 losses, parse rate, timing and provenance of the run

Ctrl-C stops after the current step and saves a checkpoint that --resume
continues exactly (same final weights, byte for byte, as a run never stopped).
"""
import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

if "numpy" not in sys.modules:  # OpenBLAS reads this when NumPy loads it: single-threaded BLAS,
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the cores go to albor.DataParallel's workers
import numpy as np  # noqa: E402  (after the line above)
from tqdm import tqdm

import albor
import sample
from tokenizer import EOT_ID, PAD_ID, Tokenizer, stdlib_python_files

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
               "  python train.py --init checkpoints/albor-base-50m --data my_code/ --out runs/ft",
        formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, help, **kwargs):
        default = DEFAULTS[name.lstrip("-").replace("-", "_")]
        if default is not None:
            help += f" (default: {default})"
        parser.add_argument(name, help=help, **kwargs)

    flag("--config", f"model preset: {', '.join(albor.PRESETS)}; with --resume/--init the model's "
                     "shape comes from the checkpoint and a different --config is an error")
    flag("--data", "training text: a folder (every file in it, one row each), a .txt file (one "
                   "row per blank-line-separated block) or a .jsonl file (one row per line's "
                   "\"text\"); default: the .py files of this Python's standard library",
         metavar="PATH")
    flag("--rows", "training rows (documents); one pass over them is the default run length",
         type=int, metavar="N")
    flag("--val-rows", "documents held out for the validation loss (0: none)", type=int, metavar="N")
    flag("--seq-len", "tokens per row seen by the model (rows are cut to this + 1 and padded)",
         type=int, metavar="T")
    flag("--batch-size", "rows per micro-batch (one forward + backward)", type=int, metavar="B")
    flag("--grad-accum", "micro-batches per optimizer step (their gradients are summed)",
         type=int, metavar="N")
    flag("--max-steps", "optimizer steps; default: one pass over the training rows "
                        "(rows // (batch-size * grad-accum)); more passes reshuffle the rows",
         type=int, metavar="N")
    flag("--lr", "peak learning rate", type=float)
    flag("--min-lr", "learning-rate floor the cosine decays to; default: lr / 10", type=float)
    flag("--warmup", "linear warmup steps (0: start at the peak); default: 10%% of the steps, "
                     "at most 100", type=int, metavar="N")
    flag("--beta1", "AdamW beta1 (first-moment decay)", type=float)
    flag("--beta2", "AdamW beta2 (second-moment decay)", type=float)
    flag("--eps", "AdamW epsilon", type=float)
    flag("--weight-decay", "AdamW decoupled weight decay, applied to the weight matrices (and the "
                           "tied embedding), not to the norm weights", type=float)
    flag("--grad-clip", "clip the global gradient norm to this (0: no clipping)", type=float)
    flag("--seed", "seed of the weights' init and of the data order", type=int)
    flag("--out", "run folder for the checkpoint and logs; default: checkpoints/<config>, or the "
                  "--resume folder", metavar="DIR")
    flag("--resume", "continue the run saved in DIR: weights, optimizer, data position and settings "
                     "(flags given now override the saved ones, except the data's)", metavar="DIR")
    flag("--init", "start from the weights in checkpoint folder DIR, with a fresh optimizer",
         metavar="DIR")
    flag("--tokenizer", "tokenizer.json to use; default: the checkpoint's with --resume/--init, "
                        "else one trained on the corpus (cached)", metavar="FILE")
    flag("--save-every", "also save a checkpoint every N steps (0: only at the end and on Ctrl-C)",
         type=int, metavar="N")
    flag("--eval-samples", "at the end, sample N completions of the held-out documents' first lines "
                           "and report the share that ast.parse accepts (the parse rate; 0: skip)",
         type=int, metavar="N")
    flag("--eval-only", "evaluate the --resume checkpoint instead of training: validation loss, "
                        "perplexity and parse rate, printed and written to its final_model.json",
         action="store_true")
    flag("--dtype", "precision of the matmuls, GPU only: fp32, tf32, bf16 or fp16 (fp16 with dynamic "
                    "loss scaling); weights, optimizer state and all other layers stay float32",
         choices=albor.MATMUL_DTYPES)
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
            albor.atomic_write_bytes(path, tokenizer_bytes(tok))
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
# 5. The loop's helpers: timing, Ctrl-C, evaluation


class LayerClock:
    """Adds up the time spent in albor's layer functions (attention_*, rmsnorm_*, ...).

    While active, albor.X_forward / albor.X_backward are replaced by timed
    wrappers (albor's forward and backward call them through module globals).
    Whatever forward + backward time lies outside them is the matmuls (with the
    residual adds and reshapes). CPU only: on a GPU the wrappers would have to
    wait for the GPU at every layer, so there only whole phases are timed.
    """

    KINDS = {"attention": "attention", "embedding": "other", "rmsnorm": "other",
             "rope": "other", "swiglu": "other", "cross_entropy": "other"}

    def __init__(self):
        self.seconds = {"attention": 0.0, "other": 0.0}
        self.originals = {}
        if albor.BACKEND == "numpy":
            for layer in self.KINDS:
                for direction in ("forward", "backward"):
                    name = f"{layer}_{direction}"
                    if hasattr(albor, name):
                        self.originals[name] = getattr(albor, name)
        self.local = threading.local()          # per thread: inside a timed layer already?
        self.lock = threading.Lock()            # worker threads add into self.seconds too

    def wrap(self, fn, kind):
        def timed(*args, **kwargs):
            if getattr(self.local, "inside", False):   # a layer called by a timed layer counts once
                return fn(*args, **kwargs)
            self.local.inside = True
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[kind] += time.perf_counter() - start
                self.local.inside = False
        return timed

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(albor, name, self.wrap(fn, self.KINDS[name.rsplit("_", 1)[0]]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(albor, name, fn)


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


class Diverged(Exception):
    """A non-finite loss or gradient norm."""


def evaluate(params, config, inputs, targets, batch_size, workers=None):
    """Mean loss over all non-pad target tokens of (inputs, targets), or None for no rows.
    Each batch's rows are shared out over `workers` (an albor.DataParallel; by default one
    per core when BLAS is single-threaded, see albor.cpu_workers)."""
    workers = workers or albor.DataParallel(albor.cpu_workers())
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        idx = albor.xp.asarray(inputs[start:start + batch_size])
        tgt = albor.xp.asarray(targets[start:start + batch_size])
        n_valid = int((targets[start:start + batch_size] != albor.IGNORE_INDEX).sum())
        if n_valid == 0:
            continue
        total += workers.loss(params, config, idx, tgt) * n_valid
        count += n_valid
    return total / count if count else None


def train_step(params, config, optimizer, inputs, targets, lr, grad_clip, step, timing, scaler=None,
               workers=None):
    """One optimizer step on the micro-batches inputs[m], targets[m] (each (B, T)).

    Returns (loss, pre-clip gradient norm, number of non-pad targets, whether the
    optimizer stepped). The loss
    is the mean over the non-pad targets of all micro-batches together: a
    micro-batch's mean loss counts with weight n_valid[m] / n_valid_step, and
    backward's loss_scale gives its gradient the same weight, added into one
    gradient dict (so 4 micro-batches of 4 rows = one batch of 16 rows).
    With --dtype fp16 the scaler's scale multiplies that loss_scale too, and
    scaler.step unscales, clips and skips the update if a gradient overflowed.
    Phase times come from albor.PhaseClock (CUDA events on the GPU: no waiting
    between phases; the step waits for the GPU once, at its end).
    With workers (an albor.DataParallel) of more than one thread, each micro-batch's rows
    are shared out over them (forward and backward run in the workers, each timed by its
    own thread's clock), and their gradients are summed before clipping.
    """
    n_valid = [int((t != albor.IGNORE_INDEX).sum()) for t in targets]
    n_valid_step = sum(n_valid)
    loss_scale = scaler.scale if scaler else 1.0
    parallel = workers is not None and workers.workers > 1
    grads, loss_sum = None, 0.0
    clock = albor.PhaseClock()
    clock.start()
    if parallel:
        worker_seconds = dict(workers.seconds)
    for m in range(len(inputs)):
        idx, tgt = albor.xp.asarray(inputs[m]), albor.xp.asarray(targets[m])
        weight = loss_scale * n_valid[m] / n_valid_step  # this micro-batch's share of the step
        if parallel:
            loss = workers.forward_backward(params, config, idx, tgt, loss_scale=weight)
            clock.mark("forward_backward_seconds")
        else:
            loss, cache = albor.forward(params, config, idx, tgt)
            clock.mark("forward_seconds")
            if math.isfinite(loss):
                grads = albor.backward(params, config, cache, loss_scale=weight, grads=grads)
            del cache
            clock.mark("backward_seconds")
        if not math.isfinite(loss):
            if parallel:
                workers.gradients()  # drop the step's partial gradients
            raise Diverged(f"the loss is {loss} at step {step} (micro-batch {m + 1} of {len(inputs)})")
        loss_sum += loss * n_valid[m]
    if parallel:
        grads = workers.gradients()
        clock.mark("backward_seconds")   # the sum of the workers' gradients
    if scaler:
        try:
            grad_norm, stepped = scaler.step(optimizer, params, grads, lr, grad_clip)
        except FloatingPointError as e:
            raise Diverged(f"{e} (step {step})") from None
    else:
        grad_norm, stepped = albor.clip_grad_norm(grads, grad_clip), True
        if not math.isfinite(grad_norm):
            raise Diverged(f"the gradient norm is {grad_norm} at step {step}")
        optimizer.step(params, grads, lr)
    clock.mark("optimizer_seconds")
    phases = clock.collect()
    if parallel:  # split the workers' phase as their own clocks did
        both = phases.pop("forward_backward_seconds")
        forward_share = workers.seconds["forward"] - worker_seconds["forward"]
        backward_share = workers.seconds["backward"] - worker_seconds["backward"]
        phases["forward_seconds"] = both * forward_share / (forward_share + backward_share)
        phases["backward_seconds"] += both * backward_share / (forward_share + backward_share)
    for phase, seconds in phases.items():
        timing[phase] += seconds
    return loss_sum / n_valid_step, grad_norm, n_valid_step, stepped


def perplexity(loss):
    return math.exp(min(loss, 700.0)) if loss is not None else None


def parse_eval(params, config, tok, val_texts, args):
    """The parse rate (sample.parse_rate): the share of --eval-samples completions of the held-out
    documents' first lines that ast.parse accepts, up to 128 new tokens each (fewer if the
    context is short), seeded with --seed."""
    max_new_tokens = min(128, config.max_position_embeddings // 2)
    return sample.parse_rate(params, config, tok, sample.eval_prompts(val_texts), args["eval_samples"],
                             max_new_tokens=max_new_tokens, seed=args["seed"])


def evaluate_only(params, config, tok, val_inputs, val_targets, val_texts, args, workers):
    """--eval-only: validation loss, perplexity and parse rate of the --resume checkpoint, printed
    and written into final_model.json (in --out, by default the checkpoint's folder)."""
    start = time.perf_counter()
    val_loss = evaluate(params, config, val_inputs, val_targets, args["batch_size"], workers)
    parse = parse_eval(params, config, tok, val_texts, args)
    source = os.path.join(args["resume"], FINAL_MODEL)
    final_model = read_json(source, "the run's summary") if os.path.exists(source) else {}
    final_model.update(val_loss=val_loss, val_perplexity=perplexity(val_loss),
                       parse_rate=parse["parse_rate"], parse_eval=parse)
    os.makedirs(args["out"], exist_ok=True)
    albor.atomic_write_bytes(os.path.join(args["out"], FINAL_MODEL),
                             (json.dumps(final_model, indent=1) + "\n").encode())
    if val_loss is not None:
        print(f"validation loss {val_loss:.4f} (perplexity {perplexity(val_loss):,.1f}) on {len(val_inputs)} rows")
    else:
        print("validation: none (--val-rows 0)")
    print(sample.describe_parse_rate(parse))
    print(f"evaluated in {time.perf_counter() - start:.1f} s; written to {os.path.join(args['out'], FINAL_MODEL)}")
    return 0


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    try:
        return run(argv)
    except (RunError, albor.CheckpointError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
    except KeyboardInterrupt:   # Ctrl-C before the training loop (which handles its own)
        raise SystemExit("train.py: interrupted before training started; nothing was saved") from None


def run(argv):
    wall_start = time.perf_counter()
    args, given = parse_settings(argv)
    albor.keep_freed_memory()  # the CPU step's temporaries are reused, not page-faulted in anew
    state = None

    # --- model shape and starting weights --------------------------------------------------
    source_folder = args["resume"] or args["init"]
    if args["resume"]:
        args, state = merge_resumed_settings(args, given)
    if source_folder:
        config = albor.load_config(source_folder)
        if "config" in given and albor.get_config(args["config"]) != config:
            raise RunError(f"--config {args['config']} contradicts {os.path.join(source_folder, 'config.json')} "
                           "(the model's shape comes from the checkpoint; drop --config)")
        name = os.path.basename(os.path.normpath(source_folder))
        config_name = next((n for n, c in albor.PRESETS.items() if c == config), name)
    else:
        config = albor.get_config(args["config"])
        config_name = args["config"]
    args["config"] = config_name
    if args["out"] is None:
        args["out"] = os.path.join("checkpoints", config_name)
    out = args["out"]
    if args["seq_len"] > config.max_position_embeddings:
        raise RunError(f"--seq-len {args['seq_len']} exceeds the model's max_position_embeddings "
                       f"{config.max_position_embeddings}")

    # --- data and tokenizer ----------------------------------------------------------------
    corpus = Corpus(args["data"])
    tok, tok_data, tok_origin = get_tokenizer(args, config, corpus, source_folder)
    if args["resume"] and args["tokenizer"]:
        saved_tok = (Path(args["resume"]) / TOKENIZER_FILE).read_bytes()
        if sha256_hex(saved_tok) != sha256_hex(tok_data):
            raise RunError(f"--tokenizer {args['tokenizer']} is not the tokenizer of the resumed run "
                           f"({os.path.join(args['resume'], TOKENIZER_FILE)})")
    data_start = time.perf_counter()
    val_texts, train_texts = take_documents(corpus, args)
    train_inputs, train_targets = make_rows(tok, train_texts, args["seq_len"])
    val_inputs, val_targets = make_rows(tok, val_texts, args["seq_len"])
    data_seconds = time.perf_counter() - data_start
    n_train = len(train_inputs)
    steps_per_pass = max(1, n_train // (args["batch_size"] * args["grad_accum"]))
    max_steps = args["max_steps"] or steps_per_pass
    warmup = args["warmup"] if args["warmup"] is not None else albor.default_warmup(max_steps)
    min_lr = args["min_lr"] if args["min_lr"] is not None else args["lr"] / 10
    provenance = {
        "data": corpus.description,
        "train_rows": n_train, "val_rows": len(val_inputs),
        "train_rows_sha256": sha256_hex(np.ascontiguousarray(train_inputs).tobytes()
                                        + np.ascontiguousarray(train_targets).tobytes()),
        "val_rows_sha256": sha256_hex(val_inputs.tobytes() + val_targets.tobytes()),
        "tokenizer_sha256": sha256_hex(tok_data),
        "config_sha256": sha256_hex(json.dumps(albor.config_to_hf(config), sort_keys=True).encode()),
        "skipped_documents": corpus.skipped,
    }

    # --- parameters and optimizer ----------------------------------------------------------
    loss_curve, timing = [], {}
    if args["resume"]:
        _, params, start_step = albor.load_checkpoint(args["resume"])
        if start_step != state["step"]:
            raise RunError(f"{os.path.join(args['resume'], TRAINER_STATE)} is at step {state['step']} but "
                           f"model.safetensors at step {start_step} (an interrupted save?)")
        saved_provenance = state.get("provenance", {})
        if saved_provenance.get("train_rows_sha256") != provenance["train_rows_sha256"]:
            raise RunError(f"the training rows differ from those of the run saved in {args['resume']} "
                           "(has the data changed?); --resume needs the same rows")
        optimizer = albor.load_optimizer(args["resume"], params, step=start_step)
        optimizer.beta1, optimizer.beta2 = args["beta1"], args["beta2"]
        optimizer.eps, optimizer.weight_decay = args["eps"], args["weight_decay"]
        loss_curve = list(state.get("loss_curve", []))[:start_step]
        timing = dict(state.get("timing", {}))
    else:
        start_step = 0
        if args["init"]:
            _, params, _ = albor.load_checkpoint(args["init"])
        else:
            params = albor.init_params(config, seed=args["seed"])
        optimizer = albor.AdamW(params, betas=(args["beta1"], args["beta2"]), eps=args["eps"],
                                weight_decay=args["weight_decay"])

    albor.set_matmul_dtype(args["dtype"])   # fp32 unless --dtype (GPU only)
    scaler = albor.LossScaler() if args["dtype"] == "fp16" else None
    if scaler and state and state.get("loss_scaler"):
        scaler.load_state(state["loss_scaler"])
    workers = albor.DataParallel(albor.cpu_workers())
    on = f"{albor.BACKEND}, {workers.workers} worker threads" if workers.workers > 1 else albor.BACKEND
    print(f"albor {config_name}: {albor.param_count(config):,} parameters on {on}; "
          f"data: {corpus.description}")
    print(f"tokenizer: {tok_origin}, {tok.vocab_size:,} tokens")
    if args["eval_only"]:
        print(f"evaluating {args['resume']} (step {start_step})")
        return evaluate_only(params, config, tok, val_inputs, val_targets, val_texts, args, workers)
    tokens_per_step = args["batch_size"] * args["grad_accum"] * args["seq_len"]
    print(f"{n_train} training rows, {len(val_inputs)} validation rows, {args['seq_len']} tokens each "
          f"({int((train_targets != albor.IGNORE_INDEX).sum()):,} non-pad training targets); "
          f"{max_steps} steps of {args['grad_accum']} x {args['batch_size']} rows "
          f"(one pass = {steps_per_pass} steps); lr {args['lr']:g} warmup {warmup} min-lr {min_lr:g}")
    if start_step:
        print(f"resuming {args['resume']} at step {start_step}")
    if start_step >= max_steps:
        print(f"note: the run is already at step {start_step} of {max_steps}; nothing to train")

    # --- metrics log: the resumed run's lines up to its step, then ours ----------------------
    os.makedirs(out, exist_ok=True)
    old_lines = []
    if args["resume"] and os.path.exists(os.path.join(args["resume"], METRICS)):
        with open(os.path.join(args["resume"], METRICS), encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        old_lines.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass   # a line cut by a crash
    albor.atomic_write_bytes(os.path.join(out, METRICS), "".join(old_lines).encode("utf-8"))

    last_saved = start_step if args["resume"] and os.path.abspath(out) == os.path.abspath(args["resume"]) else None

    def save(step, val_loss=None, finished=False, parse=None):
        """Write the checkpoint (atomically) for the state after `step` optimizer steps."""
        nonlocal last_saved
        save_start = time.perf_counter()
        trainer_state = {"step": step, "args": args, "loss_curve": loss_curve,
                         "timing": timing, "provenance": provenance,
                         "loss_scaler": scaler.state() if scaler else None}
        final_model = {
            "config": config_name, "finished": finished, "steps": step, "max_steps": max_steps,
            "warmup": warmup, "lr": args["lr"], "min_lr": min_lr,
            "final_loss": loss_curve[-1] if loss_curve else None,
            "best_loss": min(loss_curve) if loss_curve else None,
            "perplexity": perplexity(loss_curve[-1]) if loss_curve else None,
            "val_loss": val_loss, "val_perplexity": perplexity(val_loss),
            "parse_rate": parse["parse_rate"] if parse else None, "parse_eval": parse,
            "loss_curve": loss_curve, "tokens": step * tokens_per_step,
            "timing": timing, "provenance": provenance, "args": args,
        }
        extra = {TOKENIZER_FILE: tok_data,
                 TRAINER_STATE: (json.dumps(trainer_state, indent=1) + "\n").encode(),
                 FINAL_MODEL: (json.dumps(final_model, indent=1) + "\n").encode()}
        albor.save_checkpoint(out, config, params, optimizer, step=step, extra_files=extra)
        last_saved = step
        timing["save_seconds"] = timing.get("save_seconds", 0.0) + time.perf_counter() - save_start

    # --- the loop ----------------------------------------------------------------------------
    for key in ("train_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds",
                "attention_seconds", "other_layers_seconds", "data_seconds"):
        timing.setdefault(key, 0.0)
    timing["data_seconds"] += data_seconds
    stop = StopRequest()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, stop) if in_main_thread else None
    step = start_step
    bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
    try:
        with LayerClock() as clock, open(os.path.join(out, METRICS), "a", encoding="utf-8") as metrics:
            while step < max_steps and not stop.requested:
                step_start = time.perf_counter()
                s = step + 1
                lr = albor.lr_at(s, max_steps, args["lr"], warmup, min_lr)
                micro_rows = np.stack([micro_batch_rows(s, m, args, n_train)
                                       for m in range(args["grad_accum"])])      # (grad_accum, B)
                attention_before, other_before = clock.seconds["attention"], clock.seconds["other"]
                scale = scaler.scale if scaler else None
                step_loss, grad_norm, n_valid_step, stepped = train_step(
                    params, config, optimizer, train_inputs[micro_rows], train_targets[micro_rows],
                    lr, args["grad_clip"], s, timing, scaler, workers)
                if not stepped:
                    tqdm.write(f"step {s}: a gradient overflowed in fp16 at loss scale {scale:g}; "
                               f"step skipped, loss scale now {scaler.scale:g}")
                step_end = time.perf_counter()
                timing["train_seconds"] += step_end - step_start
                # the layer clock adds up every worker thread's time: per thread, on average
                threads = len(albor.row_shards(args["batch_size"], workers.workers))
                timing["attention_seconds"] += (clock.seconds["attention"] - attention_before) / threads
                timing["other_layers_seconds"] += (clock.seconds["other"] - other_before) / threads
                step = s
                loss_curve.append(step_loss)
                record = {"step": s, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens": tokens_per_step, "valid_tokens": n_valid_step,
                          "seconds": step_end - step_start}
                if scaler:
                    record.update(loss_scale=scale, skipped=not stepped)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_step / (step_end - step_start):.0f}")
                if args["save_every"] and step % args["save_every"] == 0 and step < max_steps:
                    save(step)
    except Diverged as e:
        kept = (f"the last good checkpoint (step {last_saved}) stays in {out}" if last_saved is not None
                else f"no checkpoint of this run was saved ({out} is left as it was)")
        raise RunError(f"{e}; stopping: {kept}") from None
    except KeyboardInterrupt:
        kept = (f"the last checkpoint (step {last_saved}) stays in {out}" if last_saved is not None
                else "nothing was saved")
        raise SystemExit(f"train.py: interrupted; {kept}") from None
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)

    if stop.requested and step < max_steps:
        save(step)
        print(f"stopped at step {step} of {max_steps}; saved a checkpoint in {out}. "
              f"Continue with: python train.py --resume {out}")
        return 0

    # --- the end: validation, checkpoint, summary --------------------------------------------
    eval_start = time.perf_counter()
    val_loss = evaluate(params, config, val_inputs, val_targets, args["batch_size"], workers)
    parse = parse_eval(params, config, tok, val_texts, args)
    timing["eval_seconds"] = timing.get("eval_seconds", 0.0) + time.perf_counter() - eval_start
    timing["wall_seconds"] = timing.get("wall_seconds", 0.0) + time.perf_counter() - wall_start
    train_seconds = timing["train_seconds"]
    timing["tokens_per_second"] = step * tokens_per_step / train_seconds if train_seconds else None
    split_time(timing)
    save(step, val_loss=val_loss, finished=True, parse=parse)
    print_summary(config_name, step, tokens_per_step, loss_curve, val_loss, len(val_inputs), timing, out, parse)
    return 0


def split_time(timing):
    """Where the training time went, as the model card reported it: matmuls, attention,
    other layers, optimizer (attention/other measured by LayerClock on the CPU)."""
    layers = timing["attention_seconds"] + timing["other_layers_seconds"]
    model = timing["forward_seconds"] + timing["backward_seconds"]
    if layers > 0:
        timing["matmul_seconds"] = model - layers
    return timing


def print_summary(config_name, step, tokens_per_step, loss_curve, val_loss, val_rows, timing, out, parse=None):
    train = timing["train_seconds"]
    tokens = step * tokens_per_step
    if loss_curve:
        print(f"loss {loss_curve[0]:.4f} -> {loss_curve[-1]:.4f} (perplexity {perplexity(loss_curve[-1]):,.1f}), "
              f"best {min(loss_curve):.4f}")
    if val_loss is not None:
        print(f"validation loss {val_loss:.4f} (perplexity {perplexity(val_loss):,.1f}) on {val_rows} rows")
    else:
        print("validation: none (--val-rows 0)")
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
        rest = train - sum(seconds for _, seconds in parts)
        parts.append(("data/bookkeeping", rest))
        print("time: " + ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / train:.0f}%)" for name, seconds in parts))
    print(f"checkpoint: {out}")


if __name__ == "__main__":
    sys.exit(main())
