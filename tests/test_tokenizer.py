"""Tests for tokenizer.py: round trips, the BPE algorithm, the file format, the CLI.

The fast trainer is checked against `reference_train` below, a plain BPE that
recounts every pair of every pre-token occurrence each round (obviously right,
far too slow for real corpora).
"""
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex

from bench import train_hf_tokenizers
from tokenizer import (EOT_ID, PAD_ID, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, bytes_to_unicode,
                       split_text)
from train import stdlib_python_files, stdlib_texts
from tests.oracles import oracle

ROOT = Path(__file__).resolve().parent.parent

NASTY_STRINGS = [
    "",
    " ",
    "\n",
    "   trailing spaces   ",
    "line one  \nline two\t\n",
    "a\r\nb\r\n\r\nc\r",                                  # CRLF and a lone CR
    "\ttabs\t\tinside\t",
    "héllo wörld, ça va? naïve café",
    "🙂👍🏽 👨‍👩‍👧 🇺🇾 emoji with skin tone, ZWJ family, flag",
    "Ελληνικά русский 中文 日本語 한국어 العربية עברית हिन्दी",   # mixed scripts
    "e\u0301 combining accent, zero\u200bwidth space, \ufeffBOM",
    "x\x1c\x1d\x1e\x1fy a\x85b a\u2028b\u2029c a\u3000\xa0b",  # unusual whitespace
    "١٢٣٤ ½ ² ⅷ 1234567 3.14159",                         # digits of other scripts
    "\x00\x01\x7f control bytes",
    "WE'LL don't I'M they're",
    "<|endoftext|> and <|pad|> typed as text",
    "\U0010ffff\U0001f600 astral plane",
    "    def f(x):\n        return x  # comment\n\n\n    pass\n",
    "x  \t \n\n  \t",
]


# ----------------------------------------------------------------------------
# helpers

