"""A byte-level BPE tokenizer, written out by hand: train, encode, decode, save, load.

Text becomes UTF-8 bytes, so every string has an encoding and nothing is ever
"unknown". The 256 possible bytes are the first 256 tokens; training then learns
merges ("these two tokens side by side become one new token") on top of them.

Token ids (fixed, the same in every albor tokenizer):

    0..255   the raw bytes 0x00..0xFF              (id == byte value)
    256      "<|endoftext|>"  EOT_ID  (train.py appends it after every document)
    257      "<|pad|>"        PAD_ID  (fills unused positions of a batch row)
    258...   learned merges, in the order they were learned

The special tokens are never produced from ordinary text: `encode` only ever
emits byte and merge ids, so the characters "<|endoftext|>" inside a string are
encoded as the 13 ordinary bytes they are. Only code that appends EOT_ID on
purpose (train.py) can put one in a sequence.

Worked example (the classic one from Wikipedia's "Byte pair encoding" page)::

    >>> tok = Tokenizer.train(["aaabdaaabac"], vocab_size=261, min_frequency=1)
    >>> [tok.decode([i]) for i in range(258, tok.vocab_size)]
    ['aa', 'ab', 'aaab']

The word stays one pre-token. "aa" occurs 4 times: merged, it is Z and the word
is "Z a b d Z a b a c". Now "Z a" and "a b" both occur twice; the tie rule in
`train` (smaller ids first) picks "a b" = (97, 98) over "Z a" = (258, 97): Y.
"Z Y d Z Y a c": "Z Y" occurs twice, everything else once: X = "aaab".
That is Wikipedia's "Byte pair encoding" example, merge for merge.

The saved file is a Hugging Face `tokenizers` tokenizer.json, so the same file
loads in `tokenizers` / `transformers` and gives the same ids (see save/load).

Command line (each sub-command has --help):

    python tokenizer.py train --lines 100000 --vocab-size 32768 --out tokenizer.json
    echo "print('hi')" | python tokenizer.py encode --tokenizer tokenizer.json
    echo "[1, 2, 3]"   | python tokenizer.py decode --tokenizer tokenizer.json

(`python bench.py --tokenizer` times training and encoding beside Hugging Face `tokenizers`.)
"""
import argparse
import heapq
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex

EOT_ID = 256
PAD_ID = 257
SPECIAL_TOKENS = {"<|endoftext|>": EOT_ID, "<|pad|>": PAD_ID}
FIRST_MERGE_ID = 258

# ----------------------------------------------------------------------------
# Pre-tokenization: split text into chunks; merges never cross a chunk boundary.
#
# This is GPT-4's split pattern (tiktoken's cl100k_base). Each alternative, in
# the order the regex tries them at every position:
SPLIT_PATTERN = "|".join([
    # 1. English contractions as their own chunk, in any case: "don't" -> "don" "'t",
    #    "WE'LL" -> "WE" "'LL". Without it "'t" would glue onto the next word.
    r"'(?i:[sdmt]|ll|ve|re)",
    # 2. A word: a run of letters, with at most one leading character that is not a
    #    letter, digit or newline -- usually the space before it (" return"), or
    #    "_", "." or "(" (so "self.x" -> "self" ".x"). The newline is excluded so
    #    a token never swallows a line break into an identifier. `?+` is possessive:
    #    once taken, the leading character is not given back.
    r"[^\r\n\p{L}\p{N}]?+\p{L}+",
    # 3. Numbers in groups of at most 3 digits: "1000000" -> "100" "000" "0", so
    #    the vocabulary does not spend entries on thousands of whole numbers.
    r"\p{N}{1,3}",
    # 4. A run of punctuation/symbols, optionally after one space, plus any line
    #    breaks right after it: " = ", "):\n", "()", " #". "_" counts as punctuation
    #    here (it is not a letter), so "__init__" is "__" "init" "__".
    r" ?[^\s\p{L}\p{N}]++[\r\n]*",
    # 5. Whitespace that ends in a line break: "\n", "\n\n" (blank lines),
    #    "   \n" (trailing spaces). Line structure stays its own token.
    r"\s*[\r\n]",
    # 6. A whitespace run that is not followed by a non-space: it stops one space
    #    short of the next word, so 8 spaces of indentation before "return" become
    #    "       " (7) + " return". Indentation is kept exactly, byte for byte.
    r"\s+(?!\S)",
    # 7. Any whitespace left over (e.g. spaces at the very end of the text).
    r"\s+",
])
SPLIT_REGEX = regex.compile(SPLIT_PATTERN)


