"""Streamed text: tokstats and tokenizer training read files in blocks and encode them in segments.

The reference throughout is the whole text encoded in one call, counted the way tokstats counted
before it streamed: the streamed counts must be equal, not close.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPORA, corpus
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

import tokenbridge.tokenizers.train as train_module
from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.errors import TokenbridgeError
from tokenbridge.measure.texts import read_text, text_blocks
from tokenbridge.measure.tokstats import (
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    UNSPACED_SCRIPTS,
    CutRule,
    count_text,
    encode,
    run_tokstats,
    segments,
    split_character_bytes,
    tokenizer_stats,
)
from tokenbridge.tokenizers.files import backend
from tokenbridge.tokenizers.style import default_style
from tokenbridge.tokenizers.train import BLANK_LINE, TrainConfig, paragraphs, train_tokenizer

FILES = sorted(CORPORA.glob("*.txt"))  # debref.<lang>.txt in nine languages and code.python.txt
SPECIAL_STRINGS = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<end_of_turn>", "<start_of_turn>", "<bos>",
                   "<eos>", "<unk>", "[UNK]", "[CLS]", "<0x41>", "<pad>", "<mask>"]


# ----------------------------------------------------------------------------------------------
# The reference: one encoding of the whole text


def whole_counts(tokenizer, text: str, vocab) -> dict:
    """What tokstats counted before it streamed: the text encoded in one call."""
    ids, offsets = encode(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    covered = {i for index, (start, end) in zip(ids, offsets) if index == unk for i in range(start, end)}
    letters = [c for c in text if c.isalpha()]
    unspaced = sum(1 for c in letters if any(low <= ord(c) <= high for low, high in UNSPACED_SCRIPTS))
    return {"ids": np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(vocab)).tolist(),
            "bytes": len(text.encode("utf-8")), "characters": len(text), "words": len(text.split()),
            "letters": len(letters), "unspaced_letters": unspaced,
            "unk_bytes": sum(len(text[i].encode("utf-8")) for i in covered)}


def streamed_counts(tokenizer, text: str, vocab, size: int, block: int = 777) -> tuple[dict, int]:
    """count_text over ``text`` given in blocks, segments of ``size`` characters; and how many segments."""
    blocks = [text[i:i + block] for i in range(0, len(text), block)] or [""]
    counts = count_text(tokenizer, blocks, vocab, size=size)
    n_segments = sum(1 for _ in segments(blocks, CutRule(tokenizer, vocab), size))
    return {"ids": counts.ids.tolist(), "bytes": counts.bytes, "characters": counts.characters,
            "words": counts.words, "letters": counts.letters, "unspaced_letters": counts.unspaced_letters,
            "unk_bytes": counts.unk_bytes}, n_segments


def assert_exact(tokenizer, text: str, vocab, size: int, min_segments: int = 1) -> None:
    got, n_segments = streamed_counts(tokenizer, text, vocab, size)
    want = whole_counts(tokenizer, text, vocab)
    assert got == want  # every token id, every count
    assert n_segments >= min_segments


# ----------------------------------------------------------------------------------------------
# Tokenizers: the tiny fixtures, one per allow-listed normalizer and pre-tokenizer, tokenbridge's
# own trained ones, and the real SmolLM2 and Gemma-3 ones


def _train(model, trainer, normalizer=None, pre_tokenizer=None) -> Tokenizer:
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator([corpus(lang, 0, 30000) for lang in ("en", "de", "ja")], trainer)
    return tok


def _bpe(normalizer=None, pre_tokenizer=None, **model) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["<unk>", "<|im_end|>"])
    return _train(models.BPE(**model), trainer, normalizer, pre_tokenizer)


def _byte_level_split(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _trained(config: TrainConfig, byte_fallback: bool) -> Tokenizer:
    text = corpus("en", 0, 40000) + corpus("de", 0, 20000)
    return backend(train_tokenizer([text], config, default_style(byte_fallback)))


def extra_tokenizers() -> dict:
    n = normalizers
    p = pre_tokenizers
    return {
        "llama3-regex": _bpe(None, _byte_level_split(LLAMA3_PATTERN)),
        "qwen2-regex-nfc": _bpe(n.NFC(), _byte_level_split(QWEN2_PATTERN)),
        "byte-level-prefix-space": _bpe(None, p.ByteLevel(add_prefix_space=True)),
        "strip-prepend-fused-unk": _bpe(n.Sequence([n.Strip(), n.Prepend("\u2581"), n.Replace(" ", "\u2581")]),
                                        None, unk_token="<unk>", fuse_unk=True),
        "nfkc-lowercase-metaspace": _bpe(n.Sequence([n.NFKC(), n.Lowercase()]), p.Metaspace()),
        "metaspace-first": _bpe(None, p.Metaspace(prepend_scheme="first")),
        "unigram-metaspace": _train(models.Unigram(), trainers.UnigramTrainer(
            vocab_size=2500, show_progress=False, special_tokens=["<unk>"], unk_token="<unk>"), None, p.Metaspace()),
        "wordpiece-nfkd-digits": _train(models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(
            vocab_size=800, show_progress=False, special_tokens=["[UNK]"]),
            n.Sequence([n.NFKD(), n.StripAccents()]),
            p.Sequence([p.WhitespaceSplit(), p.Digits(individual_digits=True), p.Punctuation()])),
        "trained-supertokens": _trained(TrainConfig(800, supertokens=True), False),
        "trained-fallback": _trained(TrainConfig(1100), True),
        "trained-unigram-fallback": _trained(TrainConfig(1100, model="unigram"), True),
    }


TINY = ["byte_level", "metaspace", "wordpiece", "byte_level_de", "metaspace_de", "wordpiece_de"]
EXTRA = [
    "llama3-regex", "qwen2-regex-nfc", "byte-level-prefix-space", "strip-prepend-fused-unk",
    "nfkc-lowercase-metaspace", "metaspace-first", "unigram-metaspace", "wordpiece-nfkd-digits",
    "trained-supertokens", "trained-fallback", "trained-unigram-fallback"]
REAL = ["smollm2", "gemma3"]


@pytest.fixture(scope="module")
def tokenizers_by_name(tok_dirs) -> dict:
    out = {name: AutoTokenizer.from_pretrained(str(tok_dirs[name])) for name in TINY}
    out.update(extra_tokenizers())
    return out


@functools.cache
def real_tokenizer(name: str):
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve(f"packaged:{name}"))
    return tokenizer, vocabulary(tokenizer)


def _get(tokenizers_by_name, name):
    if name in REAL:
        return real_tokenizer(name)
    tokenizer = tokenizers_by_name[name]
    return tokenizer, vocabulary(tokenizer)


# ----------------------------------------------------------------------------------------------
# Texts


def adversarial(seed: int, size: int = 120_000) -> str:
    """Corpus slices mixed with what a cut must survive: runs of newlines and spaces, CRLF, lone CR,
    tabs, NBSP, ideographic spaces, literal ▁, combining marks after a newline, controls, special-token
    strings, long lines with spaces but no newline, long runs with neither, unspaced Japanese."""
    rng = random.Random(seed)
    english, japanese = corpus("en", 0, 50000), corpus("ja", 20000, 20000)
    code = (CORPORA / "code.python.txt").read_text(encoding="utf-8")[:30000]
    bits = ["\n", "\n\n", "\n\n\n", "\r\n", "\r", "\t", " ", "  ", "\n ", "\n\t", "\n  x", " \n", "\u00a0", "\u3000",
            "\u2581", "\n\u2581", "\u2581\n", "e\u0301", "\ne\u0301", "\u0301", "\n\u0301", "\x00", "\x1f", "\u200b",
            "\ufeff", "🚀", "\U0001F468\u200d\U0001F469", "ﬁ", "Ⅻ", "½", "İ", "ß", "Σς", "가", "\u1100\u1161",
            "\u0915\u093f", "##", "'s", "'S", "123456", "١٢٣", "\x85", "\u2028", "\f", "\v", "\n\n \n", "\n \n", "> ",
            "\n>", "\r\n\r\n"]
    out, length = [], 0
    while length < size:
        r = rng.random()
        if r < 0.25:
            start = rng.randrange(len(english))
            piece = english[start:start + rng.randint(1, 400)]
        elif r < 0.35:
            start = rng.randrange(len(japanese))
            piece = japanese[start:start + rng.randint(1, 300)]
        elif r < 0.45:
            start = rng.randrange(len(code))
            piece = code[start:start + rng.randint(1, 300)]
        elif r < 0.55:
            piece = rng.choice(SPECIAL_STRINGS) + rng.choice(["", "\n", " ", "x", "\n\n"])
        elif r < 0.60:  # a long line: words, no newline
            words = ["word", "the", "x", "日本語", "a.b", "—", "42", "\u2581x"]
            piece = " ".join(rng.choice(words) for _ in range(rng.randint(300, 2000)))
        elif r < 0.62:  # neither newline nor space
            piece = "".join(rng.choice("ab日本,.") for _ in range(rng.randint(1000, 5000)))
        elif r < 0.64:  # Japanese without spaces or newlines
            piece = re.sub(r"\s", "", japanese)[:rng.randint(1000, 5000)]
        else:
            piece = rng.choice(bits)
        out.append(piece)
        length += len(piece)
    return "\n\n" + "".join(out) + "\n\n"


def edge_texts() -> dict[str, str]:
    english = corpus("en", 0, 30000)
    japanese = corpus("ja", 0, 30000)
    return {
        "long line, spaces only": " ".join(["word", "日本", "x.y", "42"] * 4000),
        "no newline, no space": "ab日本," * 5000,
        "newline then spaces and tabs": "".join(f"line {i}\n" + " " * (i % 5) + "\t" * (i % 3) + "next\n"
                                                for i in range(3000)),
        "CRLF": english.replace("\n", "\r\n"),
        "newlines at both ends": "\n\n\n" + english + "\n\n\n",
        "CJK without spaces": re.sub(r"[ \t]", "", japanese),
        "CJK, one line": re.sub(r"\s", "", japanese),
        "special-token strings": "\n".join(f"{s}{s}\n{s} text{s}" for s in SPECIAL_STRINGS * 200),
        "one character": "x",
        "empty": "",
    }


# ----------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", TINY + EXTRA)
def test_streamed_counts_equal_whole_text_on_the_corpora(tokenizers_by_name, name):
    tokenizer, vocab = _get(tokenizers_by_name, name)
    for path in FILES:
        text = path.read_text(encoding="utf-8")[:60000]
        assert_exact(tokenizer, text, vocab, size=4096, min_segments=5)


@pytest.mark.real
@pytest.mark.parametrize("name", REAL)
def test_streamed_counts_equal_whole_text_real_tokenizers(name):
    tokenizer, vocab = real_tokenizer(name)
    for path in FILES:  # every file whole: 4 KB segments, about a hundred cuts per file
        text = path.read_text(encoding="utf-8")
        assert_exact(tokenizer, text, vocab, size=4096, min_segments=len(text) // 8192)


@pytest.mark.parametrize("name", TINY + EXTRA + REAL)
def test_streamed_counts_equal_whole_text_on_adversarial_text(tokenizers_by_name, name):
    tokenizer, vocab = _get(tokenizers_by_name, name)
    for seed in range(2):
        assert_exact(tokenizer, adversarial(seed), vocab, size=512, min_segments=50)
    for label, text in edge_texts().items():
        got, n_segments = streamed_counts(tokenizer, text, vocab, size=1024)
        assert got == whole_counts(tokenizer, text, vocab), label
        if label == "long line, spaces only":  # no newline: cut before spaces
            assert n_segments > 20
        if label in ("no newline, no space", "CJK, one line"):  # nowhere to cut: one segment, still exact
            assert n_segments == 1


def test_a_cut_through_a_token_would_change_the_count():
    """The control: with a token "\\nA", cutting after every newline loses its merges; count_text does not."""
    vocab = {"<unk>": 0, "\n": 1, "A": 2, "B": 3, "\u2581": 4, "\nA": 5}
    tok = Tokenizer(models.BPE(vocab, [("\n", "A")], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    text = "BB\nAB\nBA B\n" * 3000
    view = vocabulary(tok)
    rule = CutRule(tok, view)
    at = text.index("\nA") + 1
    assert not rule.allows(text, at) and rule.allows(text, text.index("\nB") + 1)
    naive = sum(len(encode(tok, line)[0]) for line in text.splitlines(keepends=True))
    whole = len(encode(tok, text)[0])
    assert naive > whole
    assert_exact(tok, text, view, size=64, min_segments=100)


def test_a_tokenizer_outside_the_allow_list_is_encoded_whole():
    """A regex Replace can match across any cut: the text is one segment, counted exactly as before."""
    tok = _bpe(normalizers.Replace(Regex(r"\s+"), " "), pre_tokenizers.Metaspace())
    view = vocabulary(tok)
    text = adversarial(4, 20000)
    got, n_segments = streamed_counts(tok, text, view, size=256)
    assert n_segments == 1 and got == whole_counts(tok, text, view)


def test_segments_cover_the_text_once():
    tok = Tokenizer(models.BPE({"a": 0, "\n": 1, "\u2581": 2, "<unk>": 3}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    text = adversarial(3, 30000)
    parts = list(segments([text[i:i + 100] for i in range(0, len(text), 100)], CutRule(tok, vocabulary(tok)), 256))
    assert "".join(s.text[s.start:s.stop] for s in parts) == text
    assert [s.last for s in parts] == [False] * (len(parts) - 1) + [True]
    assert len(parts) > 20
    for before, after in zip(parts, parts[1:]):  # CONTEXT characters of the neighbour on each side
        assert before.text[before.stop:] == after.text[after.start:after.start + 2]
        assert after.text[:after.start] == before.text[before.stop - 2:before.stop]


def test_run_tokstats_streams_files_exactly(tok_dirs, tmp_path):
    """run_tokstats on files larger than a segment gives the whole-text statistics and overlaps."""
    paths = []
    for lang in ("en", "ja"):
        path = tmp_path / f"debref.{lang}.txt"
        path.write_text((CORPORA / f"debref.{lang}.txt").read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        paths.append(path)
    names = [str(tok_dirs["byte_level"]), str(tok_dirs["metaspace"])]
    result = run_tokstats(names, paths)
    toks = [AutoTokenizer.from_pretrained(n) for n in names]
    vocabs = [vocabulary(t) for t in toks]
    for stats in result["stats"]:
        k = names.index(stats["tokenizer"])
        text = (tmp_path / stats["text"]).read_text(encoding="utf-8")
        want = whole_counts(toks[k], text, vocabs[k])
        tokens = sum(want["ids"])
        fallback = sum(n * (len(info.bytes) if info.byte_fallback else split_character_bytes(info.bytes))
                       for n, info in zip(want["ids"], vocabs[k].tokens)
                       if n and not info.special and (info.byte_fallback or info.partial_utf8))
        assert stats["tokens"] == tokens and stats["bytes"] == want["bytes"] and stats["words"] == want["words"]
        assert stats["characters"] == want["characters"]
        assert stats["byte_fallback_share"] == fallback / want["bytes"]
        assert stats["unk_share"] == want["unk_bytes"] / want["bytes"]
        same = tokenizer_stats(toks[k], text, stats["text"], tokenizer_name=stats["tokenizer"], vocab=vocabs[k])
        assert asdict(same) == stats  # a string in memory: the same counting, segment by segment
    shared = {info.bytes for info in vocabs[0].tokens if not info.special and info.bytes} \
        & {info.bytes for info in vocabs[1].tokens if not info.special and info.bytes}
    for entry in result["overlap"][0]["texts"]:
        text = (tmp_path / entry["text"]).read_text(encoding="utf-8")
        ids_a, ids_b = encode(toks[0], text)[0], encode(toks[1], text)[0]
        assert entry["tokens_a"] == len(ids_a) and entry["tokens_b"] == len(ids_b)
        assert entry["a_in_b"] == sum(vocabs[0].tokens[i].bytes in shared for i in ids_a) / len(ids_a)
        assert entry["b_in_a"] == sum(vocabs[1].tokens[i].bytes in shared for i in ids_b) / len(ids_b)
    assert [t["bytes"] for t in result["texts"]] == [p.stat().st_size for p in paths]


# ----------------------------------------------------------------------------------------------
# The block reader


def _old_read_text(path: Path) -> str:
    """read_text as it was: the whole file decoded at once."""
    if not path.is_file():
        raise TokenbridgeError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenbridgeError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    if not text:
        raise TokenbridgeError(f"{path}: the file is empty")
    return text


def _outcome(read, *args):
    try:
        return "ok", read(*args)
    except TokenbridgeError as error:
        return "error", str(error)


def test_text_blocks_read_and_fail_as_read_text(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "t.txt"
    pieces = ["a", "é", "日", "🚀", "\n", "\r\n"]
    for _ in range(1500):
        data = bytearray("".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))).encode("utf-8"))
        for _ in range(rng.randint(0, 2)):  # damage: a byte dropped or changed, or the end cut off
            if data:
                at = rng.randrange(len(data))
                kind = rng.random()
                if kind < 0.4:
                    del data[at]
                elif kind < 0.7:
                    data[at] = rng.randrange(256)
                else:
                    data = data[:at]
        path.write_bytes(bytes(data))
        want = _outcome(_old_read_text, path)
        assert _outcome(read_text, path) == want
        for block in (1, 2, 3, 5, 4096):
            assert _outcome(lambda p, b: "".join(text_blocks(p, b)), path, block) == want
    for bad in (tmp_path / "missing.txt", tmp_path):
        assert _outcome(lambda p: list(text_blocks(p)), bad) == _outcome(_old_read_text, bad)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_text_blocks_unreadable(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(TokenbridgeError, match="locked.txt: cannot read"):
        list(text_blocks(path))


# ----------------------------------------------------------------------------------------------
# Training


def _reference_paragraphs(text: str) -> list[str]:
    """paragraphs() as it was, on a text in memory."""
    return [part for part in BLANK_LINE.split(text) if part]


def test_streamed_paragraphs_are_the_in_memory_ones(tmp_path, monkeypatch):
    rng = random.Random(0)
    path = tmp_path / "t.txt"
    alphabet = ["\n", "\n", " ", "\t", "\r", "a", "b", "\u3000", "\x85", "\u2028", "\n\n", " \n", "\r\n"]
    small = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    large = [(CORPORA / "debref.de.txt").read_text(encoding="utf-8"), adversarial(0)]
    for block, texts in ((1, small), (3, small), (64, small + large), (4096, large)):
        monkeypatch.setattr(train_module, "text_blocks", functools.partial(text_blocks, block=block))
        for text in texts:
            path.write_bytes(text.encode("utf-8"))
            assert list(paragraphs([path])) == _reference_paragraphs(text)
            assert list(paragraphs([text])) == _reference_paragraphs(text)


@pytest.mark.parametrize("config, byte_fallback, size", [(TrainConfig(2000), False, 3_000_000),
                                                          (TrainConfig(2300), True, 3_000_000),
                                                          (TrainConfig(2000, supertokens=True), False, 500_000)])
def test_training_from_a_file_equals_training_in_memory(tmp_path, monkeypatch, config, byte_fallback, size):
    data = b"".join(path.read_bytes() for path in FILES)[:size]
    data = data[:data.rindex(b"\n") + 1]
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    style = default_style(byte_fallback)
    in_memory = train_tokenizer([data.decode("utf-8")], config, style)
    monkeypatch.setattr(train_module, "text_blocks", functools.partial(text_blocks, block=4099))
    streamed = train_tokenizer([path], config, style)
    assert json.dumps(streamed, ensure_ascii=False) == json.dumps(in_memory, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Memory: a text of 8 MB, in a fresh process.  Before streaming these took 1.7-2.5 GB.

PEAK_MB = 800
PEAK = """
import runpy, sys
sys.argv = ["tokenbridge", *sys.argv[1:]]
try:
    runpy.run_module("tokenbridge", run_name="__main__")
finally:
    # VmHWM is this process's own peak: unlike ru_maxrss, it does not start from the parent's at exec
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("peak-kb", peak.split()[1], file=sys.stderr)
"""


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    data = b"".join(path.read_bytes() for path in FILES)
    data = (data * (8_000_000 // len(data) + 1))[:8_000_000]
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_bytes(data[:data.rindex(b"\n") + 1])
    return path


def peak_mb(*args: str) -> float:
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(re.search(r"peak-kb (\d+)", done.stderr).group(1)) / 1024


def test_tokstats_memory_on_8_mb(tok_dirs, big_text):
    assert peak_mb("tokstats", str(tok_dirs["byte_level"]), "--text", str(big_text), "--json") < PEAK_MB


def test_tokenizer_train_memory_on_8_mb(tmp_path, big_text):
    out = tmp_path / "trained"
    assert peak_mb("tokenizer", "train", "--text", str(big_text), "--vocab-size", "400", "--out", str(out),
                   "--quiet") < PEAK_MB
    report = json.loads((out / "tokenbridge-tokenizer.json").read_text())
    assert report["compression"][0]["bytes"] == big_text.stat().st_size
