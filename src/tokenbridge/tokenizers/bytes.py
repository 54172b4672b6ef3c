"""A byte tokenizer: every byte of the text is one token, next to a source tokenizer's special tokens.

Ids ``0 .. 255`` are the bytes themselves (id == byte value), spelled in GPT-2's byte alphabet; ids
``256 ..`` are the special tokens, in the source's order.  The model is BPE without merges, so a
text's ordinary tokens are exactly its UTF-8 bytes, in order, and ``decode(encode(text)) == text``
for any text.  No regex split is needed: with no merges there is nothing to keep apart, and one
``ByteLevel`` step (no prefix space) maps bytes to the alphabet and back.
"""

from __future__ import annotations

from ..align.token_bytes import byte_alphabet
from ..errors import TokenbridgeError
from .style import BYTE_LEVEL_DECODER, remap_post_processor, special_token

BYTE_TOKENS = 256
PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def byte_tokenizer_json(specials: list[str], post_processor: dict | None = None) -> dict:
    """``tokenizer.json`` content of the byte tokenizer with these special tokens (contents, in id order).

    ``post_processor`` (the source's) is kept, its special-token ids looked up again by content: a BOS
    the source adds, this tokenizer adds.  Specials never strip the spaces beside them (``lstrip``,
    ``rstrip`` off), so that every byte of the text stays a token.
    """
    alphabet = byte_alphabet()
    vocab = {alphabet[value]: value for value in range(BYTE_TOKENS)}
    contents = list(dict.fromkeys(specials))
    clash = [content for content in contents if content in vocab]
    if clash:
        raise TokenbridgeError(f"special token {clash[0]!r} is spelled like a byte token")
    added = [dict(special_token(content), id=BYTE_TOKENS + index) for index, content in enumerate(contents)]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": dict(PRE_TOKENIZER),
            "post_processor": remap_post_processor(post_processor, {a["content"]: a["id"] for a in added}),
            "decoder": dict(BYTE_LEVEL_DECODER), "model": model}


def check_one_token_per_byte(tokenizer, text: str) -> None:
    """Raise unless ``tokenizer`` (as loaded from disk) encodes ``text`` to its bytes' ids and back."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids != list(text.encode("utf-8")) or tokenizer.decode(ids) != text:
        raise TokenbridgeError("the byte tokenizer, as loaded back, does not give one token per byte")
