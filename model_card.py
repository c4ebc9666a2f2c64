"""The model card: README.md in every run folder, in the form of albor-base-50m's original card.

train.py writes README.md with every checkpoint (in the same save, so a card always describes the
checkpoint beside it) and with --eval-only. The card is a pure function of the run's
final_model.json and config.json: render(final_model, config) fills model_card_template.md (the
prose and the layout) with this run's figures, formatted here. Nothing on the card is a constant:
what train.py measured goes into final_model.json first (train.card_facts), then onto the card.

The three FALSIFY predictions of the original card are checked here against the run's own logs:
    FALSIFY-ALBOR-001  the loss decreases      loss_decreases(loss curve)
    FALSIFY-ALBOR-002  gradient norms bounded  grad_norms_bounded(metrics.jsonl records, clip)
    FALSIFY-ALBOR-003  checkpoint determinism  same_seed_same_bytes(weights' SHA-256, command)
Each returns a status: PASSED, REFUTED or NOT TESTED (with the reason).

The metadata at the top (YAML) is what the Hugging Face Hub reads from a model repository's
README.md: library, pipeline tag, tags, license, data, and a model-index with the validation loss.

Why a module of its own: the card's formatting and the FALSIFY checks are some 300 lines that
the training itself never needs; train.py stays the run.
"""
import functools
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np

import albor

CARD_FILE = "README.md"
TEMPLATE = Path(__file__).resolve().with_name("model_card_template.md")
# The Hub's identifier of the code's license (huggingface.co/docs/hub/repositories-licenses).
# albor's repository has no LICENSE file yet: "unknown" until it has one.
CODE_LICENSE = "unknown"
PASSED, REFUTED, NOT_TESTED = "PASSED", "REFUTED", "NOT TESTED"
CLIP_TOLERANCE = 1e-6   # a clipped norm may exceed the clip value by float32 rounding, relatively


# -----------------------------------------------------------------------------
# The FALSIFY predictions, checked against the run's logs


def verdict(prediction, status, evidence):
    return {"prediction": prediction, "status": status, "evidence": evidence}


