"""The built-in byte tokenizer (``tokenizer bytes``) and ``transplant SOURCE bytes OUT``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import (CHAT_TEMPLATE_TURN, IM_SPECIALS, TURN_SPECIALS, corpus, lines, make_byte_level,
                      make_metaspace, make_model, make_wordpiece, metaspace_bpe, save_tokenizer, wrap)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenbridge.cli import main
from tokenbridge.errors import TokenbridgeError
from tokenbridge.tokenizers.api import REPORT_FILE, byte_tokenizer
from tokenbridge.tokenizers.bytes import byte_tokenizer_json

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
TEXTS = [
    "", " ", "  ", "a", " leading", "trailing ", "  many   spaces  ", "\n", "\n\n\n", "\r\n",
    "\t\ttabs\t", "Hello, world!", "Zürich → 東京 🚀", "👩‍👩‍👧‍👦 family", "e\u0301 combining",
    "\x00\x01\x7f NUL and DEL", "\u200b zero width \ufeff BOM", "𝄞 \U0010fffd astral", "ﬁ Ⅻ ½ Ω",
    "<0x41> looks like a byte token", "▁ mark Ġ Ċ", "\ufffd replacement", "'s 're ?!... ---",
    "日本語のテキスト。改行\nあり", "mixed\u3000ideographic space",
]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's ``bytes_to_unicode`` (openai/gpt-2 ``encoder.py``), the reference for the byte alphabet."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bos_source(directory: Path) -> Path:
    """Gemma-like: ▁ style with byte fallback, a post-processor that adds <bos>, and a placeholder special."""
    specials = [*TURN_SPECIALS, "<unused0>"]
    tok = metaspace_bpe(lines(corpus("en")), 300, specials)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = wrap(tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                mask_token="<mask>", chat_template=CHAT_TEMPLATE_TURN)
    return save_tokenizer(fast, directory)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"byte_level": make_byte_level(root / "byte_level"), "metaspace": make_metaspace(root / "metaspace"),
            "bos": bos_source(root / "bos"), "wordpiece": make_wordpiece(root / "wordpiece")}


@pytest.fixture(scope="module")
def made(tmp_path_factory, sources) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bytes")
    for name, source in sources.items():
        byte_tokenizer(source, root / name)
    return {name: root / name for name in sources}


def encodes_bytewise(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    data = text.encode("utf-8")
    assert ids == list(data), text  # ids 0..255 are the bytes
    alphabet = gpt2_bytes_to_unicode()
    assert "".join(tokenizer.convert_ids_to_tokens(ids)) == "".join(alphabet[b] for b in data)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "bos", "wordpiece"])
def test_any_text_is_one_token_per_byte_and_round_trips(made, name):
    tokenizer = AutoTokenizer.from_pretrained(str(made[name]))  # stock transformers, no remote code
    for text in TEXTS + [corpus("ja", 100, 300), corpus("de", 500, 1500)]:
        encodes_bytewise(tokenizer, text)
    rng = random.Random(17)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        encodes_bytewise(tokenizer, raw.decode("utf-8", errors="replace"))


def test_round_trip_property(made):
    tokenizer = AutoTokenizer.from_pretrained(str(made["byte_level"]))

    @SETTINGS
    @given(st.text(max_size=80))
    def check(text):
        assume(not any(special in text for special in IM_SPECIALS))
        encodes_bytewise(tokenizer, text)

    check()


def test_specials_roles_and_chat_template_come_from_the_source(sources, made):
    for name, specials in (("byte_level", IM_SPECIALS), ("metaspace", TURN_SPECIALS)):
        source = AutoTokenizer.from_pretrained(str(sources[name]))
        new = AutoTokenizer.from_pretrained(str(made[name]))
        assert len(new) == 256 + len(specials)
        ids = [new.convert_tokens_to_ids(s) for s in specials]
        assert ids == list(range(256, 256 + len(specials)))  # in the source's order, none collapsed
        for role in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
            assert getattr(new, role) == getattr(source, role), (name, role)
        assert new.chat_template == source.chat_template
        messages = [{"role": "user", "content": "Hallo  Welt"}]
        assert new.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(messages,
                                                                                                 tokenize=False)
        assert new.decode(new("a<|im_start|>b <end_of_turn>", add_special_tokens=False)["input_ids"]) == \
            "a<|im_start|>b <end_of_turn>"
    # byte_level's pad and eos share one token: one id, two roles
    new = AutoTokenizer.from_pretrained(str(made["byte_level"]))
    assert new.pad_token_id == new.eos_token_id == 258 and new.bos_token_id == 257
    report = json.loads((made["metaspace"] / REPORT_FILE).read_text())
    assert report["command"] == "bytes" and report["vocab_after"] == 256 + len(TURN_SPECIALS)


def test_bos_is_added_where_the_source_adds_it_and_placeholders_stay_behind(sources, made):
    source = AutoTokenizer.from_pretrained(str(sources["bos"]))
    new = AutoTokenizer.from_pretrained(str(made["bos"]))
    assert source("x")["input_ids"][0] == source.bos_token_id
    assert new.bos_token_id == 256 + TURN_SPECIALS.index("<bos>") != source.bos_token_id
    assert new("xy")["input_ids"] == [new.bos_token_id, ord("x"), ord("y")]
    assert "<unused0>" in source.get_vocab() and "<unused0>" not in new.get_vocab()
    assert len(new) == 256 + len(TURN_SPECIALS)
    plain = AutoTokenizer.from_pretrained(str(made["byte_level"]))
    assert plain("xy")["input_ids"] == [ord("x"), ord("y")]  # the source adds nothing, nor does it


def test_written_tokenizer_is_deterministic(tmp_path, sources, made):
    byte_tokenizer(sources["bos"], tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (made["bos"] / "tokenizer.json").read_bytes()


def test_a_special_spelled_like_a_byte_is_refused():
    with pytest.raises(TokenbridgeError, match="spelled like a byte token"):
        byte_tokenizer_json(["<s>", "A"])


def _one_line_error(capsys, argv, needle) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokenbridge: error: ") and needle in err, err
    return err


def test_cli_errors(tmp_path, capsys, sources):
    out = tmp_path / "out"
    _one_line_error(capsys, ["tokenizer", "bytes", "--out", out], "--like")
    _one_line_error(capsys, ["tokenizer", "bytes", "--like", tmp_path / "missing", "--out", out],
                    "no such file or directory")
    _one_line_error(capsys, ["tokenizer", "bytes", "--like", "packaged:nope", "--out", out], "unknown packaged")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tokenbridge-" in p.name]
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _one_line_error(capsys, ["tokenizer", "bytes", "--like", sources["byte_level"], "--out", out], "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["tokenizer", "bytes", "--like", str(sources["byte_level"]), "--out", str(out), "--force",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "bytes" and summary["vocab_after"] == 259
    assert summary["details"]["special_tokens"] == IM_SPECIALS
    assert not (out / "keep.txt").exists() and len(AutoTokenizer.from_pretrained(str(out))) == 259
    _one_line_error(capsys, ["transplant", tmp_path / "missing", "bytes", tmp_path / "moved"],
                    "no such file or directory")
    assert not (tmp_path / "moved").exists() and not [p for p in tmp_path.iterdir() if ".tokenbridge-" in p.name]


def _source_token(tokenizer, value: int, kind: str) -> int:
    """The source id that spells byte ``value``: what the source produces for it alone (ASCII), else its byte token."""
    if value < 0x80:
        ids = tokenizer(chr(value), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (value, ids)
        return ids[0]
    token = gpt2_bytes_to_unicode()[value] if kind == "byte_level" else f"<0x{value:02X}>"
    return tokenizer.convert_tokens_to_ids(token)


@pytest.mark.parametrize("family, kind", [("llama", "byte_level"), ("mistral", "metaspace")])
def test_transplant_onto_bytes_copies_every_byte_row(tmp_path, capsys, sources, family, kind):
    model = make_model(tmp_path / "model", family, sources[kind])
    out = tmp_path / "moved"
    assert main(["transplant", str(model), "bytes", str(out), "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    specials = IM_SPECIALS if kind == "byte_level" else TURN_SPECIALS
    assert printed["tokenizer"]["command"] == "bytes"
    assert printed["target_vocab_size"] == 256 + len(specials)
    assert printed["counts"]["copied"] == 256 and printed["counts"]["initialised"] == 0
    assert printed["counts"]["copied_special"] == len(specials)
    assert not [p for p in tmp_path.iterdir() if ".tokenbridge-" in p.name]  # the temp tokenizer is gone

    source_tok = AutoTokenizer.from_pretrained(str(model))
    new_tok = AutoTokenizer.from_pretrained(str(out))
    source_lm = AutoModelForCausalLM.from_pretrained(str(model))
    new_lm = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(new_tok) == 256 + len(specials) == new_lm.get_input_embeddings().weight.shape[0]
    encodes_bytewise(new_tok, "moved onto bytes: 東京 🚀")
    expected = {value: _source_token(source_tok, value, kind) for value in range(256)}
    if kind == "metaspace":  # bytes spelled both by a character and by <0xNN>: the character is copied
        vocab = source_tok.get_vocab()
        twins = [v for v in range(0x80) if chr(v) in vocab and expected[v] != vocab[f"<0x{v:02X}>"]]
        assert len(twins) > 20
    provenance = json.loads((out / "tokenbridge.json").read_text())
    assert dict(map(tuple, provenance["copied"])) == expected
    pairs = [(new_lm.get_input_embeddings().weight, source_lm.get_input_embeddings().weight),
             (new_lm.get_output_embeddings().weight, source_lm.get_output_embeddings().weight)]
    for new_rows, old_rows in pairs:
        for value, source_id in expected.items():
            assert torch.equal(new_rows[value], old_rows[source_id]), value
        for special in specials:
            assert torch.equal(new_rows[new_tok.convert_tokens_to_ids(special)],
                               old_rows[source_tok.convert_tokens_to_ids(special)])
    with torch.no_grad():
        logits = new_lm(**new_tok("hi there", return_tensors="pt")).logits
    assert logits.shape[-1] == 256 + len(specials)


def test_dot_slash_bytes_names_a_directory(tmp_path, capsys, monkeypatch, sources):
    model = make_model(tmp_path / "model", "llama", sources["byte_level"])
    monkeypatch.chdir(tmp_path)
    make_metaspace(tmp_path / "bytes", vocab_size=600)
    assert main(["transplant", str(model), "./bytes", str(tmp_path / "dir"), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target_vocab_size"] == 600
    assert main(["transplant", str(model), "bytes", str(tmp_path / "builtin"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["target_vocab_size"] == 256 + len(IM_SPECIALS)
    assert "built-in byte tokenizer" in captured.err


@pytest.mark.real
def test_real_smollm2_byte_tokenizer(tmp_path, capsys):
    assert main(["tokenizer", "bytes", "--like", "packaged:smollm2", "--out", str(tmp_path / "b"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer

    source = load_tokenizer(resolve("packaged:smollm2"))
    specials = [t.content for _, t in sorted(source.backend_tokenizer.get_added_tokens_decoder().items())
                if t.special]
    assert summary["details"]["special_tokens"] == specials and "<|im_start|>" in specials
    new = AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    assert len(new) == summary["vocab_after"] == 256 + len(specials)
    assert new.chat_template == source.chat_template
    for text in TEXTS + [corpus("ja", 0, 500)]:
        encodes_bytewise(new, text)
