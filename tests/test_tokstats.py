"""Tokenizer statistics, checked against direct counts and brute-force comparisons."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CORPORA, corpus, make_byte_level
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tokenbridge.errors import TokenbridgeError
from tokenbridge.measure.tokstats import (
    format_tokstats,
    language_of,
    plot_premiums,
    split_character_bytes,
    run_tokstats,
    token_premium,
    tokenizer_stats,
    vocab_overlap,
)

# Held-out slices: the tiny tokenizers are trained on the first 20000 characters.
EN = corpus("en", 40000, 1500)
DE = corpus("de", 40000, 1500)
JA = corpus("ja", 40000, 1500)


def parallel_preface(lang: str) -> str:
    """The Debian Reference preface up to its section 3: the same content in every language, 2.4-3.4 KB."""
    text = (CORPORA / f"debref.{lang}.txt").read_text(encoding="utf-8")
    headings = [m.start() for m in re.finditer(r"(?m)^3\.[ \xa0]", text)]  # the table of contents, then the body
    return text[:headings[1]]


def direct_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def gpt2_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes, through transformers' own copy of the GPT-2 byte alphabet."""
    inverse = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in token)


@pytest.fixture(scope="module")
def toks(tok_dirs, tmp_path_factory):
    out = {kind: AutoTokenizer.from_pretrained(str(path)) for kind, path in tok_dirs.items()}
    # trained on Japanese: its tokens often hold one whole character and part of the next
    japanese = make_byte_level(tmp_path_factory.mktemp("tokstats") / "byte_level_ja", lang="ja", chat=False)
    out["byte_level_ja"] = AutoTokenizer.from_pretrained(str(japanese))
    return out


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "wordpiece"])
def test_counts_equal_direct_counts(toks, kind):
    tokenizer = toks[kind]
    stats = tokenizer_stats(tokenizer, EN, "en", tokenizer_name=kind)
    tokens = direct_count(tokenizer, EN)
    assert (stats.tokenizer, stats.text) == (kind, "en")
    assert stats.tokens == tokens
    assert stats.bytes == len(EN.encode("utf-8"))
    assert stats.characters == len(EN)
    assert stats.bytes_per_token == pytest.approx(len(EN.encode("utf-8")) / tokens)
    assert stats.words == len(EN.split())
    assert stats.fertility == pytest.approx(tokens / len(EN.split()))


def test_literal_special_token_strings_count_as_text(toks, tok_dirs):
    tokenizer = toks["byte_level"]
    text = "done <|im_end|> next <|im_start|>user"
    stats = tokenizer_stats(tokenizer, text, "t")
    backend = Tokenizer.from_file(str(tok_dirs["byte_level"] / "tokenizer.json"))
    backend.encode_special_tokens = True
    as_text = backend.encode(text, add_special_tokens=False).ids
    assert stats.tokens == len(as_text)
    # the backend is left as it was (transformers would leave split_special_tokens switched on) ...
    assert tokenizer.backend_tokenizer.encode_special_tokens is False
    assert backend.encode_special_tokens is True
    # ... and an ordinary call still produces the special ids themselves
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer(text, add_special_tokens=False).input_ids
    assert stats.tokens > direct_count(tokenizer, text)


def test_byte_fallback_share_metaspace(toks):
    """Characters missing from the vocabulary, and only those, go out as <0xNN> bytes."""
    tokenizer = toks["metaspace"]
    text = EN[:600] + " 日本語のテキスト、" + EN[600:900] + " Ωμέγα ☃ " + JA[:200]
    vocab = tokenizer.get_vocab()
    missing = [c for c in text if c.replace(" ", "\u2581") not in vocab]
    assert len({c for c in missing if ord(c) > 0x2FFF}) > 10  # the test text exercises byte fallback
    expected = sum(len(c.encode("utf-8")) for c in missing) / len(text.encode("utf-8"))
    stats = tokenizer_stats(tokenizer, text, "mixed")
    assert stats.byte_fallback_share == pytest.approx(expected)
    assert tokenizer_stats(tokenizer, "the system", "plain").byte_fallback_share == 0.0


