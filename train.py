"""Train albor on Python code: `python train.py --rows 500` (the model card's run), or
`python train.py --config workshop --minutes 15` (a model that learns to write Python).

What a run does, in the order of the sections below:

1. Settings: the command line (defaults = the model card's run). A preset (--config) brings the
   model's shape and may bring its own training settings (PRESET_SETTINGS: workshop's packed data,
   context, batch, learning rate), which the flags given override. `--resume DIR` continues a
   saved run with its saved settings; `--init DIR` starts a new run from a checkpoint's weights.
   Both take the model's shape from DIR/config.json.
2. Data: the documents of a corpus (default: the .py files of this Python's standard library,
   no download needed), in sorted order, then shuffled with --seed. The first --val-rows
   documents are held out for validation, the next --rows are for training. Two modes:
   rows (the model card's): one document is one row: tokenized, <|endoftext|> appended, cut to
   --seq-len + 1 tokens, padded with <|pad|>. packed: the documents joined into one token
   stream, each after an <|endoftext|>, cut into windows of --seq-len + 1 tokens that overlap
   by one, so every token is trained on (what nanoGPT and llm.c do). A row (or window) of
   T + 1 tokens gives T inputs and T targets (the same row shifted by one); targets that are
   padding are set to IGNORE_INDEX, so the loss skips them.
3. Tokenizer: --tokenizer FILE, or one trained on the corpus's first 100K lines
   (vocabulary = the config's vocab_size) on first use, cached in a
   `tokenizers/` folder next to the run folder.
4. The step: each optimizer step runs --grad-accum micro-batches of
   --batch-size rows, adds up their gradients (each weighted by its share of
   the step's non-pad tokens, so the step's loss is the mean over all of them),
   clips the global norm and takes an AdamW step (albor.py's math). On a CPU each
   micro-batch's rows are shared out over one worker thread per core (cpu.py, with
   single-threaded BLAS: set below, before NumPy loads). --dtype tf32/bf16/fp16
   runs the matmuls in mixed precision (gpu.py; fp16 with dynamic loss scaling: a
   step whose gradients overflow is skipped; emulated on a CPU). Under MPI
   (`mpiexec -n N python train.py ...`, distributed.py) the rows of every
   micro-batch are shared out over the N ranks too and their gradients summed
   by an all-reduce: the same steps on the same rows, N processes doing them;
   rank 0 alone writes the run folder and prints.
5. The run: setup (model, data, optimizer), with --minutes the schedule fitted to the time
   budget, the loop (a step, a line in metrics.jsonl, a validation every --eval-every steps, a
   checkpoint every --save-every steps), and the finish: validation loss (also in bits per
   byte), the parse rate (the share of --eval-samples sampled completions that ast.parse
   accepts with at least 3 lines of code, see sample.py) with a few samples, the checkpoint,
   the loss plot and a summary. `--eval-only --resume DIR` computes just these for DIR.

The run folder (--out, default checkpoints/<config>):
    model.safetensors, config.json, tokenizer.json   a Hugging Face LlamaForCausalLM folder
    optimizer.safetensors, trainer_state.json        what --resume needs
    final_model.json                                 losses, parse rate, samples, timing and provenance
    README.md                                        the model card (model_card.py), from final_model.json
    metrics.jsonl                                    one JSON line per optimizer step (and the
                                                     validations: val_loss, val_bpb)
    loss.png                                         training and validation loss over the steps
A save commits all of the checkpoint's files (all but metrics.jsonl and loss.png) as one unit, the
previous checkpoint whole until then (checkpoint.py). A run locks its folder, and a new run refuses
a folder that holds another run's checkpoint unless --overwrite.

Ctrl-C, SIGTERM or SIGHUP stops after the current step and saves a checkpoint that --resume
continues exactly (same final weights, byte for byte, as a run never stopped). At the end the
checkpoint is committed before the evaluation, so a stop there loses no training either. A
second signal quits at once (once a save in progress is committed); a kill loses only the steps
since the last save (--save-every). Under MPI a stop signal on any rank stops every rank after
the same step.
"""
import argparse
import collections
import contextlib
import hashlib
import io
import json
import math
import os
import shlex
import signal
import sys
import sysconfig
import threading
import time
import warnings
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
import model_card  # noqa: E402
import sample  # noqa: E402
from tokenizer import EOT_ID, PAD_ID, Tokenizer  # noqa: E402

TOKENIZER_LINES = 100_000     # a tokenizer trained here sees the corpus's first 100K lines
TOKENIZER_MIN_FREQUENCY = 1   # merge down to pairs seen once: fills all 32,768 ids from those lines
TRAINER_STATE = "trainer_state.json"
FINAL_MODEL = "final_model.json"
METRICS = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"


class RunError(Exception):
    """A problem with the run's input; main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# 1. Settings

DEFAULTS = {   # the model card's run
    "config": "albor-base-50m", "data": None, "data_mode": "rows", "rows": 500, "val_rows": 50,
    "seq_len": 128, "batch_size": 4, "grad_accum": 4, "max_steps": None, "minutes": None, "lr": 6e-4,
    "min_lr": None, "warmup": None, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
    "grad_clip": 1.0, "seed": 0, "out": None, "resume": None, "init": None, "tokenizer": None,
    "save_every": 0, "eval_every": 0, "eval_samples": 8, "eval_only": False, "dtype": "fp32",
    "overwrite": False,
}
# A preset brings the model's shape (albor.PRESETS) and may bring training settings too: these
# replace DEFAULTS for --config NAME, and a flag given on the command line replaces them in turn.
# workshop: a model that learns to write Python within minutes on a 2-core laptop CPU (README:
# "A run that learns Python"); the whole recipe is `python train.py --config workshop --minutes 15`.
PRESET_SETTINGS = {
    "workshop": {"data_mode": "packed", "rows": None, "val_rows": 20, "seq_len": 256, "batch_size": 4,
                 "grad_accum": 1, "lr": 2e-3, "eval_every": 250, "eval_samples": 32},
}
DATA_MODES = ("rows", "packed")
# With --resume these define the rows a step reads; changing them would not continue the run.
DATA_SETTINGS = ("data", "data_mode", "rows", "val_rows", "seq_len", "seed")
# What one command asks for, never taken over from the run it resumes.
THIS_COMMAND_ONLY = ("resume", "init", "out", "tokenizer", "eval_only", "overwrite")
PATH_SETTINGS = ("data", "out", "resume", "init", "tokenizer")


def count_or_all(text):
    """--rows's type: a positive count, or "all" (None)."""
    return None if text == "all" else int(text)

FLAGS = [   # (flag, help, argparse options), in --help's order
    ("--config", f"model preset: {', '.join(albor.PRESETS)}; a preset may also bring training "
                 "settings (shown below as 'NAME: value'), used where no flag is given; with "
                 "--resume/--init the model's shape comes from the checkpoint and a different "
                 "--config is an error", {}),
    ("--data", "training text: a folder (every file in it, one row each), a .txt file (one "
               "row per blank-line-separated block) or a .jsonl file (one row per line's "
               "\"text\"); default: the .py files of this Python's standard library",
     dict(metavar="PATH")),
    ("--data-mode", "rows: one document a row, cut to --seq-len + 1 tokens and padded (the model "
                    "card's run: the model sees each file's beginning only); packed: the documents "
                    "joined into one token stream, each after <|endoftext|>, cut into windows of "
                    "--seq-len tokens (every token is trained on)", dict(choices=DATA_MODES)),
    ("--rows", "training documents ('all': every one); in rows mode one row each; one pass over "
               "the rows (or windows) is the default run length", dict(type=count_or_all, metavar="N")),
    ("--val-rows", "documents held out for the validation loss (0: none); never trained on",
     dict(type=int, metavar="N")),
    ("--seq-len", "tokens per row (or window) seen by the model (rows are cut to this + 1 and padded)",
     dict(type=int, metavar="T")),
    ("--batch-size", "rows per micro-batch (one forward + backward)", dict(type=int, metavar="B")),
    ("--grad-accum", "micro-batches per optimizer step (their gradients are summed)",
     dict(type=int, metavar="N")),
    ("--max-steps", "optimizer steps; default: one pass over the training rows "
                    "(rows // (batch-size * grad-accum)); more passes reshuffle the rows",
     dict(type=int, metavar="N")),
    ("--minutes", "a time budget instead of --max-steps: the first steps are timed (on a scratch "
                  "copy of the model), max-steps becomes the number that fit in the budget, counted "
                  "from the start of train.py, and the schedule ends there (fitted again every 100 "
                  "steps to the pace measured); the run stops at the budget at the latest and then "
                  "evaluates and saves as usual",
     dict(type=float, metavar="M")),
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
    ("--eval-every", "validation loss every N steps (and before the first and after the last), "
                     "in metrics.jsonl and the loss plot (0: at the end only)",
     dict(type=int, metavar="N")),
    ("--eval-samples", "at the end, sample N completions of the held-out documents' first lines "
                       "and report the share that ast.parse accepts with at least 3 lines of code "
                       "(the parse rate; 0: skip)",
     dict(type=int, metavar="N")),
    ("--eval-only", "evaluate the --resume checkpoint instead of training: validation loss, "
                    "perplexity and parse rate, printed and written to its final_model.json",
     dict(action="store_true")),
    ("--dtype", "precision of the linear layers' matmuls (mixed precision): fp32; tf32 (operands "
                "rounded to 10 mantissa bits by cuBLAS); bf16 or fp16 (half copies of the weight "
                "matrices made once a step, activations and gradients rounded to half as they "
                "enter a matmul; fp16 with dynamic loss scaling that skips a step whose gradients "
                "overflow). Sums and products are float32, and so is everything else: master "
                "weights, optimizer state, norms, attention, softmax, cross-entropy. On a CPU "
                "tf32/bf16/fp16 are emulated (the same rounding, slower than fp32: for testing)",
     dict(choices=gpu.MATMUL_DTYPES)),
    ("--overwrite", "let a new run replace the checkpoint of another run in --out (without it, "
                    "such a folder is refused; the old checkpoint stays until this run's first save)",
     dict(action="store_true")),
]
# The type of each setting's value (None is also allowed where the default or a preset's is None).
SETTING_TYPES = {name.lstrip("-").replace("-", "_"): options.get("type", bool if "action" in options else str)
                 for name, _, options in FLAGS}
