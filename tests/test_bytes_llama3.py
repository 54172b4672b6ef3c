"""Exact byte-level probabilities for Llama-3 style tokenizers: byte-level BPE with ``ignore_merges`` and
Llama-3's split regex, checked against the tokenizer itself and against brute force.

The tokenizers are trained here, on corpus text that does not overlap the slices checked, and then get
whole pre-tokens that their merges cannot make added to the vocabulary: with ``ignore_merges`` such a
pre-token is one token, without it BPE splits it, so the tests fail if the rule is not modelled.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CORPORA, IM_SPECIALS, lines, load_lm, make_model, save_tokenizer, wrap
from test_bytes import Brute
from tokenbridge.bytes import ByteLM
from tokenbridge.bytes.lm import CanonicalPrefixes

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SLICES = ("debref.en.txt", "debref.de.txt", "debref.ja.txt", "code.python.txt")
SLICE_OFFSET, SLICE_BYTES = 20000, 8000  # the four slices of bench/transplant.py
TRAIN_OFFSET = 60000  # training text starts here, past the slices


def training_text(size: int, names=SLICES) -> list[str]:
    out = []
    for name in names:
        data = (CORPORA / name).read_bytes()[TRAIN_OFFSET:TRAIN_OFFSET + size]
        out += lines(data.decode("utf-8", errors="ignore"))
    return out


def llama3_bpe(texts: list[str], vocab_size: int, whole: int, ignore_merges: bool = True):
    """Byte-level BPE with Llama-3's regex; then the ``whole`` most frequent pre-tokens that the merges
    split are added to the vocabulary (without merges), as Llama-3's vocabulary has such tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=IM_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    counts = Counter(piece for text in texts for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    added = 0
    for piece, _ in counts.most_common():
        if added == whole:
            break
        if piece not in vocab and len(piece) > 2:
            vocab[piece] = len(vocab)
            added += 1
    spec["model"]["ignore_merges"] = ignore_merges
    return Tokenizer.from_str(json.dumps(spec))


def make_llama3(directory: Path, texts: list[str], vocab_size: int, whole: int, ignore_merges: bool = True):
    fast = wrap(llama3_bpe(texts, vocab_size, whole, ignore_merges), bos_token="<|im_start|>",
                eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    return save_tokenizer(fast, directory)


def whole_tokens(tokenizer) -> list[str]:
    """The added whole pre-tokens (as text), which BPE alone would split."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merged = {"".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in spec["model"]["merges"]}
    ids = sorted(i for t, i in spec["model"]["vocab"].items() if t not in merged and len(t) > 2)
    return [tokenizer.decode([i]) for i in ids if i >= 256]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def engine_ids(walk: CanonicalPrefixes, per_position, n: int) -> list[list[int]]:
    """The engine's canonical encodings of the first ``n`` bytes that may end the text there."""
    out = []
    for node in per_position[n][1]:
        if walk.canon.can_end(node.state):
            ids = []
            while node.parent is not None:
                ids.append(node.token)
                node = node.parent
            out.append(ids[::-1])
    return out


def check_boundaries(walk: CanonicalPrefixes, tokenizer, data: bytes, label: str = "") -> int:
    """At every character boundary of ``data``: exactly one canonical encoding, the tokenizer's own."""
    _, per_position = walk._plan(data)
    checked = 0
    for n in range(len(data) + 1):
        if n < len(data) and data[n] & 0xC0 == 0x80:
            continue
        ends = engine_ids(walk, per_position, n)
        assert ends == [encode(tokenizer, data[:n].decode())], (label, n, data[max(0, n - 30):n])
        checked += 1
    return checked


# ----- a tiny model, for brute force ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("llama3")
    texts = training_text(40000, ("debref.en.txt", "debref.de.txt"))
    tokdir = make_llama3(root / "tok", texts, 420, whole=40)
    model = load_lm(make_model(root / "model", "llama", tokdir)).double()
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    lm = ByteLM(model, tokenizer)
    plain = AutoTokenizer.from_pretrained(str(make_llama3(root / "plain", texts, 420, whole=40, ignore_merges=False)))
    return lm, Brute(model, tokenizer, lm.prefix_id, lm.eos_id), tokenizer, plain


TEXT = "\n".join(training_text(6000, ("debref.en.txt", "debref.de.txt")))


def _text_slice(start: int, size: int) -> bytes:
    data = TEXT.encode()
    while 0 < start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:start + size]


PIECES = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "'s", "'t", "'re", "'ll", "don", "1", "12", "123", "4567", " 89",
          ".", ",", "``", "_", "(", "ä", "ß", "中", "日本", "é", "x", "the", " the", "The", "\u3000"]


def texts_with(whole: list[str]):
    """Texts built from pieces that stress the rules: the whole tokens (also cut), whitespace runs, digits,
    contractions, punctuation, multi-byte characters."""
    pieces = st.one_of(st.sampled_from(PIECES), st.sampled_from(whole),
                       st.sampled_from(whole).flatmap(lambda w: st.integers(1, len(w)).map(lambda k: w[:k])))
    return st.lists(pieces, max_size=4).map("".join)