def split_text(text):
    """The pre-tokens ("chunks") of `text`; joined back they give `text` exactly.

    >>> split_text("    if x:\\n        return 'it's'")
    ['   ', ' if', ' x', ':\\n', '       ', ' return', " '", 'it', "'s", "'"]
    """
    return SPLIT_REGEX.findall(text)


# ----------------------------------------------------------------------------
# Merging one pair inside a list of ids: the single primitive of BPE.

def merge_pair(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, scanning left to right.

    >>> merge_pair([97, 97, 97, 98], (97, 97), 258)
    [258, 97, 98]
    """
    first, second = pair
    merged = []
    i = 0
    while i < len(ids):
        if ids[i] == first and i + 1 < len(ids) and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _merge_in_words(pair, new_id, words, freqs, pair_counts, pair_words, heap):
    """Tokenizer.train's step 3: merge `pair` into new_id in every word that holds it, in
    place, and move the counts: each old pair of such a word loses the word's frequency, each
    new pair gains it; changed counts are pushed onto the heap again (lazy deletion).

    Example: word [a, b, a, b] (frequency 3), pair (a, b) -> Z: the word becomes [Z, Z];
    (a, b) loses 6, (b, a) loses 3, (Z, Z) gains 3.
    """
    changed = set()
    for w in pair_words.pop(pair):
        word, freq = words[w], freqs[w]
        new_word = merge_pair(word, pair, new_id)
        old_pairs = list(zip(word, word[1:]))
        new_pairs = list(zip(new_word, new_word[1:]))
        for p in old_pairs:
            pair_counts[p] -= freq
        for p in new_pairs:
            pair_counts[p] += freq
        for p in set(old_pairs).difference(new_pairs):
            if p != pair:
                pair_words[p].discard(w)
        for p in new_pairs:
            pair_words[p].add(w)
        changed.update(old_pairs)
        changed.update(new_pairs)
        words[w] = new_word
    for p in changed:
        if pair_counts[p] > 0:
            heapq.heappush(heap, (-pair_counts[p], p))
        else:
            del pair_counts[p]


# ----------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """Byte-level BPE: ids 0..255 bytes, 256/257 special, 258+ merges (see module doc).

    `merges` maps a pair of ids to the id it becomes, in the order learned: the
    n-th merge makes token 258 + n, so a smaller id means an earlier merge, and
    encoding applies merges in that order, exactly as training learned them.
    """

    def __init__(self, merges=None):
        self.merges = dict(merges or {})   # (left id, right id) -> merged id, in learned order
        # token_bytes[id] is what the token decodes to.
        self.token_bytes = [bytes([b]) for b in range(256)]
        self.token_bytes += [name.encode("utf-8") for name in SPECIAL_TOKENS]
        for (left, right), new_id in self.merges.items():
            if new_id != len(self.token_bytes) or max(left, right) >= new_id:
                raise ValueError(f"merge {(left, right)} -> {new_id} is out of order "
                                 f"(the n-th merge must make token 258 + n from earlier tokens)")
            self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.cache = {}                    # chunk -> its ids (encode's cache, per pre-token)

    @property
    def vocab_size(self):
        """Number of token ids: 256 bytes + 2 specials + the learned tokens."""
        return len(self.token_bytes)

    # ------------------------------------------------------------------ train

    @classmethod
    def train(cls, texts, vocab_size, min_frequency=1, progress=False):
        """Learn merges from `texts` until there are `vocab_size` tokens.

        Exact BPE: repeatedly take the most frequent adjacent pair of tokens
        (counted inside pre-tokens), make it a new token, replace it everywhere.

        Made fast the way production trainers (Hugging Face `tokenizers`,
        sentencepiece) do it, with the same result as recounting every round:
          1. Count each distinct pre-token once, with its frequency: the 100K-line
             corpus has 755K pre-tokens but only 28K distinct ones.
          2. Keep `pair_counts` (pair -> frequency) and `pair_words` (pair -> the
             words it occurs in), built once.
          3. A merge rewrites only the words in `pair_words[best]`, and updates
             the counts of the pairs in those words, nothing else.
          4. The best pair comes from a max-heap of (count, pair). A count that
             changes is pushed again rather than updated in place; a popped entry
             whose count is stale (no longer the pair's count) is thrown away
             ("lazy deletion").

        Tie rule: among pairs with the same count, the smallest (left id, right id)
        wins, i.e. the pair whose left token was created first (bytes count as
        created in byte order), then the same for the right token.

        Stops when `vocab_size` is reached, or early (with a message on stderr)
        when the most frequent pair occurs fewer than `min_frequency` times or no
        pairs are left: then the corpus cannot fill the vocabulary. The default,
        1, merges down to pairs seen once (as `tokenizers`' default does): each
        such merge still shortens the corpus by one token, and it is what fills
        the model's 32,768 ids from the 100K-line corpus (min_frequency=2 stops
        at 25,279 tokens there).

        Every merge makes a byte string that is not yet a token, so each token has
        one id and one spelling. (Why: the first time bytes s become a token, via
        A+B, every other span of the same bytes that is still a clean run of whole
        tokens has been split exactly the same way, since a span's splits depend
        only on its own bytes, so it is A+B too and is merged at the same moment.)
        """
        if vocab_size < FIRST_MERGE_ID:
            raise ValueError(f"vocab_size must be at least {FIRST_MERGE_ID} (256 bytes + 2 special tokens), got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")

        # 1. Distinct pre-tokens ("words") as lists of byte ids, with their counts.
        chunk_counts = Counter()
        for text in texts:
            chunk_counts.update(split_text(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        # 2. Every adjacent pair: how often it occurs, and in which words.
        pair_counts = defaultdict(int)
        pair_words = defaultdict(set)
        for w, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freqs[w]
                pair_words[pair].add(w)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        tok = cls()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=vocab_size - tok.vocab_size, desc="merges", unit="merge")

        stop_reason = None
        while tok.vocab_size < vocab_size:
            # 4. Pop stale entries until the top of the heap is current.
            while heap and -heap[0][0] != pair_counts.get(heap[0][1], 0):
                heapq.heappop(heap)
            if not heap:
                stop_reason = "no pairs left to merge"
                break
            count, pair = -heap[0][0], heap[0][1]
            if count < min_frequency:
                stop_reason = f"the most frequent pair occurs {count} times, below min_frequency={min_frequency}"
                break
            heapq.heappop(heap)

            new_id = tok.vocab_size
            tok.merges[pair] = new_id
            tok.token_bytes.append(tok.token_bytes[pair[0]] + tok.token_bytes[pair[1]])
            if bar is not None:
                bar.update(1)

            # 3. Rewrite the words that contain the pair; move their pair counts.
            _merge_in_words(pair, new_id, words, freqs, pair_counts, pair_words, heap)
        if bar is not None:
            bar.close()
        if stop_reason is not None:
            print(f"tokenizer: stopped early at {tok.vocab_size} tokens (asked for {vocab_size}): {stop_reason}",
                  file=sys.stderr)
        return tok

    # ------------------------------------------------------------ encode/decode

    def encode_chunk(self, chunk_bytes):
        """BPE on one pre-token: apply the earliest-learned merge present, repeat.

        >>> tok = Tokenizer({(97, 97): 258, (258, 98): 259})
        >>> tok.encode_chunk(b"aaaab")     # a a a a b -> aa aa b -> aa aab
        [258, 259]
        """
        ids = list(chunk_bytes)
        while len(ids) >= 2:
            pairs = zip(ids, ids[1:])
            best = min(pairs, key=lambda pair: self.merges.get(pair, float("inf")))
            if best not in self.merges:
                break                          # no learned merge applies any more
            ids = merge_pair(ids, best, self.merges[best])
        return ids

    def encode(self, text, max_tokens=None):
        """Text -> ids. Lossless: decode(encode(text)) == text for every str.

        Special-token strings in `text` are encoded as ordinary bytes (never as
        EOT_ID/PAD_ID). A str holding a lone surrogate (e.g. "\\ud800", which can
        come from a bad decode with errors="surrogateescape") is not Unicode text
        and has no UTF-8 encoding: that raises ValueError.

        max_tokens: encode only the start of text, until there are at least max_tokens
        ids (all of the last chunk's). Chunks are split off one at a time, so the rest
        of the text is never read: 129 ids of a 50 MB document cost what 129 ids cost.
        They are the first ids encode(text) gives, except inside a chunk longer than
        max_tokens times the longest token (a run of 100,000 letters, say): only that
        many of its bytes are encoded, which is enough for max_tokens ids.
        """
        if max_tokens is None:
            chunks = split_text(text)
        else:
            chunks = (match.group() for match in SPLIT_REGEX.finditer(text))
        ids = []
        for chunk in chunks:
            chunk_ids = self.cache.get(chunk)
            if chunk_ids is None:
                try:
                    chunk_bytes = chunk.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"cannot encode text: {err.reason} ({chunk[err.start:err.end]!r} is not valid Unicode text)") from None
                if max_tokens is not None and len(chunk_bytes) > max_tokens:   # (cheap test first)
                    enough = max_tokens * max(map(len, self.token_bytes))
                    if len(chunk_bytes) > enough:
                        ids.extend(self.encode_chunk(chunk_bytes[:enough]))
                        break
                chunk_ids = self.encode_chunk(chunk_bytes)
                self.cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        return ids

    def decode(self, ids):
        """Ids -> text. Bytes that are not valid UTF-8 (e.g. a sequence that cuts
        a multi-byte character in half) become U+FFFD "\ufffd" instead of raising.

        >>> Tokenizer().decode([0xE2, 0x82])     # first 2 of the 3 bytes of "€"
        '\ufffd'
        """
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}")
        return b"".join([self.token_bytes[i] for i in ids]).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- save/load

    def to_json(self):
        """The tokenizer as a Hugging Face `tokenizers` tokenizer.json dict.

        `tokenizers` spells byte-level tokens with GPT-2's byte-to-unicode
        alphabet (see `bytes_to_unicode`): each byte is one printable character,
        e.g. the space 0x20 is "Ġ", so " return" is the token "Ġreturn". The
        pre-tokenizer is our split pattern followed by that byte-level mapping
        (with use_regex false: the split is already done).
        """
        byte_char = bytes_to_unicode()

        def spell(token):
            return "".join(byte_char[b] for b in token)

        vocab = {}
        for i, token in enumerate(self.token_bytes):
            vocab[spell(token) if i not in SPECIAL_TOKENS.values() else token.decode("utf-8")] = i
        merges = [[spell(self.token_bytes[left]), spell(self.token_bytes[right])] for left, right in self.merges]
        added_tokens = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True} for name, i in SPECIAL_TOKENS.items()]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added_tokens,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges},
        }

    def save(self, path):
        """Write tokenizer.json (same tokenizer -> byte-identical file)."""
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        Path(path).write_text(text, encoding="utf-8", newline="\n")

    @classmethod
    def load(cls, path, max_vocab_size=None):
        """Read a tokenizer.json written by `save` (or by `tokenizers` from one).

        Checks everything that decides the ids, so a corrupt file or one from
        another tokenizer (GPT-2's, say: different byte ids, different split)
        fails with a one-line ValueError instead of encoding differently.
        With `max_vocab_size` (a model's vocab_size), a tokenizer with more
        tokens than that is an error too: every id it makes must fit the model.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"{path}: cannot read a tokenizer.json: {err.strerror or err}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as err:   # RecursionError: '[' * 10**6
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
            raise ValueError(f"{path}: cannot read a tokenizer.json: not valid JSON: {reason}") from None
        try:
            tok = cls.from_json(data)
        except ValueError as err:
            raise ValueError(f"{path}: not an albor tokenizer.json: {err}") from None
        if max_vocab_size is not None and tok.vocab_size > max_vocab_size:
            raise ValueError(f"{path}: the tokenizer has {tok.vocab_size:,} tokens, more than the "
                             f"model's vocab_size {max_vocab_size:,}: every id must fit")
        return tok

    @classmethod
    def from_json(cls, data):
        """Rebuild a Tokenizer from a tokenizer.json dict, validating it."""

        def require(ok, what):
            if not ok:
                raise ValueError(what)

        require(isinstance(data, dict) and isinstance(data.get("model"), dict), "no 'model' object")
        model = data["model"]
        require(model.get("type") == "BPE", f"model type is {model.get('type')!r:.40}, expected 'BPE'")
        require(data.get("normalizer") is None, "it has a normalizer (albor uses none)")
        pre = data.get("pre_tokenizer")
        steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
        require(isinstance(steps, list) and len(steps) == 2 and all(isinstance(step, dict) for step in steps)
                and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": SPLIT_PATTERN}
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False
                and not steps[1].get("add_prefix_space"),
                "its pre_tokenizer is not albor's split pattern + ByteLevel")
        added_tokens = data.get("added_tokens") or []
        require(isinstance(added_tokens, list), "added_tokens is not a list")
        added = {t.get("content"): t.get("id") for t in added_tokens if isinstance(t, dict)}
        require(added == SPECIAL_TOKENS and all(type(i) is int for i in added.values()),
                f"added_tokens are {added}, expected {SPECIAL_TOKENS}"[:200])

        vocab, merge_list = model.get("vocab"), model.get("merges")
        require(isinstance(vocab, dict) and isinstance(merge_list, list), "model has no vocab/merges")
        require(all(type(i) is int for i in vocab.values()), "vocab ids must be ints")
        byte_char = bytes_to_unicode()
        for b in range(256):
            require(vocab.get(byte_char[b]) == b, f"byte 0x{b:02x} is not token {b}")
        for name, i in SPECIAL_TOKENS.items():
            require(vocab.get(name) == i, f"special token {name!r} is not token {i} in the vocab")
        require(sorted(vocab.values()) == list(range(len(vocab))), "vocab ids are not 0..N-1, each once")

        merges = {}
        for entry in merge_list:
            # `tokenizers` >= 0.20 writes ["a", "b"]; older versions wrote "a b".
            parts = entry.split(" ") if isinstance(entry, str) else entry
            require(isinstance(parts, list) and len(parts) == 2 and all(isinstance(s, str) for s in parts),
                    f"bad merge entry {entry!r}")
            left, right = parts
            require(left in vocab and right in vocab and left + right in vocab,
                    f"merge {entry!r} uses or makes a token not in the vocab")
            merges[(vocab[left], vocab[right])] = vocab[left + right]
        require(len(merges) == len(merge_list), "a merge is listed twice")
        tok = cls(merges)                  # raises if the n-th merge does not make token 258 + n
        require(tok.vocab_size == len(vocab),
                f"the merges make {tok.vocab_size} tokens but the vocab lists {len(vocab)}")
        return tok


def bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level tokenizer.json.

    Printable bytes map to themselves ("a" -> "a"); the other 68 (controls, space,
    a few Latin-1 ones) map to U+0100 onwards in byte order, so 0x00 -> "Ā",
    0x20 (space) -> "Ġ", 0x0A (newline) -> "Ċ". Returns a list of 256 characters.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    next_code = 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(next_code)
            next_code += 1
    return table


# ----------------------------------------------------------------------------
# Command line

def command_train(args):
    from train import stdlib_texts  # the training data's reader: the standard library's .py files
    out = Path(args.out)
    if out.is_dir():   # checked before the training, not after it
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'tokenizer.json'}")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.absolute().parent} does not exist")
    texts = list(stdlib_texts(args.lines))
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    print(f"corpus: {sum(len(text.splitlines()) for text in texts)} lines of the stdlib "
          f"({len(texts)} files, {megabytes:.2f} MB)", file=sys.stderr)
    start = time.perf_counter()
    tok = Tokenizer.train(texts, args.vocab_size, min_frequency=args.min_frequency, progress=True)
    seconds = time.perf_counter() - start
    try:
        tok.save(out)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    print(f"trained {tok.vocab_size} tokens in {seconds:.1f} s -> {args.out}", file=sys.stderr)


def command_encode(args):
    tok = Tokenizer.load(args.tokenizer)
    try:
        text = sys.stdin.buffer.read().decode("utf-8")   # bytes, so "\r\n" is kept as is
    except UnicodeDecodeError as err:
        raise ValueError(f"stdin is not UTF-8 text: {err}") from None
    print(json.dumps(tok.encode(text)))


def command_decode(args):
    tok = Tokenizer.load(args.tokenizer)
    try:
        ids = json.loads(sys.stdin.buffer.read())
    except json.JSONDecodeError as err:
        raise ValueError(f"stdin is not a JSON list of token ids: {err}") from None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError("stdin is not a JSON list of token ids (integers)")
    sys.stdout.buffer.write(tok.decode(ids).encode("utf-8"))
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description="albor's byte-level BPE tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on the stdlib source and save tokenizer.json")
    p.add_argument("--lines", type=int, default=100_000, help="use the first N lines of the stdlib (default 100000)")
    p.add_argument("--vocab-size", type=int, default=32768, help="tokens wanted, including 258 bytes+specials")
    p.add_argument("--min-frequency", type=int, default=1, help="stop when the best pair is rarer than this")
    p.add_argument("--out", default="tokenizer.json", help="where to write (default tokenizer.json)")
    p.set_defaults(run=command_train)

    p = sub.add_parser("encode", help="text on stdin -> JSON list of ids on stdout")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    p.set_defaults(run=command_encode)

    p = sub.add_parser("decode", help="JSON list of ids on stdin -> text on stdout")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    p.set_defaults(run=command_decode)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