def reference_train(texts, vocab_size, min_frequency):
    """Plain BPE: each round, recount every pair in every pre-token occurrence,
    take the most frequent (ties: smallest (left id, right id)), merge it everywhere."""

    def merge(ids, pair, new_id):
        out = []
        i = 0
        while i < len(ids):
            if tuple(ids[i:i + 2]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        return out

    words = [list(chunk.encode("utf-8")) for text in texts for chunk in split_text(text)]
    merges = {}
    while 258 + len(merges) < vocab_size:
        counts = Counter()
        for word in words:
            counts.update(zip(word, word[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < min_frequency:
            break
        new_id = 258 + len(merges)
        merges[best] = new_id
        words = [merge(word, best, new_id) for word in words]
    return merges


def run_cli(*args, stdin=b""):
    return subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def tok():
    """A modest tokenizer (first 20K stdlib lines, 4096 tokens): fast to train."""
    return Tokenizer.train(stdlib_texts(20_000), 4096)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


# ----------------------------------------------------------------------------
# the algorithm

def test_worked_example_aaabdaaabac():
    # Counted by hand in the module docstring: aa=Z (4x), then a+b=Y (tie with Z+a at 2,
    # (97, 98) < (258, 97)), then Z+Y=X (2x). Wikipedia: aaabdaaabac -> XdXac.
    tok = Tokenizer.train(["aaabdaaabac"], vocab_size=300, min_frequency=2)
    assert tok.merges == {(97, 97): 258, (97, 98): 259, (258, 259): 260}
    assert [tok.decode([i]) for i in (258, 259, 260)] == ["aa", "ab", "aaab"]
    assert tok.encode("aaabdaaabac") == [260, ord("d"), 260, ord("a"), ord("c")]
    assert tok.vocab_size == 261


def test_fast_trainer_equals_reference_on_real_code():
    texts = [path.read_text(encoding="utf-8")[:2000] for path in stdlib_python_files()[:5]]
    for min_frequency in (1, 4):
        fast = Tokenizer.train(texts, 500, min_frequency=min_frequency)
        assert list(fast.merges.items()) == list(reference_train(texts, 500, min_frequency).items())


def test_fast_trainer_equals_reference_with_many_ties():
    rng = random.Random(0)
    # Short words over a 3-letter alphabet, each repeated a small number of times:
    # nearly every round has several pairs tied on count. Run to exhaustion.
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(2, 9))) for _ in range(60)]
    texts = [" ".join(word for word in words for _ in range(rng.randint(1, 3)))]
    for min_frequency in (1, 2, 3):
        fast = Tokenizer.train(texts, 10_000, min_frequency=min_frequency)
        assert list(fast.merges.items()) == list(reference_train(texts, 10_000, min_frequency).items())
        assert len(fast.merges) > 30
        assert len(set(fast.token_bytes)) == fast.vocab_size      # no two tokens spell the same bytes


def test_merge_counts_respect_min_frequency_and_vocab_size():
    texts = list(stdlib_texts(2000))
    for vocab_size in (258, 300, 777):
        assert Tokenizer.train(texts, vocab_size).vocab_size == vocab_size
    # min_frequency decides where training stops: a run with a higher threshold
    # learns a prefix of the merges of a run with a lower one.
    low = Tokenizer.train(texts, 5000, min_frequency=2)
    high = Tokenizer.train(texts, 5000, min_frequency=40)
    assert 258 < high.vocab_size < low.vocab_size
    assert list(high.merges.items()) == list(low.merges.items())[:len(high.merges)]


def test_training_stops_early_and_says_so(capsys):
    tok = Tokenizer.train(["abab cd"], vocab_size=1000, min_frequency=2)
    assert tok.vocab_size == 259                      # only "ab" occurs twice
    assert "stopped early at 259 tokens (asked for 1000)" in capsys.readouterr().err
    tok = Tokenizer.train(["ab"], vocab_size=1000, min_frequency=1)
    assert tok.vocab_size == 259
    assert "no pairs left" in capsys.readouterr().err


def test_progress_bar_is_shown_when_asked(capsys):
    Tokenizer.train(["hello world"] * 3, vocab_size=262, progress=True)
    assert "merges" in capsys.readouterr().err
    Tokenizer.train(["hello world"] * 3, vocab_size=262, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        Tokenizer.train(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be at least 1"):
        Tokenizer.train(["x"], vocab_size=300, min_frequency=0)


def test_same_corpus_same_file(tmp_path):
    texts = list(stdlib_texts(5000))
    Tokenizer.train(texts, 1500).save(tmp_path / "a.json")
    Tokenizer.train(texts, 1500).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


# ----------------------------------------------------------------------------
# encode / decode

def test_round_trip_every_stdlib_file(tok):
    files = stdlib_python_files()
    assert len(files) > 500
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(text)) == text, path


@pytest.mark.parametrize("text", NASTY_STRINGS)
def test_round_trip_nasty_strings(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_tokens_never_come_from_text(tok):
    text = "x = '<|endoftext|>' + '<|pad|>'\n" * 3
    ids = tok.encode(text)
    assert EOT_ID not in ids and PAD_ID not in ids
    assert tok.decode(ids) == text
    assert tok.decode([EOT_ID, PAD_ID]) == "<|endoftext|><|pad|>"
    # Training on text full of special-token strings still cannot produce their ids.
    trained = Tokenizer.train(["<|endoftext|><|pad|>"] * 50, vocab_size=400)
    assert {EOT_ID, PAD_ID}.isdisjoint(trained.encode("<|endoftext|><|pad|>"))
    assert {EOT_ID, PAD_ID}.isdisjoint(trained.merges.values())


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="not valid Unicode text"):
        tok.encode("abc \ud800 def")


def test_indentation_survives_and_newlines_stay_out_of_identifiers(tok):
    code = ("class A:\n    def f(self, x):\n        if x:\n\t\treturn x\n\n        return None  \r\n"
            "            # deep\n")
    ids = tok.encode(code)
    assert tok.decode(ids) == code
    assert split_text("\n        return") == ["\n", "       ", " return"]
    # Letters and digits are what the split pattern treats as word characters ("_" is
    # punctuation there, so a line ending in "x__" is "x" + "__\n").
    letters = regex.compile(r"[\p{L}\p{N}]")
    for token in [tok.decode([i]) for i in ids] + [tok.decode([i]) for i in range(258, tok.vocab_size)]:
        if "\n" in token or "\r" in token:
            assert not letters.search(token), repr(token)


def test_decode_cut_multibyte_character(tok):
    euro = "€".encode("utf-8")                           # 3 bytes
    assert tok.decode(list(euro[:2])) == "\ufffd"
    assert tok.decode(list(euro[:2]) + [ord("a")]) == "\ufffda"
    ids = tok.encode("naïve 🙂 ok")
    for cut in range(len(ids) + 1):
        tok.decode(ids[:cut])                            # never raises
    for cut in range(1, 4):
        assert tok.decode(list("🙂".encode("utf-8")[:cut])) == "\ufffd"


def test_decode_bad_id_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is out of range"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tok.decode([-1])


# ----------------------------------------------------------------------------
# save / load

def test_save_load_identical_ids(tok, saved):
    loaded = Tokenizer.load(saved)
    assert loaded.merges == tok.merges and loaded.vocab_size == tok.vocab_size
    for text in NASTY_STRINGS + list(stdlib_texts(3000)):
        assert loaded.encode(text) == tok.encode(text)


def test_file_layout(saved):
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": SPLIT_PATTERN}
    assert {t["content"]: t["id"] for t in data["added_tokens"]} == SPECIAL_TOKENS
    assert all(t["special"] for t in data["added_tokens"])
    vocab = data["model"]["vocab"]
    assert vocab["Ġ"] == 0x20 and vocab["Ċ"] == 0x0A and vocab["a"] == 0x61
    assert len(set(bytes_to_unicode())) == 256


def corrupt_variants(saved):
    good = json.loads(saved.read_text(encoding="utf-8"))

    def changed(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        return json.dumps(data)

    def swap_first_merges(data):
        data["model"]["merges"][:2] = data["model"]["merges"][1::-1]

    yield "not json", "{ this is not json"
    yield "truncated", saved.read_text(encoding="utf-8")[:5000]
    yield "empty", ""
    yield "a list", "[1, 2, 3]"
    yield "wordpiece", changed(lambda d: d["model"].update(type="WordPiece"))
    yield "gpt2 split", changed(lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(
        pattern={"Regex": r"'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"}))
    yield "no specials", changed(lambda d: d.update(added_tokens=[]))
    yield "byte ids moved", changed(lambda d: d["model"]["vocab"].update({"a": 0, "Ā": 0x61}))
    yield "unknown merge", changed(lambda d: d["model"]["merges"].append(["Ġzzzq", "Ġwhy"]))
    yield "merges out of order", changed(swap_first_merges)
    yield "vocab entry removed", changed(lambda d: d["model"]["vocab"].pop(d["model"]["merges"][-1][0] + d["model"]["merges"][-1][1]))


def test_corrupt_or_foreign_file_is_a_clear_error(saved, tmp_path):
    for name, text in corrupt_variants(saved):
        path = tmp_path / "bad.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as info:
            Tokenizer.load(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, (name, message)
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.load(tmp_path / "missing.json")


def test_foreign_tokenizers_file_is_rejected(tmp_path):
    # A GPT-2-style byte-level BPE made by `tokenizers` itself: valid, but not ours.
    tokenizers = oracle("tokenizers")  # an oracle only (requirements-dev.txt)
    HFTokenizer, decoders, models = tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models
    pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    hf.save(str(tmp_path / "gpt2ish.json"))
    with pytest.raises(ValueError, match="not an albor tokenizer.json: its pre_tokenizer"):
        Tokenizer.load(tmp_path / "gpt2ish.json")


def test_load_checks_the_ids_fit_a_model(tok, saved):
    # every id the tokenizer can make must fit the model's vocabulary
    assert Tokenizer.load(saved, max_vocab_size=tok.vocab_size).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match=f"{tok.vocab_size:,} tokens, more than the model's vocab_size"):
        Tokenizer.load(saved, max_vocab_size=tok.vocab_size - 1)


def test_old_merges_format_loads(saved, tmp_path):
    # tokenizers < 0.20 wrote merges as "left right" strings; same tokenizer.
    data = json.loads(saved.read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (tmp_path / "old.json").write_text(json.dumps(data), encoding="utf-8")
    assert Tokenizer.load(tmp_path / "old.json").merges == Tokenizer.load(saved).merges


# ----------------------------------------------------------------------------
# Hugging Face tokenizers parity

def test_hf_tokenizers_loads_the_file_and_gives_the_same_ids(tok, saved, tmp_path):
    HFTokenizer = oracle("tokenizers").Tokenizer  # an oracle only (requirements-dev.txt)
    hf = HFTokenizer.from_file(str(saved))
    assert hf.get_vocab_size() == tok.vocab_size
    assert hf.token_to_id("<|endoftext|>") == EOT_ID and hf.token_to_id("<|pad|>") == PAD_ID
    # tokenizers splits special-token strings out of text by default; albor never
    # does (they are plain bytes). encode_special_tokens=True is that behaviour.
    hf.encode_special_tokens = True
    real_code = [path.read_bytes().decode("utf-8", errors="replace") for path in stdlib_python_files()[::15]]
    for text in NASTY_STRINGS + real_code:
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, text[:80]
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    cut = list("€🙂".encode("utf-8"))[:5]
    assert hf.decode(cut) == tok.decode(cut)
    # And a file re-saved by tokenizers loads back in albor unchanged.
    hf.save(str(tmp_path / "resaved.json"))
    assert Tokenizer.load(tmp_path / "resaved.json").merges == tok.merges


def test_same_vocab_size_as_hf_trainer():
    # Both are exact BPE on the same pre-tokens with the same min_frequency, so they
    # saturate at the same size (ties may pick different, equally frequent pairs).
    # At min_frequency=1 the tie picks can change which pairs are left at the very
    # end (here: 5,425 tokens against 5,424), so this compares at 2.
    oracle("tokenizers")  # train_hf_tokenizers uses it: an oracle only (requirements-dev.txt)
    texts = list(stdlib_texts(3000))
    ours = Tokenizer.train(texts, 50_000, min_frequency=2)
    hf = train_hf_tokenizers(texts, 50_000, min_frequency=2)
    assert ours.vocab_size == hf.get_vocab_size() < 50_000


# ----------------------------------------------------------------------------
# command line

def test_cli_encode_decode_round_trip(saved, tok):
    text = "def f():\r\n\treturn '🙂'  \n<|endoftext|>\n"
    encoded = run_cli("encode", "--tokenizer", str(saved), stdin=text.encode("utf-8"))
    assert encoded.returncode == 0, encoded.stderr
    ids = json.loads(encoded.stdout)
    assert ids == tok.encode(text)
    decoded = run_cli("decode", "--tokenizer", str(saved), stdin=encoded.stdout)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == text.encode("utf-8")


def test_cli_train_applies_every_option(tmp_path):
    out = tmp_path / "cli.json"
    result = run_cli("train", "--lines", "3000", "--vocab-size", "5000", "--min-frequency", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "stopped early" in result.stderr.decode()
    expected = tmp_path / "expected.json"
    Tokenizer.train(stdlib_texts(3000), 5000, min_frequency=30).save(expected)
    assert out.read_bytes() == expected.read_bytes()


def test_cli_help_and_errors(saved, tmp_path):
    for command in ([], ["train"], ["encode"], ["decode"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and b"usage" in result.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope", encoding="utf-8")
    result = run_cli("encode", "--tokenizer", str(bad), stdin=b"x")
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1 and "cannot read a tokenizer.json" in result.stderr.decode()
    result = run_cli("decode", "--tokenizer", str(saved), stdin=b"[1, 2, 'x']")
    assert result.returncode == 2 and "not a JSON list of token ids" in result.stderr.decode()
    result = run_cli("decode", "--tokenizer", str(saved), stdin=b"[1, 99999]")
    assert result.returncode == 2 and "out of range" in result.stderr.decode()
    result = run_cli("encode", "--tokenizer", str(saved), stdin=b"\xff\xfe bad utf-8")
    assert result.returncode == 2 and "not UTF-8" in result.stderr.decode()
