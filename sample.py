"""Generate code with a trained albor checkpoint, and measure how much of it is valid Python.

    python sample.py --checkpoint checkpoints/albor-base-50m --prompt "def fib(n):"

prints the prompt, then the model's continuation token by token as it is drawn, until the
model writes <|endoftext|> or --max-new-tokens tokens are out. Same --seed, same text;
--temperature 0 is greedy decoding (always the most likely token).

What happens, in the order of the functions below:

1. load(): the checkpoint folder's config.json and model.safetensors (checkpoint.load_checkpoint)
   and tokenizer.json (tokenizer.Tokenizer.load).
2. generate() runs the model with a KV cache (albor.forward_step): the prompt once, then one
   new token per step, each drawn by sample_next from sampling_probs (temperature, top-k,
   top-p). The prompt is cut from the left when
   prompt + new tokens would not fit the model's context (max_position_embeddings).
3. TextStream turns the ids into text as they come. A byte-level token can end inside a
   multi-byte UTF-8 character, so it decodes the whole growing list of new ids each time and
   prints only the new, settled suffix.

Evaluation (train.py calls it at the end of a run and with --eval-only): parse_rate() samples
N completions of short prompts and reports the share that Python's own parser (ast.parse)
accepts and that hold at least 3 lines of code (not blank, not comments), a structural measure
of "is this code" that a loss value does not give.
"""
import argparse
import ast
import math
import os
import sys
import time
import warnings

import numpy as np

import albor
import checkpoint
from tokenizer import EOT_ID, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"  # what decode makes of bytes that are not (yet) a whole UTF-8 character
DEFAULT_PROMPTS = ["import ", "def ", "class "]  # parse_rate's prompts when there is no held-out text
MIN_CODE_LINES = 3  # a completion counts as parsed only with this many lines that are not blank or comments


class SampleError(Exception):
    """A problem with sample.py's input; main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# 1. Loading a checkpoint


def load(folder):
    """(config, params, tokenizer) of a checkpoint folder; a one-line SampleError if it is not one."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise SampleError(f"{folder}: no such checkpoint folder")
    try:
        config, params, _ = checkpoint.load_checkpoint(folder)
    except checkpoint.CheckpointError as e:
        raise SampleError(str(e)) from None
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise SampleError(f"{path}: file not found (the checkpoint has no tokenizer)")
    try:
        tok = Tokenizer.load(path, max_vocab_size=config.vocab_size)
    except ValueError as e:
        raise SampleError(str(e).splitlines()[0]) from None
    return config, params, tok


# -----------------------------------------------------------------------------
# 2. Drawing tokens: the sampling policy and the generation loop
#
#   sampling_probs   logits -> the distribution to draw from (temperature, top-k, top-p)
#   sample_next      one token id drawn from it (the argmax at temperature 0)
#   generate         prompt ids -> new ids, until eos_id or max_new_tokens