SETTING_TYPES["rows"] = int   # count_or_all's values: an int, or None for all
NULLABLE = {name for name, value in DEFAULTS.items() if value is None} | {
    name for settings in PRESET_SETTINGS.values() for name, value in settings.items() if value is None}


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
        parser.add_argument(name, help=help + defaults_shown(name.lstrip("-").replace("-", "_")), **options)
    return parser


def defaults_shown(key):
    """--help's note on a setting's defaults, e.g. " (default: 128; workshop: 256)"."""
    shown = [f"default: {DEFAULTS[key]}"] if DEFAULTS[key] is not None else []
    shown += [f"{preset}: {'all' if settings[key] is None else settings[key]}"
              for preset, settings in PRESET_SETTINGS.items() if key in settings]
    return f" ({'; '.join(shown)})" if shown else ""


def parse_settings(argv):
    """(settings dict, names of the flags given on the command line); bad values -> parser.error."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    args = {**DEFAULTS, **PRESET_SETTINGS.get(given.get("config"), {}), **given}
    checks = [
        (not args["eval_only"] or args["resume"], "--eval-only needs --resume DIR (the checkpoint to evaluate)"),
        (args["config"] in albor.PRESETS, f"--config {args['config']!r} is not a preset; "
                                          f"choose from {', '.join(albor.PRESETS)}"),
        (not (args["resume"] and args["init"]), "--resume and --init exclude each other"),
        (not {"minutes", "max_steps"} <= set(given), "--minutes and --max-steps exclude each other "
                                                     "(--minutes sets max-steps to the steps that fit)"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    problem = settings_problem(args)
    if problem:
        parser.error(problem)
    return args, set(given)


def settings_problem(args):
    """The first problem with the values of a settings dict (the flags given, or the settings a
    trainer_state.json saved), as a message naming the flag; None if there is none."""
    for name in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "minutes"):
        if args[name] is not None and not math.isfinite(args[name]):
            return f"--{name.replace('_', '-')} must be a finite number"
    for name in PATH_SETTINGS:
        if args[name] == "":
            return f"--{name} is empty (leave it out for the default)"
    for name, kind in SETTING_TYPES.items():
        if kind is int and args[name] is not None and abs(args[name]) >= 2**63:
            return f"--{name.replace('_', '-')} is out of range (a 64-bit int)"
    checks = [
        (args["data_mode"] in DATA_MODES, f"--data-mode must be one of {', '.join(DATA_MODES)}"),
        (args["rows"] is None or args["rows"] >= 1, "--rows must be at least 1 (or all)"),
        (args["val_rows"] >= 0, "--val-rows must be 0 or more"),
        (args["seq_len"] >= 1, "--seq-len must be at least 1"),
        (args["batch_size"] >= 1, "--batch-size must be at least 1"),
        (args["grad_accum"] >= 1, "--grad-accum must be at least 1"),
        (args["max_steps"] is None or args["max_steps"] >= 1, "--max-steps must be at least 1"),
        (args["minutes"] is None or args["minutes"] > 0, "--minutes must be positive"),
        (args["lr"] > 0, "--lr must be positive"),
        (args["min_lr"] is None or 0 <= args["min_lr"] <= args["lr"], "--min-lr must lie in [0, --lr]"),
        (args["warmup"] is None or args["warmup"] >= 0, "--warmup must be 0 or more"),
        (0 <= args["beta1"] < 1, "--beta1 must lie in [0, 1)"),
        (0 <= args["beta2"] < 1, "--beta2 must lie in [0, 1)"),
        (args["eps"] > 0, "--eps must be positive"),
        (args["weight_decay"] >= 0, "--weight-decay must be 0 or more"),
        (args["grad_clip"] >= 0, "--grad-clip must be 0 or more"),
        (args["seed"] >= 0, "--seed must be 0 or more"),
        (args["save_every"] >= 0, "--save-every must be 0 or more"),
        (args["eval_every"] >= 0, "--eval-every must be 0 or more"),
        (args["eval_samples"] >= 0, "--eval-samples must be 0 or more"),
        (args["dtype"] in gpu.MATMUL_DTYPES, f"--dtype must be one of {', '.join(gpu.MATMUL_DTYPES)}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def is_number(value, kind=float):
    """Whether value is a JSON number of this kind (an int also counts as a float; a bool never)."""
    return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)


def read_trainer_state(folder):
    """folder's trainer_state.json, checked: {"step": int >= 0, "args": the run's settings, each
    of its flag's type, "loss_curve": [numbers], "timing": {name: number}, "provenance": {...},
    "loss_scaler": null or {"scale": number, ...}}. A RunError names the file and the field."""
    path = os.path.join(folder, TRAINER_STATE)
    state = checkpoint.read_json(path, "the saved run's state")

    def require(ok, what):
        if not ok:
            raise RunError(f"{path}: {what}")

    require(isinstance(state, dict), f"expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    require(is_number(step, int) and step >= 0, f"step must be an int >= 0, got {step!r}"[:200])
    require(isinstance(state.get("args"), dict), "args must be an object of the run's settings")
    for name, value in state["args"].items():
        kind = SETTING_TYPES.get(name)
        ok = kind is None or (value is None and name in NULLABLE) or (
            is_number(value, kind) if kind in (int, float) else isinstance(value, kind))
        require(ok, f"args.{name} must be {'an int' if kind is int else f'a {kind.__name__}'}, "
                    f"got {value!r}"[:200])
    curve, timing = state.get("loss_curve", []), state.get("timing", {})
    require(isinstance(curve, list) and all(map(is_number, curve)), "loss_curve must be a list of numbers")
    require(isinstance(timing, dict) and all(v is None or is_number(v) for v in timing.values()),
            "timing must map names to numbers")
    require(isinstance(state.get("provenance", {}), dict), "provenance must be an object")
    scaler = state.get("loss_scaler")
    require(scaler is None or (isinstance(scaler, dict) and is_number(scaler.get("scale")) and
                               all(is_number(scaler.get(key), int) for key in ("good_steps", "skipped"))),
            "loss_scaler must be null or an object of scale, good_steps and skipped")
    return state


def merge_resumed_settings(args, given):
    """With --resume: the saved run's settings, overridden by the flags given now.

    Flags that decide which rows a step reads (DATA_SETTINGS) cannot change: that
    would not be the same run any more (start a new one from the weights with --init).
    """
    state = read_trainer_state(args["resume"])
    saved = state["args"]
    merged = {**DEFAULTS, **{name: value for name, value in saved.items() if name in DEFAULTS}}
    for name in DATA_SETTINGS:
        if name in given and args[name] != merged[name]:
            raise RunError(f"--{name.replace('_', '-')} {args[name]} differs from the resumed run's "
                           f"{merged[name]}: --resume continues that run on its data "
                           "(use --init to train these weights on other data)")
    if "minutes" in given:        # a new time budget: the remaining steps are fitted to it again
        merged["max_steps"] = None
    if "max_steps" in given:      # a step count replaces the budget the saved run was fitted to
        merged["minutes"] = None
    for name in given:
        if name not in DATA_SETTINGS and merged.get(name) != args[name]:
            if name not in THIS_COMMAND_ONLY + ("config",) and name in saved:
                print(f"note: --{name.replace('_', '-')} {args[name]} (the saved run had {saved[name]})")
            merged[name] = args[name]
    for name in THIS_COMMAND_ONLY:   # e.g. the saved run's --tokenizer file may have moved since: the
        merged[name] = args[name]    # checkpoint's own tokenizer.json is used unless one is given now
    merged["out"] = args["out"] if "out" in given else args["resume"]
    problem = settings_problem(merged)
    if problem:
        raise RunError(f"{os.path.join(args['resume'], TRAINER_STATE)}: the saved settings: {problem}")
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
        elif not path.exists():
            raise RunError(f"--data {data}: no such file or folder")
        elif path.suffix == ".jsonl":
            lines = self._read_text(path).splitlines()
            self.items = [self._jsonl_text(line) for line in lines if line.strip()]
        elif path.suffix == ".txt":
            text = self._read_text(path)
            self.items = [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
        else:
            raise RunError(f"--data {data}: expected a folder, a .txt or a .jsonl file")

    @staticmethod
    def _read_text(path):
        try:
            return path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"--data {path}: cannot read it as UTF-8 text ({type(e).__name__})") from None

    @staticmethod
    def _jsonl_text(line):
        """The "text" of a .jsonl line, or None if it has none that is Unicode text: JSON can
        spell a lone surrogate ("\\ud800"), which no UTF-8 text holds."""
        try:
            text = json.loads(line)["text"]
            text.encode("utf-8")
            return text
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # ValueError: also
            return None                                    # not JSON, and UnicodeEncodeError

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
    corpus shuffled with --seed (the validation ones first, so they never change with --rows;
    --rows all: every document after them)."""
    order = np.random.default_rng(args["seed"]).permutation(len(corpus.items))
    wanted = None if args["rows"] is None else args["val_rows"] + args["rows"]
    texts = []
    for text in corpus.documents(order):
        texts.append(text)
        if len(texts) == wanted:
            break
    if not texts:
        raise RunError(f"no usable text in {corpus.description} ({corpus.skipped} files or lines "
                       "skipped: unreadable or not UTF-8)")
    if len(texts) <= args["val_rows"] or (args["data_mode"] == "rows"
                                          and len(texts) - args["val_rows"] < args["batch_size"]):
        raise RunError(f"{corpus.description} has {len(texts)} usable documents: after --val-rows "
                       f"{args['val_rows']} that is fewer than one batch of --batch-size "
                       f"{args['batch_size']} rows")
    if wanted is not None and len(texts) < wanted:
        print(f"note: {corpus.description} has only {len(texts)} usable documents: "
              f"{len(texts) - args['val_rows']} training rows instead of {args['rows']}")
    return texts[:args["val_rows"]], texts[args["val_rows"]:]