def loss_decreases(loss_curve):
    """FALSIFY-ALBOR-001. "Decreases" means: the mean training loss of the last tenth of the
    steps (at least one step) is below the mean of the first tenth.

    >>> loss_decreases([10.0, 9.0, 8.0, 7.0])["status"], loss_decreases([7.0, 8.0, 9.0])["status"]
    ('PASSED', 'REFUTED')
    """
    prediction = "the training loss decreases: the mean of the last tenth of the steps is below the first tenth's"
    n = len(loss_curve)
    if n < 2:
        return verdict(prediction, NOT_TESTED, f"{n} step(s): no first and last tenth to compare")
    k = max(1, n // 10)
    first, last = float(np.mean(loss_curve[:k])), float(np.mean(loss_curve[-k:]))
    status = PASSED if last < first else REFUTED
    return verdict(prediction, status, f"mean loss of {steps(1, k)}: {first:.4f}; of {steps(n - k + 1, n)}: "
                                       f"{last:.4f} ({last - first:+.4f})")


def steps(first, last):
    """'step 3' or 'steps 1-3'."""
    return f"step {first}" if first == last else f"steps {first}-{last}"


def plural(count, word):
    """'1 step', '3 steps', '1,024 tokens'."""
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def grad_norms_bounded(records, grad_clip):
    """FALSIFY-ALBOR-002: every gradient norm is finite, and after clipping at most the clip
    value (within CLIP_TOLERANCE). records: metrics.jsonl's lines, whose "grad_norm" is the norm
    before clipping and "grad_norm_clipped" the norm measured after it (an fp16 step skipped on
    overflow never reached the optimizer and is left out).

    >>> grad_norms_bounded([{"step": 1, "grad_norm": 5.0, "grad_norm_clipped": 5.0}], 1.0)["status"]
    'REFUTED'
    """
    prediction = "gradient norms stay finite, and after clipping at most the clip value"
    applied = [r for r in records if not r.get("skipped")]
    if not applied:
        return verdict(prediction, NOT_TESTED, "no optimizer step was logged")
    infinite = [r["step"] for r in applied if not math.isfinite(r["grad_norm"])]
    if infinite:
        return verdict(prediction, REFUTED, f"the gradient norm is not finite at step {infinite[0]} "
                                            f"({len(infinite)} step(s))")
    before = [r["grad_norm"] for r in applied]
    finite = f"{len(applied)} steps: every norm before clipping finite ({min(before):.4g} to {max(before):.4g})"
    if not grad_clip > 0:
        return verdict(prediction, NOT_TESTED, f"{finite}; clipping was off (--grad-clip 0): no bound to check")
    measured = [r for r in applied if "grad_norm_clipped" in r]
    if not measured:
        return verdict(prediction, NOT_TESTED, f"{finite}; the norm after clipping was not logged")
    over = [r for r in measured if not r["grad_norm_clipped"] <= grad_clip * (1 + CLIP_TOLERANCE)]
    if over:
        return verdict(prediction, REFUTED, f"after clipping at {grad_clip:g} the norm was "
                                            f"{over[0]['grad_norm_clipped']:.4g} at step {over[0]['step']} "
                                            f"({len(over)} of {len(measured)} steps over the clip value)")
    engaged = sum(b > grad_clip for b in before)
    unlogged = f"; {len(applied) - len(measured)} older steps without it" if len(measured) < len(applied) else ""
    after = max(r["grad_norm_clipped"] for r in measured)
    return verdict(prediction, PASSED, f"{finite}; clipping at {grad_clip:g} engaged on {engaged}; after clipping "
                                       f"at most {after:.6g}, measured on {len(measured)} steps{unlogged}")


RESUMED_CHANGED = "the run was resumed with changed settings"


def no_command_reason(args):
    """Why no single command reproduces a run's weights (its "reproduce" is None), from its
    settings: a --minutes run's step count and schedule followed the machine's pace; any other
    run lost its command when a resume changed a setting the weights depend on."""
    if args.get("minutes"):
        return "its steps and schedule were fitted to a time budget (--minutes) at the machine's pace"
    return RESUMED_CHANGED


def same_seed_same_bytes(model_sha256, command, why_none=RESUMED_CHANGED):
    """FALSIFY-ALBOR-003: the same settings and seed write the same model.safetensors, byte for
    byte. One run cannot test that about itself: its status stays NOT TESTED, with the command
    that would (the test suite tests the prediction on a tiny model), or why there is none."""
    prediction = "the same settings and seed give a byte-identical model.safetensors"
    if command is None:
        return verdict(prediction, NOT_TESTED, f"{why_none}, so no single command reproduces these bytes")
    return verdict(prediction, NOT_TESTED, f"this run trained once: its SHA-256 is {model_sha256}; the "
                                           "command below trains it again (the suite tests the prediction on a "
                                           "tiny model)")


def falsify(loss_curve, records, grad_clip, model_sha256, command, why_none=RESUMED_CHANGED):
    """The three predictions' verdicts, by id (final_model.json's "falsify")."""
    return {"FALSIFY-ALBOR-001": loss_decreases(loss_curve),
            "FALSIFY-ALBOR-002": grad_norms_bounded(records, grad_clip),
            "FALSIFY-ALBOR-003": same_seed_same_bytes(model_sha256, command, why_none)}


# -----------------------------------------------------------------------------
# The machine and the software (recorded in final_model.json by train.card_facts)


def machine(worker_threads):
    """{"kind", "name", "backend"(, "worker_threads")}: the device the run trained on."""
    if albor.BACKEND == "cupy":
        props = albor.xp.cuda.runtime.getDeviceProperties(albor.xp.cuda.Device().id)
        return {"kind": "GPU", "name": props["name"].decode(), "backend": "cupy"}
    return {"kind": "CPU", "name": cpu_name(), "backend": "numpy", "worker_threads": worker_threads}


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def software():
    """Python, NumPy (and its BLAS), CuPy, and albor's git commit (None outside a git checkout)."""
    found = {"python": platform.python_version(), "numpy": np.__version__, "blas": None, "albor_commit": None}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        found["blas"] = f"{blas['name']} {blas['version']}"
    except Exception:   # an older NumPy, or a build that does not say
        pass
    if albor.BACKEND == "cupy":
        found["cupy"] = albor.xp.__version__
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=TEMPLATE.parent,
                                capture_output=True, text=True, timeout=30)
        found["albor_commit"] = result.stdout.strip() or None if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return found


