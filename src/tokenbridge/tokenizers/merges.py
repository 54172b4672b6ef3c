"""Continue BPE training from an existing segmentation: the most frequent allowed pair, merged, repeatedly.

This is the step the ``tokenizers`` trainers cannot take: start from sequences that an existing
tokenizer already produced (SuperBPE's second stage, vocabulary extension) and learn merges under a
rule about which pairs may merge (bounded words per token, no byte-fallback pieces).
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Merge:
    left: str
    right: str
    count: int  # occurrences merged when it was learned: the tokens it saved on the training text

    @property
    def token(self) -> str:
        return self.left + self.right


def learn_merges(sequences: dict[tuple[str, ...], int], n_merges: int, allowed: Callable[[str, str], bool],
                 known: set[str], min_count: int = 2, progress=None) -> list[Merge]:
    """Up to ``n_merges`` merges, most frequent first, over ``sequences`` (token strings -> count).

    A pair merges only if ``allowed(left, right)`` and its string is not in ``known`` (nor learned
    already).  Ties go to the pair that sorts first, so the result is deterministic.  Occurrences are
    merged left to right without overlap, as a BPE tokenizer applies a merge.  Stops early when no
    allowed pair occurs ``min_count`` times.
    """
    words = [list(seq) for seq in sequences]
    counts = list(sequences.values())
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    verdict: dict[tuple[str, str], bool] = {}
    known = set(known)

    def ok(pair: tuple[str, str]) -> bool:
        answer = verdict.get(pair)
        if answer is None:
            answer = verdict[pair] = allowed(*pair) and pair[0] + pair[1] not in known
        return answer

    def count_pairs(index: int, sign: int, changed: dict) -> None:
        word = words[index]
        for pair in itertools.pairwise(word):
            if ok(pair):
                pair_count[pair] += sign * counts[index]
                if sign > 0:
                    where[pair].add(index)
                changed[pair] = changed.get(pair, 0) + sign * counts[index]

    for index in range(len(words)):
        count_pairs(index, 1, {})
    heap = [(-c, pair) for pair, c in pair_count.items() if c >= min_count]
    heapq.heapify(heap)
    # Invariant: every pair counted at least min_count times has a heap entry with its current count;
    # entries whose count has since changed are stale and skipped when popped.
    merges: list[Merge] = []
    while heap and len(merges) < n_merges:
        negative, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if -negative != count or not ok(pair):
            continue  # a stale entry; the pair's current count is (or was) pushed separately
        if count < min_count:
            break
        merged = pair[0] + pair[1]
        merges.append(Merge(pair[0], pair[1], count))
        known.add(merged)
        verdict[pair] = False
        changed: dict = {}
        for index in sorted(where.pop(pair, ())):
            word = words[index]
            if len(word) < 2:
                continue
            count_pairs(index, -1, changed)
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[index] = out
            count_pairs(index, 1, changed)
        pair_count.pop(pair, None)
        for other, delta in changed.items():  # only pairs whose count moved need a new entry
            if delta and other != pair and pair_count.get(other, 0) >= min_count:
                heapq.heappush(heap, (-pair_count[other], other))
        if len(heap) > 4 * len(pair_count) + 4096:  # drop the stale entries (the pops stay the same)
            heap = [(-c, p) for p, c in pair_count.items() if c >= min_count and ok(p)]
            heapq.heapify(heap)
        if progress is not None:
            progress.update(1)
    return merges
