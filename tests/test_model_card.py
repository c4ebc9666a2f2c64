"""Tests for the model card (model_card.py): README.md in every run folder.

A tiny run on the standard library (the default data; the run trains its own tokenizer, cached for
the module's other runs) writes a card; every figure on it is checked against what the folder and
the data give when measured again here: the weights, their SHA-256 and size, the rows and their
tokens, the metrics log, final_model.json. The FALSIFY verdicts are fed curves and norms that must
refute them. huggingface_hub (a test-only oracle) parses the card's metadata.
"""
import hashlib
import json
import math
import os
import re
import shlex

import numpy as np
import pytest
from safetensors.numpy import load_file

import albor
import checkpoint
import cpu
import model_card
import train
from tests import oracles
from tests.test_train import signal_on_call
from tokenizer import Tokenizer

SECTIONS = ["Model Details", "Intended Use", "Training Details", "Tokenizer", "FALSIFY predictions",
            "Limitations", "Data Provenance", "Checkpoint"]   # the original card's, in its order
TINY = ["--config", "tiny", "--rows", "32", "--val-rows", "4", "--seq-len", "32", "--batch-size", "4",
        "--grad-accum", "2"]


def run(argv):
    assert train.main([str(a) for a in argv]) == 0


def read_json(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def card_of(folder):
    return (folder / "README.md").read_text(encoding="utf-8")


def metrics(folder):
    with open(folder / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def table_row(card, label):
    """The value cell of the card's table row `| label | value |`."""
    match = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", card, re.MULTILINE)
    assert match, f"no table row {label!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder for the module's runs: they share the tokenizer cache (runs/tokenizers)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(runs):
    """A 12-step tiny run on the standard library, which trains its tokenizer."""
    out = runs / "trained"
    run(TINY + ["--max-steps", "12", "--lr", "3e-3", "--eval-samples", "2", "--out", out])
    return out


# -----------------------------------------------------------------------------
# the card of a run: its sections, its metadata, every figure


def test_the_card_has_the_original_sections_in_order(trained):
    card = card_of(trained)
    assert re.findall(r"^## (.+)$", card, re.MULTILINE) == SECTIONS
    assert card.startswith("---\n") and "\n# tiny\n" in card
    assert "**Finished**: 12 of 12 optimizer steps." in card


def test_the_card_is_rendered_from_final_model_json_and_config_json(trained):
    """The card says nothing that final_model.json and config.json do not hold."""
    final_model = read_json(trained, "final_model.json")
    assert model_card.render(final_model, checkpoint.load_config(trained)) == card_of(trained)
    assert model_card.TEMPLATE.name == "model_card_template.md" and model_card.TEMPLATE.is_file()


def test_model_details_are_measured_from_the_weights_and_the_config(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    weights = load_file(trained / "model.safetensors")
    parameters = sum(a.size for a in weights.values())
    assert table_row(card, "parameters").startswith(f"{parameters:,} (counted in the weights")
    hf = read_json(trained, "config.json")
    architecture = table_row(card, "architecture")
    for figure in (f"hidden {hf['hidden_size']},", f"{hf['num_hidden_layers']} layers",
                   f"{hf['num_attention_heads']} query heads", f"{hf['num_key_value_heads']} key/value heads",
                   f"head dim {hf['head_dim']}", f"SwiGLU MLP {hf['intermediate_size']}",
                   f"eps {hf['rms_norm_eps']:g}", f"theta {hf['rope_theta']:g}"):
        assert figure in architecture, figure
    tok = Tokenizer.load(trained / "tokenizer.json")
    assert table_row(card, "vocabulary") == \
        f"{hf['vocab_size']:,} token ids (the tokenizer uses {tok.vocab_size:,})"
    assert table_row(card, "context").startswith(f"trained on rows of 32 tokens; the model accepts "
                                                 f"{hf['max_position_embeddings']:,}")
    timing = final_model["timing"]
    assert table_row(card, "training time") == (
        f"{timing['train_seconds']:,.1f} s of training, {timing['wall_seconds']:,.1f} s wall time "
        "(tokenizer, data, evaluation and saving included)")
    device = table_row(card, "device")
    threads = cpu.cpu_workers()
    assert device == f"CPU: {model_card.cpu_name()} (numpy, {threads} worker thread{'s' * (threads > 1)})" or \
        albor.BACKEND == "cupy"
    assert f"NumPy {np.__version__}" in table_row(card, "framework")
    assert table_row(card, "precision").startswith("fp32")


def test_training_details_are_the_logged_figures(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    lines = metrics(trained)
    losses = [line["loss"] for line in lines]
    assert table_row(card, "steps") == f"{len(lines)} of 12"
    assert table_row(card, "loss").startswith(
        f"{losses[0]:.4f} -> {losses[-1]:.4f} (perplexity {math.exp(losses[-1]):,.1f}), best {min(losses):.4f}")
    positions = sum(line["tokens"] for line in lines)
    counted = sum(line["valid_tokens"] for line in lines)
    assert table_row(card, "tokens seen") == \
        f"{positions:,} token positions, {counted:,} of them non-pad targets counted in the loss"
    assert table_row(card, "batch").startswith("4 rows a micro-batch x 2 micro-batches")
    warmup = model_card.plural(albor.default_warmup(12), "step")
    assert table_row(card, "learning rate") == \
        f"peak 0.003, linear warmup over {warmup}, then cosine decay to 0.0003 at step 12"
    parse = final_model["parse_eval"]
    assert table_row(card, "parse rate").startswith(f"{parse['parsed']} of 2 sampled completions parse as "
                                                    f"Python with at least 3 lines of code "
                                                    f"({parse['parsed_any']} parse at all)")
    timing = final_model["timing"]
    throughput = positions / timing["train_seconds"]
    assert table_row(card, "throughput") == f"{throughput:,.0f} token positions a second of training"
    for name, key in (("matmuls", "matmul_seconds"), ("attention", "attention_seconds"),
                      ("optimizer", "optimizer_seconds")):
        assert f"| {name} | {timing[key]:,.1f} | {timing[key] / timing['train_seconds']:.0%} |" in card, name
    assert table_row(card, "resumed") == "no"


def test_the_validation_loss_is_the_weights_loss_on_the_held_out_rows(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    config, params, _ = checkpoint.load_checkpoint(trained)
    state = read_json(trained, "trainer_state.json")
    val_texts, _ = train.take_documents(train.Corpus(state["args"]["data"]), state["args"])
    inputs, targets = train.make_rows(Tokenizer.load(trained / "tokenizer.json"), val_texts, 32)
    val_loss = train.evaluate(params, config, inputs, targets, 4)
    assert val_loss == pytest.approx(final_model["val_loss"], rel=1e-6)
    val_loss = final_model["val_loss"]
    assert table_row(card, "validation loss") == \
        f"{val_loss:.4f} (perplexity {math.exp(val_loss):,.1f}) on 4 held-out rows"


def test_provenance_is_the_sha256_of_the_files_and_of_the_rows_made_again(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    model_bytes = (trained / "model.safetensors").read_bytes()
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    assert final_model["model_file"]["sha256"] == model_sha
    assert final_model["model_file"]["bytes"] == len(model_bytes)
    assert f"`model.safetensors`: {len(model_bytes):,} bytes" in card
    assert f"| `model.safetensors` | the weights after step 12 | `{model_sha}` |" in card
    tok_sha = hashlib.sha256((trained / "tokenizer.json").read_bytes()).hexdigest()
    assert f"SHA-256 `{tok_sha}`" in table_row(card, "file") and f"`{tok_sha}`" in card
    # the rows, made again from the standard library
    state = read_json(trained, "trainer_state.json")
    tok = Tokenizer.load(trained / "tokenizer.json")
    val_texts, train_texts = train.take_documents(train.Corpus(None), state["args"])
    for texts, label in ((train_texts, "training rows"), (val_texts, "validation rows")):
        inputs, targets = train.make_rows(tok, texts, 32)
        sha = hashlib.sha256(inputs.tobytes() + targets.tobytes()).hexdigest()
        assert f"| {label} | {len(texts):,} x 32 inputs and targets | `{sha}` |" in card
    lengths = [len(tok.encode(text)) for text in train_texts]
    counted = sum(min(n + 1, 33) - 1 for n in lengths)      # a row's targets: its non-pad ids but one
    cut = sum(n >= 33 for n in lengths)                      # no room left for <|endoftext|>
    assert table_row(card, "training data") == (f"32 rows of {train.Corpus(None).description}: {counted:,} "
                                                "non-pad tokens; 4 more rows held out for validation")
    assert f"{cut:,} of 32 training rows end there with the document going on" in card
    assert "PSF License Agreement" in card   # the standard library's license


def test_the_tokenizer_section_says_how_it_was_trained(trained):
    card = card_of(trained)
    tok = Tokenizer.load(trained / "tokenizer.json")
    lines = sum(text.count("\n") for text in train.Corpus(None).first_lines(train.TOKENIZER_LINES))
    assert table_row(card, "how it was trained") == (
        f"trained by tokenizer.py on the first {lines:,} lines of {train.Corpus(None).description}, "
        f"min frequency {train.TOKENIZER_MIN_FREQUENCY}")
    section = card.split("## Tokenizer")[1].split("## FALSIFY")[0]
    assert f"then {len(tok.merges):,} learned merges" in table_row(section, "type")
    assert table_row(section, "vocabulary") == f"{tok.vocab_size:,} ids"


def test_limitations_are_written_from_the_run(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    limitations = card.split("## Limitations")[1].split("## Data Provenance")[0]
    counted = sum(line["valid_tokens"] for line in metrics(trained))
    parameters = final_model["parameters"]
    assert f"Trained for 12 optimizer steps on {counted:,} non-pad tokens: {counted / parameters:.3g} tokens " \
           "per parameter" in limitations
    assert counted < parameters
    assert "12 steps on file heads is a pipeline check, not a code model" in limitations
    last = read_json(trained, "config.json")["max_position_embeddings"] - 1
    assert f"positions 32 to {last:,}, which the model accepts, were never trained" in limitations
    parse = final_model["parse_eval"]
    assert f"Parse rate: {parse['parsed']} of 2 sampled completions parse" in limitations
    # a run that saw more tokens than it has parameters is not called a pipeline check
    bigger = dict(final_model, tokens_seen=2 * parameters)
    assert "pipeline check" not in model_card.render(bigger, checkpoint.load_config(trained))


def test_the_metadata_loads_and_validates_in_huggingface_hub(trained):
    hub = oracles.oracle("huggingface_hub")
    final_model = read_json(trained, "final_model.json")
    card = hub.ModelCard.load(trained / "README.md")   # ignore_metadata_errors=False: a bad model-index raises
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == model_card.CODE_LICENSE and {"albor", "llama", "python"} <= set(data.tags)
    assert data.datasets == [final_model["data"]["name"]] and data.language == ["code"]
    assert data.model_name == "tiny"
    results = {result.metric_type: result for result in data.eval_results}
    assert results["loss"].metric_value == final_model["val_loss"]
    assert results["perplexity"].metric_value == final_model["val_perplexity"]
    assert results["parse_rate"].metric_value == final_model["parse_rate"]
    assert {r.task_type for r in results.values()} == {"text-generation"}
    assert {r.dataset_split for r in results.values()} == {"validation"}
    again = hub.ModelCard(str(card))                    # what the Hub would store reads back the same
    assert again.data.to_dict() == data.to_dict() and card.text.startswith("\n# tiny\n")


def test_a_card_without_validation_has_no_model_index(trained):
    final_model = read_json(trained, "final_model.json")
    final_model.update(val_loss=None, val_perplexity=None, parse_rate=None, parse_eval=None)
    final_model["provenance"] = dict(final_model["provenance"], val_rows=0)
    card = model_card.render(final_model, checkpoint.load_config(trained))
    assert "model-index" not in card and "| validation loss | not measured (--val-rows 0) |" in card
    assert "| parse rate | not measured |" in card
    hub = oracles.oracle("huggingface_hub")
    assert hub.ModelCard(card).data.eval_results is None


# -----------------------------------------------------------------------------
# FALSIFY: computed, and refuted where the figures say so


def test_falsify_001_is_refuted_by_a_rising_loss_curve():
    rising = model_card.loss_decreases([5.0, 5.1, 5.3, 5.2, 5.6, 5.8, 6.0, 6.1, 6.3, 6.2, 6.6, 7.0])
    assert rising["status"] == "REFUTED"
    assert "mean loss of step 1: 5.0000; of step 12: 7.0000 (+2.0000)" == rising["evidence"]
    falling = model_card.loss_decreases(list(np.linspace(10, 7, 31)))
    assert falling["status"] == "PASSED"
    assert "steps 1-3" in falling["evidence"] and "steps 29-31" in falling["evidence"]
    # only the tenths count: a curve that ends where it starts is refuted, whatever its middle did
    assert model_card.loss_decreases([6.0] + [3.0] * 18 + [6.0])["status"] == "REFUTED"
    assert model_card.loss_decreases([6.0])["status"] == "NOT TESTED"


def record(step, before, after, **more):
    return {"step": step, "grad_norm": before, "grad_norm_clipped": after, **more}


def test_falsify_002_is_refuted_by_an_unclipped_or_infinite_gradient_norm():
    bounded = model_card.grad_norms_bounded
    unclipped = bounded([record(1, 0.5, 0.5), record(2, 5.0, 5.0)], 1.0)
    assert unclipped["status"] == "REFUTED" and "the norm was 5 at step 2" in unclipped["evidence"]
    assert bounded([record(1, 0.5, 0.5), record(2, math.nan, math.nan)], 1.0)["status"] == "REFUTED"
    clipped = bounded([record(1, 3.0, 1.0 - 1e-7), record(2, 0.5, 0.5)], 1.0)
    assert clipped["status"] == "PASSED" and "engaged on 1" in clipped["evidence"]
    assert bounded([record(1, 3.0, 1.0 + 1e-9)], 1.0)["status"] == "PASSED"    # float32 rounding
    assert bounded([record(1, 3.0, 1.001)], 1.0)["status"] == "REFUTED"
    # an fp16 step skipped on overflow never reached the optimizer
    skipped = record(1, math.inf, math.inf, skipped=True)
    assert bounded([skipped, record(2, 3.0, 1.0)], 1.0)["status"] == "PASSED"
    off = bounded([record(1, 3.0, 3.0)], 0.0)
    assert off["status"] == "NOT TESTED" and "clipping was off" in off["evidence"]
    unlogged = bounded([{"step": 1, "grad_norm": 3.0}], 1.0)
    assert unlogged["status"] == "NOT TESTED" and "not logged" in unlogged["evidence"]
    assert bounded([], 1.0)["status"] == "NOT TESTED"


def test_falsify_003_is_never_marked_tested_by_the_run_itself():
    verdict = model_card.same_seed_same_bytes("ab" * 32, "python train.py --rows 500")
    assert verdict["status"] == "NOT TESTED" and "ab" * 32 in verdict["evidence"]
    assert "changed settings" in model_card.same_seed_same_bytes("ab" * 32, None)["evidence"]


def test_the_card_shows_each_verdict(trained):
    card, final_model = card_of(trained), read_json(trained, "final_model.json")
    curve = [line["loss"] for line in metrics(trained)]
    assert final_model["falsify"]["FALSIFY-ALBOR-001"] == model_card.loss_decreases(curve)
    assert final_model["falsify"]["FALSIFY-ALBOR-002"] == model_card.grad_norms_bounded(metrics(trained), 1.0)
    for name, verdict in final_model["falsify"].items():
        assert f"| {name}: {verdict['prediction']} | **{verdict['status']}** | {verdict['evidence']} |" in card
    assert final_model["falsify"]["FALSIFY-ALBOR-001"]["status"] == "PASSED"
    assert final_model["falsify"]["FALSIFY-ALBOR-002"]["status"] == "PASSED"


def test_metrics_log_the_gradient_norm_after_clipping(trained):
    lines = metrics(trained)
    for line in lines:
        assert line["grad_norm_clipped"] <= 1.0 * (1 + 1e-6)
        if line["grad_norm"] <= 1.0:
            assert line["grad_norm_clipped"] == pytest.approx(line["grad_norm"], rel=1e-6)


def test_a_run_whose_clipping_does_nothing_is_refuted_on_its_card(runs, monkeypatch):
    """The original card's bug: clipping that did nothing. The card catches it from the log."""
    monkeypatch.setattr(albor, "clip_grad_norm", lambda grads, max_norm: albor.global_norm(grads))
    out = runs / "no_clipping"
    run(TINY + ["--max-steps", "3", "--grad-clip", "0.01", "--eval-samples", "0", "--out", out])
    verdict = read_json(out, "final_model.json")["falsify"]["FALSIFY-ALBOR-002"]
    assert verdict["status"] == "REFUTED" and "3 of 3 steps over the clip value" in verdict["evidence"]
    assert f"| **REFUTED** | {verdict['evidence']} |" in card_of(out)


def test_the_cards_command_trains_the_same_bytes_again(trained, tmp_path):
    """FALSIFY-ALBOR-003's command, run here (into a new folder: the tokenizer is trained again)."""
    final_model = read_json(trained, "final_model.json")
    command = final_model["reproduce"]
    assert f"```bash\n{command} --out /tmp/albor-again && sha256sum /tmp/albor-again/model.safetensors\n```" \
        in card_of(trained)
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    run(words[2:] + ["--out", tmp_path / "again"])
    again = hashlib.sha256((tmp_path / "again" / "model.safetensors").read_bytes()).hexdigest()
    assert again == final_model["model_file"]["sha256"]
    assert f"Expected: `{again}`." in card_of(trained)


def test_the_command_names_the_model_the_rows_and_every_changed_setting():
    args = dict(train.DEFAULTS)
    assert train.reproduce_command(args) == "python train.py --config albor-base-50m --rows 500"
    args.update(lr=0.001, data="my code", out="elsewhere", eval_samples=0, save_every=5)
    assert train.reproduce_command(args) == \
        "python train.py --config albor-base-50m --data 'my code' --rows 500 --lr 0.001"
    args.update(init="runs/base")            # the model's shape comes from the checkpoint
    assert shlex.split(train.reproduce_command(args))[2:] == \
        ["--data", "my code", "--rows", "500", "--lr", "0.001", "--init", "runs/base"]
    parsed, _ = train.parse_settings(shlex.split(train.reproduce_command(args))[2:])
    assert all(parsed[name] == args[name] for name in train.DEFAULTS if name not in train.NOT_REPEATED)


# -----------------------------------------------------------------------------
# stopped, resumed, diverged, evaluated again


def test_a_stopped_run_says_so_and_its_resume_updates_the_card(runs, monkeypatch):
    argv = TINY + ["--max-steps", "6", "--eval-samples", "0"]
    run(argv + ["--out", runs / "straight"])
    signal_on_call(monkeypatch, albor, "backward", {5})             # during step 3 (2 micro-batches a step)
    stopped = runs / "stopped"
    run(argv + ["--out", stopped])
    card = card_of(stopped)
    assert ("**Stopped early** at step 3 of 6: Ctrl-C (SIGINT). The figures below describe the checkpoint of "
            "step 3; the end-of-run evaluation did not run. Continue with "
            f"`python train.py --resume {stopped}`.") in card
    assert "The run did not finish (step 3 of 6)" in card and table_row(card, "steps") == "3 of 6"
    status = read_json(stopped, "final_model.json")["status"]
    assert status == {"state": "stopped", "step": 3, "max_steps": 6, "reason": "Ctrl-C (SIGINT)"}
    monkeypatch.undo()
    run(["--resume", stopped])
    card, final_model = card_of(stopped), read_json(stopped, "final_model.json")
    assert "**Finished**: 6 of 6 optimizer steps." in card and "Stopped" not in card
    assert table_row(card, "resumed") == f"at step 3 from `{stopped}` (settings unchanged)"
    straight = read_json(runs / "straight", "final_model.json")
    assert final_model["reproduce"] == straight["reproduce"]              # one command for both
    assert final_model["model_file"]["sha256"] == straight["model_file"]["sha256"]
    # resumed with a longer schedule: no single command gives these bytes
    run(["--resume", stopped, "--max-steps", "8", "--out", runs / "longer"])
    longer = read_json(runs / "longer", "final_model.json")
    assert longer["reproduce"] is None
    assert "changed settings" in longer["falsify"]["FALSIFY-ALBOR-003"]["evidence"]
    assert table_row(card_of(runs / "longer"), "resumed") == (
        f"at step 3 from `{stopped}` (settings unchanged); at step 6 from `{stopped}` (max_steps 6 -> 8)")


def test_a_diverged_run_says_so_on_the_card_of_its_last_good_checkpoint(runs, monkeypatch):
    real_step = train.train_step

    def train_step(params, config, optimizer, inputs, targets, lr, grad_clip, step, *more):
        if step == 5:
            raise train.Diverged("the loss is nan at step 5 (injected)")
        return real_step(params, config, optimizer, inputs, targets, lr, grad_clip, step, *more)

    monkeypatch.setattr(train, "train_step", train_step)
    out = runs / "nan"
    with pytest.raises(SystemExit, match="the loss is nan at step 5"):
        train.main([str(a) for a in TINY + ["--max-steps", "8", "--save-every", "2", "--out", out]])
    card = card_of(out)
    assert ("**Stopped: diverged** (the loss is nan at step 5 (injected)). This folder keeps the "
            "last good checkpoint, step 4 of 8") in card
    assert read_json(out, "final_model.json")["status"]["state"] == "diverged"
    assert model_card.render(read_json(out, "final_model.json"), checkpoint.load_config(out)) == card


def test_a_periodic_checkpoints_card_says_the_run_is_in_progress(trained):
    final_model = read_json(trained, "final_model.json")
    final_model["status"] = dict(final_model["status"], state="in progress", step=4)
    final_model["args"] = dict(final_model["args"], save_every=4)
    card = model_card.render(final_model, checkpoint.load_config(trained))
    assert "**In progress**: a periodic checkpoint (`--save-every 4`) at step 4 of 12" in card


def test_eval_only_writes_a_card_for_the_checkpoint_it_evaluated(trained, tmp_path):
    out = tmp_path / "evaluated"
    run(["--eval-only", "--resume", trained, "--eval-samples", "1", "--out", out])
    card, final_model = card_of(out), read_json(out, "final_model.json")
    trained_model = read_json(trained, "final_model.json")
    assert final_model["val_loss"] == pytest.approx(trained_model["val_loss"], rel=1e-6)
    assert final_model["parse_eval"]["samples"] == 1
    weights = (trained / "model.safetensors").read_bytes()
    assert final_model["model_file"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert final_model["status"] == trained_model["status"]
    assert final_model["falsify"] == trained_model["falsify"]
    assert f"Path: `{trained}`, step 12." in card
    assert model_card.render(final_model, checkpoint.load_config(trained)) == card
