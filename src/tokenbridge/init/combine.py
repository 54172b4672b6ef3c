"""Rows as weighted sums of source rows, decided once per transplant.

Most methods (CLP, FOCUS, TokenAdapt, WECHSEL, Trans-Tokenization) decide, for every new
target token, a short list of source tokens and weights in some auxiliary space, and the
same combination then builds input and output rows.  Their ``prepare`` step returns a
:class:`Combination`; :func:`apply_combination` turns it into a :class:`MethodResult`.
Tokens the combination does not cover get the ``subword`` rows and are labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .registry import MethodInputs, MethodResult
from .subword import combine_rows, fill_mean, subword_pieces


@dataclass
class Combination:
    """target id -> (source ids, weights) for the new tokens a method could place."""

    ids: dict[int, list[int]] = field(default_factory=dict)
    weights: dict[int, list[float]] = field(default_factory=dict)
    how: dict[int, str] = field(default_factory=dict)  # optional per-token label, default the method's name

    def add(self, target_id: int, source_ids: list[int], weights: list[float], how: str | None = None) -> None:
        if len(source_ids) != len(weights) or not source_ids:
            raise ValueError(f"target {target_id}: {len(source_ids)} ids and {len(weights)} weights")
        self.ids[target_id] = [int(i) for i in source_ids]
        self.weights[target_id] = [float(w) for w in weights]
        if how:
            self.how[target_id] = how

    def __len__(self) -> int:
        return len(self.ids)


def combination_from_weights(new_ids: list[int], positions: torch.Tensor, weights: torch.Tensor,
                             overlap_source: torch.Tensor) -> Combination:
    """``new_ids[i]`` -> the source ids of its overlap ``positions[i]`` (-1 = unused) with positive weight."""
    combination = Combination()
    source_ids = overlap_source[positions.clamp(min=0)]
    keep = (positions >= 0) & (weights > 0)
    for target_id, ids, w, mask in zip(new_ids, source_ids.tolist(), weights.tolist(), keep.tolist()):
        kept = [(i, x) for i, x, m in zip(ids, w, mask) if m]
        if kept:
            combination.add(target_id, [i for i, _ in kept], [x for _, x in kept])
    return combination


def combine_over_overlap(new_ids: list[int], weigh: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
                         overlap_source: torch.Tensor, desc: str, progress: bool, step: int) -> Combination:
    """A :class:`Combination` from ``weigh(ids) -> (overlap positions [n, m], weights [n, m])``, ``step``
    new tokens at a time (bounding the per-step tensors), with a progress bar."""
    combination = Combination()
    bar = tqdm(total=len(new_ids), desc=desc, unit="tok", mininterval=1.0, disable=not progress or not new_ids)
    for begin in range(0, len(new_ids), step):
        ids = new_ids[begin:begin + step]
        positions, weights = weigh(ids)
        part = combination_from_weights(ids, positions, weights, overlap_source)
        combination.ids.update(part.ids)
        combination.weights.update(part.weights)
        bar.update(len(ids))
    bar.close()
    return combination


def apply_combination(inputs: MethodInputs, combination: Combination, method: str) -> MethodResult:
    """Rows for ``inputs.new_tokens``; tokens outside ``combination`` fall back to ``subword``."""
    outside = [info for info in inputs.new_tokens if info.id not in combination.ids]
    pieces = dict(zip((info.id for info in outside), zip(*subword_pieces(outside, inputs.source_encoder))))
    ids, weights, how, fallback = [], [], [], []
    for info in inputs.new_tokens:
        if info.id in combination.ids:
            ids.append(combination.ids[info.id])
            weights.append(combination.weights[info.id])
            how.append(combination.how.get(info.id, method))
            fallback.append(False)
        else:
            piece_ids, piece_w, missing = pieces[info.id]
            ids.append(piece_ids)
            weights.append(piece_w)
            how.append("fallback:mean" if missing else f"{method}:fallback:subword")
            fallback.append(missing)
    rows = fill_mean(combine_rows(inputs.source_rows, ids, weights), inputs.source_rows, fallback)
    return MethodResult(rows, ids, weights, fallback, how)
