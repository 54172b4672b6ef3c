"""Token bytes and byte-exact encoding, checked against the tokenizers' own behaviour."""

from __future__ import annotations

import pytest
from conftest import corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tokenbridge.align.encode import ByteEncoder
from tokenbridge.align.token_bytes import byte_alphabet, vocabulary
from tokenbridge.errors import TokenbridgeError

SAMPLES = [
    "Hello world", " leading space", "tabs\tand\nnewlines\n\n", "Übergrößenträger café", "日本語のテキスト",
    "emoji 🙂 and math ∑", "x = [1, 2, 3]  # comment", "  double  spaces  ", corpus("de", 5000, 300),
    corpus("ja", 8000, 200),
]


def test_byte_alphabet_matches_the_tokenizers_library():
    from tokenizers import pre_tokenizers

    assert set(byte_alphabet().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in SAMPLES + ["".join(chr(c) for c in range(1, 0x250))]:
        (mapped, _), = reference.pre_tokenize_str(text)
        assert mapped == "".join(byte_alphabet()[b] for b in text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "metaspace_de"])
@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_concatenate_to_the_text(tok_dirs, kind, text):
    """Independent reference: the tokenizer's own encoding, mapped through our byte view, is the text."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs[kind]))
    vocab = vocabulary(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(vocab.tokens[i].bytes for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("text", SAMPLES)
def test_encoder_matches_the_tokenizer_on_text(tok_dirs, kind, text):
    """On valid text our byte encoder produces exactly the tokenizer's encoding."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs[kind]))
    encoder = ByteEncoder(vocabulary(tokenizer))
    assert encoder.encode(text.encode("utf-8")) == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_encoder_is_exact_on_arbitrary_bytes(tok_dirs, kind):
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs[kind]))
    vocab = vocabulary(tokenizer)
    encoder = ByteEncoder(vocab)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=40) | st.text(max_size=30).map(lambda s: s.encode("utf-8")))
    def check(data):
        ids = encoder.encode(data)
        assert ids is not None
        assert b"".join(vocab.tokens[i].bytes for i in ids) == data

    check()


def test_wordpiece_bytes_and_encoding(tok_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["wordpiece"]))
    vocab = vocabulary(tokenizer)
    assert vocab.family == "wordpiece"
    encoder = ByteEncoder(vocab)
    for text in ["the system", "installation packages"]:
        reference = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert encoder.encode(b" " + text.encode()) == reference
        assert b"".join(vocab.tokens[i].bytes for i in reference) == b" " + text.encode()
    continuation = next(t for t in vocab.tokens if t.token.startswith("##") and len(t.token) > 3)
    assert not continuation.word_start and continuation.bytes == continuation.token[2:].encode()
    assert encoder.encode(continuation.bytes) == [continuation.id]


def test_flags(tok_dirs):
    byte_level = vocabulary(AutoTokenizer.from_pretrained(str(tok_dirs["byte_level"])))
    metaspace = vocabulary(AutoTokenizer.from_pretrained(str(tok_dirs["metaspace"])))
    assert byte_level.family == "byte_level" and metaspace.family == "metaspace"
    specials = [t for t in byte_level.tokens if t.special]
    assert {t.token for t in specials} == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert all(t.bytes == b"" for t in specials)
    partial = [t for t in byte_level.tokens if t.partial_utf8]
    assert partial and all(len(t.bytes) >= 1 for t in partial)
    assert byte_level.tokens[[t.token for t in byte_level.tokens].index("\u0120the")].bytes == b" the"
    fallback = [t for t in metaspace.tokens if t.byte_fallback]
    assert len(fallback) == 256 and fallback[0x41 - 0].bytes == bytes([0x41])
    assert metaspace.tokens[[t.token for t in metaspace.tokens].index("\u2581the")].word_start


def test_unsupported_tokenizer_family_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenbridgeError, match="tokenizer family not supported"):
        vocabulary(tok)
