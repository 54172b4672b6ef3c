"""Extend a BPE or Unigram vocabulary with the tokens a corpus needs most, keeping every existing id.

New tokens are learned on the corpus as the source tokenizer segments it: first the characters that
fall back to byte tokens (most bytes saved first), then merges of adjacent tokens, most frequent first.
BPE merges go after the existing ones, so text in which no new merge applies encodes as before.  A
Unigram piece gets a score that makes it win over the two pieces it joins; a segmentation that does
not use a new piece stays the best one, so such text also encodes as before.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from ..errors import TokenbridgeError
from .files import backend, model_ids
from .merges import learn_merges
from .style import BYTE_TOKENS, METASPACE_PATTERN

WORDS = re.compile(METASPACE_PATTERN)


def is_metaspace(data: dict) -> bool:
    return bool(data["model"].get("byte_fallback")) or "▁" in str(data.get("normalizer"))


def corpus_pieces(data: dict, texts: list[str]) -> Counter:
    """The pre-tokenized pieces of ``texts`` with their counts (metaspace pieces cut before each ``▁``)."""
    tokenizer = backend(data)
    pieces: Counter = Counter()
    split_words = is_metaspace(data)
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
        found = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)] if tokenizer.pre_tokenizer \
            else [normalized]
        for piece in found:
            pieces.update(WORDS.findall(piece) if split_words else [piece])
    return pieces


def _fixed_tokens(data: dict) -> set[str]:
    """Tokens that never merge: byte tokens, the unknown token, added tokens."""
    model = data["model"]
    fixed = set(BYTE_TOKENS) | {a["content"] for a in data.get("added_tokens", [])}
    if model["type"] == "BPE" and model.get("unk_token"):
        fixed.add(model["unk_token"])
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        fixed.add(model["vocab"][model["unk_id"]][0])
    return fixed


def extend_tokenizer(data: dict, texts: list[str], add: int, min_frequency: int = 2,
                     progress: bool = False) -> tuple[dict, list[str]]:
    """``data`` (tokenizer.json content) with up to ``add`` new tokens appended; returns it and them."""
    import copy

    model_type = data["model"]["type"]
    if model_type not in ("BPE", "Unigram"):
        raise TokenbridgeError(f"extend supports BPE and Unigram tokenizers, not {model_type}")
    if add < 1:
        raise TokenbridgeError(f"--add must be at least 1, not {add}")
    data = copy.deepcopy(data)
    model = data["model"]
    ids = model_ids(data)
    if model_type == "Unigram" and any(i >= len(model["vocab"]) for i in ids.values()):
        raise TokenbridgeError("extend: this Unigram tokenizer has added tokens after its vocabulary, so new "
                               "pieces cannot take the next ids")
    pieces = corpus_pieces(data, texts)
    new: list[tuple[str, str | None, str | None, int]] = []  # token, left, right, count
    if model.get("byte_fallback"):
        chars = Counter()
        for piece, count in pieces.items():
            for char in piece:
                if char not in ids:
                    chars[char] += count
        ranked = sorted(((count * (len(c.encode()) - 1), c) for c, count in chars.items()
                         if count >= min_frequency and len(c.encode()) > 1), key=lambda x: (-x[0], x[1]))
        new += [(c, None, None, chars[c]) for _, c in ranked[:add]]
        _append(data, new, total=sum(count * len(piece) for piece, count in pieces.items()))
    tokenizer = backend(data)
    sequences: Counter = Counter()
    for piece, count in pieces.items():
        sequences[tuple(token.value for token in tokenizer.model.tokenize(piece))] += count
    fixed = _fixed_tokens(data)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=add - len(new), desc="extend", unit="merge")
    merges = learn_merges(dict(sequences), add - len(new), lambda a, b: a not in fixed and b not in fixed,
                          set(model_ids(data)), min_frequency, bar)
    if bar is not None:
        bar.close()
    learned = [(m.token, m.left, m.right, m.count) for m in merges]
    _append(data, learned, total=sum(c * len(s) for s, c in sequences.items()))
    return data, [token for token, *_ in new + learned]


def _append(data: dict, tokens: list[tuple[str, str | None, str | None, int]], total: int) -> None:
    """Give ``tokens`` the next ids; a Unigram piece scores its share of ``total`` symbols."""
    model = data["model"]
    if model["type"] == "BPE":
        next_id = max(model_ids(data).values()) + 1
        for token, left, right, _ in tokens:
            if token in model["vocab"]:
                continue
            model["vocab"][token] = next_id
            next_id += 1
            if left is not None:
                model["merges"].append([left, right])
        return
    scores = {piece: score for piece, score in model["vocab"]}
    total = max(total, 1)
    for token, left, right, count in tokens:
        if token in scores:
            continue
        score = math.log(max(count, 1) / total)
        if left is not None:
            score = max(score, scores[left] + scores[right] + 1e-3)
        scores[token] = score
        model["vocab"].append([token, score])
