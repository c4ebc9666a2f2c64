"""Interop: an albor checkpoint folder opens, unchanged, in Hugging Face transformers and tokenizers.

The folder checkpoint.save_checkpoint writes (model.safetensors, config.json, plus tokenizer.json)
must load as LlamaForCausalLM with every weight used and none missing, give albor's logits,
decode greedily to albor's tokens, and its tokenizer.json must give tokenizer.py's ids in
`tokenizers` and in transformers' tokenizer classes. torch and transformers are test-only
dependencies (requirements-dev.txt); albor itself never imports them.
"""
import json
import warnings

import numpy as np
import pytest

import albor
import checkpoint
import sample
from tests.oracles import oracle
from tests.test_sample import params_of
from tokenizer import EOT_ID, PAD_ID, Tokenizer
from train import stdlib_python_files
# The oracles (requirements-dev.txt): where one is missing, this module is skipped.
torch = oracle("torch")
transformers = oracle("transformers")
HFTokenizer = oracle("tokenizers").Tokenizer

# Two small shapes; the second changes every setting config.json carries (GQA group size,
# head count, RoPE theta, RMSNorm eps, context), so a field transformers misread would show.
CONFIGS = {
    "gqa": albor.Config(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=48),
    "settings": albor.Config(vocab_size=400, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=1, intermediate_size=80, max_position_embeddings=40,
                             rope_theta=500.0, rms_norm_eps=1e-2),
}

TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "class Ä:\n\tpass  # naïve €🙂\r\n\n\n   x = '''<|pad|>'''\n",
         "", " ", "\n\n", "import os, sys\nprint(os.sep)  <|endoftext|> tail"]




@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(encoding="utf-8", errors="replace")[:4000] for p in stdlib_python_files()[:40]]
    return Tokenizer.train(texts, vocab_size=380)


@pytest.fixture(scope="module", params=list(CONFIGS))
def run_folder(request, tok, tmp_path_factory):
    config = CONFIGS[request.param]
    params = params_of(config, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    tok.save(folder / "tokenizer.json")
    checkpoint.save_checkpoint(folder, config, params, step=1)
    return folder, config, params


@pytest.fixture(scope="module")
def hf_model(run_folder):
    folder, _, _ = run_folder
    model, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    model.eval()
    return model, info


def test_transformers_reads_config_json_as_written(run_folder, hf_model):
    folder, config, _ = run_folder
    model, _ = hf_model
    hf = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and hf.model_type == "llama"
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                  "head_dim"):
        assert getattr(hf, field) == getattr(config, field), field
    # transformers 5 moves rope_theta into rope_parameters; older versions keep the attribute
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta, "rope_type": "default"}
    assert rope["rope_theta"] == config.rope_theta and rope.get("rope_type", "default") == "default"
    assert hf.hidden_act == "silu" and hf.tie_word_embeddings is True
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (EOT_ID, EOT_ID, PAD_ID)
    assert not hf.attention_bias and not hf.mlp_bias


def test_every_weight_loads_and_the_head_is_tied(run_folder, hf_model):
    folder, config, params = run_folder
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, value in params.items():
        np.testing.assert_array_equal(state[name].numpy(), albor.to_numpy(value), err_msg=name)
        assert state[name].dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_logits_as_albor(run_folder, hf_model):
    folder, config, params = run_folder
    model, _ = hf_model
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, config.max_position_embeddings))
    ours, _ = albor.forward(params, config, ids)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(albor.to_numpy(ours)).max() > 1.0  # logits far from zero: the check has teeth
    np.testing.assert_allclose(albor.to_numpy(ours), theirs, rtol=0, atol=1e-4)


def test_same_greedy_tokens_as_albor_generate(run_folder, hf_model):
    folder, config, params = run_folder
    model, _ = hf_model
    prompt = [int(i) for i in np.random.default_rng(1).integers(0, 256, 8)]
    n = config.max_position_embeddings - len(prompt)
    ours = sample.generate(params, config, prompt, n, temperature=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD_ID)
    assert out[0, len(prompt):].tolist() == ours


def test_config_json_round_trips_through_transformers(run_folder, tmp_path):
    folder, config, _ = run_folder
    hf = transformers.AutoConfig.from_pretrained(folder)
    assert isinstance(hf, transformers.LlamaConfig)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]


def encode_cases(tok):
    real_code = [p.read_text(encoding="utf-8", errors="replace")[:2000] for p in stdlib_python_files()[::60]]
    return TEXTS + real_code


def test_tokenizers_loads_tokenizer_json_and_gives_the_same_ids(run_folder, tok):
    folder, _, _ = run_folder
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size
    assert hf.token_to_id("<|endoftext|>") == EOT_ID and hf.token_to_id("<|pad|>") == PAD_ID
    hf.encode_special_tokens = True  # albor encodes special-token strings as plain bytes
    for text in encode_cases(tok):
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, text[:60]
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)


@pytest.mark.parametrize("load", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_transformers_tokenizer_from_the_folder_gives_the_same_ids(run_folder, tok, load):
    folder, _, _ = run_folder
    if load == "AutoTokenizer":
        hf = transformers.AutoTokenizer.from_pretrained(folder)
    else:
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in encode_cases(tok):
        ids = tok.encode(text)
        # split_special_tokens: "<|endoftext|>" in text is plain bytes, as in albor
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, text[:60]
        if "<|" not in text:
            assert hf(text)["input_ids"] == ids  # nothing added: no BOS/EOS post-processing
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.convert_tokens_to_ids("<|endoftext|>") == EOT_ID