FAST = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def test_ignore_merges_matters(tiny):
    """The added whole tokens change the encoding: without ignore_merges BPE splits them."""
    _, _, tokenizer, plain = tiny
    whole = whole_tokens(tokenizer)
    assert len(whole) >= 20
    text = " ".join(whole)
    assert encode(tokenizer, text) != encode(plain, text)
    differ = [w for w in whole if encode(tokenizer, w) != encode(plain, w)]
    assert len(differ) >= 20 and all(len(encode(tokenizer, w)) == 1 for w in differ)


def test_canonical_encodings_match_the_tokenizer(tiny):
    lm, _, tokenizer, _ = tiny
    whole = whole_tokens(tokenizer)
    samples = [" ".join(whole), "".join(whole), "\n".join(w[:-1] for w in whole), TEXT[:3000],
               "a 1234567 b12 don't I'll  \n\n  x\t\t1,234.5 ''' ``_C  \u3000日本語", ]
    for text in samples:
        check_boundaries(lm, tokenizer, text.encode(), text[:20])


@FAST
@given(data=st.data())
def test_canonical_prefixes_property(tiny, data):
    lm, _, tokenizer, _ = tiny
    text = data.draw(texts_with(whole_tokens(tokenizer)))
    check_boundaries(lm, tokenizer, text.encode(), text)


def _prefixes(whole: list[str]):
    return st.one_of(
        st.builds(_text_slice, st.integers(0, 5000), st.integers(0, 6)),
        texts_with(whole).map(lambda t: t.encode()).flatmap(lambda b: st.integers(0, min(6, len(b))).map(
            lambda k: b[:k])),  # may cut a character
    )


@FAST
@given(data=st.data())
def test_next_byte_matches_brute_force(tiny, data):
    lm, brute, tokenizer, _ = tiny
    prefix = data.draw(_prefixes(whole_tokens(tokenizer)))
    got = np.exp(lm.next_byte_logprobs(prefix))
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(got - brute.next_byte(prefix)).max() < 1e-6, prefix


def test_next_byte_edge_cases(tiny):
    """Whole tokens cut and complete, digit groups, contractions, whitespace, unfinished characters."""
    lm, brute, tokenizer, _ = tiny
    whole = whole_tokens(tokenizer)
    short = sorted(whole, key=len)[:3]
    cases = [b"don'", b"1234", b"x  ", b"\n\n", b"a ``_", b"de\xc3", b"\xe4\xb8"]
    cases += [w.encode()[:6] for w in short] + [w.encode()[:-1][:6] for w in short]
    for case in cases:
        got = np.exp(lm.next_byte_logprobs(case))
        assert np.abs(got - brute.next_byte(case)).max() < 1e-6, case


def test_chain_of_conditionals_and_cursor(tiny):
    lm, _, tokenizer, _ = tiny
    whole = whole_tokens(tokenizer)
    data = (" ".join(whole[:6]) + " 12345 it's").encode()
    per_byte = lm.byte_logprobs(data)
    assert np.all(np.isfinite(per_byte)) and np.all(per_byte <= 1e-12)
    cursor = lm.cursor(data[:5])
    for n in range(5, len(data)):
        assert cursor.distribution()[data[n]] == pytest.approx(per_byte[n], abs=1e-9)
        cursor.push(data[n:n + 1])


# ----- the four slices, with a few-thousand-token tokenizer ------------------------------------------------
BOUNDARY_BYTES = 1500  # of each slice here; bench/llama3_boundaries.py checks the whole 8000


def read_slice(name: str, size: int = SLICE_BYTES) -> bytes:
    """``size`` bytes at SLICE_OFFSET (as bench/transplant.py cuts them), ending on a character boundary."""
    data = (CORPORA / name).read_bytes()
    start = SLICE_OFFSET
    while data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:start + size].decode("utf-8", errors="ignore").encode()


@pytest.fixture(scope="module")
def slices_walk(tmp_path_factory):
    from transformers import AutoTokenizer

    tokdir = make_llama3(tmp_path_factory.mktemp("llama3_3k") / "tok", training_text(100000), 3000, whole=60)
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    return CanonicalPrefixes(tokenizer), tokenizer


@pytest.mark.parametrize("name", SLICES)
def test_slices_canonical_prefixes_are_the_tokenizers(slices_walk, name):
    walk, tokenizer = slices_walk
    data = read_slice(name, BOUNDARY_BYTES)
    assert check_boundaries(walk, tokenizer, data, name) > 300


def test_ignore_merges_outside_byte_level_is_refused(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from conftest import make_metaspace
    from tokenbridge.errors import TokenbridgeError

    directory = make_metaspace(tmp_path / "ms")
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["ignore_merges"] = True
    Tokenizer.from_str(json.dumps(spec)).save(str(directory / "tokenizer.json"))
    with pytest.raises(TokenbridgeError, match="ignore_merges.*byte-level BPE only"):
        CanonicalPrefixes(AutoTokenizer.from_pretrained(str(directory)))
