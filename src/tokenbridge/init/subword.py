"""``subword`` (Fast Vocabulary Transfer / ReTok): average the rows of the source pieces.

Each new target token's exact bytes are tokenized by the source tokenizer (byte
tokens for partial UTF-8, never decoded text) and the pieces' rows averaged.  For
output rows the first piece can be weighted more: predicting a token is mostly
predicting how it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..align.encode import ByteEncoder
from ..align.token_bytes import TokenInfo
from .mean import mean_rows
from .registry import MethodInputs, MethodResult, register


def piece_weights(count: int, first_weight: float) -> list[float]:
    """Normalised weights for ``count`` pieces, the first one ``first_weight`` times the others."""
    raw = [first_weight] + [1.0] * (count - 1)
    total = sum(raw)
    return [w / total for w in raw]


def combine_rows(source: torch.Tensor, ids: list[list[int]], weights: list[list[float]],
                 chunk: int = 4096) -> torch.Tensor:
    """``out[i] = sum_j weights[i][j] * source[ids[i][j]]`` -> ``[len(ids), d]``.

    Pieces are summed in order (``index_add_``), in chunks to bound memory; deterministic.
    """
    out = torch.zeros((len(ids), source.shape[1]), dtype=source.dtype)
    for begin in range(0, len(ids), chunk):
        block_ids = ids[begin:begin + chunk]
        rows = torch.tensor([i for i, row in enumerate(block_ids) for _ in row], dtype=torch.int64)
        if rows.numel() == 0:
            continue
        cols = torch.tensor([c for row in block_ids for c in row], dtype=torch.int64)
        vals = torch.tensor([w for row in weights[begin:begin + chunk] for w in row], dtype=source.dtype)
        out[begin:begin + len(block_ids)].index_add_(0, rows, source[cols] * vals[:, None])
    return out


@dataclass
class SubwordConfig:
    output_first_piece_weight: float = 1.0  # weight of the first piece relative to the others, output rows only


def subword_pieces(tokens: list[TokenInfo], encoder: ByteEncoder, first_weight: float = 1.0
                   ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Per token: the source pieces of its exact bytes, their weights, and whether it has none."""
    ids, weights, missing = [], [], []
    for info in tokens:
        pieces = encoder.encode(info.bytes)
        ids.append(pieces or [])
        weights.append(piece_weights(len(pieces), first_weight) if pieces else [])
        missing.append(not pieces)
    return ids, weights, missing


def fill_mean(rows: torch.Tensor, source: torch.Tensor, missing: list[bool]) -> torch.Tensor:
    """``rows[i]`` = the mean source row wherever ``missing[i]`` (in place; returns ``rows``)."""
    if any(missing):
        mean = mean_rows(source, 1)[0]
        for i, missed in enumerate(missing):
            if missed:
                rows[i] = mean
    return rows


@register("subword", SubwordConfig, "mean of the source pieces of the token's bytes (FVT / ReTok)")
def subword(inputs: MethodInputs, config: SubwordConfig) -> MethodResult:
    first = config.output_first_piece_weight if inputs.matrix == "output" else 1.0
    ids, weights, fallback = subword_pieces(inputs.new_tokens, inputs.source_encoder, first)
    rows = fill_mean(combine_rows(inputs.source_rows, ids, weights), inputs.source_rows, fallback)
    return MethodResult(rows, ids, weights, fallback)