@pytest.mark.parametrize("kind", ["byte_level", "byte_level_ja"])
def test_byte_fallback_share_byte_level(toks, kind):
    """Byte-level BPE: the bytes of characters that no single token holds whole."""
    tokenizer = toks[kind]
    text = EN[:400] + " 日本語のテキスト、café ☃ " + JA
    pieces = [gpt2_bytes(t) for t in tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)]
    assert b"".join(pieces) == text.encode("utf-8")
    if kind == "byte_level_ja":  # some tokens hold whole characters and part of another
        assert any(p.decode("utf-8", "ignore") and p.decode("utf-8", "replace") != p.decode("utf-8", "ignore")
                   for p in pieces)
    boundaries, position = set(), 0
    for piece in pieces:
        position += len(piece)
        boundaries.add(position)
    split, position = 0, 0
    for char in text:
        size = len(char.encode("utf-8"))
        if any(position < b < position + size for b in boundaries):
            split += size
        position += size
    assert split > 0
    stats = tokenizer_stats(tokenizer, text, "mixed")
    assert stats.byte_fallback_share == pytest.approx(split / len(text.encode("utf-8")))


def test_split_character_bytes():
    assert split_character_bytes(b"abc") == 0
    assert split_character_bytes("日本".encode()) == 0
    assert split_character_bytes(b"\xe6\x97") == 2  # the first two bytes of 日
    assert split_character_bytes(b"\x97\xa5 a\xe6") == 3  # the end of one character, the start of another
    assert split_character_bytes(b"\xe3\x83\xbc\xe3\x82") == 2  # ー whole, then half of a kana
    assert split_character_bytes(b"\xff\xc0\x80") == 3  # never valid UTF-8
    assert split_character_bytes(b"\xed\xa0\x80") == 3  # a surrogate: three bytes of no character


def test_unk_share_wordpiece(toks):
    tokenizer = toks["wordpiece"]
    text = "the ☃ and the ☃☃ system"
    assert tokenizer.unk_token in tokenizer.tokenize(text)
    stats = tokenizer_stats(tokenizer, text, "snow")
    # WordPiece maps a whole word with an unknown character to [UNK]: "☃" and "☃☃" are 9 bytes
    assert stats.unk_share == pytest.approx(9 / len(text.encode("utf-8")))
    assert tokenizer_stats(tokenizer, EN[:300].lower(), "en").unk_share == 0.0
    assert tokenizer_stats(toks["byte_level"], text, "snow").unk_share == 0.0


def test_fertility_none_without_spaces(toks):
    japanese = (CORPORA / "debref.ja.txt").read_text(encoding="utf-8")[5000:8000]
    assert len(japanese.split()) > 0  # the slice has spaced ASCII words, yet words are not meaningful
    for kind in ("byte_level", "metaspace"):
        assert tokenizer_stats(toks[kind], japanese, "ja").fertility is None
        english = tokenizer_stats(toks[kind], EN, "en")
        assert english.fertility == pytest.approx(direct_count(toks[kind], EN) / len(EN.split()))
    assert tokenizer_stats(toks["metaspace"], "", "empty").fertility is None


def test_language_of():
    assert language_of("debref.de.txt") == "de"
    assert language_of(Path("/x/y.z/debref.zh-cn.txt")) == "zh-cn"
    assert language_of("notes.txt") == "notes"
    assert language_of("README") == "README"


def test_token_premium_is_the_ratio_of_token_counts(toks):
    tokenizer = toks["metaspace"]
    texts = {lang: parallel_preface(lang) for lang in ("en", "de", "ja")}
    stats = {lang: tokenizer_stats(tokenizer, text, f"debref.{lang}.txt") for lang, text in texts.items()}
    premiums = token_premium(stats, "en")
    assert premiums["en"] == 1.0
    for lang, text in texts.items():
        assert premiums[lang] == pytest.approx(direct_count(tokenizer, text) / direct_count(tokenizer, texts["en"]))
    assert premiums["ja"] > premiums["de"] > 1.0  # an English-trained vocabulary
    with pytest.raises(TokenbridgeError, match="fr"):
        token_premium(stats, "fr")


