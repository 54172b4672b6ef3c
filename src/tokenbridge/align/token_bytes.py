"""Every token of a Hugging Face fast tokenizer as its exact byte string.

Three tokenizer families are understood:

* ``byte_level``: GPT-2 style byte-level BPE (SmolLM2, Qwen, Llama-3, GPT-2).  Each
  character of a token stands for one byte through the GPT-2 byte alphabet.
* ``metaspace``: SentencePiece style BPE or Unigram where ``▁`` stands for a space,
  optionally with ``<0xNN>`` byte-fallback tokens (Gemma, Llama-2, Mistral, T5).
* ``wordpiece``: BERT style, continuation pieces carry ``##``; a word-initial piece
  is taken to follow a space.

Special (control) tokens have no bytes: they are identified by their content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import TokenbridgeError

SPACE_MARK = "\u2581"  # ▁
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def byte_alphabet_inverse() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


def is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One vocabulary entry and the exact bytes it stands for."""

    id: int
    token: str  # the raw vocabulary string
    bytes: bytes  # exact bytes it contributes to text (b"" for special tokens)
    special: bool = False  # a control token: matched by content/role, never by bytes
    added: bool = False  # declared in added_tokens
    byte_fallback: bool = False  # a <0xNN> token
    word_start: bool = False  # begins with a space (Ġ, ▁) or is a word-initial WordPiece piece
    partial_utf8: bool = False  # its bytes are not valid UTF-8 on their own


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's vocabulary, indexed by id, with the family it belongs to."""

    family: str  # "byte_level" | "metaspace" | "wordpiece"
    tokens: tuple[TokenInfo, ...]
    backend: object  # the tokenizers.Tokenizer, whose model segments byte strings (read only)
    byte_fallback: bool
    continuing_prefix: str = "##"

    def __len__(self) -> int:
        return len(self.tokens)


def _walk(node) -> list[dict]:
    """All component dicts of a (possibly nested Sequence) pre-tokenizer/normalizer/decoder."""
    if node is None:
        return []
    if isinstance(node, list):
        return [d for item in node for d in _walk(item)]
    out = [node]
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        if key in node:
            out.extend(_walk(node[key]))
    return out


def _component(part) -> dict | None:
    """A tokenizer component (normalizer, pre-tokenizer, decoder) as its JSON description."""
    if part is None:
        return None
    return json.loads(part.__getstate__())


def tokenizer_spec(backend) -> dict:
    """The parts of a tokenizer's description that say how tokens spell bytes, without its vocabulary.

    Parsing the full ``to_str()`` JSON would build Python objects for every vocabulary entry and merge
    (hundreds of MB for a 262k vocabulary), so the model's few fields and each component are read alone.
    """
    model = backend.model
    return {
        "model": {
            "type": type(model).__name__,
            "byte_fallback": getattr(model, "byte_fallback", False),
            "continuing_subword_prefix": getattr(model, "continuing_subword_prefix", None),
        },
        "normalizer": _component(backend.normalizer),
        "pre_tokenizer": _component(backend.pre_tokenizer),
        "decoder": _component(backend.decoder),
    }


def detect_family(spec: dict) -> str:
    model_type = spec["model"]["type"]
    parts = _walk(spec.get("normalizer")) + _walk(spec.get("pre_tokenizer")) + _walk(spec.get("decoder"))
    types = {p.get("type") for p in parts}
    if model_type == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in types:
        return "byte_level"
    replaces_space = any(
        p.get("type") == "Replace" and p.get("content") in (SPACE_MARK, " ") and p.get("pattern", {}).get("String") in (" ", SPACE_MARK)
        for p in parts
    )
    if "Metaspace" in types or replaces_space:
        return "metaspace"
    raise TokenbridgeError(
        f"tokenizer family not supported (model {model_type}, components {sorted(t for t in types if t)}); "
        "supported: byte-level BPE, SentencePiece-style (▁) BPE/Unigram, WordPiece"
    )


def _token_bytes(token: str, family: str, byte_fallback: bool, prefix: str) -> tuple[bytes, bool, bool]:
    """(bytes, is_byte_fallback, word_start) of a non-special vocabulary string."""
    if family == "byte_level":
        inverse = byte_alphabet_inverse()
        if all(c in inverse for c in token):
            data = bytes(inverse[c] for c in token)
        else:  # e.g. an added token stored as plain text
            data = token.encode("utf-8")
        return data, False, data.startswith(b" ")
    if family == "metaspace":
        match = _BYTE_FALLBACK.match(token)
        if match and byte_fallback:
            value = int(match.group(1), 16)
            return bytes([value]), True, value == 0x20
        data = token.replace(SPACE_MARK, " ").encode("utf-8")
        return data, False, data.startswith(b" ")
    if family == "wordpiece":
        if token.startswith(prefix) and len(token) > len(prefix):
            return token[len(prefix):].encode("utf-8"), False, False
        return b" " + token.encode("utf-8"), False, True
    raise AssertionError(family)


def ids_by_token(vocab: dict[str, int], name: str) -> dict[int, str]:
    """``{id: token}`` of a ``{token: id}`` vocabulary whose ids must be exactly ``0 .. len - 1``.

    Checked before anything of the ids' size is allocated: a single id of 200,000,000 in a small file
    must be an error, not a 200M-element list.
    """
    if not vocab:
        raise TokenbridgeError(f"{name}: the tokenizer's vocabulary is empty")
    by_id: dict[int, str] = {}
    for token, index in vocab.items():
        other = by_id.setdefault(index, token)
        if other != token:
            first, second = sorted((other, token))
            raise TokenbridgeError(f"{name}: id {index} has two tokens, {first!r} and {second!r}")
    size = len(by_id)
    top = max(by_id)
    if top >= size or min(by_id) < 0:
        missing = next(i for i in range(size) if i not in by_id)
        raise TokenbridgeError(f"{name}: the tokenizer's ids are not contiguous (id {missing} has no token, "
                               f"the largest is {top})")
    return by_id


def vocabulary(tokenizer) -> Vocabulary:
    """Byte view of a transformers fast tokenizer (or a ``tokenizers.Tokenizer``)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = tokenizer_spec(backend)
    family = detect_family(spec)
    model = spec["model"]
    # Unigram does not expose byte_fallback in Python; its ByteFallback decoder says the same.
    byte_fallback = bool(model.get("byte_fallback")) or any(
        part.get("type") == "ByteFallback" for part in _walk(spec.get("decoder")))
    prefix = model.get("continuing_subword_prefix") or "##"
    vocab = backend.get_vocab(with_added_tokens=True)
    name = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    by_id = ids_by_token(vocab, name)
    size = len(by_id)
    added = backend.get_added_tokens_decoder()
    tokens = []
    for index in range(size):
        token = by_id[index]
        added_token = added.get(index)
        if added_token is not None and added_token.special:
            tokens.append(TokenInfo(index, token, b"", special=True, added=True))
            continue
        if added_token is not None:
            data = token.encode("utf-8")
            tokens.append(
                TokenInfo(index, token, data, added=True, word_start=data.startswith(b" "),
                          partial_utf8=False)
            )
            continue
        data, is_fallback, word_start = _token_bytes(token, family, byte_fallback, prefix)
        tokens.append(
            TokenInfo(index, token, data, byte_fallback=is_fallback, word_start=word_start,
                      partial_utf8=not is_valid_utf8(data))
        )
    return Vocabulary(family, tuple(tokens), backend, byte_fallback, prefix)