def encode_row(tok, text, seq_len):
    """A document as one row of seq_len + 1 ids: its first tokens, <|endoftext|>, then padding.

    Example (seq_len 7, "x = 1\\n" as 4 tokens a b c d): [a, b, c, d, EOT, PAD, PAD, PAD].
    Only the first seq_len + 1 tokens are kept, so only as much of a document as they need is
    encoded (Tokenizer.encode's max_tokens): a row of a 50 MB file reads its first kilobytes.
    """
    n = seq_len + 1
    ids = (tok.encode(text, max_tokens=n) + [EOT_ID])[:n]
    return ids + [PAD_ID] * (n - len(ids))


def make_rows(tok, texts, seq_len):
    """(inputs, targets), both (N, seq_len) int32: targets are inputs shifted by one,
    IGNORE_INDEX where the target is padding."""
    rows = np.array([encode_row(tok, text, seq_len) for text in texts], dtype=np.int32).reshape(-1, seq_len + 1)
    inputs = np.ascontiguousarray(rows[:, :-1])
    targets = rows[:, 1:].copy()
    targets[targets == PAD_ID] = albor.IGNORE_INDEX
    return inputs, targets


def token_stream(tok, texts, progress=False):
    """The texts as one stream of token ids, each text after an <|endoftext|>: (L,) int32.
    Example: texts "ab" and "c" with a bytes-only tokenizer -> [256, 97, 98, 256, 99]."""
    documents = tqdm(texts, desc="encoding", unit="doc", leave=False, disable=not progress)
    pieces = [np.array([EOT_ID] + tok.encode(text), dtype=np.int32) for text in documents]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def cached_token_stream(tok, texts, folder):
    """token_stream(tok, texts), kept in folder/stream-<key>.npy for the next run on the same texts
    with the same tokenizer (encoding the whole standard library takes many seconds; loading it,
    a fraction of one). The key is the SHA-256 of the tokenizer's file and of every text."""
    key = hashlib.sha256(tokenizer_bytes(tok))
    for text in texts:
        key.update(text.encode("utf-8", errors="surrogatepass") + b"\0")
    path = Path(folder) / f"stream-{key.hexdigest()[:16]}.npy"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return np.load(path).astype(np.int32)
    stream = token_stream(tok, texts, progress=True)
    buffer = io.BytesIO()
    np.save(buffer, stream.astype(np.uint16) if tok.vocab_size <= 1 << 16 else stream)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_bytes(path, buffer.getvalue())
    return stream


def pack_windows(tok, texts, seq_len, progress=False):
    """(inputs, targets), both (N, seq_len) int32: packed mode's data (--data-mode packed), the
    texts as one token stream (token_stream) cut into windows (stream_windows). Notebooks call it.

    Example, seq_len 3, texts "ab" and "c" as tokens a b and c: the stream EOT a b EOT c gives
    inputs [[EOT, a, b], [EOT, c, PAD]] and targets [[a, b, EOT], [c, -100, -100]].
    """
    return stream_windows(token_stream(tok, texts, progress), seq_len)


