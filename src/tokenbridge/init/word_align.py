"""Statistical token alignment of a parallel corpus, and a parallel corpus from two translated documents.

Tools for Trans-Tokenization (``init/transtok.py``):

* :func:`align_corpus`: IBM Model 1 EM (Brown et al. 1993), then EM under fast_align's
  diagonal-favouring reparameterisation of Model 2 (Dyer et al. 2013), trained in both
  directions and symmetrised with Koehn et al.'s grow-diag-final heuristic (:func:`symmetrize`).
  :func:`count_links` tallies the links of the whole corpus per (target token, source token).
* :func:`parallel_from_documents`: pairs of paragraphs (and table rows) from two translations of
  one document that are parallel at document level only, by Gale & Church's (1993) length-based
  dynamic programme (:func:`align_paragraphs`).

Sentences are lists of token ids.  EM runs on one flat array of (target position, source
position) cells for the whole corpus, with ``numpy.bincount`` for the sums, so a few thousand
sentence pairs take seconds.  Everything is deterministic: no sampling, ties go to the lowest
position (NULL first), sets are walked in sorted order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

NULL = -1  # the source "token" of the NULL word in a TranslationTable
HEURISTICS = ("intersection", "union", "grow-diag", "grow-diag-final", "grow-diag-final-and")
_NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


# ---------------------------------------------------------------------------------------------
# Lexical translation model (one direction)


@dataclass
class _Cells:
    """Every (target position, source position or NULL) cell of one direction, grouped by target position.

    ``C`` cells, ``G`` target positions, ``P`` distinct (source token, target token) pairs.
    """

    pair: np.ndarray  # int64 [C]: index of the cell's (source token, target token) pair
    group: np.ndarray  # int64 [C]: global target position; a position's cells are contiguous
    source_pos: np.ndarray  # int64 [C]: 0 for NULL, i + 1 for source position i
    feature: np.ndarray  # float64 [C]: -|i/n - j/m| (1-based i, j), 0 for NULL
    starts: np.ndarray  # int64 [G]: first cell of each target position
    pair_source: np.ndarray  # int64 [P]: source token of each pair (``null_id`` for NULL)
    pair_target: np.ndarray  # int64 [P]: target token of each pair
    null_id: int
    sentence_of_group: np.ndarray  # int64 [G]: sentence pair of each target position
    position_of_group: np.ndarray  # int64 [G]: position of each target position in its sentence


def _flatten(sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    flat = np.fromiter((t for s in sentences for t in s), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.zeros(len(sentences), dtype=np.int64)
    if len(sentences) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    return flat, lengths, offsets


def _cells(source: list[list[int]], target: list[list[int]], use_null: bool) -> _Cells:
    """The cells of predicting ``target`` sentences from ``source`` sentences (pairs with an empty side skipped)."""
    if len(source) != len(target):
        raise ValueError(f"{len(source)} source sentences but {len(target)} target sentences")
    src_flat, src_len, src_off = _flatten(source)
    tgt_flat, tgt_len, tgt_off = _flatten(target)
    if np.any(src_flat < 0) or np.any(tgt_flat < 0):
        raise ValueError("token ids must be non-negative")
    keep = np.flatnonzero((src_len > 0) & (tgt_len > 0))
    n, m = src_len[keep], tgt_len[keep]
    width = n + (1 if use_null else 0)  # cells per target position
    sizes = m * width
    total = int(sizes.sum())
    sentence = np.repeat(np.arange(len(keep)), sizes)
    cell_off = np.zeros(len(keep), dtype=np.int64)
    if len(keep) > 1:
        np.cumsum(sizes[:-1], out=cell_off[1:])
    local = np.arange(total, dtype=np.int64) - cell_off[sentence]
    w = width[sentence]
    j = local // w  # target position in the sentence
    i = local % w + (0 if use_null else 1)  # 0: NULL, else source position + 1
    null_id = int(src_flat.max(initial=-1)) + 1
    src_index = np.clip(src_off[keep][sentence] + i - 1, 0, max(len(src_flat) - 1, 0))
    src_tok = np.where(i > 0, src_flat[src_index] if len(src_flat) else 0, null_id)
    tgt_tok = tgt_flat[tgt_off[keep][sentence] + j]
    n_c, m_c = n[sentence].astype(np.float64), m[sentence].astype(np.float64)
    feature = np.where(i > 0, -np.abs(i / n_c - (j + 1) / m_c), 0.0)
    group_off = np.zeros(len(keep), dtype=np.int64)
    if len(keep) > 1:
        np.cumsum(m[:-1], out=group_off[1:])
    group = group_off[sentence] + j
    target_vocab = int(tgt_flat.max(initial=-1)) + 1
    keys, pair = np.unique(src_tok * target_vocab + tgt_tok, return_inverse=True)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if total else np.zeros(0, dtype=np.int64)
    groups = len(starts)
    sentence_of_group = np.repeat(keep, m)
    position_of_group = np.arange(groups, dtype=np.int64) - np.repeat(group_off, m)
    return _Cells(pair.reshape(-1).astype(np.int64), group, i.astype(np.int64), feature, starts,
                  keys // max(target_vocab, 1), keys % max(target_vocab, 1), null_id, sentence_of_group,
                  position_of_group)


def _diagonal_prior(cells: _Cells, p_null: float, tension: float, use_null: bool) -> np.ndarray:
    """fast_align's p(a_j = i): ``p0`` for NULL, else ``(1 - p0) exp(tension * feature) / Z_j``."""
    weight = np.where(cells.source_pos > 0, np.exp(tension * cells.feature), 0.0)
    z = np.bincount(cells.group, weights=weight, minlength=len(cells.starts))
    prior = weight / z[cells.group]
    if use_null:
        prior = np.where(cells.source_pos > 0, (1.0 - p_null) * prior, p_null)
    return prior