# -----------------------------------------------------------------------------
# Rendering: final_model.json (+ the config) -> the card's text


def render(final_model, config):
    """The card (str) of a run: model_card_template.md filled from final_model.json and its Config."""
    fm = final_model
    fields = {"metadata": to_yaml(metadata(fm)), "name": fm["config"], "status": status_text(fm)}
    fields.update(model_details(fm, config))
    fields.update(training_details(fm))
    fields.update(tokenizer_details(fm))
    fields.update(falsify_details(fm))
    fields.update(limitations=limitations(fm, config))
    fields.update(provenance_details(fm))
    fields.update(checkpoint_details(fm))
    return TEMPLATE.read_text(encoding="utf-8").format_map(fields)


def metadata(fm):
    """The YAML metadata the Hugging Face Hub reads (huggingface_hub.ModelCardData's fields)."""
    data = fm["data"]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": CODE_LICENSE,
            "language": ["code"], "tags": ["albor", "llama", "from-scratch", "causal-lm"] + data["tags"],
            "datasets": [data["name"]]}
    metrics = [("loss", fm["val_loss"], "validation loss (nats per token)"),
               ("perplexity", fm["val_perplexity"], "validation perplexity"),
               ("parse_rate", fm["parse_rate"], "share of sampled completions that ast.parse accepts")]
    metrics = [{"type": kind, "value": value, "name": name} for kind, value, name in metrics if value is not None]
    if fm["val_loss"] is not None:
        meta["model-index"] = [{"name": fm["config"], "results": [{
            "task": {"type": "text-generation", "name": "next-token prediction"},
            "dataset": {"type": data["name"], "name": fm["provenance"]["data"], "split": "validation"},
            "metrics": metrics}]}]
    return meta


def to_yaml(value, indent=0):
    """Block-style YAML of dicts, lists, strings and numbers; scalars are written as JSON, which
    YAML reads as they are. Example: {"a": [1, "x"]} -> 'a:\\n  - 1\\n  - "x"'."""
    pad = " " * indent
    lines = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        lead = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, (dict, list)) and item:
            nested = to_yaml(item, indent + 2)
            if isinstance(value, list) and isinstance(item, dict):   # "- key: ..." on one line
                lines.append(f"{lead} {nested.lstrip()}")
            else:
                lines += [lead, nested]
        else:
            lines.append(f"{lead} {json.dumps(item)}")
    return "\n".join(lines)


def status_text(fm):
    status = fm["status"]
    step, total, reason = status["step"], status["max_steps"], status.get("reason")
    if status["state"] == "finished":
        return f"**Finished**: {step:,} of {total:,} optimizer steps."
    if status["state"] == "stopped":
        evaluated = "" if fm["val_loss"] is not None else "; the end-of-run evaluation did not run"
        return (f"**Stopped early** at step {step:,} of {total:,}: {reason}. The figures below describe the "
                f"checkpoint of step {step:,}{evaluated}. Continue with "
                f"`python train.py --resume {fm['model_file']['folder']}`.")
    if status["state"] == "diverged":
        return (f"**Stopped: diverged** ({reason}). This folder keeps the last good checkpoint, step {step:,} "
                f"of {total:,}, which the figures below describe.")
    return (f"**In progress**: a periodic checkpoint (`--save-every {fm['args']['save_every']}`) at step "
            f"{step:,} of {total:,}; the end-of-run evaluation has not run yet.")