def stream_windows(stream, seq_len):
    """A token stream (L,) cut into N windows of seq_len + 1 tokens that overlap by one (window i
    is stream[i*T : i*T + T + 1]): (inputs, targets), both (N, seq_len) int32, so every token but
    the stream's first is a target exactly once (each document's first token too: predicted from
    the <|endoftext|> before it). The last window is padded; padding targets are IGNORE_INDEX."""
    n_windows = -(-(len(stream) - 1) // seq_len) if len(stream) else 0              # ceil((L - 1) / T)
    padded = np.full(n_windows * seq_len + 1, PAD_ID, dtype=np.int32)
    padded[:len(stream)] = stream
    inputs = padded[:-1].reshape(n_windows, seq_len)                           # (N, T)
    targets = padded[1:].reshape(n_windows, seq_len).copy()                    # (N, T), shifted by one
    targets[targets == PAD_ID] = albor.IGNORE_INDEX
    return inputs, targets


def make_data(tok, texts, args, cache_folder=None):
    """(inputs, targets) of the texts in the run's --data-mode: rows (make_rows) or packed windows
    (pack_windows; the token stream cached in cache_folder when given)."""
    if args["data_mode"] == "rows":
        return make_rows(tok, texts, args["seq_len"])
    if cache_folder is None:
        return pack_windows(tok, texts, args["seq_len"])
    return stream_windows(cached_token_stream(tok, texts, cache_folder), args["seq_len"])


def target_bytes(tok, targets):
    """The number of bytes of text the counted targets stand for (the special tokens: none), to
    turn a loss per token into bits per byte (bits_per_byte)."""
    lengths = np.array([len(b) for b in tok.token_bytes], dtype=np.int64)    # (V,)
    lengths[[EOT_ID, PAD_ID]] = 0
    targets = albor.to_numpy(targets)
    counted = targets[targets != albor.IGNORE_INDEX]
    return int(lengths[counted].sum())


def micro_batch_rows(step, micro, args, n_rows):
    """Indices of the rows in micro-batch `micro` (0-based) of optimizer step `step` (1-based).

    A pure function of the step, so a resumed run reads exactly the rows the
    uninterrupted run would have: micro-batch k = (step - 1) * grad_accum + micro
    of the whole run falls in pass (epoch) k // per_pass over the rows, each pass
    in its own order drawn from (seed, pass). (Rows here are packed mode's windows too.)
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
    """(Tokenizer, its tokenizer.json bytes, where it came from, what it was trained on (None
    when that is not known here)).

    --tokenizer FILE; else the checkpoint folder's (--resume/--init); else the one
    trained on this corpus's first TOKENIZER_LINES lines with vocab_size tokens,
    cached in <out>/../tokenizers/ under a name derived from that text and size.
    """
    trained_on = None
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
        lines = sum(text.count("\n") for text in texts)
        trained_on = (f"the first {lines:,} lines of {corpus.description}, "
                      f"min frequency {TOKENIZER_MIN_FREQUENCY}")
        key = hashlib.sha256(f"vocab_size={config.vocab_size}\nmin_frequency={TOKENIZER_MIN_FREQUENCY}\n".encode())
        for text in texts:
            key.update(text.encode("utf-8"))
            key.update(b"\0")
        path = Path(args["out"]).parent / "tokenizers" / f"tokenizer-{config.vocab_size}-{key.hexdigest()[:16]}.json"
        if path.is_file():
            origin = f"{path} (cached)"
        else:
            started = time.perf_counter()
            print(f"training a {config.vocab_size:,}-token tokenizer on the first {lines:,} lines of "
                  f"{corpus.description} ...")
            tok = Tokenizer.train(texts, config.vocab_size, min_frequency=TOKENIZER_MIN_FREQUENCY, progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_bytes(path, tokenizer_bytes(tok))
            origin = f"{path} (trained in {time.perf_counter() - started:.1f} s)"
    data = read_bytes(path, "the tokenizer")
    try:
        tok = Tokenizer.load(path, max_vocab_size=config.vocab_size)
    except ValueError as e:
        raise RunError(str(e).splitlines()[0]) from None
    if source_folder and not args["tokenizer"]:
        trained_on = recorded_training(source_folder, sha256_hex(data))
    return tok, data, origin, trained_on


def recorded_training(folder, tokenizer_sha256):
    """What the final_model.json in folder says its tokenizer (of this SHA-256) was trained on,
    or None where it does not say."""
    try:
        saved = json.loads(Path(folder, FINAL_MODEL).read_text(encoding="utf-8")).get("tokenizer") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return saved.get("trained_on") if saved.get("sha256") == tokenizer_sha256 else None


def read_bytes(path, what):
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RunError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def tokenizer_bytes(tok):
    return (json.dumps(tok.to_json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


# -----------------------------------------------------------------------------
# 4. The step, and evaluation


class Diverged(Exception):
    """A non-finite loss or gradient norm."""


def train_step(params, config, optimizer, inputs, targets, lr, grad_clip, step, timing, scaler=None,
               workers=None, group=distributed.SINGLE):
    """One optimizer step on the micro-batches inputs[m], targets[m] (each (B, T), NumPy).

    Returns (loss, (gradient norm before clipping, after it), number of non-pad targets, whether
    the optimizer stepped). The loss is the mean over the non-pad targets of all micro-batches
    together: a micro-batch's mean loss counts with weight n_valid[m] / n_valid_step, and backward's
    loss_scale gives its gradient the same weight, added into one gradient dict (so 4
    micro-batches of 4 rows = one batch of 16 rows). workers (a cpu.DataParallel; default one
    thread) share each micro-batch's rows out, their gradients summed before clipping. With MPI
    (group: distributed.py) every rank gets the whole step and its workers take the rank's share
    of the rows; the ranks' loss sums and gradients are added up, so every rank clips the same
    gradients and takes the same step.
    With --dtype bf16/fp16 the weights' half copies are made once, before the micro-batches
    (gpu.half_weights); with fp16 the scaler's scale multiplies the loss_scale too (see
    apply_update).
    On a GPU the step waits for the device once, in apply_update: the targets are counted on
    the host, and the micro-batches' loss sums and the gradient norm stay on the device until
    then. Phase times go into timing, from gpu.PhaseClock (CUDA events on the GPU: no waiting
    between phases; the optimizer's is added at the next step, after its wait).
    """
    workers = workers or cpu.DataParallel(1)
    n_valid = [int((t != albor.IGNORE_INDEX).sum()) for t in targets]  # on the host
    n_valid_step = sum(n_valid)
    loss_scale = scaler.scale if scaler else 1.0
    worker_seconds = dict(workers.seconds)
    clock = workers.clock
    clock.start()
    loss_sums = []   # per micro-batch: the loss summed over its counted targets (this process's rows)
    with gpu.half_weights(params):
        for m in range(len(inputs)):
            weight = loss_scale * n_valid[m] / n_valid_step  # this micro-batch's share of the step
            loss_sums.append(workers.forward_backward(params, config, inputs[m], targets[m],
                                                      loss_scale=weight))
    grads = group.sum_gradients(workers.gradients(), params)   # every rank's gradients, added up
    clock.mark("model_seconds")
    norms, stepped, loss_sums = apply_update(optimizer, params, grads, lr, grad_clip, scaler, step,
                                             loss_sums, group)
    clock.mark("optimizer_seconds")
    phases = clock.collect(wait=False)
    # forward and backward ran interleaved in the workers: split as their own clocks did
    model = phases.pop("model_seconds", 0.0)
    forward = workers.seconds["forward"] - worker_seconds["forward"]
    backward = workers.seconds["backward"] - worker_seconds["backward"]
    forward_share = forward / (forward + backward) if forward + backward else 0.5
    phases["forward_seconds"] = model * forward_share
    phases["backward_seconds"] = model * (1.0 - forward_share)
    for phase, seconds in phases.items():
        timing[phase] += seconds
    return sum(loss_sums) / n_valid_step, norms, n_valid_step, stepped


def apply_update(optimizer, params, grads, lr, grad_clip, scaler, step, losses=(),
                 group=distributed.SINGLE):
    """Clip the gradients' global norm and take the optimizer step; returns ((the norm before
    clipping, the norm after it), whether the optimizer stepped, the losses as Python floats).
    The norm after clipping is measured, not assumed: the model card checks it against the clip
    value (FALSIFY-ALBOR-002).

    losses: the step's micro-batch losses or loss sums (on a GPU, device scalars). They come to
    the host together with the norms, in ONE copy: the step's one wait for the GPU; with MPI
    they are then summed over the ranks (group). A non-finite loss stops the run (Diverged)
    before anything is updated (and drops the step's gradients). With an fp16 loss scaler
    (gpu.LossScaler) the gradients are unscaled first, and a step whose gradients overflowed is
    skipped; without one, a non-finite norm stops the run."""
    if scaler:
        scaler.unscale(grads)
    norm = albor.clip_grad_norm(grads, grad_clip)  # clipped on the device: nothing waits yet
    clipped_norm = albor.global_norm(grads)
    *losses, grad_norm, clipped_norm = gpu.fetch(*losses, norm, clipped_norm)
    losses = group.sum_floats(losses)   # every rank's rows
    for m, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {step} (micro-batch {m + 1} of {len(losses)})")
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
    return (grad_norm, clipped_norm), stepped, losses


def evaluate(params, config, inputs, targets, batch_size, workers=None, group=distributed.SINGLE):
    """Mean loss over all non-pad target tokens of (inputs, targets) (NumPy arrays), or None for
    no rows. Each batch's rows are shared out over `workers` (a cpu.DataParallel; by default one
    per core when BLAS is single-threaded, see cpu.cpu_workers). On a GPU the batches' loss sums
    stay on the device and one wait at the end fetches them. With MPI (group) each rank sums its
    rows of each batch, and the batches' sums are added over the ranks before they add up."""
    workers = workers or cpu.DataParallel(cpu.cpu_workers())
    sums, count = [], 0
    with gpu.half_weights(params):
        for start in range(0, len(inputs), batch_size):
            idx, tgt = inputs[start:start + batch_size], targets[start:start + batch_size]
            n_valid = int((tgt != albor.IGNORE_INDEX).sum())
            if n_valid == 0:
                continue
            sums.append(workers.loss_sum(params, config, idx, tgt))   # this process's rows' sum
            count += n_valid
    if not count:
        return None
    return sum(group.sum_floats(gpu.fetch(*sums))) / count   # every rank's rows, batch by batch


def perplexity(loss):
    return math.exp(min(loss, 700.0)) if loss is not None else None


def bits_per_byte(loss, n_targets, n_bytes):
    """A mean loss in nats per token over n_targets tokens that spell n_bytes bytes, as bits per
    byte: loss * n_targets / n_bytes / ln 2 (what a compressor built on the model would need).
    Example: bits_per_byte(math.log(256), 100, 100) -> 8.0 (a uniform guess over bytes)."""
    if loss is None or not n_bytes:
        return None
    return loss * n_targets / n_bytes / math.log(2)


