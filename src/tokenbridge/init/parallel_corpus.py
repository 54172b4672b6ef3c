"""A parallel corpus from two translations of one document (Gale & Church's length-based alignment).

:func:`parallel_from_documents` pairs the paragraphs (and table rows) of two translations of one
document that are parallel at document level only, by Gale & Church's (1993) length-based
dynamic programme (:func:`align_paragraphs`), so that ``transtok`` can align the words of each pair.
Everything is deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import pairwise

# Gale & Church (1993): prior of each bead (source segments, target segments) and the variance
# of target characters per source character.
BEAD_PRIORS = {(1, 1): 0.89, (1, 0): 0.0099, (0, 1): 0.0099, (2, 1): 0.089, (1, 2): 0.089, (2, 2): 0.011}
LENGTH_VARIANCE = 6.8


def bead_cost(source_chars: int, target_chars: int, ratio: float, prior: float) -> float:
    """``-log(prior * P(|delta|))`` with ``delta = (l2 - c l1) / sqrt(s2 (l1 + l2/c) / 2)``."""
    mean = (source_chars + target_chars / ratio) / 2.0
    delta = (target_chars - ratio * source_chars) / math.sqrt(LENGTH_VARIANCE * max(mean, 1.0))
    tail = math.erfc(abs(delta) / math.sqrt(2.0))  # two-sided: 2 (1 - Phi(|delta|))
    return -math.log(prior) - math.log(max(tail, 1e-300))


_MARKER = re.compile(r"^(?:[*+#$>-]|\d+(?:\.\d+)*\.)(?=\s)")
_ANCHOR_CHARS = re.compile(r"[0-9/_$=<>|(){}\[\]~@]")


def anchors(segment: str) -> Counter:
    """Strings a translation keeps as they are: a leading bullet or section number, numbers, paths,
    commands (words with a digit or one of ``/_$=<>|(){}[]~@``), as a multiset."""
    found: Counter = Counter()
    marker = _MARKER.match(segment)
    if marker:
        found["^" + marker.group(0)] += 1
    for word in segment.split():
        word = word.strip("\"'“”„,.;:!?")
        if word and _ANCHOR_CHARS.search(word):
            found[word] += 1
    return found


def unmatched_anchors(source: Counter, target: Counter) -> int:
    """How many anchors of one side the other side lacks (multisets)."""
    if not source or not target:
        return sum(source.values()) + sum(target.values())
    small, large = (source, target) if len(source) <= len(target) else (target, source)
    shared = sum(min(c, large.get(k, 0)) for k, c in small.items())
    return sum(source.values()) + sum(target.values()) - 2 * shared


def align_paragraphs(source: list[str], target: list[str], band: int | None = None,
                     ratio: float | None = None, anchor_weight: float = 1.0) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Gale-Church alignment of two sequences of segments (paragraphs, sentences) by character length.

    Returns the beads in order: (source indices, target indices), 1-1, 1-0, 0-1, 2-1, 1-2 or 2-2
    (:data:`BEAD_PRIORS`).  A bead costs ``-log(prior * P(|delta|))`` (:func:`bead_cost`) plus, for beads
    ``anchor_weight`` for every one of its :func:`anchors` (numbers, commands, bullets that translators
    keep verbatim) that the other side of the bead lacks (0 disables it); every path pays for an
    anchor nobody matches, so only pairings that match anchors gain.  Lengths alone mistake a short
    bullet or a reworded heading for half of a 2-1 bead.  ``ratio``: expected target characters per source character
    (default: the documents' totals).  ``band``: how far (in segments) the path may leave the line
    from (0, 0) to (n, m) (default ``max(50, 2 |n - m|)``), keeping the programme O((n + m) band).
    """
    n, m = len(source), len(target)
    ls = [len(s) for s in source]
    lt = [len(t) for t in target]
    if ratio is None:
        ratio = (sum(lt) / sum(ls)) if sum(ls) and sum(lt) else 1.0
    if band is None:
        band = max(50, 2 * abs(n - m))
    # anchors of the one or two segments ending at each index, for beads of that size
    src_anchors = [anchors(s) for s in source] if anchor_weight else []
    tgt_anchors = [anchors(t) for t in target] if anchor_weight else []
    src_bead = {1: src_anchors, 2: [Counter()] + [a + b for a, b in pairwise(src_anchors)],
                0: [Counter()] * (n + 1)}
    tgt_bead = {1: tgt_anchors, 2: [Counter()] + [a + b for a, b in pairwise(tgt_anchors)],
                0: [Counter()] * (m + 1)}
    inf = float("inf")
    cost: dict[tuple[int, int], float] = {(0, 0): 0.0}
    back: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(n + 1):
        centre = i * m / n if n else 0.0
        lo, hi = max(0, int(centre) - band), min(m, int(centre) + band + 1)
        for j in range(lo, hi + 1):
            if i == 0 and j == 0:
                continue
            best, move = inf, None
            for (di, dj), prior in BEAD_PRIORS.items():
                if i - di < 0 or j - dj < 0:
                    continue
                prev = cost.get((i - di, j - dj))
                if prev is None:
                    continue
                c = prev + bead_cost(sum(ls[i - di:i]), sum(lt[j - dj:j]), ratio, prior)
                if anchor_weight:
                    a = src_bead[di][i - 1] if di else src_bead[0][0]
                    b = tgt_bead[dj][j - 1] if dj else tgt_bead[0][0]
                    c += anchor_weight * unmatched_anchors(a, b)
                if c < best:
                    best, move = c, (di, dj)
            if move is not None:
                cost[(i, j)] = best
                back[(i, j)] = move
    if (n, m) not in cost:
        raise ValueError(f"no alignment within a band of {band} segments; pass a wider band")
    beads = []
    i, j = n, m
    while (i, j) != (0, 0):
        di, dj = back[(i, j)]
        beads.append((tuple(range(i - di, i)), tuple(range(j - dj, j))))
        i, j = i - di, j - dj
    beads.reverse()
    return beads