def _check_sampling(temperature, top_k, top_p):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (1: no limit), got {top_p!r}")


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution sample_next draws the next token from: a float64 (V,) host array.

    1. temperature: softmax(logits / temperature); below 1 it sharpens, above 1 it flattens.
       0 puts all the mass on the argmax (greedy decoding).
    2. top_k > 0: only the k most likely tokens keep their mass (ties: the lower id first).
    3. top_p < 1: then only the smallest set of most likely tokens whose mass reaches top_p
       (the "nucleus"). What is kept is renormalized to sum to 1.
    Example: logits [2, 1, 0] -> probs [0.665, 0.245, 0.090]; with top_k=2 -> [0.731, 0.269, 0];
    with top_p=0.5 -> [1, 0, 0]; with temperature 0 -> [1, 0, 0].
    """
    _check_sampling(temperature, top_k, top_p)
    logits = albor.to_numpy(logits).astype(np.float64).reshape(-1)  # (V,)
    V = logits.size
    probs = np.zeros(V)
    if temperature == 0:
        probs[np.argmax(logits)] = 1.0  # argmax: the first (lowest id) of equal maxima
        return probs
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")  # token ids, most likely first
    if 0 < top_k < V:
        scaled[order[top_k:]] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        cumulative = np.cumsum(probs[order])  # mass of the 1, 2, 3, ... most likely tokens
        n_keep = min(int(np.searchsorted(cumulative, top_p)) + 1, V)  # first n reaching top_p
        probs[order[n_keep:]] = 0.0
        probs /= probs.sum()
    return probs


def sample_next(logits, temperature, top_k, top_p, rng):
    """One token id drawn from sampling_probs(logits, ...) with rng (a np.random.Generator).

    Temperature 0 returns the argmax and draws nothing from rng. One uniform number per
    draw, so the same seed gives the same ids.
    """
    probs = sampling_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return int(np.argmax(probs))
    cumulative = np.cumsum(probs)  # (V,)
    u = rng.random() * cumulative[-1]  # uniform in [0, total mass)
    # the token whose slice [cumulative[i-1], cumulative[i]) holds u; empty slices never do
    return int(min(np.searchsorted(cumulative, u, side="right"), probs.size - 1))


def generate(params, config, prompt_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, eos_id=None, on_token=None, vocab_size=None):
    """Continue prompt_ids (a list of ints) by up to max_new_tokens tokens; returns the new ids.

    Stops early when it draws eos_id (the end-of-text token; not returned, not passed on).
    on_token(id) is called with each new id as soon as it is drawn (sample.py prints with it).
    The draws come from np.random.default_rng(seed): same seed and settings -> same ids.
    vocab_size: draw only ids below it (a tokenizer smaller than the model's vocabulary cannot
    decode the others); default: all of config.vocab_size.
    A long prompt is cut from the LEFT so that prompt plus new tokens fit the context: the model
    sees the last max_position_embeddings - max_new_tokens prompt tokens.
    """
    prompt = [int(i) for i in prompt_ids]
    context = config.max_position_embeddings
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if not 0 <= max_new_tokens < context:
        raise ValueError(f"max_new_tokens must lie in [0, {context}) (max_position_embeddings "
                         f"{context}, and the prompt needs room), got {max_new_tokens}")
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if not 1 <= vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size must lie in [1, {config.vocab_size}], got {vocab_size}")
    _check_sampling(temperature, top_k, top_p)
    prompt = prompt[-(context - max_new_tokens):]  # cut from the left
    if max_new_tokens == 0:
        return []
    rng = np.random.default_rng(seed)
    dtype = params["model.embed_tokens.weight"].dtype
    cache = albor.kv_cache_new(config, 1, len(prompt) + max_new_tokens, dtype)
    logits = albor.forward_step(params, config, np.array([prompt]), cache)[0, -1]  # (V,) the last one
    new_ids = []
    while True:
        next_id = sample_next(logits[:vocab_size], temperature, top_k, top_p, rng)
        if next_id == eos_id:
            break
        new_ids.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if len(new_ids) == max_new_tokens:
            break
        logits = albor.forward_step(params, config, np.array([[next_id]]), cache)[0, 0]  # (V,)
    return new_ids


# -----------------------------------------------------------------------------
# 3. Streaming text


class TextStream:
    """Writes the text of token ids to `out` as the ids arrive, one whole character at a time.

    Example: "€" is the 3 bytes E2 82 AC. If one token is E2 82 and the next AC, then after
    the first, decode gives "\ufffd" (an unfinished character): nothing is written yet; after
    the second it gives "€", which is written. A trailing "\ufffd" is held back until a later
    token settles it or finish() is called (the model did write bytes that are not UTF-8).
    """

    def __init__(self, tok, out):
        self.tok, self.out = tok, out
        self.ids = []
        self.written = ""  # the text written so far, a prefix of decode(ids)

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        self._write(text.rstrip(REPLACEMENT))

    def finish(self):
        self._write(self.tok.decode(self.ids))

    def _write(self, text):
        if len(text) > len(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text


# -----------------------------------------------------------------------------
# Evaluation: the share of sampled completions that are valid Python


def is_valid_python(text):
    """Whether ast.parse accepts text. is_valid_python("x = 1\\n") -> True; ("x = (\\n") -> False."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "\d" in a string
            ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte
        return False