def measured(value, text, missing="not measured"):
    """text (a format string of value) or `missing` when value is None."""
    return missing if value is None else text.format(value)


def model_details(fm, config):
    args, prov, data = fm["args"], fm["provenance"], fm["data"]
    unit = "windows" if args.get("data_mode") == "packed" else "rows"   # --data-mode packed: of one stream
    timing, versions = fm["timing"], fm["software"]
    group = config.num_attention_heads // config.num_key_value_heads
    device = fm["device"]
    workers = f", {plural(device['worker_threads'], 'worker thread')}" if device.get("worker_threads") else ""
    train_time = timing.get("train_seconds")
    wall = timing.get("wall_seconds")
    return {
        "parameters": f"{fm['parameters']:,} (counted in the weights; the input embedding is also the LM head, "
                      "counted once)",
        "architecture": f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                        f"{config.num_attention_heads} query heads and {config.num_key_value_heads} key/value "
                        "heads "
                        f"(grouped-query attention, {group} query heads a group, head dim {config.head_dim}), "
                        f"SwiGLU MLP {config.intermediate_size}, RMSNorm (eps {config.rms_norm_eps:g}), RoPE "
                        f"(theta {config.rope_theta:g}), no biases, embedding tied to the LM head",
        "vocabulary": f"{config.vocab_size:,} token ids (the tokenizer uses {fm['tokenizer']['vocab_size']:,})",
        "context": f"trained on {unit} of {args['seq_len']:,} tokens; the model accepts "
                   f"{config.max_position_embeddings:,} (max_position_embeddings)",
        "training_data": f"{prov['train_rows']:,} {unit} of {prov['data']}: {data['train_tokens']:,} non-pad "
                         f"tokens; {prov['val_rows']:,} more {unit} held out for validation",
        "training_time": (measured(train_time, "{:,.1f} s of training") + ", "
                          + measured(wall, "{:,.1f} s wall time (tokenizer, data, evaluation and saving included)",
                                     "wall time not measured (the run did not finish)")),
        "framework": f"albor (commit {versions['albor_commit'] or 'not recorded'}), Python {versions['python']}, "
                     f"NumPy {versions['numpy']}" + (f" ({versions['blas']})" if versions.get("blas") else "")
                     + (f", CuPy {versions['cupy']}" if versions.get("cupy") else ""),
        "device": f"{device['kind']}: {device['name']} ({device['backend']}{workers})",
        "precision": precision_text(fm["precision"]),
    }


def precision_text(dtype):
    if dtype == "fp32":
        return "fp32: weights, optimizer state and every layer in float32"
    scaling = ", with dynamic loss scaling" if dtype == "fp16" else ""
    return f"{dtype} matmuls{scaling}; weights, optimizer state and the other layers float32"