def parse_eval(params, config, tok, val_texts, args):
    """The parse rate (sample.parse_rate): the share of --eval-samples completions of the held-out
    documents' first lines that ast.parse accepts with at least 3 lines of code, up to 128 new
    tokens each (fewer if the context is short), seeded with --seed."""
    max_new_tokens = min(128, config.max_position_embeddings // 2)
    with gpu.half_weights(params):   # --dtype bf16/fp16: the weights' half copies, made once
        return sample.parse_rate(params, config, tok, sample.eval_prompts(val_texts), args["eval_samples"],
                                 max_new_tokens=max_new_tokens, seed=args["seed"])


# -----------------------------------------------------------------------------
# 5. The run: setup, loop, finish
#
# A run's state travels in one object, `run` (a SimpleNamespace), filled in by setup():
#   args, config, config_name, out, state (the resumed run's trainer_state, or None),
#   corpus, tok, tok_data, tok_origin, val_texts, train_inputs/targets, val_inputs/targets,
#   val_bytes, max_steps, warmup, min_lr, steps_per_pass, tokens_per_step, provenance,
#   params, optimizer, scaler, workers, start_step, loss_curve, timing, resumed_here (--out is the
#   --resume folder), last_saved (the step of this run's checkpoint in --out), stop (a StopRequest),
#   deadline and out_of_time (--minutes), last_validation.


def setup(args, given, held, group=distributed.SINGLE):
    """Everything the loop needs, from the settings: the run folder, model shape, data, tokenizer,
    weights. held (a contextlib.ExitStack) keeps the folders' locks until the run ends. group: the
    processes training together (distributed.py; one process by default); with MPI, rank 0 alone
    locks and claims the folders."""
    run = SimpleNamespace(args=args, state=None, last_saved=None, group=group, deadline=None,
                          out_of_time=False, last_validation=None)
    source_folder = args["resume"] or args["init"]
    if args["resume"]:
        if not os.path.isdir(args["resume"]):
            raise RunError(f"--resume {args['resume']}: no such folder")
        if group.is_root:   # locked: no other run saves into it meanwhile; a save a kill cut short
            held.enter_context(checkpoint.lock(args["resume"]))   # is finished first
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
    claim_folder(run, held)
    if run.args["seq_len"] > run.config.max_position_embeddings:
        raise RunError(f"--seq-len {run.args['seq_len']} exceeds the model's max_position_embeddings "
                       f"{run.config.max_position_embeddings}")
    load_data(run, source_folder)
    load_weights(run)
    run.resumes, run.reproduce = resume_history(run)
    return run


def claim_folder(run, held):
    """Make the run folder (--out) this run's: create it, lock it until the run ends (a second
    run on it stops with an error), and refuse it if it holds another run's checkpoint, unless
    --overwrite. Nothing in it is changed here. With MPI, rank 0 alone does this."""
    out, resume = run.out, run.args["resume"]
    if not run.group.is_root:   # (rank 0 has claimed it already: it sets up first)
        run.resumed_here = bool(resume) and os.path.isdir(out) and os.path.samefile(out, resume)
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    run.resumed_here = bool(resume) and os.path.samefile(out, resume)
    if run.resumed_here:
        return   # locked already
    held.enter_context(checkpoint.lock(out))
    if checkpoint.holds_checkpoint(out) and not run.args["overwrite"]:
        raise RunError(f"{out} holds the checkpoint of another run: continue it with --resume {out}, "
                       "choose another --out, or pass --overwrite to replace it")


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
    run.tok, run.tok_data, run.tok_origin, run.tok_trained_on = get_tokenizer(args, config, run.corpus,
                                                                             source_folder)
    if args["resume"] and args["tokenizer"]:
        saved_tok = read_bytes(Path(args["resume"]) / TOKENIZER_FILE, "the resumed run's tokenizer")
        if sha256_hex(saved_tok) != sha256_hex(run.tok_data):
            raise RunError(f"--tokenizer {args['tokenizer']} is not the tokenizer of the resumed run "
                           f"({os.path.join(args['resume'], TOKENIZER_FILE)})")
    data_start = time.perf_counter()
    run.val_texts, train_texts = take_documents(run.corpus, args)
    run.train_inputs, run.train_targets = make_data(run.tok, train_texts, args,
                                                    cache_folder=Path(run.out).parent / "tokens")
    run.val_inputs, run.val_targets = make_data(run.tok, run.val_texts, args)
    if len(run.train_inputs) < args["batch_size"]:
        raise RunError(f"the training text fills {len(run.train_inputs)} windows of --seq-len "
                       f"{args['seq_len']} tokens: fewer than one batch of --batch-size {args['batch_size']}")
    run.val_bytes = target_bytes(run.tok, run.val_targets)   # for the validation loss in bits per byte
    run.data_seconds = time.perf_counter() - data_start
    run.steps_per_pass = max(1, len(run.train_inputs) // (args["batch_size"] * args["grad_accum"]))
    run.tokens_per_step = args["batch_size"] * args["grad_accum"] * args["seq_len"]
    set_schedule(run, args["max_steps"] or run.steps_per_pass)
    run.provenance = {
        "data": run.corpus.description,
        "train_rows": len(run.train_inputs), "val_rows": len(run.val_inputs),
        "train_rows_sha256": sha256_hex(run.train_inputs.tobytes() + run.train_targets.tobytes()),
        "val_rows_sha256": sha256_hex(run.val_inputs.tobytes() + run.val_targets.tobytes()),
        "tokenizer_sha256": sha256_hex(run.tok_data),
        "config_sha256": sha256_hex(json.dumps(checkpoint.config_to_hf(config), sort_keys=True).encode()),
        "skipped_documents": run.corpus.skipped,
    }


def set_schedule(run, max_steps):
    """The learning-rate schedule of a max_steps run: warmup (--warmup, or albor.default_warmup),
    then cosine decay to min-lr (--min-lr, or lr / 10) at the last step."""
    args = run.args
    run.max_steps = max_steps
    run.warmup = args["warmup"] if args["warmup"] is not None else albor.default_warmup(max_steps)
    run.min_lr = args["min_lr"] if args["min_lr"] is not None else args["lr"] / 10


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
        run.timing = {key: value for key, value in state.get("timing", {}).items() if value is not None}
    else:
        if args["init"]:
            _, run.params, _ = checkpoint.load_checkpoint(args["init"])
        else:
            run.params = albor.init_params(run.config, seed=args["seed"])
        run.optimizer = cpu.FastAdamW(run.params, betas=(args["beta1"], args["beta2"]), eps=args["eps"],
                                      weight_decay=args["weight_decay"])
    run.last_saved = run.start_step if run.resumed_here else None   # the checkpoint in --out
    gpu.configure(matmul_dtype=args["dtype"])   # fp32 unless --dtype (emulated on a CPU)
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
    if args["dtype"] != "fp32":
        emulated = " (emulated: slower than fp32)" if albor.BACKEND == "numpy" else ""
        on += f", {args['dtype']} matmuls{emulated}"
    print(f"albor {run.config_name}: {albor.param_count(run.config):,} parameters on {on}; "
          f"data: {run.corpus.description}")
    print(f"tokenizer: {run.tok_origin}, {run.tok.vocab_size:,} tokens")
    if args["eval_only"]:
        print(f"evaluating {args['resume']} (step {run.start_step})")
        return
    counted = int((run.train_targets != albor.IGNORE_INDEX).sum())
    unit = "windows" if args["data_mode"] == "packed" else "rows"
    print(f"{len(run.train_inputs)} training {unit}, {len(run.val_inputs)} validation {unit} "
          f"({len(run.val_texts)} held-out documents), {args['seq_len']} tokens each "
          f"({counted:,} non-pad training targets); {args['grad_accum']} x {args['batch_size']} {unit} "
          f"a step "
          f"(one pass = {run.steps_per_pass} steps)")
    if fitting_to_budget(run):
        print(f"schedule: max-steps fitted to --minutes {args['minutes']:g} once the first steps are timed")
    else:
        print_schedule(run)
    if run.start_step:
        print(f"resuming {args['resume']} at step {run.start_step}")
    if run.start_step >= run.max_steps:
        print(f"note: the run is already at step {run.start_step} of {run.max_steps}; nothing to train")


def print_schedule(run):
    print(f"schedule: {run.max_steps} steps, lr {run.args['lr']:g}, warmup {run.warmup}, "
          f"cosine to min-lr {run.min_lr:g}")


def start_metrics_log(run):
    """metrics.jsonl in the run folder: the resumed run's lines up to its step, then ours
    (rank 0 writes it)."""
    if not run.group.is_root:
        return
    old_lines = read_metrics(run.args["resume"], run.start_step) if run.args["resume"] else []
    path = os.path.join(run.out, METRICS)
    if os.path.isdir(path):
        raise RunError(f"{path}: a folder is in the place of the metrics file")
    try:
        checkpoint.atomic_write_bytes(path, "".join(old_lines).encode("utf-8"))
    except OSError as e:
        raise RunError(f"{path}: cannot write it ({e.strerror or e})") from None


def read_metrics(folder, up_to_step):
    """The lines of folder's metrics.jsonl (if it has one) for steps up to up_to_step, checked:
    each a JSON object with an int "step". A last line without its newline (a kill cut it) is
    dropped."""
    path = os.path.join(folder, METRICS)
    if not os.path.exists(path):
        return []
    try:
        lines = read_bytes(path, "the metrics").decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not (isinstance(record, dict) and is_number(record.get("step"), int)):
            raise RunError(f"{path}: line {number} is not a JSON object with an int \"step\"")
        if record["step"] <= up_to_step:
            kept.append(line)
    return kept


def save(run, step, finished=False):
    """Commit the checkpoint of the state after `step` optimizer steps: all its files as one unit
    (checkpoint.commit_files). A stop signal meanwhile waits until it is committed. Rank 0 saves;
    the other ranks (which hold the same state) only note that it is there."""
    if not run.group.is_root:
        run.last_saved = step
        return
    save_start = time.perf_counter()
    trainer_state = {"step": step, "args": run.args, "loss_curve": run.loss_curve, "timing": run.timing,
                     "provenance": run.provenance, "resumes": run.resumes, "reproduce": run.reproduce,
                     "loss_scaler": run.scaler.state() if run.scaler else None}
    extra = {TOKENIZER_FILE: run.tok_data,
             TRAINER_STATE: (json.dumps(trainer_state, indent=1) + "\n").encode(),
             **summary_files(run, step, finished)}
    with run.stop.saving():
        try:
            checkpoint.save_checkpoint(run.out, run.config, run.params, run.optimizer, step=step,
                                       extra_files=extra)
        except checkpoint.CheckpointError as e:   # e.g. the disk is full
            raise RunError(f"{e}; {kept(run)}") from None
        run.last_saved = step
    run.timing["save_seconds"] = run.timing.get("save_seconds", 0.0) + time.perf_counter() - save_start


def summary_files(run, step, finished, val_loss=None, parse=None):
    """The files that sum the run up ({name: bytes}): final_model.json and the model card made
    from it, README.md. Each save writes them with the checkpoint; the end of the run commits
    them again with the evaluation's results."""
    final_model = run_summary(run, step, run.out, finished, val_loss, parse)
    stopped = None if finished else run.stop.requested   # the stop signal's name, if one came
    final_model["status"] = {"state": "finished" if finished else "stopped" if stopped else "in progress",
                             "step": step, "max_steps": run.max_steps,
                             "reason": StopRequest.REASONS.get(stopped, stopped) if stopped else None}
    run.last_final_model = final_model
    return card_files(final_model, run.config)


def card_files(final_model, config):
    """{final_model.json: its bytes, README.md: the model card rendered from it}."""
    return {FINAL_MODEL: (json.dumps(final_model, indent=1) + "\n").encode(),
            model_card.CARD_FILE: model_card.render(final_model, config).encode("utf-8")}


def run_summary(run, step, folder, finished, val_loss=None, parse=None):
    """final_model.json (without its "status"): the figures of the run after `step` steps, whose
    checkpoint lies in `folder`: losses, evaluation, timing, provenance, and the card's facts."""
    curve = run.loss_curve
    return {
        "config": run.config_name, "finished": finished, "steps": step, "max_steps": run.max_steps,
        "warmup": run.warmup, "lr": run.args["lr"], "min_lr": run.min_lr,
        "final_loss": curve[-1] if curve else None, "best_loss": min(curve) if curve else None,
        "perplexity": perplexity(curve[-1]) if curve else None,
        "val_loss": val_loss, "val_perplexity": perplexity(val_loss),
        "val_bpb": val_bits_per_byte(run, val_loss),
        "parse_rate": parse["parse_rate"] if parse else None, "parse_eval": parse,
        "loss_curve": curve, "tokens": step * run.tokens_per_step,
        "timing": run.timing, "provenance": run.provenance, "args": run.args,
        **card_facts(run, step, folder),
    }


def card_facts(run, step, folder):
    """What the model card reports beyond the losses, measured: the parameters counted in the
    weights, the weights' SHA-256 (as saved in `folder` at this step), the tokens counted in the
    rows and in folder's metrics log, the machine, and the FALSIFY verdicts (model_card.py)."""
    records = [json.loads(line) for line in read_metrics(folder, step)]
    records = [record for record in records if "loss" in record]   # the steps (not step 0's validation)
    sha256, size = checkpoint.safetensors_digest(run.params, checkpoint.model_metadata(step))
    return {
        "parameters": sum(int(p.size) for p in run.params.values()),
        "model_file": {"folder": folder, "name": checkpoint.CHECKPOINT_MODEL, "sha256": sha256, "bytes": size},
        "tokens_seen": sum(record.get("valid_tokens", 0) for record in records),
        "data": data_facts(run),
        "tokenizer": {"vocab_size": run.tok.vocab_size, "merges": len(run.tok.merges),
                      "source": run.tok_origin, "trained_on": run.tok_trained_on,
                      "sha256": run.provenance["tokenizer_sha256"]},
        "device": model_card.machine(run.workers.workers), "precision": run.args["dtype"],
        "software": model_card.software(), "resumes": run.resumes, "reproduce": run.reproduce,
        "falsify": model_card.falsify(run.loss_curve[:step], records, run.args["grad_clip"], sha256,
                                      run.reproduce, model_card.no_command_reason(run.args)),
    }


def data_facts(run):
    """The data's name (for the card's metadata), its tokens counted in the rows, and in rows mode
    how many training rows are cut (no <|endoftext|> in them: the document goes on past the row;
    None for packed windows)."""
    stdlib = run.args["data"] is None
    name = f"python-{sys.version.split()[0]}-stdlib" if stdlib else Path(run.args["data"]).stem
    cut_rows = None   # rows mode: rows without <|endoftext|> (packed windows are cut by design)
    if run.args["data_mode"] == "rows":
        full_rows = np.concatenate([run.train_inputs, run.train_targets[:, -1:]], axis=1) == EOT_ID
        cut_rows = int((~full_rows.any(axis=1)).sum())
    return {"name": name, "tags": ["code", "python"] if stdlib else [],
            "license": "The Python standard library is distributed under the PSF License Agreement." if stdlib
            else None,
            "train_tokens": int((run.train_targets != albor.IGNORE_INDEX).sum()),
            "val_tokens": int((run.val_targets != albor.IGNORE_INDEX).sum()),
            "cut_train_rows": cut_rows}


# The flags a command that trains these weights again must repeat: all but where the run is
# written, how it is evaluated, and --resume (its settings are the run's own).
NOT_REPEATED = ("out", "resume", "save_every", "eval_samples", "eval_only", "overwrite")


def reproduce_command(args):
    """The `python train.py ...` command line that trains this run's weights from scratch: the
    model and the rows, and every other setting that differs from DEFAULTS (with --init, the
    model's shape comes from there); None for a --minutes run, whose step count and schedule
    follow the machine's pace. Example: the defaults with --lr 0.001 ->
    "python train.py --config albor-base-50m --rows 500 --lr 0.001"."""
    if args["minutes"]:
        return None
    flags = []
    for name, default in DEFAULTS.items():
        if name in NOT_REPEATED or (name == "config" and args["init"]):
            continue
        if (args[name] != default or name in ("config", "rows")) and args[name] is not None:
            flags.append(f"--{name.replace('_', '-')} {shlex.quote(str(args[name]))}")
    return " ".join(["python train.py"] + flags)


def resume_history(run):
    """(resumes, command): the run's resumes (the saved run's, plus this one with the settings
    it changed, {name: [saved, now]}) and the one command that reproduces the run's weights
    (None once a resume changed a setting that the weights depend on)."""
    state, args = run.state or {}, run.args
    if not args["resume"]:
        return [], reproduce_command(args)
    saved = {**DEFAULTS, **state["args"]}
    resumes, command = list(state.get("resumes", [])), state.get("reproduce", reproduce_command(saved))
    if not args["eval_only"]:
        changed = {name: [saved[name], args[name]] for name in DEFAULTS
                   if name not in NOT_REPEATED + ("init", "tokenizer") and saved[name] != args[name]}
        resumes.append({"step": run.start_step, "from": args["resume"], "changed": changed})
        command = None if changed else command
    return resumes, command


def kept(run, what="checkpoint"):
    """What is on disk after a stop or an error, as the end of a message."""
    if run is None or run.last_saved is None:
        return "no checkpoint of this run was saved"
    return f"the last {what} (step {run.last_saved}) is in {run.out}"


class StopRequest:
    """What a stop signal does: Ctrl-C (SIGINT), SIGTERM (kill, timeout, docker stop, a SLURM
    preemption) and SIGHUP (the terminal closed) all ask the run to stop, the same way.

    While training (at_once False) the first signal lets the current step finish; the run then
    commits a checkpoint that --resume continues exactly, and exits. Before training (nothing to
    save yet) and during the end-of-run evaluation (its checkpoint is committed already) a signal
    stops at once: KeyboardInterrupt. A second signal quits at once too, except during a save:
    that is finished first (seconds), so the newest checkpoint written is the one kept.
    A signal that was ignored when the run started (nohup ignores SIGHUP) stays ignored.
    """
    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
    REASONS = {"SIGINT": "Ctrl-C (SIGINT)", "SIGTERM": "SIGTERM (a kill, timeout, docker stop or a preemption)",
               "SIGHUP": "SIGHUP (the terminal closed)"}   # the model card's words for them

    def __init__(self):
        self.requested = None       # the first signal's name
        self.at_once = True
        self.in_save = False
        self.quit_after_save = False
        self.previous = {}

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGHUP":
            self.silence_lost_terminal()
        if self.requested is None and not self.at_once:
            self.requested = name
            self.say(f"{name}: stopping after this step and saving a checkpoint (again: quit at once)")
            return
        self.requested = self.requested or name
        if self.in_save:
            self.quit_after_save = True
            self.say(f"{name}: quitting once the checkpoint being saved is committed")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        """A save runs in this block: a stop signal waits until it has ended."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False
        if self.quit_after_save:
            raise KeyboardInterrupt

    def __enter__(self):
        """Install the handler (in the main thread only: Python runs handlers there)."""
        if threading.current_thread() is threading.main_thread():
            self.terminals = [fd for fd in (1, 2) if os.isatty(fd)]
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)   # Windows has no SIGHUP
                if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def silence_lost_terminal(self):
        """After a hang-up the terminal is gone and writing to it fails: send what was going
        there to /dev/null instead (a terminal that is still there stays)."""
        for fd in getattr(self, "terminals", []):
            if not os.isatty(fd):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)

    @staticmethod
    def say(message):
        with contextlib.suppress(OSError):
            tqdm.write(message)


def train_loop(run):
    """Steps from run.start_step until max_steps, a stop signal or the --minutes deadline; a
    validation every --eval-every steps; returns the last step."""
    for key in ("train_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds",
                "attention_seconds", "other_layers_seconds", "data_seconds", "eval_seconds"):
        run.timing.setdefault(key, 0.0)
    run.timing["data_seconds"] += run.data_seconds
    # a layer clock on the CPU only: on a GPU it would have to wait for every layer
    layer_clock = cpu.LayerClock() if albor.BACKEND == "numpy" else None
    step, stopping = run.start_step, False
    recent = collections.deque(maxlen=REFIT_EVERY)   # --minutes: the last steps' seconds
    bar = tqdm(total=run.max_steps, initial=step, unit="step", dynamic_ncols=True)
    metrics_path = os.path.join(run.out, METRICS) if run.group.is_root else os.devnull  # rank 0 writes
    try:
        with layer_clock or contextlib.nullcontext(), open(metrics_path, "a", encoding="utf-8") as metrics:
            while step < run.max_steps and not stopping:
                step += 1
                record = one_step(run, step, layer_clock)
                if run.args["eval_every"] and (step % run.args["eval_every"] == 0 or step == run.max_steps):
                    record.update(validate(run, step))
                    if layer_clock:
                        layer_clock.take()   # the validation's layer time is not the next step's
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{run.tokens_per_step / record['seconds']:.0f}")
                if run.args["save_every"] and step % run.args["save_every"] == 0 and step < run.max_steps:
                    save(run, step)
                stopping = run.group.any(run.stop.requested)   # a stop signal on any rank stops them all
                if run.deadline is not None:
                    recent.append(record["seconds"])
                    if step % REFIT_EVERY == 0 and step < run.max_steps:
                        refit_to_budget(run, step, sum(recent) / len(recent))
                        bar.total = run.max_steps
                if run.deadline is not None and step < run.max_steps and run.group.any(past_deadline(run)):
                    tqdm.write(f"note: the time budget of --minutes {run.args['minutes']:g} ran out after "
                               f"step {step} of {run.max_steps} (the machine ran slower than timed); "
                               "finishing there")
                    run.out_of_time = True
                    break
    except Diverged as e:
        mark_diverged(run, str(e))
        raise RunError(f"{e}; stopping: {kept(run, 'good checkpoint')}") from None
    finally:
        bar.close()
    if stopping and not run.stop.requested:
        run.stop.requested = "a stop signal on another rank"
    return step


def mark_diverged(run, reason):
    """After a non-finite loss or gradient: the card of the last checkpoint this process saved
    says the run diverged, and why (the checkpoint itself stays as it was)."""
    final_model = getattr(run, "last_final_model", None)
    if final_model is None or run.last_saved is None:
        return
    final_model["status"] = dict(final_model["status"], state="diverged", reason=reason)
    with run.stop.saving():
        checkpoint.commit_files(run.out, card_files(final_model, run.config))


def append_metrics(run, record):
    """One line of metrics.jsonl (rank 0 writes it)."""
    if not run.group.is_root:
        return
    with open(os.path.join(run.out, METRICS), "a", encoding="utf-8") as metrics:
        metrics.write(json.dumps(record) + "\n")


def validate(run, step):
    """The validation loss now (evaluate), in nats per token and bits per byte, as metrics.jsonl's
    fields {"val_loss", "val_bpb"} (None without validation rows); kept in run.last_validation."""
    start = time.perf_counter()
    loss = evaluate(run.params, run.config, run.val_inputs, run.val_targets, run.args["batch_size"],
                    run.workers, run.group)
    fields = {"val_loss": loss, "val_bpb": val_bits_per_byte(run, loss)}
    run.last_validation = (step, fields, time.perf_counter() - start)
    run.timing["eval_seconds"] = run.timing.get("eval_seconds", 0.0) + run.last_validation[2]
    return fields


def val_bits_per_byte(run, loss):
    """A validation loss (nats per token) in bits per byte of the validation text."""
    return bits_per_byte(loss, int((run.val_targets != albor.IGNORE_INDEX).sum()), run.val_bytes)


# --minutes: fitting the schedule to a time budget

PROBE_STEPS = 3   # steps timed on a scratch copy of the model; the first only warms up


def fitting_to_budget(run):
    return bool(run.args["minutes"]) and run.args["max_steps"] is None


def fit_to_budget(run, wall_start):
    """--minutes: set max_steps (and with it the schedule) to the steps that fit in the budget.

    Times PROBE_STEPS steps (one_step on the run's first batches) on a scratch copy of the
    weights and optimizer, thrown away after, so the run itself starts untouched. A step costs
    the faster of the timed ones, plus a validation every --eval-every steps at what the one
    before training took. The budget counts from wall_start (the start of train.py); the steps
    fitted are what is left of it, less the last step's validation. The loop fits the steps left
    again every REFIT_EVERY steps, at the pace it measures (refit_to_budget), and stops at the
    deadline at the latest; the run then evaluates and saves as usual.
    """
    args = run.args
    deadline = wall_start + 60 * args["minutes"]
    probe = SimpleNamespace(**vars(run))
    probe.params = {name: p.copy() for name, p in run.params.items()}
    probe.optimizer = cpu.FastAdamW(probe.params, betas=(args["beta1"], args["beta2"]), eps=args["eps"],
                                    weight_decay=args["weight_decay"])
    probe.scaler = gpu.LossScaler() if run.scaler else None
    probe.loss_curve, probe.timing = [], collections.defaultdict(float)
    seconds = [one_step(probe, run.start_step + 1 + i, None)["seconds"] for i in range(PROBE_STEPS)]
    step_seconds = min(seconds[1:])
    if args["eval_every"] and run.last_validation is None:   # resumed: no validation timed yet
        validate(run, run.start_step)
    eval_seconds = run.last_validation[2] if args["eval_every"] else 0.0
    left = deadline - time.perf_counter()
    fitted = steps_that_fit(left, step_seconds, eval_seconds, args["eval_every"])
    fitted = int(run.group.sum_floats([fitted])[0]) // run.group.size   # with MPI: every rank the same
    run.args["max_steps"] = run.start_step + fitted
    set_schedule(run, run.args["max_steps"])
    run.deadline = deadline
    print(f"--minutes {args['minutes']:g}: a step takes {step_seconds:.3f} s, a validation "
          f"{eval_seconds:.1f} s; the {max(0.0, left):.0f} s left fit {fitted} steps")
    print_schedule(run)


def steps_that_fit(seconds_left, step_seconds, eval_seconds, eval_every):
    """How many steps of step_seconds fit in seconds_left, with a validation of eval_seconds every
    eval_every steps (0: none) and one after the last step; at least 1.
    Example: steps_that_fit(100, 1.0, 5.0, 10) -> 63 (63 steps + 7 validations = 98 s)."""
    per_step = step_seconds + (eval_seconds / eval_every if eval_every else 0.0)
    last_validation = eval_seconds if eval_every else 0.0
    return max(1, int((seconds_left - last_validation) / per_step))


REFIT_EVERY = 100   # --minutes: the steps left are fitted to the time left again every this many steps


def refit_to_budget(run, step, step_seconds):
    """--minutes on a machine whose speed drifts (a shared machine, a laptop that throttles): fit
    the steps left to the time left again, at step_seconds a step (the pace of the last steps), so
    that the cosine still ends at the budget. The warmup stays as first fitted; the learning rate
    moves a little at each refit. With MPI every rank takes the same count."""
    args = run.args
    eval_seconds = run.last_validation[2] if args["eval_every"] and run.last_validation else 0.0
    fitted = steps_that_fit(run.deadline - time.perf_counter(), step_seconds, eval_seconds, args["eval_every"])
    run.max_steps = args["max_steps"] = step + int(run.group.sum_floats([fitted])[0]) // run.group.size


def past_deadline(run):
    """Whether --minutes' deadline has passed (checked after each step, so a run always takes one)."""
    return run.deadline is not None and time.perf_counter() >= run.deadline


def one_step(run, step, layer_clock):
    """Optimizer step number `step` (1-based): its rows, train_step, the timing; returns its
    metrics.jsonl record."""
    args, timing = run.args, run.timing
    step_start = time.perf_counter()
    lr = albor.lr_at(step, run.max_steps, args["lr"], run.warmup, run.min_lr)
    rows = np.stack([micro_batch_rows(step, m, args, len(run.train_inputs))
                     for m in range(args["grad_accum"])])      # (grad_accum, B)
    scale = run.scaler.scale if run.scaler else None
    loss, (grad_norm, clipped_norm), n_valid, stepped = train_step(
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
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "grad_norm_clipped": clipped_norm,
              "tokens": run.tokens_per_step, "valid_tokens": n_valid, "seconds": seconds}
    if run.scaler:
        record.update(loss_scale=scale, skipped=not stepped)
    return record


def finish(run, step, wall_start):
    """After the loop: the checkpoint first, so that nothing after it can lose the run; then,
    unless a stop signal came, the validation loss, the parse rate and a few samples, committed
    into final_model.json beside it, the loss plot and the summary."""
    finished = step >= run.max_steps or run.out_of_time
    if run.last_saved != step:
        save(run, step, finished=finished)
    if run.stop.requested:
        then = (f"Evaluate it with: python train.py --eval-only --resume {run.out}" if finished
                else f"Continue with: python train.py --resume {run.out}")
        print(f"stopped at step {step} of {run.max_steps} ({run.stop.requested}); the checkpoint of "
              f"step {step} is saved in {run.out}, the loss plot in {plot_losses(run.out)}. {then}")
        return
    run.stop.at_once = True   # the checkpoint is committed: a stop signal ends the evaluation at once
    try:
        val, parse = end_of_run_evaluation(run, step, wall_start)
    except KeyboardInterrupt:
        print(f"evaluation stopped ({run.stop.requested}); the checkpoint of step {step} is saved in "
              f"{run.out}, without the validation loss and parse rate "
              f"(python train.py --eval-only --resume {run.out} measures them)")
        return
    with run.stop.saving():
        checkpoint.commit_files(run.out, summary_files(run, step, finished, val["val_loss"], parse))
    plot = plot_losses(run.out, (step, val["val_loss"]))
    print_samples(parse)
    print_summary(run.config_name, step, run.tokens_per_step, run.loss_curve, val["val_loss"],
                  len(run.val_inputs), run.timing, run.out, parse, val_bpb=val["val_bpb"])
    print(f"loss plot: {plot}")


def end_of_run_evaluation(run, step, wall_start):
    """(validation {"val_loss", "val_bpb"}, parse rate) of the trained weights; the run's timing
    completed. The loop's validation of this step is reused."""
    timing = run.timing
    if not (run.last_validation and run.last_validation[0] == step):   # the loop's last one is now
        validate(run, step)
    val = run.last_validation[1]
    eval_start = time.perf_counter()
    parse = parse_eval(run.params, run.config, run.tok, run.val_texts, run.args)
    timing["eval_seconds"] = timing.get("eval_seconds", 0.0) + time.perf_counter() - eval_start
    timing["wall_seconds"] = timing.get("wall_seconds", 0.0) + time.perf_counter() - wall_start
    train_seconds = timing["train_seconds"]
    timing["tokens_per_second"] = step * run.tokens_per_step / train_seconds if train_seconds else None
    split_time(timing)
    return val, parse


SAMPLES_SHOWN = 3   # the end-of-run report prints this many of the parse rate's samples


def print_samples(parse):
    """The first SAMPLES_SHOWN of the parse rate's sampled texts (prompt + completion)."""
    shown = list(zip(parse["texts"], parse["verdicts"]))[:SAMPLES_SHOWN] if parse else []
    for i, (text, verdict) in enumerate(shown, 1):
        print(f"---- sample {i} of {parse['samples']} ({verdict}) " + "-" * 40)
        print(text.rstrip("\n"))
    if shown:
        print("-" * 72)


LOSS_PLOT = "loss.png"


def plot_losses(folder, final_validation=None):
    """Draw metrics.jsonl's training and validation losses over the steps into folder/loss.png,
    with final_validation (step, loss) as one more validation point (the end-of-run one, which
    metrics.jsonl lacks without --eval-every); returns the PNG's path. matplotlib is imported
    here, so only the end of a run needs it."""
    from matplotlib.figure import Figure   # no pyplot: no GUI backend, no global state
    records = []
    with open(os.path.join(folder, METRICS), encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if final_validation and final_validation[1] is not None and final_validation not in val:
        val.append(final_validation)
    window = max(1, len(train) // 50)   # the training loss's running mean, over 2% of the steps
    running = [(step, sum(loss for _, loss in train[max(0, i + 1 - window):i + 1]) / min(window, i + 1))
               for i, (step, _) in enumerate(train)] if window > 1 else []
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.subplots()
    for points, label, style in ((train, "training loss (each step's batch)", dict(lw=0.6, alpha=0.35)),
                                 (running, f"its running mean over {window} steps", dict(lw=1.2, color="C0")),
                                 (val, "validation loss (held-out documents)", dict(marker="o", ms=3))):
        if points:
            axes.plot(*zip(*points), label=label, **style)
    axes.set(xlabel="optimizer step", ylabel="loss (nats per token)", title=os.path.abspath(folder))
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = os.path.join(folder, LOSS_PLOT)
    checkpoint.atomic_write_bytes(path, buffer.getvalue())
    return path


def evaluate_only(run):
    """--eval-only: validation loss, perplexity and parse rate of the --resume checkpoint, printed
    and committed into final_model.json (in --out, by default the checkpoint's folder)."""
    args = run.args
    start = time.perf_counter()
    source = os.path.join(args["resume"], FINAL_MODEL)
    saved = checkpoint.read_json(source, "the run's summary") if os.path.exists(source) else {}
    if not isinstance(saved, dict):
        raise RunError(f"{source}: expected a JSON object, got {type(saved).__name__}")
    val_loss = evaluate(run.params, run.config, run.val_inputs, run.val_targets, args["batch_size"],
                        run.workers)
    parse = parse_eval(run.params, run.config, run.tok, run.val_texts, args)
    final_model = {**saved, **run_summary(run, run.start_step, args["resume"], saved.get("finished") is True,
                                          val_loss, parse)}
    final_model["status"] = saved.get("status") if isinstance(saved.get("status"), dict) else {
        "state": "finished" if final_model["finished"] else "in progress", "step": run.start_step,
        "max_steps": run.max_steps, "reason": None}
    with run.stop.saving():
        checkpoint.commit_files(args["out"], card_files(final_model, run.config))
    print_losses(None, val_loss, len(run.val_inputs), final_model["val_bpb"])
    print_samples(parse)
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


def print_losses(loss_curve, val_loss, val_rows, val_bpb=None):
    if loss_curve:
        print(f"loss {loss_curve[0]:.4f} -> {loss_curve[-1]:.4f} (perplexity {perplexity(loss_curve[-1]):,.1f}), "
              f"best {min(loss_curve):.4f}")
    if val_loss is not None:
        bpb = f", {val_bpb:.3f} bits per byte" if val_bpb is not None else ""
        print(f"validation loss {val_loss:.4f} (perplexity {perplexity(val_loss):,.1f}{bpb}) "
              f"on {val_rows} rows")
    else:
        print("validation: none (--val-rows 0)")


def print_summary(config_name, step, tokens_per_step, loss_curve, val_loss, val_rows, timing, out, parse=None,
                  val_bpb=None):
    train = timing["train_seconds"]
    tokens = step * tokens_per_step
    print_losses(loss_curve, val_loss, val_rows, val_bpb)
    if parse is not None:
        print(sample.describe_parse_rate(parse))
    if train:
        print(f"{config_name}: {step} steps, {tokens:,} tokens in {train:.1f} s of training: "
              f"{tokens / train:,.0f} tokens/s; wall time {timing['wall_seconds']:.1f} s")
        print("time: " + ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / train:.0f}%)"
                                   for name, seconds in model_card.time_split(timing)))
    print(f"checkpoint: {out}")


def main(argv=None):
    try:
        group = distributed.start()   # one process; or, under mpiexec, this rank's place among them
    except distributed.LaunchError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    with warnings.catch_warnings(), group.stop_all_on_failure():   # MPI: an error on a rank ends all
        # A diverging step overflows before its loss or gradient norm turns inf or NaN, which the
        # run reports itself in one line (Diverged): NumPy's warnings would only come first.
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                RuntimeWarning)
        try:
            return execute(argv, group)
        except (RunError, checkpoint.CheckpointError) as e:
            raise SystemExit(f"train.py: error: {e}") from None


def rank_zero_alone(run):
    """With MPI, after the training loop the other ranks are done: rank 0 alone goes on (the
    final save, the evaluation, the summary; --eval-only) with worker threads on all its cores,
    as a group of one (no collective waits for the others). Returns whether this process goes on."""
    if not run.group.is_root:
        return False
    if run.group.size > 1:
        run.workers, run.group = cpu.DataParallel(cpu.cpu_workers()), distributed.SINGLE
    return True


def execute(argv, group=distributed.SINGLE):
    """The whole run: settings, setup, the loop, and the finish (or a save when stopped)."""
    wall_start = time.perf_counter()
    args, given = parse_settings(argv)
    cpu.keep_freed_memory()  # the CPU step's temporaries are reused, not page-faulted in anew
    run = None
    with contextlib.ExitStack() as held, StopRequest() as stop:   # held: the run folders' locks
        try:
            with group.root_first():   # with MPI, rank 0 first: it claims the folder, trains a tokenizer
                run = setup(args, given, held, group)
            check_ranks_agree(run)
            run.stop = stop
            print_setup(run)
            if run.args["eval_only"]:
                return evaluate_only(run) if rank_zero_alone(run) else 0
            start_metrics_log(run)
            if run.args["eval_every"] and run.start_step == 0:   # where the validation curve starts
                append_metrics(run, {"step": 0, **validate(run, 0)})
            if fitting_to_budget(run):
                fit_to_budget(run, wall_start)
            stop.at_once = False   # from here a stop signal lets the step finish, then saves
            step = train_loop(run)
            if rank_zero_alone(run):
                finish(run, step, wall_start)
        except KeyboardInterrupt:   # a stop signal before training, in the evaluation, or a second one
            raise SystemExit(f"train.py: interrupted; {kept(run)}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
