"""Exact byte-level probabilities on the real packaged models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CORPORA

from tokenbridge.bytes import ByteLM
from tokenbridge.bytes.lm import CanonicalPrefixes
from tokenbridge.load.packaged import resolve
from tokenbridge.measure.bpb import load_causal_lm
from tokenbridge.pipeline import resolve_source

pytestmark = pytest.mark.real


def _slice(name: str, size: int = 500) -> bytes:
    data = (CORPORA / name).read_bytes()[30000:30000 + size + 8]
    return data.decode("utf-8", errors="ignore")[: size // 3].encode()


@pytest.mark.parametrize("model", ["packaged:smollm2", "packaged:gemma3"])
def test_real_canonical_prefixes_match_the_tokenizer(model):
    """At every character boundary of en/de/ja/code text, the engine's encoding is the tokenizer's."""
    from transformers import AutoTokenizer

    directory = resolve_source(resolve(model))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    rows = json.loads((directory / "config.json").read_text())["vocab_size"]
    walk = CanonicalPrefixes(tokenizer, rows)
    for name in ("debref.en.txt", "debref.de.txt", "debref.ja.txt", "code.python.txt"):
        data = _slice(name)
        _, per_position = walk._plan(data)
        for n in range(len(data) + 1):
            if n < len(data) and data[n] & 0xC0 == 0x80:
                continue
            ends = [node for node in per_position[n][1] if walk.canon.can_end(node.state)]
            ids, node = [], ends[0]
            while node.parent is not None:
                ids.append(node.token)
                node = node.parent
            expected = tokenizer(data[:n].decode(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert len(ends) == 1 and ids[::-1] == expected, (model, name, data[max(0, n - 30):n])


def test_real_prompt_healing_smollm2():
    """Cut mid-word, token-level greedy decoding goes wrong; byte-level continues the word."""
    model, tokenizer = load_causal_lm(resolve("packaged:smollm2"))
    lm = ByteLM(model, tokenizer)
    prompt = "The capital of France is Pa"
    ids = [lm.prefix_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    token_level = tokenizer.decode(out[0, len(ids):])
    assert not token_level.startswith("ris")
    assert lm.generate(prompt.encode(), max_bytes=4, temperature=0) == b"ris."
    # the cut prompt's next-byte distribution is the marginal of the whole text at that byte
    whole = (prompt + "ris.").encode()
    rows = lm.byte_logprobs(whole)
    assert lm.next_byte_logprobs(prompt.encode())[ord("r")] == pytest.approx(rows[len(prompt)], abs=1e-6)
    assert np.exp(rows[len(prompt)]) > 0.5