def training_details(fm):
    args, timing, curve = fm["args"], fm["timing"], fm["loss_curve"]
    status = fm["status"]
    rows_per_step = args["batch_size"] * args["grad_accum"]
    positions = fm["tokens"]
    parse = fm.get("parse_eval")
    loss = "not measured (no step taken)"
    if curve:
        loss = (f"{curve[0]:.4f} -> {curve[-1]:.4f} (perplexity {fm['perplexity']:,.1f}), best {min(curve):.4f}; "
                f"ln({fm['tokenizer']['vocab_size']:,}) = {math.log(fm['tokenizer']['vocab_size']):.2f} "
                "is the loss of a uniform guess")
    return {
        "optimizer": f"AdamW: betas ({args['beta1']:g}, {args['beta2']:g}), eps {args['eps']:g}, weight decay "
                     f"{args['weight_decay']:g} on every matrix (the tied embedding included), none on the norm "
                     f"weights; gradients clipped to global norm {args['grad_clip']:g}"
                     + (" (off)" if not args["grad_clip"] > 0 else ""),
        "learning_rate": f"peak {fm['lr']:g}, linear warmup over {plural(fm['warmup'], 'step')}, then cosine "
                         f"decay to {fm['min_lr']:g} at step {fm['max_steps']:,}",
        "batch": f"{args['batch_size']} rows a micro-batch x {args['grad_accum']} micro-batches (gradient "
                 f"accumulation) = {rows_per_step} rows of {args['seq_len']} tokens a step",
        "steps": f"{status['step']:,} of {fm['max_steps']:,}",
        "tokens_seen": f"{positions:,} token positions, {fm['tokens_seen']:,} of them non-pad targets counted "
                       "in the loss",
        "mixed_precision": ("none: fp32 throughout" if fm["precision"] == "fp32"
                            else precision_text(fm["precision"])),
        "loss": loss,
        "validation": (f"{fm['val_loss']:.4f} (perplexity {fm['val_perplexity']:,.1f}) on "
                       f"{fm['provenance']['val_rows']:,} held-out rows" if fm["val_loss"] is not None
                       else "not measured" + (" (--val-rows 0)" if not fm["provenance"]["val_rows"] else "")),
        "parse_rate": parse_rate_text(parse),
        "throughput": measured(positions / timing["train_seconds"] if timing.get("train_seconds") else None,
                               "{:,.0f} token positions a second of training"),
        "resumed": "; ".join(resume_text(r) for r in fm["resumes"]) or "no",
        "time_split": time_split_table(timing),
    }


def non_trivial(parse):
    """How sample.parse_rate counted a parse, e.g. " with at least 3 lines of code (6 parse at all)"
    (empty for a summary written before it counted only non-trivial completions)."""
    if "min_code_lines" not in parse:
        return ""
    return f" with at least {parse['min_code_lines']} lines of code ({parse['parsed_any']} parse at all)"


def parse_rate_text(parse):
    if not parse or not parse["samples"]:
        return "not measured"
    return (f"{parse['parsed']} of {parse['samples']} sampled completions parse as Python{non_trivial(parse)} "
            f"({parse['parse_rate']:.0%}; up to {parse['max_new_tokens']} new tokens, temperature "
            f"{parse['temperature']:g}, top-p {parse['top_p']:g})")


def resume_text(resume):
    changed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in resume["changed"].items())
    return f"at step {resume['step']:,} from `{resume['from']}` ({changed or 'settings unchanged'})"


TIME_PARTS = [("matmul_seconds", "matmuls"), ("attention_seconds", "attention"),
              ("other_layers_seconds", "other layers"), ("optimizer_seconds", "optimizer")]
TIME_PARTS_WITHOUT_LAYERS = [("forward_seconds", "forward"), ("backward_seconds", "backward"),
                             ("optimizer_seconds", "optimizer")]


def time_split(timing):
    """[(what, seconds)] of the training time, by kind, the rest as data and bookkeeping; the
    layer kinds where they were measured (cpu.LayerClock, on a CPU), else forward/backward."""
    train = timing.get("train_seconds") or 0.0
    parts = TIME_PARTS if "matmul_seconds" in timing else TIME_PARTS_WITHOUT_LAYERS
    split = [(name, timing[key]) for key, name in parts if key in timing]
    return split + [("data/bookkeeping", train - sum(seconds for _, seconds in split))]


def time_split_table(timing):
    train = timing.get("train_seconds")
    if not train:
        return "Not measured: no training step was timed."
    rows = [f"| {name} | {seconds:,.1f} | {seconds / train:.0%} |" for name, seconds in time_split(timing)]
    return "\n".join(["| where | seconds | share of training |", "|---|---|---|"] + rows
                     + [f"| **training** | **{train:,.1f}** | |"])


