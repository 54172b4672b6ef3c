"""``mean``: every new row is the mean of the source rows (as ``resize_token_embeddings``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import MethodInputs, MethodResult, register


def mean_rows(source: torch.Tensor, count: int) -> torch.Tensor:
    """``source [V, d]`` -> ``[count, d]``, each row the mean of ``source``'s rows."""
    return source.mean(dim=0, keepdim=True).expand(count, -1).clone()


@dataclass
class MeanConfig:
    """No options."""


@register("mean", MeanConfig, "mean of all source rows")
def mean(inputs: MethodInputs, config: MeanConfig) -> MethodResult:
    count = len(inputs.new_tokens)
    return MethodResult(mean_rows(inputs.source_rows, count), [[] for _ in range(count)],
                        [[] for _ in range(count)], [False] * count)