def eval_prompts(texts):
    """parse_rate's prompts: the first line of each text (held-out documents), DEFAULT_PROMPTS
    if there are none. Example: ["import os\\nimport sys\\n"] -> ["import os\\n"]."""
    prompts = [text.splitlines(keepends=True)[0] for text in texts if text.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def code_lines(text):
    """The lines of text that are neither blank nor comments.
    Example: code_lines("# setup\\n\\nx = 1\\n    y = 2  # two\\n") -> 2."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def completion_text(prompt, new_text, finished):
    """What parse_rate parses: the prompt plus the completion, and when the model ran out of
    tokens instead of writing <|endoftext|> (finished False), cut after its last newline (an
    unfinished last line is no fault of the model's). Example: ("x = 1\\n", "y = 2\\nz = (", False)
    -> "x = 1\\ny = 2\\n"."""
    text = prompt + new_text
    return text if finished else text[:text.rfind("\n") + 1]


def verdict(prompt, text):
    """How parse_rate counts one sample's text (completion_text's, prompt included): "valid" when
    ast.parse accepts it and the completion (after the prompt) has at least MIN_CODE_LINES lines
    of code (code_lines), "trivial" when it parses with fewer, "invalid" when it does not parse.
    Example: ("x = 1\\n", "x = 1\\n# done\\n") -> "trivial"."""
    if not is_valid_python(text):
        return "invalid"
    return "valid" if code_lines(text[len(prompt):]) >= MIN_CODE_LINES else "trivial"


def parse_rate(params, config, tok, prompts, n_samples, max_new_tokens=128, temperature=0.8,
               top_k=0, top_p=0.95, seed=0):
    """Sample n_samples completions and count the non-trivial valid Python ones, as a dict:
    {"parse_rate": parsed / n_samples (None for 0 samples), "parsed" (verdict "valid"),
    "parsed_any" (every text that parses), "samples", "texts", "verdicts", and the settings}.

    Sample i continues prompts[i % len(prompts)] with seed + i; its text is completion_text's
    and its verdict verdict's, so a model that writes only blank lines, comments or nothing
    cannot score.
    """
    if n_samples < 0 or not prompts:
        raise ValueError("parse_rate needs n_samples >= 0 and at least one prompt")
    texts, verdicts = [], []
    for i in range(n_samples):
        prompt = prompts[i % len(prompts)]
        new_ids = generate(params, config, tok.encode(prompt), max_new_tokens, temperature,
                           top_k, top_p, seed=seed + i, eos_id=EOT_ID, vocab_size=tok.vocab_size)
        texts.append(completion_text(prompt, tok.decode(new_ids), finished=len(new_ids) < max_new_tokens))
        verdicts.append(verdict(prompt, texts[-1]))
    parsed = verdicts.count("valid")
    return {"parse_rate": parsed / n_samples if n_samples else None, "parsed": parsed,
            "parsed_any": parsed + verdicts.count("trivial"), "min_code_lines": MIN_CODE_LINES,
            "samples": n_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "seed": seed, "texts": texts, "verdicts": verdicts}


def describe_parse_rate(result):
    """parse_rate's result as one line: "parse rate 25%: 2 of 8 sampled completions are valid
    Python with at least 3 lines of code (ast.parse; 5 of 8 parse at all)"."""
    if not result["samples"]:
        return "parse rate: not measured (0 samples)"
    return (f"parse rate {result['parse_rate']:.0%}: {result['parsed']} of {result['samples']} sampled "
            f"completions are valid Python with at least {result['min_code_lines']} lines of code "
            f"(ast.parse; {result['parsed_any']} of {result['samples']} parse at all)")


# -----------------------------------------------------------------------------
# The command line


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Continue a prompt with a trained albor checkpoint, printing tokens as they "
                    "are drawn. Stops at <|endoftext|> or after --max-new-tokens tokens. A prompt "
                    "too long for the model's context is cut from the left (keeping its last "
                    "max_position_embeddings - max-new-tokens tokens).",
        epilog="example:\n  python sample.py --checkpoint checkpoints/albor-base-50m --prompt \"def fib(n):\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint folder (model.safetensors, config.json, tokenizer.json)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="most tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divide the logits by this; 0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="draw only from the K most likely tokens; 0 = all (default: 0)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="draw only from the smallest set of most likely tokens whose "
                             "probability reaches P; 1 = all (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same text (default: 0)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        parser.error("--temperature must be a finite number >= 0")
    if args.top_k < 0:
        parser.error("--top-k must be 0 or more")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must lie in (0, 1]")
    if args.seed < 0:
        parser.error("--seed must be 0 or more")
    if not args.prompt:
        parser.error("--prompt is empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:   # bytes that are not UTF-8 on the command line arrive as lone surrogates
        parser.error("--prompt is not UTF-8 text")
    try:
        config, params, tok = load(args.checkpoint)
    except SampleError as e:
        raise SystemExit(f"sample.py: error: {e}") from None
    context = config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise SystemExit(f"sample.py: error: --max-new-tokens {args.max_new_tokens} leaves no room for "
                         f"the prompt in the model's context of {context} tokens")
    prompt_ids = tok.encode(args.prompt)
    room = context - args.max_new_tokens
    if len(prompt_ids) > room:
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees its last {room} "
              f"(context {context} - max-new-tokens {args.max_new_tokens})", file=sys.stderr)

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    stream = TextStream(tok, sys.stdout)
    start = time.perf_counter()
    new_ids = generate(params, config, prompt_ids, args.max_new_tokens, args.temperature,
                             args.top_k, args.top_p, seed=args.seed, eos_id=EOT_ID,
                             on_token=stream.add, vocab_size=tok.vocab_size)
    stream.finish()
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    ending = "<|endoftext|>" if len(new_ids) < args.max_new_tokens else "--max-new-tokens"
    print(f"[{len(new_ids)} tokens in {seconds:.1f} s ({len(new_ids) / seconds:.1f} tokens/s); "
          f"stopped by {ending}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
