"""A tokenizer's conventions, apart from its vocabulary: how text becomes pieces and tokens become text.

Two styles cover every byte of every text, so that any trained tokenizer round-trips:

- ``byte-level`` (GPT-2, Llama 3, SmolLM2): bytes are mapped to 256 printable characters, and a
  regex splits text into pieces; a space starts a word as ``Ġ``.
- ``metaspace`` (SentencePiece, Llama 2, Gemma): spaces become ``▁`` and a character the vocabulary
  lacks is spelled by byte tokens ``<0x00>`` ... ``<0xFF>`` (byte fallback).  A literal ``▁`` in the
  text reads back as a space: the convention cannot tell them apart.

A :class:`Style` is taken from a source tokenizer (``--like``) or built by default, and turned into
the ``tokenizer.json`` pieces (normalizer, pre-tokenizer, decoder, post-processor, special tokens).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from ..align.token_bytes import _walk, byte_alphabet_inverse
from ..errors import TokenbridgeError
from .files import tokenizer_json

BYTE_LEVEL = "byte-level"
METASPACE = "metaspace"
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token")

# GPT-2's pre-tokenization; what ``ByteLevel(use_regex=True)`` applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Metaspace pieces: each ``▁`` starts a piece (SentencePiece splits on whitespace only).
METASPACE_PATTERN = r"▁?[^▁]+|▁"
# Supertoken pieces: paragraphs.  A newline ends a piece only where a blank line follows, so
# merges may cross spaces and line wraps; the words a token may span are bounded separately.
PARAGRAPH = {BYTE_LEVEL: r"(?:[^\n]|\n(?![^\S\n]*\n))+", METASPACE: r"(?:[^\n]|\n(?!(?:[^\S\n]|▁)*\n))+"}
PLACEHOLDER = re.compile(r"[<\[]unused\d+[>\]]")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


@dataclass
class Style:
    """How a tokenizer turns text into pieces and tokens back into text (JSON as in tokenizer.json)."""

    kind: str  # BYTE_LEVEL or METASPACE
    normalizer: dict | None
    pre_tokenizer: dict  # first-stage pieces, the ones the trainer learns merges within
    decoder: dict
    post_processor: dict | None = None
    specials: list[dict] = field(default_factory=list)  # added-token records, in id order
    roles: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    chat_template: str | None = None
    like: str | None = None  # the tokenizer the conventions came from

    @property
    def unk(self) -> str | None:
        return self.roles.get("unk_token")

    def supertoken_pre_tokenizer(self) -> dict:
        """Pieces for the supertoken stage: whole paragraphs (the text between blank lines)."""
        return _regex_pre_tokenizer(PARAGRAPH[self.kind], self.kind)

    def words_in(self, token: str) -> int:
        """Words a token's text spans (runs of non-space characters)."""
        if self.kind == METASPACE:
            return len(token.replace("▁", " ").split())
        return len(bytes(byte_alphabet_inverse()[c] for c in token).decode("utf-8", "replace").split())


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _regex_pre_tokenizer(pattern: str, kind: str) -> dict:
    if kind == METASPACE:
        return _split(pattern)
    return {"type": "Sequence", "pretokenizers": [
        _split(pattern), {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


SPACE_TO_MARK = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
METASPACE_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def special_token(content: str) -> dict:
    """An added-token record for a special token, with the usual flags."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def default_style(byte_fallback: bool, extra_specials: list[str] = ()) -> Style:
    """Byte-level BPE with ``<|endoftext|>``, or (``byte_fallback``) metaspace with ``<unk> <s> </s>``."""
    if byte_fallback:
        roles = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
        style = Style(METASPACE, SPACE_TO_MARK, _regex_pre_tokenizer(METASPACE_PATTERN, METASPACE),
                      METASPACE_DECODER, roles=roles)
    else:
        roles = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
        style = Style(BYTE_LEVEL, None, _regex_pre_tokenizer(GPT2_PATTERN, BYTE_LEVEL),
                      BYTE_LEVEL_DECODER, roles=roles)
    contents = list(dict.fromkeys([*roles.values(), *extra_specials]))
    style.specials = [special_token(c) for c in contents]
    return style


def _of_type(node, kinds: set[str]) -> list[dict]:
    """The components of a tokenizer.json section (nested Sequences included) whose type is in ``kinds``."""
    return [part for part in _walk(node) if part.get("type") in kinds]


def _mentions_mark(node) -> bool:
    return "▁" in str(node)


def roles_of(tokenizer) -> dict[str, str]:
    """The special-token roles a transformers tokenizer sets (``bos_token`` -> its content)."""
    return {role: str(getattr(tokenizer, role)) for role in ROLES if getattr(tokenizer, role, None)}


def kept_specials(added_tokens: list[dict], roles: dict[str, str]) -> list[dict]:
    """The special tokens a replacement tokenizer keeps, as added-token records without ids, in order.

    Every special added token but placeholders like ``<unused17>``, with its flags; then the content of
    any role (``roles``: ``bos_token`` -> content) that is not among them.  Each content once.
    """
    specials, contents = [], set()
    for record in added_tokens:
        if record.get("special") and not PLACEHOLDER.fullmatch(record["content"]) \
                and record["content"] not in contents:
            specials.append({k: v for k, v in record.items() if k != "id"} | {"special": True})
            contents.add(record["content"])
    for content in roles.values():
        if content not in contents:
            specials.append(special_token(content))
            contents.add(content)
    return specials


def style_of(tokenizer, name: str, byte_fallback: bool | None = None) -> Style:
    """The conventions of a loaded (fast) tokenizer, for a replacement that is a drop-in for it.

    Special tokens are kept (placeholders like ``<unused17>`` are not), with their flags; roles and
    the chat template are copied.  ``byte_fallback=True`` insists on the metaspace style.
    """
    data = tokenizer_json(tokenizer)
    model = data["model"]
    normalizer, pre, decoder = data.get("normalizer"), data.get("pre_tokenizer"), data.get("decoder")
    if _of_type(pre, {"ByteLevel"}) or _of_type(decoder, {"ByteLevel"}):
        if byte_fallback:
            raise TokenbridgeError(f"--byte-fallback: {name} is byte-level; it spells every byte already")
        kind = BYTE_LEVEL
        pre_tokenizer = copy.deepcopy(pre)
        decoder = copy.deepcopy(decoder) if decoder else BYTE_LEVEL_DECODER
    elif model.get("byte_fallback") or _mentions_mark(normalizer) or _mentions_mark(pre) or byte_fallback:
        kind = METASPACE
        metaspace = _of_type(pre, {"Metaspace"})
        if normalizer is not None and _mentions_mark(normalizer):
            normalizer = copy.deepcopy(normalizer)
        elif metaspace:
            prepend = metaspace[0].get("prepend_scheme", "always") != "never"
            normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, SPACE_TO_MARK]}
                          if prepend else SPACE_TO_MARK)
        else:
            normalizer = SPACE_TO_MARK
        pre_tokenizer = _regex_pre_tokenizer(METASPACE_PATTERN, kind)
        if _of_type(decoder, {"ByteFallback"}):
            decoder = copy.deepcopy(decoder)
        else:
            decoder = copy.deepcopy(METASPACE_DECODER)
            if "Prepend" in str(normalizer):
                decoder["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    else:
        raise TokenbridgeError(
            f"{name}: neither byte-level nor metaspace (▁); a {model['type']} tokenizer's conventions cannot "
            "be copied into one that encodes every byte")
    roles = roles_of(tokenizer)
    specials = kept_specials(data.get("added_tokens", []), roles)
    if kind == METASPACE and "unk_token" not in roles:
        roles["unk_token"] = "<unk>"
        if "<unk>" not in {a["content"] for a in specials}:
            specials.append(special_token("<unk>"))
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return Style(kind, normalizer, pre_tokenizer, decoder, copy.deepcopy(data.get("post_processor")),
                 specials, roles, template, like=name)


def remap_post_processor(processor: dict | None, ids: dict[str, int]) -> dict | None:
    """The post-processor with special-token ids looked up again by content (``ids``: content -> id)."""
    if processor is None:
        return None
    processor = copy.deepcopy(processor)

    def lookup(content: str) -> int:
        if content not in ids:
            raise TokenbridgeError(f"the post-processor uses {content!r}, which the new vocabulary lacks")
        return ids[content]

    for node in _of_type(processor, {"TemplateProcessing", "BertProcessing", "RobertaProcessing"}):
        if node["type"] == "TemplateProcessing":
            for entry in node.get("special_tokens", {}).values():
                entry["ids"] = [lookup(t) for t in entry["tokens"]]
        else:
            for key in ("sep", "cls"):
                if key in node:
                    node[key] = [node[key][0], lookup(node[key][0])]
    return processor
