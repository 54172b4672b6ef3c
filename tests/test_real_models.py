"""End to end on the real packaged models: SmolLM2-135M (GGUF) onto the Gemma-3 tokenizer (GGUF)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPORA, read_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenbridge import transplant
from tokenbridge.load.packaged import gemma3_gguf, smollm2_gguf
from tokenbridge.pipeline import resolve_source

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def transplanted(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    outputs = {}
    for method in ("subword", "random"):
        out, report = transplant(smollm2_gguf(), gemma3_gguf(), root / method, method=method, progress=False)
        outputs[method] = (out, report)
    return outputs


def nll_per_token(directory, text: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :384]
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_convert_matches_transformers_gguf_loading(tmp_path):
    """The dequantised directory gives the same logits as transformers reading the GGUF itself."""
    from tokenbridge.cli import main

    gguf = smollm2_gguf()
    assert main(["convert", str(gguf), str(tmp_path / "hf")]) == 0
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tokenizer("Debian is a free operating system.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, converted(ids).logits)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_real_self_transplant_is_bit_exact(tmp_path):
    source = resolve_source(smollm2_gguf())
    out, report = transplant(source, source, tmp_path / "self", progress=False)
    assert report.counts["initialised"] == 0
    before, after = read_tensors(source), read_tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_smollm2_onto_gemma3_tokenizer(transplanted):
    out, report = transplanted["subword"]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert len(tokenizer) == 262144 and model.config.vocab_size == 262144
    assert report.counts["copied"] > 40000 and report.counts["initialised"] > 200000
    matched = {s.token: s.source_token for s in report.specials}
    assert matched["<start_of_turn>"] == "<|im_start|>" and matched["<end_of_turn>"] == "<|im_end|>"
    assert model.config.bos_token_id == tokenizer.bos_token_id == 2
    # Copied rows are the source rows, bit for bit.
    source = read_tensors(resolve_source(smollm2_gguf()))["model.embed_tokens.weight"]
    target = read_tensors(out)["model.embed_tokens.weight"]
    pairs = torch.tensor(report.copied)
    assert torch.equal(target[pairs[:, 0]], source[pairs[:, 1]])
    # It generates text.
    prompt = tokenizer("The Debian package manager", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(continuation.strip()) > 0
    # Provenance is on disk for every initialised row.
    saved = json.loads((out / "tokenbridge.json").read_text())
    assert len(saved["initialised"]["input"]) == report.counts["initialised"] + report.counts["unmatched_special"]


def test_subword_beats_random_on_english(transplanted):
    text = (CORPORA / "debref.en.txt").read_text(encoding="utf-8")[20000:24000]
    subword = nll_per_token(transplanted["subword"][0], text)
    random = nll_per_token(transplanted["random"][0], text)
    assert math.isfinite(subword) and math.isfinite(random)
    assert subword < random


def test_real_gemma_plus_sign_copies_the_produced_token():
    """Gemma's tokenizer has '+' and '<0x2B>'; the SmolLM2 '+' must come from Gemma's '+'."""
    from tokenbridge.align.encode import ByteEncoder
    from tokenbridge.align.token_bytes import vocabulary
    from tokenbridge.align.vocab import align
    from tokenbridge.load.tokenizer import load_tokenizer

    gemma = load_tokenizer(gemma3_gguf())
    smol = load_tokenizer(smollm2_gguf())
    gemma_vocab, smol_vocab = vocabulary(gemma), vocabulary(smol)
    alignment = align(gemma_vocab, smol_vocab, gemma, smol, ByteEncoder(gemma_vocab))
    copied = alignment.copied_from()
    plus = gemma("+", add_special_tokens=False)["input_ids"]
    assert len(plus) == 1 and gemma.convert_ids_to_tokens(plus[0]) == "+"
    assert copied[smol.convert_tokens_to_ids("+")] == plus[0] != gemma.convert_tokens_to_ids("<0x2B>")
    # The share of SmolLM2's vocabulary that Gemma's covers by exact bytes.
    assert len(copied) / len(smol_vocab) > 0.9
