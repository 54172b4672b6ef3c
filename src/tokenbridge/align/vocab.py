"""Match a target vocabulary against a source vocabulary.

* Ordinary tokens match by their exact bytes.  When several source tokens share
  the bytes (SentencePiece ``+`` and its byte fallback ``<0x2B>``), the one the
  source tokenizer actually produces for those bytes is copied; a target
  byte-fallback token takes the source's byte-fallback token where there is one.
* Special tokens have no bytes.  They match by content first, then by role
  (bos, eos, pad, unk, mask, cls, sep), then by chat role (``chat_roles.json``).
  Each special is its own key: two specials never collapse onto one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from .encode import ByteEncoder
from .token_bytes import TokenInfo, Vocabulary

ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")


@lru_cache(maxsize=1)
def chat_roles() -> dict[str, str]:
    """content -> chat role."""
    table = json.loads(files("tokenbridge.align").joinpath("chat_roles.json").read_text())
    return {content: role for role, contents in table.items() if not role.startswith("_") for content in contents}


def special_roles(tokenizer) -> dict[str, str]:
    """role -> content of the tokenizer's declared special tokens (bos, eos, ...)."""
    roles = {}
    for role in ROLES:
        value = getattr(tokenizer, f"{role}_token", None)
        if value:
            roles[role] = str(value)
    return roles


@dataclass(frozen=True, slots=True)
class Match:
    """A target row copied from a source row, and why."""

    target_id: int
    source_id: int
    how: str  # "bytes", "special:content", "special:role:<role>", "special:chat:<role>"


@dataclass
class Alignment:
    source: Vocabulary
    target: Vocabulary
    matches: list[Match]
    new: list[int]  # ordinary target tokens the method initialises
    unmatched_special: list[int]  # special target tokens with no counterpart in the source

    def copied_from(self) -> dict[int, int]:
        return {m.target_id: m.source_id for m in self.matches}


def _produced(group: list[TokenInfo], encoder: ByteEncoder) -> TokenInfo:
    """Among tokens with the same bytes, the one the tokenizer produces for them."""
    ids = encoder.encode(group[0].bytes)
    if ids is not None and len(ids) == 1:
        for info in group:
            if info.id == ids[0]:
                return info
    # Not decidable by encoding: prefer plain over byte fallback, vocabulary over added, low ids.
    return min(group, key=lambda t: (t.byte_fallback, t.added, t.id))


def _groups(vocab: Vocabulary) -> dict[bytes, list[TokenInfo]]:
    groups: dict[bytes, list[TokenInfo]] = {}
    for info in vocab.tokens:
        if not info.special and info.bytes:
            groups.setdefault(info.bytes, []).append(info)
    return groups


def align(source: Vocabulary, target: Vocabulary, source_tokenizer=None, target_tokenizer=None,
          source_encoder: ByteEncoder | None = None) -> Alignment:
    source_encoder = source_encoder or ByteEncoder(source)
    source_groups = _groups(source)
    target_groups = _groups(target)
    target_encoder = None
    source_pick: dict[bytes, TokenInfo] = {}

    def source_for(b: bytes) -> TokenInfo:
        if b not in source_pick:
            group = source_groups[b]
            source_pick[b] = group[0] if len(group) == 1 else _produced(group, source_encoder)
        return source_pick[b]

    matches: list[Match] = []
    new: list[int] = []
    unmatched_special: list[int] = []
    source_roles = special_roles(source_tokenizer) if source_tokenizer is not None else {}
    target_roles = special_roles(target_tokenizer) if target_tokenizer is not None else {}
    source_added = {t.token: t for t in source.tokens if t.special or t.added}
    source_by_chat_role = {}
    for info in source.tokens:
        role = chat_roles().get(info.token)
        if (info.special or info.added) and role and role not in source_by_chat_role:
            source_by_chat_role[role] = info
    target_preferred: dict[bytes, int] = {}

    for info in target.tokens:
        if info.special:
            match = _match_special(info, source_added, source_roles, target_roles, source_by_chat_role)
            if match is None:
                unmatched_special.append(info.id)
            else:
                matches.append(match)
            continue
        if not info.bytes or info.bytes not in source_groups:
            new.append(info.id)
            continue
        candidates = source_groups[info.bytes]
        chosen = None
        if info.byte_fallback:
            chosen = next((c for c in candidates if c.byte_fallback), None)
        elif sum(not t.byte_fallback for t in target_groups[info.bytes]) > 1:
            if info.bytes not in target_preferred:
                if target_encoder is None:
                    target_encoder = ByteEncoder(target)
                target_preferred[info.bytes] = _produced(target_groups[info.bytes], target_encoder).id
            if target_preferred[info.bytes] != info.id:
                # A target duplicate its tokenizer never produces: keep its own twin if the source has one.
                chosen = next((c for c in candidates if c.token == info.token and c.added == info.added), None)
        if chosen is None:
            chosen = source_for(info.bytes)
        matches.append(Match(info.id, chosen.id, "bytes"))
    return Alignment(source, target, matches, new, unmatched_special)


def _match_special(info: TokenInfo, source_added: dict[str, TokenInfo], source_roles: dict[str, str],
                   target_roles: dict[str, str], source_by_chat_role: dict[str, TokenInfo]) -> Match | None:
    same = source_added.get(info.token)
    if same is not None:
        return Match(info.id, same.id, "special:content")
    for role, content in target_roles.items():
        if content == info.token and role in source_roles and source_roles[role] in source_added:
            return Match(info.id, source_added[source_roles[role]].id, f"special:role:{role}")
    role = chat_roles().get(info.token)
    if role and role in source_by_chat_role:
        return Match(info.id, source_by_chat_role[role].id, f"special:chat:{role}")
    return None
