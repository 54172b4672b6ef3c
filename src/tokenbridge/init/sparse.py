"""Sparse weightings over similarity scores, and chunked cosine nearest neighbours.

Weight-based methods (CLP, FOCUS, WECHSEL, ...) score every new token against the
overlapping tokens, then keep a few of them with weights that sum to 1:

* :func:`sparsemax` (Martins & Astudillo 2016): the Euclidean projection of the scores
  onto the probability simplex; exact zeros outside a small support.
  :func:`sparsemax_sparse` gives the same weights without sorting whole rows.
* :func:`topk_normalized`: the ``k`` best scores divided by their sum (CLP-Transfer).
* :func:`topk_softmax`: a softmax over the ``k`` best scores (WECHSEL).

:func:`cosine_topk` and :func:`cosine_sparsemax` score ``B`` queries against ``N`` keys
``chunk`` query rows at a time, so no score block is larger than ``chunk x N``.

Functions returning a selection give ``(weights, indices)`` (``(values, indices)`` for
:func:`cosine_topk`), like ``torch.topk``; all are pure, deterministic tensor functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def _threshold(sorted_desc: Tensor) -> tuple[Tensor, Tensor]:
    """Sparsemax threshold of rows sorted in descending order.

    ``sorted_desc [B, n]`` -> ``(tau [B], support [B])``: ``support`` is the largest ``j``
    with ``1 + j * z_(j) > z_(1) + ... + z_(j)`` (the condition holds exactly for
    ``j <= support``), ``tau = (z_(1) + ... + z_(support) - 1) / support``.
    """
    n = sorted_desc.shape[-1]
    cumsum = sorted_desc.cumsum(dim=-1)
    j = torch.arange(1, n + 1, dtype=sorted_desc.dtype, device=sorted_desc.device)
    support = (1 + j * sorted_desc > cumsum).sum(dim=-1).clamp(min=1)
    tau = (cumsum.gather(-1, (support - 1).unsqueeze(-1)).squeeze(-1) - 1) / support.to(sorted_desc.dtype)
    return tau, support


def sparsemax(scores: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax of ``scores`` along ``dim``: ``max(z - tau, 0)`` summing to 1 (same shape).

    Exact sort-based algorithm (Martins & Astudillo 2016, Algorithm 1), batched over every
    other dimension.  Scores must be finite.
    """
    moved = scores.movedim(dim, -1)
    sorted_desc = moved.sort(dim=-1, descending=True).values
    tau, _ = _threshold(sorted_desc)
    return (moved - tau.unsqueeze(-1)).clamp(min=0).movedim(-1, dim)


def sparsemax_sparse(scores: Tensor, start: int = 64) -> tuple[Tensor, Tensor]:
    """Sparsemax of each row of ``scores [B, n]`` as ``(weights [B, m], indices [B, m])``.

    Only the support is returned, best score first; ``m`` is the largest support size in
    the batch and shorter rows are padded with weight 0 and index -1.  The same weights as
    :func:`sparsemax`, found from the ``start`` best scores of each row: if the support
    is smaller than the candidates looked at, the next score is below the threshold and
    so is every later one; rows whose support fills the candidates look at twice as many.
    """
    rows, n = scores.shape
    if rows == 0 or n == 0:
        return scores.new_zeros((rows, 0)), torch.zeros((rows, 0), dtype=torch.int64, device=scores.device)
    groups = []  # (rows, weights [r, m], indices [r, m], support [r]) per round
    pending = torch.arange(rows, device=scores.device)
    m = min(max(int(start), 1), n)
    while pending.numel():
        rows_now = scores if pending.numel() == rows else scores[pending]
        values, indices = rows_now.topk(m, dim=-1, sorted=True)
        tau, support = _threshold(values)
        done = (support < m) | (m == n)
        weights = (values - tau.unsqueeze(-1)).clamp(min=0)
        groups.append((pending[done], weights[done], indices[done], support[done]))
        pending = pending[~done]
        m = min(2 * m, n)
    width = max(int(g[3].max()) for g in groups if g[3].numel())
    out_w = scores.new_zeros((rows, width))
    out_i = torch.full((rows, width), -1, dtype=torch.int64, device=scores.device)
    for group_rows, weights, indices, support in groups:
        cols = min(weights.shape[1], width)
        inside = torch.arange(cols, device=scores.device) < support.unsqueeze(-1)
        out_w[group_rows, :cols] = torch.where(inside, weights[:, :cols], 0.0)
        out_i[group_rows, :cols] = torch.where(inside, indices[:, :cols], -1)
    return out_w, out_i


