"""Symmetrisation of two directional word alignments (Koehn et al. 2003: grow-diag-final and relatives).

eflomal, like fast_align, aligns in one direction at a time and leaves the symmetrisation to the
user (fast_align's ``atools``); this is that step, as a pure function over sets of links.
"""

from __future__ import annotations

HEURISTICS = ("intersection", "union", "grow-diag", "grow-diag-final", "grow-diag-final-and")
_NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


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