def test_overlap_matches_brute_force(toks):
    a, b = toks["byte_level"], toks["byte_level_de"]
    texts = {"en": EN, "de": DE}
    overlap = vocab_overlap(a, b, texts, name_a="en", name_b="de")

    def ordinary_ids(tokenizer):
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        return [i for i in range(len(tokenizer)) if i not in special]

    def decoded(tokenizer):
        strings = {tokenizer.decode([i]) for i in ordinary_ids(tokenizer)}
        return {s for s in strings if "\ufffd" not in s}

    def byte_strings(tokenizer):
        return {gpt2_bytes(t) for t in tokenizer.convert_ids_to_tokens(ordinary_ids(tokenizer))}

    assert overlap.shared - overlap.shared_partial_utf8 == len(decoded(a) & decoded(b))
    bytes_a, bytes_b = byte_strings(a), byte_strings(b)
    assert overlap.shared == len(bytes_a & bytes_b)
    assert (overlap.size_a, overlap.size_b) == (len(a), len(b))
    assert overlap.shared_special == 3  # both carry <|endoftext|>, <|im_start|>, <|im_end|>
    for entry in overlap.texts:
        text = texts[entry.text]
        pieces_a = [gpt2_bytes(t) for t in a.tokenize(text)]
        pieces_b = [gpt2_bytes(t) for t in b.tokenize(text)]
        assert entry.tokens_a == len(pieces_a) and entry.tokens_b == len(pieces_b)
        assert entry.a_in_b == pytest.approx(sum(p in bytes_b for p in pieces_a) / len(pieces_a))
        assert entry.b_in_a == pytest.approx(sum(p in bytes_a for p in pieces_b) / len(pieces_b))
    # each tokenizer's own language is covered better by itself than by the other vocabulary
    by_text = {t.text: t for t in overlap.texts}
    assert by_text["de"].a_in_b > by_text["de"].b_in_a


def test_overlap_across_families_compares_bytes(toks):
    """Byte-level 'Ġthe' and SentencePiece '▁the' are the same bytes."""
    overlap = vocab_overlap(toks["byte_level"], toks["metaspace"], {"en": EN[:300]})
    assert overlap.shared_special == 0
    ids = toks["metaspace"].convert_tokens_to_ids(["\u2581the"])
    assert ids[0] != toks["metaspace"].unk_token_id and "\u0120the" in toks["byte_level"].get_vocab()
    assert overlap.shared > 100


def test_plot_is_a_png(tmp_path):
    path = plot_premiums({"a": {"en": 1.0, "de": 1.4, "ja": 2.5}, "b": {"en": 1.0, "de": 1.2, "ja": 1.1}},
                         tmp_path / "premium.png", reference="en")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(TokenbridgeError, match="no-such-dir"):
        plot_premiums({"a": {"en": 1.0}}, tmp_path / "no-such-dir" / "p.png")


@pytest.fixture()
def parallel_files(tmp_path):
    paths = []
    for lang, text in {"en": EN, "de": DE, "ja": JA}.items():
        path = tmp_path / f"debref.{lang}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def test_run_tokstats(tok_dirs, toks, parallel_files, tmp_path):
    names = [str(tok_dirs["byte_level"]), str(tok_dirs["metaspace"] / "tokenizer.json")]
    result = run_tokstats(names, parallel_files, reference=parallel_files[0], plot=tmp_path / "p.png")
    json.dumps(result)  # JSON-able
    assert result["tokenizers"] == names
    assert len(result["stats"]) == 6
    counts = {(s["tokenizer"], s["text"]): s["tokens"] for s in result["stats"]}
    assert counts[(names[0], "debref.de.txt")] == direct_count(toks["byte_level"], DE)
    assert result["reference"] == "en"
    premiums = result["premiums"][names[1]]
    assert premiums["en"] == 1.0
    assert premiums["ja"] == pytest.approx(direct_count(toks["metaspace"], JA) / direct_count(toks["metaspace"], EN))
    assert len(result["overlap"]) == 1 and len(result["overlap"][0]["texts"]) == 3
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    report = format_tokstats(result)
    assert "debref.ja.txt" in report and "Token premium" in report and "Vocabulary overlap" in report
    line = next(row for row in report.splitlines() if row.startswith(names[0]) and "debref.de.txt" in row)
    assert re.search(rf"\b{counts[(names[0], 'debref.de.txt')]}\b", line)