_BLANK = re.compile(r"\n[ \t\u00a0]*\n")
_RULE = re.compile(r"^\s*[+|][-=+|]*[+|]\s*$")  # a table border or row separator
_TABLE_LINE = re.compile(r"^\s*[+|].*[+|]\s*$")


def _squash(text: str) -> str:
    return " ".join(text.split())


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks of ``text``, lines kept, empty blocks dropped."""
    return [block.strip("\n") for block in _BLANK.split(text) if block.strip()]


def is_table(block: str) -> bool:
    """An ASCII table as the Debian Reference's text version draws them (``+---+`` / ``|...|``)."""
    lines = [line for line in block.split("\n") if line.strip()]
    return len(lines) >= 2 and all(_TABLE_LINE.match(line) for line in lines) and any(
        _RULE.match(line) for line in lines)


def table_rows(block: str) -> list[str]:
    """The rows of an ASCII table, each row's wrapped cell lines joined column by column (`` | `` between)."""
    rows: list[list[str]] = [[]]
    for line in block.split("\n"):
        if not line.strip():
            continue
        if _RULE.match(line):
            if rows[-1]:
                rows.append([])
            continue
        rows[-1].append(line.strip())
    out = []
    for lines in rows:
        if not lines:
            continue
        columns: list[list[str]] = []
        for line in lines:
            cells = line.strip("|").split("|")
            for k, cell in enumerate(cells):
                if k >= len(columns):
                    columns.append([])
                columns[k].append(cell)
        text = " | ".join(_squash(" ".join(column)) for column in columns if _squash(" ".join(column)))
        if text:
            out.append(text)
    return out


def parallel_from_documents(source_text: str, target_text: str) -> tuple[list[str], list[str]]:
    """Line-aligned segment pairs from two translations of one document.

    The documents are cut into blank-line separated paragraphs and aligned with
    :func:`align_paragraphs`; a pair of ASCII tables is aligned again row by row.  Beads with one
    side empty (an untranslated or extra paragraph) are dropped; 2-1, 1-2 and 2-2 beads are joined
    into one line per side.  Whitespace inside a segment is squashed to single spaces.
    """
    source_blocks, target_blocks = split_paragraphs(source_text), split_paragraphs(target_text)
    beads = align_paragraphs([_squash(b) for b in source_blocks], [_squash(b) for b in target_blocks])
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    for s_ids, t_ids in beads:
        if not s_ids or not t_ids:
            continue
        if len(s_ids) == len(t_ids) == 1 and is_table(source_blocks[s_ids[0]]) and is_table(target_blocks[t_ids[0]]):
            s_rows, t_rows = table_rows(source_blocks[s_ids[0]]), table_rows(target_blocks[t_ids[0]])
            for rs, rt in align_paragraphs(s_rows, t_rows):
                if rs and rt:
                    src_lines.append(" ".join(s_rows[k] for k in rs))
                    tgt_lines.append(" ".join(t_rows[k] for k in rt))
            continue
        src_lines.append(" ".join(_squash(source_blocks[k]) for k in s_ids))
        tgt_lines.append(" ".join(_squash(target_blocks[k]) for k in t_ids))
    return src_lines, tgt_lines