def tokenizer_details(fm):
    tok = fm["tokenizer"]
    return {
        "tokenizer_type": f"byte-level BPE (albor's tokenizer.py): ids 0-255 are the bytes, 256 `<|endoftext|>`, "
                          f"257 `<|pad|>`, then {tok['merges']:,} learned merges; text is first split with "
                          "GPT-4's pattern",
        "tokenizer_vocabulary": f"{tok['vocab_size']:,} ids",
        "tokenizer_training": (f"trained by tokenizer.py on {tok['trained_on']}" if tok.get("trained_on")
                               else f"not recorded: loaded from `{tok['source']}`"),
        "tokenizer_sha256": tok["sha256"],
    }


def falsify_details(fm):
    rows = [f"| {name}: {v['prediction']} | **{v['status']}** | {v['evidence']} |"
            for name, v in fm["falsify"].items()]
    command = fm["reproduce"]
    reproduce = (f"No single command reproduces this checkpoint: {no_command_reason(fm['args'])}."
                 if command is None else
                 "To test FALSIFY-ALBOR-003 for this checkpoint, train it again and compare the SHA-256 (the "
                 "same bytes need the same data rows and tokenizer (Data Provenance), the same device kind and "
                 "number of worker threads, and the same NumPy/BLAS build):\n\n"
                 f"```bash\n{command} --out /tmp/albor-again && "
                 "sha256sum /tmp/albor-again/model.safetensors\n```\n\n"
                 f"Expected: `{fm['model_file']['sha256']}`.")
    return {"falsify_rows": "\n".join(rows), "reproduce": reproduce}


def limitations(fm, config):
    """The card's Limitations, as bullets, each from this run's figures."""
    args, data, prov, status = fm["args"], fm["data"], fm["provenance"], fm["status"]
    per_parameter = fm["tokens_seen"] / fm["parameters"]
    items = [f"Trained for {status['step']:,} optimizer steps on {fm['tokens_seen']:,} non-pad tokens: "
             f"{per_parameter:.3g} tokens per parameter (compute-optimal training, after Chinchilla, is "
             "about 20)."]
    packed = args.get("data_mode") == "packed"
    if per_parameter < 1:
        items[0] += (f" {status['step']:,} steps on {'so few tokens' if packed else 'file heads'} is a pipeline "
                     "check, not a code model: it shows that data, model, optimizer and checkpoint work end "
                     "to end, not that the model learned Python.")
    if packed:
        items.append(f"The training documents were joined into one token stream and cut into {prov['train_rows']:,} "
                     f"windows of {args['seq_len']} tokens: the model saw whole files, but never attended across "
                     "a window's start, so a file's beginning was out of its sight from the next window on.")
    else:
        items.append(f"Each row is the first {args['seq_len']} tokens of one document: {data['cut_train_rows']:,} "
                     f"of {prov['train_rows']:,} training rows end there with the document going on, so the model "
                     "saw file heads (licence headers, docstrings, imports), not the code further down.")
    if args["seq_len"] < config.max_position_embeddings:
        items.append(f"Context: trained on {args['seq_len']:,} positions; positions {args['seq_len']:,} to "
                     f"{config.max_position_embeddings - 1:,}, which the model accepts, were never trained.")
    parse = fm.get("parse_eval")
    if parse and parse["samples"]:
        verdict_ = "it does not write valid Python" if parse["parsed"] == 0 else "valid Python is the exception"
        if parse["parsed"] > parse["samples"] // 2:
            verdict_ = "a parse is not correctness: the completions are unchecked beyond the syntax"
        items.append(f"Parse rate: {parse['parsed']} of {parse['samples']} sampled completions parse"
                     f"{non_trivial(parse)}: {verdict_}. "
                     f"{parse['samples']} samples measure it only roughly.")
    else:
        items.append("Parse rate: not measured, so nothing here says the model writes valid Python.")
    if fm["val_loss"] is not None:
        seen = (f"{args['val_rows']:,} held-out documents of the same corpus, every token ({prov['val_rows']:,} "
                f"windows)" if packed else
                f"{prov['val_rows']:,} held-out documents' first {args['seq_len']} tokens of the same corpus")
        items.append(f"The validation loss comes from {seen}: it is not a benchmark.")
    if status["state"] != "finished":
        items.append(f"The run did not finish (step {status['step']:,} of {status['max_steps']:,}): these figures "
                     "describe an unfinished model.")
    return "\n".join(f"- {item}" for item in items)


