"""Tokenizer JSON in and out: the ``tokenizers`` object behind a fast tokenizer, and a saved directory."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TokenbridgeError


def tokenizer_json(tokenizer) -> dict:
    """The ``tokenizer.json`` content of a loaded fast tokenizer."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def backend(data: dict):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` content."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    except Exception as error:  # noqa: BLE001 - report what tokenizers objects to, in one line
        raise TokenbridgeError(f"the new tokenizer does not build ({str(error).splitlines()[0]})") from None


def model_ids(data: dict) -> dict[str, int]:
    """Token content -> id over the model's vocabulary and the added tokens."""
    model = data["model"]
    if model["type"] == "Unigram":
        ids = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    else:
        ids = dict(model["vocab"])
    ids.update({a["content"]: a["id"] for a in data.get("added_tokens", [])})
    return ids


def save_tokenizer(data: dict, directory: Path, roles: dict[str, str], chat_template: str | None = None):
    """Write a tokenizer directory that stock ``AutoTokenizer`` loads as written; returns the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    known = model_ids(data)
    missing = [content for content in roles.values() if content not in known]
    if missing:
        raise TokenbridgeError(f"the new tokenizer lacks its special token(s) {', '.join(missing)}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend(data), clean_up_tokenization_spaces=False,
                                        **roles)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))
    return tokenizer