def normalize_nonnegative(values: Tensor) -> Tensor:
    """``values [B, k]`` -> weights ``[B, k]``: ``max(v, 0)`` over the row's sum (uniform if all <= 0)."""
    clipped = values.clamp(min=0)
    total = clipped.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(values, 1.0 / max(values.shape[-1], 1))
    return torch.where(total > 0, clipped / total.clamp(min=torch.finfo(values.dtype).tiny), uniform)


def topk_normalized(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row of ``scores [B, n]``, weighted score / sum of the ``k`` scores.

    Returns ``(weights [B, k'], indices [B, k'])``, ``k' = min(k, n)``, best first.  Negative
    scores count as 0 (a convex combination); a row with no positive score is uniform.
    """
    values, indices = scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=True)
    return normalize_nonnegative(values), indices


def topk_softmax(scores: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row of ``scores [B, n]`` with ``softmax(score / temperature)`` over them.

    Returns ``(weights [B, k'], indices [B, k'])``, ``k' = min(k, n)``, best first.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    values, indices = scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=True)
    return torch.softmax(values / temperature, dim=-1), indices


def unit_rows(rows: Tensor) -> Tensor:
    """``rows [n, d]`` scaled to unit length (all-zero rows stay zero); float32."""
    rows = rows.float()
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


BLOCK_SCORES = 1 << 25  # at most this many similarities (128 MB) in one block, whatever ``chunk`` asks


def cosine_blocks(queries: Tensor, keys: Tensor, chunk: int = 1024, unit: bool = False
                  ) -> Iterator[tuple[int, Tensor]]:
    """Cosine similarities of ``queries [B, d]`` to ``keys [N, d]``, ``chunk`` query rows at a time
    (fewer when ``chunk x N`` would exceed ``BLOCK_SCORES``).

    Yields ``(begin, scores [rows, N])``.  An all-zero row has similarity 0
    to everything.  Every block is written into the same buffer (allocating a large block per
    step costs more than the product): use a block before asking for the next one.
    """
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} dimensions, keys {keys.shape[-1]}")
    chunk = max(1, min(int(chunk), BLOCK_SCORES // max(1, keys.shape[0])))
    unit_keys_t = (keys if unit else unit_rows(keys)).T  # mm reads the transpose in place: no copy
    buffer = torch.empty((min(chunk, queries.shape[0]), keys.shape[0]), dtype=torch.float32)
    for begin in range(0, queries.shape[0], chunk):
        block = queries[begin:begin + chunk] if unit else unit_rows(queries[begin:begin + chunk])
        yield begin, torch.mm(block, unit_keys_t, out=buffer[:block.shape[0]])


def cosine_topk(queries: Tensor, keys: Tensor, k: int, chunk: int = 1024, unit: bool = False
                ) -> tuple[Tensor, Tensor]:
    """The ``k`` keys most cosine-similar to each query.

    ``queries [B, d]``, ``keys [N, d]`` -> ``(values [B, k'], indices [B, k'])``, ``k' = min(k, N)``,
    most similar first.  Memory: one ``chunk x N`` score block at a time.  ``unit``: the rows are
    already unit length (or zero), so they are used as they are, without a normalised copy.
    """
    k = min(int(k), keys.shape[0])
    values = torch.empty((queries.shape[0], k), dtype=torch.float32)
    indices = torch.empty((queries.shape[0], k), dtype=torch.int64)
    for begin, block in cosine_blocks(queries, keys, chunk, unit):
        v, i = block.topk(k, dim=-1, sorted=True)
        values[begin:begin + block.shape[0]] = v
        indices[begin:begin + block.shape[0]] = i
    return values, indices


def cosine_sparsemax(queries: Tensor, keys: Tensor, chunk: int = 1024, start: int = 64) -> tuple[Tensor, Tensor]:
    """Sparsemax over each query's cosine similarities to ``keys``, support only.

    ``queries [B, d]``, ``keys [N, d]`` -> ``(weights [B, m], indices [B, m])`` as
    :func:`sparsemax_sparse` (padding: weight 0, index -1).  One ``chunk x N`` block at a time.
    """
    parts = [sparsemax_sparse(block, start) for _, block in cosine_blocks(queries, keys, chunk)]
    width = max((w.shape[1] for w, _ in parts), default=0)
    weights = torch.zeros((queries.shape[0], width), dtype=torch.float32)
    indices = torch.full((queries.shape[0], width), -1, dtype=torch.int64)
    begin = 0
    for w, i in parts:
        weights[begin:begin + w.shape[0], :w.shape[1]] = w
        indices[begin:begin + w.shape[0], :w.shape[1]] = i
        begin += w.shape[0]
    return weights, indices