def _em(cells: _Cells, model1_iterations: int, iterations: int, p_null: float, tension: float,
        use_null: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Translation probabilities ``t [P]`` after the EM iterations, and the diagonal prior used last."""
    t = np.ones(len(cells.pair_source), dtype=np.float64)
    prior = None
    schedule = [False] * model1_iterations + [True] * iterations
    for diagonal in schedule:
        if diagonal and prior is None:
            prior = _diagonal_prior(cells, p_null, tension, use_null)
        weight = t[cells.pair] * prior if diagonal else t[cells.pair]  # Model 1's uniform prior cancels
        denom = np.bincount(cells.group, weights=weight, minlength=len(cells.starts))
        posterior = weight / np.maximum(denom, 1e-300)[cells.group]  # guards only against underflow
        counts = np.bincount(cells.pair, weights=posterior, minlength=len(t))
        totals = np.bincount(cells.pair_source, weights=counts, minlength=cells.null_id + 1)
        t = counts / np.maximum(totals, 1e-300)[cells.pair_source]
    return t, prior


@dataclass
class TranslationTable:
    """Lexical translation probabilities ``t(target token | source token)`` over co-occurring pairs."""

    source: np.ndarray  # int64 [P]: source token, NULL (-1) for the NULL word
    target: np.ndarray  # int64 [P]
    prob: np.ndarray  # float64 [P]

    def to_dict(self) -> dict[tuple[int, int], float]:
        return {(int(s), int(t)): float(p) for s, t, p in zip(self.source, self.target, self.prob)}


def translation_table(source: list[list[int]], target: list[list[int]], model1_iterations: int = 5,
                      iterations: int = 0, p_null: float = 0.08, tension: float = 4.0,
                      use_null: bool = True) -> TranslationTable:
    """``t(target | source)`` after ``model1_iterations`` of IBM Model 1 EM, then ``iterations`` under
    fast_align's diagonal prior (NULL probability ``p_null``, diagonal ``tension``).

    Starts from uniform probabilities; sentence pairs with an empty side are skipped.
    """
    cells = _cells(source, target, use_null)
    t, _ = _em(cells, model1_iterations, iterations, p_null, tension, use_null)
    sources = np.where(cells.pair_source == cells.null_id, NULL, cells.pair_source)
    return TranslationTable(sources, cells.pair_target.copy(), t)


def viterbi(source: list[list[int]], target: list[list[int]], model1_iterations: int = 5, iterations: int = 5,
            p_null: float = 0.08, tension: float = 4.0, use_null: bool = True) -> list[list[int]]:
    """For every target position, the most probable source position (-1: NULL or an empty side).

    The positional prior of the last phase (diagonal when ``iterations`` > 0) scores the links.
    """
    cells = _cells(source, target, use_null)
    out = [[-1] * len(s) for s in target]
    if len(cells.pair) == 0:
        return out
    t, prior = _em(cells, model1_iterations, iterations, p_null, tension, use_null)
    if iterations > 0 and prior is None:
        prior = _diagonal_prior(cells, p_null, tension, use_null)
    score = t[cells.pair] * prior if iterations > 0 else t[cells.pair]
    best_score = np.maximum.reduceat(score, cells.starts)
    candidates = np.where(score == best_score[cells.group], np.arange(len(score)), len(score))
    best = np.minimum.reduceat(candidates, cells.starts)
    chosen = cells.source_pos[best] - 1
    for sentence, position, link in zip(cells.sentence_of_group.tolist(), cells.position_of_group.tolist(),
                                        chosen.tolist()):
        out[sentence][position] = link
    return out


# ---------------------------------------------------------------------------------------------
# Symmetrisation and link counts


def symmetrize(forward: set[tuple[int, int]], reverse: set[tuple[int, int]],
               heuristic: str = "grow-diag-final") -> set[tuple[int, int]]:
    """Combine two directional alignments of one sentence pair, each a set of (source pos, target pos).

    ``intersection``, ``union``, or Koehn's ``grow-diag`` (start from the intersection, add union points
    next to an alignment point, diagonals included, while one of their words is unaligned), then
    ``-final`` (add remaining directional points with an unaligned word) or ``-final-and`` (both
    words unaligned).
    """
    if heuristic not in HEURISTICS:
        raise ValueError(f"unknown symmetrisation {heuristic!r}; one of {', '.join(HEURISTICS)}")
    union = forward | reverse
    if heuristic == "union":
        return set(union)
    links = forward & reverse
    if heuristic == "intersection":
        return set(links)
    aligned_s = {i for i, _ in links}
    aligned_t = {j for _, j in links}
    added = True
    while added:
        added = False
        for i, j in sorted(links):
            for di, dj in _NEIGHBOURS:
                point = (i + di, j + dj)
                if point in union and point not in links and (
                        point[0] not in aligned_s or point[1] not in aligned_t):
                    links.add(point)
                    aligned_s.add(point[0])
                    aligned_t.add(point[1])
                    added = True
    if heuristic.startswith("grow-diag-final"):
        both = heuristic.endswith("-and")
        for direction in (forward, reverse):
            for i, j in sorted(direction):
                free_s, free_t = i not in aligned_s, j not in aligned_t
                if (free_s and free_t) if both else (free_s or free_t):
                    links.add((i, j))
                    aligned_s.add(i)
                    aligned_t.add(j)
    return links


def align_corpus(source: list[list[int]], target: list[list[int]], iterations: int = 5,
                 model1_iterations: int = 5, heuristic: str = "grow-diag-final", p_null: float = 0.08,
                 tension: float = 4.0) -> list[list[tuple[int, int]]]:
    """Symmetrised token alignments of a parallel corpus.

    ``source[k]``/``target[k]``: token ids of the k-th sentence pair.  Both directions are trained
    (``model1_iterations`` of Model 1 EM, then ``iterations`` with fast_align's diagonal prior), their
    Viterbi links combined by ``heuristic`` (:data:`HEURISTICS`).  Returns, per sentence pair, the
    sorted (source position, target position) links.
    """
    if heuristic not in HEURISTICS:
        raise ValueError(f"unknown symmetrisation {heuristic!r}; one of {', '.join(HEURISTICS)}")
    forward = viterbi(source, target, model1_iterations, iterations, p_null, tension)
    reverse = viterbi(target, source, model1_iterations, iterations, p_null, tension)
    out = []
    for fwd, rev in zip(forward, reverse):
        f = {(i, j) for j, i in enumerate(fwd) if i >= 0}
        r = {(i, j) for i, j in enumerate(rev) if j >= 0}
        out.append(sorted(symmetrize(f, r, heuristic)))
    return out


@dataclass
class LinkCounts:
    """How often each target token was linked to each source token, sorted by target, then count
    (descending), then source."""

    target: np.ndarray  # int64 [L]
    source: np.ndarray  # int64 [L]
    count: np.ndarray  # int64 [L]

    def by_target(self) -> dict[int, list[tuple[int, int]]]:
        """``{target token: [(source token, count), ...]}`` in the sorted order."""
        out: dict[int, list[tuple[int, int]]] = {}
        for t, s, c in zip(self.target.tolist(), self.source.tolist(), self.count.tolist()):
            out.setdefault(t, []).append((s, c))
        return out


def count_links(source: list[list[int]], target: list[list[int]],
                alignments: list[list[tuple[int, int]]]) -> LinkCounts:
    """Tally (target token, source token) over every link (source pos, target pos) of ``alignments``."""
    pairs_t: list[int] = []
    pairs_s: list[int] = []
    for src, tgt, links in zip(source, target, alignments):
        for i, j in links:
            pairs_t.append(tgt[j])
            pairs_s.append(src[i])
    if not pairs_t:
        empty = np.zeros(0, dtype=np.int64)
        return LinkCounts(empty, empty.copy(), empty.copy())
    both = np.stack([np.asarray(pairs_t, dtype=np.int64), np.asarray(pairs_s, dtype=np.int64)], axis=1)
    unique, counts = np.unique(both, axis=0, return_counts=True)
    order = np.lexsort((unique[:, 1], -counts, unique[:, 0]))
    return LinkCounts(unique[order, 0], unique[order, 1], counts[order].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Parallel corpus from translated documents

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
