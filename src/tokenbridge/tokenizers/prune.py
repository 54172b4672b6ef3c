"""Prune a BPE or Unigram vocabulary to the tokens a corpus needs, renumbering ids.

Always kept: the special tokens (not placeholders such as ``<unused17>``) and what spells any byte
(the 256 byte-level characters, or the byte tokens and ``<unk>`` of byte fallback).  Then tokens the
corpus uses, most used first, each with the tokens its merges are built from.  Every BPE merge that
fired on the corpus is kept, in its old order, and every merge that did not is dropped, so the corpus
encodes to the same token strings as before.  Remaining room up to ``keep`` goes to the unused tokens
with the lowest ids (the earliest, most general merges).
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..align.token_bytes import byte_alphabet_inverse
from ..errors import TokenbridgeError
from .files import backend, model_ids
from .style import BYTE_TOKENS, PLACEHOLDER, remap_post_processor


@dataclass(frozen=True)
class Pruned:
    data: dict  # the pruned tokenizer.json content
    old_ids: list[int]  # new id -> old id
    required: int  # tokens kept whatever the corpus
    needed: int  # tokens the corpus uses, with what their merges are built from


def prune_tokenizer(data: dict, texts: list[str], keep: int) -> Pruned:
    model = data["model"]
    if model["type"] not in ("BPE", "Unigram"):
        raise TokenbridgeError(f"prune supports BPE and Unigram tokenizers, not {model['type']}")
    tokenizer = backend(data)
    counts: Counter = Counter()
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        counts.update(encoding.ids)
    ids = model_ids(data)
    by_id = {i: token for token, i in ids.items()}
    added = {a["content"]: a for a in data.get("added_tokens", [])}

    required = {t for t, a in added.items() if a.get("special") and not PLACEHOLDER.fullmatch(t)}
    if model["type"] == "BPE":
        if model.get("byte_fallback"):
            required |= {t for t in BYTE_TOKENS if t in ids}
        elif any(t in byte_alphabet_inverse() for t in ids):
            required |= {t for t in byte_alphabet_inverse() if t in ids}
        else:
            required |= {t for t in model["vocab"] if len(t) == 1}
        if model.get("unk_token"):
            required.add(model["unk_token"])
        merges = _merge_pairs(model)
        parents: dict[str, list[str]] = defaultdict(list)
        for left, right in merges:
            parents[left + right] += [left, right]
    else:
        if model.get("byte_fallback"):
            required |= {t for t in BYTE_TOKENS if t in ids}
        required |= {piece for piece, _ in model["vocab"] if len(piece) == 1}
        if model.get("unk_id") is not None:
            required.add(model["vocab"][model["unk_id"]][0])
        parents = {}

    def closure(token: str) -> set[str]:
        found, stack = set(), [token]
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack += parents.get(current, [])
        return found

    used = sorted(counts, key=lambda i: (-counts[i], i))
    needed = set(required).union(*(closure(by_id[i]) for i in used)) if used else set(required)
    if keep < len(required):
        raise TokenbridgeError(f"--keep {keep} is too small: special tokens and byte coverage alone take "
                               f"{len(required)}")
    kept = set(required)
    for i in [*used, *sorted(set(by_id) - set(used))]:
        if len(kept) >= keep:
            break
        extra = closure(by_id[i]) - kept
        if len(kept) + len(extra) <= keep:
            kept |= extra
    old_ids = sorted(ids[t] for t in kept)
    new_id = {old: new for new, old in enumerate(old_ids)}
    result = copy.deepcopy(data)
    result["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in data.get("added_tokens", []) if a["content"] in kept]
    if model["type"] == "BPE":
        result["model"]["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if t in kept}
        result["model"]["merges"] = [[left, right] for left, right in merges
                                     if left in kept and right in kept and left + right in kept]
    else:
        result["model"]["vocab"] = [[p, s] for p, s in model["vocab"] if p in kept]
        if model.get("unk_id") is not None:
            result["model"]["unk_id"] = new_id[model["unk_id"]]
    result["post_processor"] = remap_post_processor(data.get("post_processor"), model_ids(result))
    return Pruned(result, old_ids, len(required), len(needed))


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """BPE merges as pairs, whichever of the two tokenizer.json spellings the file uses."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
