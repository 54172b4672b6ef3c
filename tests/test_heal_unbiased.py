"""Unbiased chunk boundaries (tokenkit's pair biases) against a brute-force definition.

Tokenizer pairs where "spaces start words" does not hold: a BPE that attaches spaces to word ends,
a byte tokenizer (every byte a token) and the tiny GPT-2 style byte-level BPE.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from conftest import corpus, lines, save_tokenizer, wrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenbridge.align.token_bytes import byte_alphabet_inverse, vocabulary
from tokenbridge.errors import TokenbridgeError
from tokenbridge.heal.chunks import (
    BIAS_THRESHOLD,
    SMOOTHING,
    PairBias,
    align_chunks,
    backend_encoder,
    token_ends,
    unigram_probs,
)
from tokenbridge.load.tokenizer import load_tokenizer

SPECIAL = "<|endoftext|>"


def _gpt2_bytes_to_chars() -> list[str]:
    """GPT-2's byte -> character table, written out again here (printable bytes stand for themselves)."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _byte_level(tok: Tokenizer, regex_split: str | None = None) -> Tokenizer:
    parts = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if regex_split is not None:
        parts.insert(0, pre_tokenizers.Split(Regex(regex_split), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(parts) if len(parts) > 1 else parts[0]
    tok.decoder = decoders.ByteLevel()
    return tok


def word_end_space_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE whose pre-tokens are a word with the whitespace after it ("cat ", "sat.\\n")."""
    tok = _byte_level(Tokenizer(models.BPE()), r"\S+\s*")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def bpe_from(extra: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """Byte-level BPE: ids 0..255 are the bytes, then ``extra`` tokens, then the special token."""
    vocab = {c: b for b, c in enumerate(_gpt2_bytes_to_chars())}
    for token in extra:
        vocab[token] = len(vocab)
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=merges)))
    tok.add_special_tokens([SPECIAL])
    return tok


@pytest.fixture(scope="module")
def toks(tok_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("unbiased_tokenizers")
    texts = lines(corpus("en")) + lines(corpus("de", 0, 10000))
    made = {"word_end": word_end_space_bpe(texts, 520), "bytes": bpe_from([], []),
            "hand": bpe_from(["ab", "cd", "bc", "abcd"], [("a", "b"), ("c", "d"), ("b", "c"), ("ab", "cd")])}
    out = {"byte_level": load_tokenizer(tok_dirs["byte_level"])}
    for name, tok in made.items():
        out[name] = load_tokenizer(save_tokenizer(wrap(tok, eos_token=SPECIAL, unk_token=SPECIAL), root / name))
    return out


def encode(tokenizer, text: bytes) -> list[int]:
    return tokenizer(text.decode("utf-8"), add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def probs(toks):
    """Unigram probabilities of each tokenizer on real text (a different slice from the test texts)."""
    texts = lines(corpus("en", 20000, 20000)) + lines(corpus("de", 20000, 10000))
    return {name: unigram_probs([encode(tok, t.encode()) for t in texts], len(tok)) for name, tok in toks.items()}


# -- the brute force: every token, every split, the tokenizer's own encode ---------------------------


def bytes_of(tokenizer, index: int) -> bytes:
    inverse = byte_alphabet_inverse()
    return bytes(inverse[c] for c in tokenizer.convert_ids_to_tokens(index))


class Brute:
    """tokenkit's cover sets and pair biases, enumerating the whole vocabulary for each split."""

    def __init__(self, tokenizer, probs):
        self.tok, self.probs = tokenizer, probs
        self.special = set(tokenizer.all_special_ids)
        self.pieces = {b: bytes_of(tokenizer, b) for b in range(len(tokenizer)) if b not in self.special}
        self.memo = {}

    def cover(self, index: int) -> dict[bytes, int]:
        if index in self.memo:
            return self.memo[index]
        x, found = self.pieces[index], {}
        for i in range(len(x)):
            try:
                head = encode(self.tok, x[:i]) if i else []
            except UnicodeDecodeError:
                continue
            for b, piece in self.pieces.items():
                if not piece.startswith(x[i:]) or len(piece) == len(x) - i:
                    continue
                try:
                    if encode(self.tok, x[:i] + piece) == head + [b]:
                        found[piece[len(x) - i:]] = b
                except UnicodeDecodeError:
                    pass
        self.memo[index] = found
        return found

    def space_only(self, index: int) -> bool:
        return len(self.tok.decode([index]).strip()) == 0


def brute_bias(a: Brute, x: int, b: Brute, y: int) -> tuple[float, float]:
    if x in a.special or y in b.special:
        return 0.0, 0.0
    if not (a.pieces[x].endswith(b.pieces[y]) or b.pieces[y].endswith(a.pieces[x])):
        return 0.0, 0.0
    if a.space_only(x) or b.space_only(y):
        return 1.0, 1.0
    cover_a, cover_b = a.cover(x), b.cover(y)
    return (sum(a.probs[t] for o, t in cover_a.items() if o not in cover_b),
            sum(b.probs[t] for o, t in cover_b.items() if o not in cover_a))


def common_boundaries(a, ids_a, b, ids_b, data: bytes) -> list[tuple[int, int, int]]:
    """(byte end, teacher tokens, student tokens) of every prefix pair that spells the same bytes."""
    prefixes_a = {b"".join(bytes_of(a, t) for t in ids_a[:i]): i for i in range(1, len(ids_a) + 1)}
    found = []
    for j in range(1, len(ids_b) + 1):
        prefix = b"".join(bytes_of(b, t) for t in ids_b[:j])
        if prefix in prefixes_a and data.startswith(prefix):
            found.append((len(prefix), prefixes_a[prefix], j))
    return found


@pytest.fixture(scope="module")
def brutes(toks, probs):
    return {name: Brute(tok, probs[name]) for name, tok in toks.items()}


def chunks_of(toks, probs, pair, data, follower, threshold, bias=None):
    a, b = toks[pair[0]], toks[pair[1]]
    ids_a, ids_b = encode(a, data), encode(b, data)
    if bias is None:
        bias = PairBias(vocabulary(a), vocabulary(b), probs[pair[0]], probs[pair[1]], threshold)
    ends_a, ends_b = token_ends(ids_a, vocabulary(a), data), token_ends(ids_b, vocabulary(b), data)
    chunks = align_chunks(ends_a, ends_b, data, "unbiased", follower, teacher_ids=ids_a, student_ids=ids_b, bias=bias)
    return chunks, ids_a, ids_b, bias


def assert_contiguous_and_spelled(chunks, a, ids_a, b, ids_b, data):
    position = (0, 0, 0)
    for c in chunks:
        assert (c.byte_start, c.teacher_start, c.student_start) == position
        assert c.byte_end > c.byte_start
        spelled_a = b"".join(bytes_of(a, t) for t in ids_a[c.teacher_start:c.teacher_end])
        spelled_b = b"".join(bytes_of(b, t) for t in ids_b[c.student_start:c.student_end])
        assert spelled_a == spelled_b == data[c.byte_start:c.byte_end]
        position = (c.byte_end, c.teacher_end, c.student_end)


PAIRS = [("byte_level", "word_end"), ("byte_level", "bytes"), ("word_end", "bytes"), ("bytes", "word_end")]
TEXTS = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab cé\n\tß日本 .,'-x1")), min_size=1, max_size=30),
    st.integers(0, 15000).map(lambda start: corpus("en", start, 200)),
    st.integers(0, 8000).map(lambda start: corpus("de", start, 150)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, pair=st.sampled_from(PAIRS), follower=st.sampled_from([None, 97]),
       threshold=st.sampled_from([BIAS_THRESHOLD, 3e-3, 3e-2]))
def test_unbiased_chunks_equal_brute_force(toks, probs, brutes, text, pair, follower, threshold):
    """Chunk ends are exactly the common boundaries whose brute-force pair biases are within the threshold."""
    data = text.encode("utf-8")
    chunks, ids_a, ids_b, bias = chunks_of(toks, probs, pair, data, follower, threshold)
    a, b = brutes[pair[0]], brutes[pair[1]]
    expected = []
    for end, i, j in common_boundaries(a.tok, ids_a, b.tok, ids_b, data):
        x, y = ids_a[i - 1], ids_b[j - 1]
        want = brute_bias(a, x, b, y)
        assert bias.bias(x, y) == pytest.approx(want, rel=1e-9, abs=1e-15)
        if (end == len(data) and follower is None) or (want[0] <= threshold and want[1] <= threshold):
            expected.append((end, i, j))
    assert [(c.byte_end, c.teacher_end, c.student_end) for c in chunks] == expected
    assert_contiguous_and_spelled(chunks, a.tok, ids_a, b.tok, ids_b, data)


@pytest.mark.parametrize("pair", PAIRS)
def test_unbiased_chunks_are_contiguous_and_spelled_by_both_sides(toks, probs, pair):
    """On real text: chunks tile a prefix of the text, each spelled by both sides, each end unbiased."""
    kept = dropped = 0
    for lang, start, size in (("en", 100, 600), ("de", 3000, 400), ("en", 9000, 600)):
        data = corpus(lang, start, size).encode("utf-8")
        for follower in (None, 32):
            chunks, ids_a, ids_b, bias = chunks_of(toks, probs, pair, data, follower, 3e-3)
            assert_contiguous_and_spelled(chunks, toks[pair[0]], ids_a, toks[pair[1]], ids_b, data)
            for c in chunks:
                if not (c.byte_end == len(data) and follower is None):
                    assert bias.unbiased(ids_a[c.teacher_end - 1], ids_b[c.student_end - 1])
            if follower is None:  # the end of the document always ends the last chunk
                assert chunks[-1].byte_end == len(data)
            common = set(token_ends(ids_a, vocabulary(toks[pair[0]]), data).tolist()) & set(
                token_ends(ids_b, vocabulary(toks[pair[1]]), data).tolist())
            kept += len(chunks)
            dropped += len(common) - len(chunks)
    assert kept > 5 and dropped > 5  # the threshold really separates boundaries on these pairs


def test_same_tokenizer_keeps_every_boundary_but_after_whitespace(toks, probs):
    """One tokenizer on both sides: cover sets cancel, so every token ends a chunk unless it is whitespace only."""
    for name in ("byte_level", "word_end", "bytes"):
        data = corpus("en", 500, 800).encode("utf-8")
        chunks, ids, _, _ = chunks_of(toks, probs, (name, name), data, 97, BIAS_THRESHOLD)
        expected = [i + 1 for i, t in enumerate(ids) if toks[name].decode([t]).strip()]  # NBSP is whitespace too
        assert [c.teacher_end for c in chunks] == [c.student_end for c in chunks] == expected


# -- a hand-made vocabulary against the byte tokenizer ---------------------------------------------------


def test_hand_vocabulary_biases_are_the_straddling_mass(toks):
    """Teacher: bytes + ab, cd, bc, abcd (merges a·b, c·d, b·c, ab·cd).  Student: bytes, whose bias is always 0.

    Worked by hand: after ``ab`` only ``abcd`` straddles (``a|bc`` is not how "abc" is split: a·b merges
    first); after ``c`` only ``cd``; after ``b`` (when "bc" is how the text would go) ``bc``; after ``bc``,
    ``cd`` by the split ``b|cd``; after ``a`` both ``ab`` and ``abcd``; after ``x`` and ``cd`` nothing.
    """
    hand, byte_tok = toks["hand"], toks["bytes"]
    ids = {t: hand.convert_tokens_to_ids(t) for t in ("ab", "cd", "bc", "abcd", "a", "b", "c", "x", "Ġ")}
    probs = np.full(len(hand), 1e-4)
    probs[[ids["ab"], ids["abcd"], ids["cd"], ids["bc"]]] = [0.1, 0.05, 0.2, 0.15]
    bias = PairBias(vocabulary(hand), vocabulary(byte_tok), probs, np.full(len(byte_tok), 1 / 256), 0.06)
    cover = {t: bias.cover("teacher", ids[t]) for t in ("ab", "c", "b", "bc", "a", "x", "cd", "abcd")}
    assert cover == {"ab": {b"cd": ids["abcd"]}, "c": {b"d": ids["cd"]}, "b": {b"c": ids["bc"]},
                     "bc": {b"d": ids["cd"]}, "a": {b"b": ids["ab"], b"bcd": ids["abcd"]}, "x": {}, "cd": {},
                     "abcd": {}}
    last_byte = {t: byte_tok.convert_tokens_to_ids(t[-1]) for t in ("ab", "c", "b", "bc", "a", "x", "cd")}
    expected = {"ab": 0.05, "c": 0.2, "b": 0.15, "bc": 0.2, "a": 0.15, "x": 0.0, "cd": 0.0}
    for token, mass in expected.items():
        assert bias.bias(ids[token], last_byte[token]) == pytest.approx((mass, 0.0))
    # the mirror image: the hand vocabulary as student
    mirror = PairBias(vocabulary(byte_tok), vocabulary(hand), np.full(len(byte_tok), 1 / 256), probs, 0.06)
    assert mirror.bias(last_byte["ab"], ids["ab"]) == pytest.approx((0.0, 0.05))

    data = b"abcxbcdxab"
    t_ids, s_ids = encode(hand, data), encode(byte_tok, data)
    assert hand.convert_ids_to_tokens(t_ids) == ["ab", "c", "x", "b", "cd", "x", "ab"]

    def ends(threshold, follower):
        chunker = PairBias(vocabulary(hand), vocabulary(byte_tok), probs, np.full(len(byte_tok), 1 / 256), threshold)
        chunks = align_chunks(token_ends(t_ids, vocabulary(hand), data), token_ends(s_ids, vocabulary(byte_tok), data),
                              data, "unbiased", follower, teacher_ids=t_ids, student_ids=s_ids, bias=chunker)
        return [(c.byte_end, c.teacher_end, c.student_end) for c in chunks]

    # teacher biases at byte ends 2..10: ab 0.05, c 0.2, x 0, b 0.15, cd 0, x 0, ab 0.05
    assert ends(0.06, 97) == [(2, 1, 2), (4, 3, 4), (7, 5, 7), (8, 6, 8), (10, 7, 10)]
    assert ends(0.01, 97) == [(4, 3, 4), (7, 5, 7), (8, 6, 8)]  # the biased end of the text is left out
    assert ends(0.01, None) == [(4, 3, 4), (7, 5, 7), (8, 6, 8), (10, 7, 10)]  # ... unless the document ends
    assert ends(0.25, 97)[:3] == [(2, 1, 2), (3, 2, 3), (4, 3, 4)]

    # whitespace-only last tokens are biased whatever the threshold (tokenkit's 1.0)
    space = byte_tok.convert_tokens_to_ids("Ġ")
    assert bias.bias(ids["Ġ"], space) == (1.0, 1.0)
    assert not PairBias(vocabulary(hand), vocabulary(byte_tok), probs, np.full(len(byte_tok), 1 / 256),
                        0.5).unbiased(ids["Ġ"], space)


def test_tokenkit_conventions_for_special_foreign_and_unrelated_pairs(toks, probs):
    """Special tokens and ids beyond a vocabulary are unbiased; so is a pair where neither ends with the other."""
    a, b = toks["byte_level"], toks["bytes"]
    bias = PairBias(vocabulary(a), vocabulary(b), probs["byte_level"], probs["bytes"])
    special_a, special_b = a.convert_tokens_to_ids(SPECIAL), b.convert_tokens_to_ids(SPECIAL)
    letter = b.convert_tokens_to_ids("e")
    assert bias.bias(special_a, letter) == (0.0, 0.0) and bias.unbiased(special_a, letter)
    assert bias.unbiased(5, special_b) and bias.unbiased(len(a) + 3, letter) and bias.unbiased(5, len(b))
    space_t = a.convert_tokens_to_ids("Ġt")
    assert bytes_of(a, space_t) == b" t" and bias.cover("teacher", space_t)[b"he"] == a.convert_tokens_to_ids("Ġthe")
    last, other = b.convert_tokens_to_ids("t"), b.convert_tokens_to_ids("x")
    assert bias.bias(space_t, last)[0] > 0  # " t" and "t" share a boundary, and " the" straddles it
    assert bias.bias(space_t, other) == (0.0, 0.0)  # " t" and "x" are never one boundary: no entry, unbiased
    assert bias.cover("teacher", special_a) == {}


def test_unigram_probs_are_smoothed_frequencies():
    encoded = [[0, 1, 1], [3, 1], []]
    got = unigram_probs(encoded, 5, smoothing=0.1)
    counts = Counter(t for ids in encoded for t in ids)
    raw = [counts[i] + 0.1 * 5 for i in range(5)]
    assert got == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert SMOOTHING == 1e-9 and BIAS_THRESHOLD == 1e-4  # tokenkit's defaults
    default = unigram_probs(encoded, 5)
    assert default[2] == pytest.approx(1e-9 * 5 / (5 + 5 * 5e-9)) and default[2] > 0


def test_unbiased_kind_errors_are_one_line(toks, probs):
    a, b = toks["byte_level"], toks["bytes"]
    data = b"the cat"
    ids_a, ids_b = encode(a, data), encode(b, data)
    ends_a, ends_b = token_ends(ids_a, vocabulary(a), data), token_ends(ids_b, vocabulary(b), data)
    bias = PairBias(vocabulary(a), vocabulary(b), probs["byte_level"], probs["bytes"])
    for kwargs in ({}, {"teacher_ids": ids_a, "student_ids": ids_b}, {"bias": bias, "teacher_ids": ids_a},
                   {"bias": bias, "student_ids": ids_b}):
        with pytest.raises(TokenbridgeError, match="needs teacher_ids, student_ids and bias") as error:
            align_chunks(ends_a, ends_b, data, "unbiased", None, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(TokenbridgeError, match="token ids for") as error:
        align_chunks(ends_a, ends_b, data, "unbiased", None, teacher_ids=ids_a[:-1], student_ids=ids_b, bias=bias)
    assert "\n" not in str(error.value)
    with pytest.raises(TokenbridgeError, match="unigram probabilities"):
        PairBias(vocabulary(a), vocabulary(b), probs["byte_level"][:10], probs["bytes"])
    with pytest.raises(TokenbridgeError, match="unknown side"):
        bias.cover("helper", 5)
    with pytest.raises(TokenbridgeError, match="outside the student's vocabulary"):
        bias.cover("student", len(b))
    with pytest.raises(TokenbridgeError, match="outside a vocabulary"):
        unigram_probs([[1, 7]], 5)
    with pytest.raises(TokenbridgeError, match="no tokens"):
        unigram_probs([[]], 5)


def test_backend_encoder_encodes_as_the_training_tokenizer_call(toks):
    """The default encoder equals ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)``."""
    texts = ["the cat <|endoftext|> sat", "  Hallo Welt.\n", "日本 é", corpus("de", 500, 300)]
    for name in ("byte_level", "word_end", "bytes"):
        tok = toks[name]
        expected = [encode(tok, t.encode()) for t in texts]
        assert any(tok.convert_tokens_to_ids(SPECIAL) in ids for ids in [tok(texts[0])["input_ids"]])
        assert all(tok.convert_tokens_to_ids(SPECIAL) not in ids for ids in expected)
        backend = vocabulary(tok).backend
        backend.encode_special_tokens = False
        assert backend_encoder(vocabulary(tok))([t.encode() for t in texts]) == expected
        assert backend.encode_special_tokens is False  # left as it was


def test_pair_bias_is_fast_enough_for_training(toks, probs):
    """All boundaries of a fresh 2 kB text in well under a second once warm (covers memoised per token)."""
    a, b = toks["byte_level"], toks["word_end"]
    bias = PairBias(vocabulary(a), vocabulary(b), probs["byte_level"], probs["word_end"])
    chunks_of(toks, probs, ("byte_level", "word_end"), corpus("en", 0, 2000).encode(), None, 0, bias)  # warm-up
    data = corpus("en", 12000, 2000).encode("utf-8")
    start = time.perf_counter()
    chunks_of(toks, probs, ("byte_level", "word_end"), data, None, 0, bias)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    chunks_of(toks, probs, ("byte_level", "word_end"), data, None, 0, bias)
    again = time.perf_counter() - start
    print(f"PairBias over a fresh 2 kB text: {fresh:.3f} s, again: {again:.3f} s")
    assert fresh < 2.0 and again < 1.0