def test_run_tokstats_single_tokenizer_no_reference(tok_dirs, parallel_files):
    result = run_tokstats([str(tok_dirs["wordpiece"])], parallel_files[:1], None, None)
    assert result["premiums"] is None and result["overlap"] == [] and result["plot"] is None
    assert "Token premium" not in format_tokstats(result)


def test_run_tokstats_bad_input(tok_dirs, parallel_files, tmp_path):
    tok = [str(tok_dirs["byte_level"])]
    missing = tmp_path / "absent.txt"
    with pytest.raises(TokenbridgeError, match="absent.txt"):
        run_tokstats(tok, [missing], None, None)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(TokenbridgeError, match="latin1.txt.*UTF-8"):
        run_tokstats(tok, [latin1], None, None)
    with pytest.raises(TokenbridgeError, match="reference"):
        run_tokstats(tok, parallel_files[:2], parallel_files[2], None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "debref.en.txt").write_text("x", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="language 'en'"):
        run_tokstats(tok, [parallel_files[0], other / "debref.en.txt"], parallel_files[0], None)
    with pytest.raises(TokenbridgeError, match="no-tokenizer"):
        run_tokstats([str(tmp_path / "no-tokenizer")], parallel_files, None, None)


# ----------------------------------------------------------------------------------------------
# The real tokenizers


@pytest.mark.real
def test_real_gemma_has_a_lower_japanese_premium_than_smollm2(tmp_path):
    paths = []
    for lang in ("en", "de", "ja"):
        path = tmp_path / f"debref.{lang}.txt"
        path.write_text(parallel_preface(lang), encoding="utf-8")
        paths.append(path)
    result = run_tokstats(["packaged:smollm2", "packaged:gemma3"], paths, paths[0], tmp_path / "premium.png")
    smollm2, gemma = result["premiums"]["packaged:smollm2"], result["premiums"]["packaged:gemma3"]
    # measured: SmolLM2 en 1.00, de 1.75, ja 2.73; Gemma-3 en 1.00, de 1.27, ja 1.21
    assert gemma["ja"] < smollm2["ja"]
    assert smollm2["ja"] > 2.0
    assert gemma["de"] < smollm2["de"]
    stats = {(s["tokenizer"], s["text"]): s for s in result["stats"]}
    assert stats[("packaged:smollm2", "debref.ja.txt")]["byte_fallback_share"] > 0.3
    assert stats[("packaged:gemma3", "debref.ja.txt")]["fertility"] is None
    overlap = result["overlap"][0]
    assert overlap["shared"] > 40000 and overlap["shared_special"] == 0


def test_tokstats_cli(tok_dirs, tmp_path, capsys):
    import json as _json

    from tokenbridge.cli import main

    text = tmp_path / "debref.en.txt"
    text.write_text("The Debian system. Überall 日本語", encoding="utf-8")
    assert main(["tokstats", str(tok_dirs["byte_level"]), str(tok_dirs["metaspace"]), "--text", str(text),
                 "--json"]) == 0
    result = _json.loads(capsys.readouterr().out)
    assert {s["tokenizer"] for s in result["stats"]} == {str(tok_dirs["byte_level"]), str(tok_dirs["metaspace"])}
    assert len(result["overlap"]) == 1
    assert main(["tokstats", str(tok_dirs["byte_level"]), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