def provenance_details(fm):
    prov, data, args = fm["provenance"], fm["data"], fm["args"]
    n = args["seq_len"] + 1
    skipped = (f"; {plural(prov['skipped_documents'], 'document')} skipped (unreadable or not UTF-8)"
               if prov.get("skipped_documents") else "")
    if args.get("data_mode") == "packed":
        rows = "all the rest" if args["rows"] is None else f"the next {args['rows']:,} (at most)"
        description = (f"Data: {prov['data']}, its documents in sorted order shuffled with seed {args['seed']}; the "
                       f"first {args['val_rows']:,} are held out for validation, {rows} are the training "
                       f"documents{skipped}. Packed: each set of documents is one token stream, every document "
                       f"after an `<|endoftext|>`, cut into windows of {n} token ids that overlap by one "
                       f"({prov['train_rows']:,} training and {prov['val_rows']:,} validation windows, the last "
                       "padded with `<|pad|>`)")
    else:
        description = (f"Data: {prov['data']}, its documents in sorted order shuffled with seed {args['seed']}; the "
                       f"first {prov['val_rows']:,} are held out for validation, the next {prov['train_rows']:,} are "
                       f"the training rows{skipped}. A row is a document's first {n} token ids (`<|endoftext|>` "
                       "appended, `<|pad|>` after it)")
    description += ("; its SHA-256 below covers the int32 input ids, then the target ids (-100 where the "
                    "target is padding), as train.py lays them out.")
    if data.get("license"):
        description += f" {data['license']}"
    rows = [("training rows", f"{prov['train_rows']:,} x {args['seq_len']} inputs and targets",
             "train_rows_sha256"),
            ("validation rows", f"{prov['val_rows']:,} x {args['seq_len']} inputs and targets", "val_rows_sha256"),
            ("`tokenizer.json`", f"{fm['tokenizer']['vocab_size']:,}-token BPE", "tokenizer_sha256"),
            ("`config.json`", "its JSON with sorted keys", "config_sha256")]
    lines = [f"| {name} | {what} | `{prov[key]}` |" for name, what, key in rows]
    lines.append(f"| `model.safetensors` | the weights after step {fm['status']['step']:,} | "
                 f"`{fm['model_file']['sha256']}` |")
    return {"data_description": description, "provenance_rows": "\n".join(lines)}


def checkpoint_details(fm):
    model = fm["model_file"]
    out = model["folder"]
    summary = (f"Path: `{out}`, step {fm['status']['step']:,}. `model.safetensors`: {model['bytes']:,} bytes "
               f"({model['bytes'] / 1e6:,.1f} MB), SHA-256 `{model['sha256']}`.")
    usage = ("Use it:\n\n```bash\n"
             f"python sample.py --checkpoint {out} --prompt \"def fib(n):\"   # albor's sampler\n"
             f"python train.py --eval-only --resume {out}   # validation loss, perplexity, parse rate\n"
             f"python train.py --resume {out} --max-steps {2 * fm['max_steps']}   # train on\n```\n\n"
             "In Python, Hugging Face `transformers` opens the folder as it is: "
             f"`AutoModelForCausalLM.from_pretrained(\"{out}\")`.")
    return {"checkpoint_summary": summary, "usage": usage}
