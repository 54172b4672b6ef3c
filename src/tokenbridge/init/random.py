"""``random``: normal rows with the source rows' per-dimension mean and std, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import MethodInputs, MethodResult, register


def random_rows(source: torch.Tensor, count: int, generator: torch.Generator, std_scale: float = 1.0) -> torch.Tensor:
    """``source [V, d]`` -> ``[count, d]`` drawn from N(mean_j, (std_scale * std_j)^2) per dimension j."""
    mean = source.mean(dim=0)
    std = source.std(dim=0) * std_scale
    noise = torch.randn((count, source.shape[1]), generator=generator, dtype=torch.float32)
    return noise.mul_(std).add_(mean)


@dataclass
class RandomConfig:
    std_scale: float = 1.0  # multiply the per-dimension std by this


@register("random", RandomConfig, "normal with the source rows' per-dimension mean and std")
def random(inputs: MethodInputs, config: RandomConfig) -> MethodResult:
    count = len(inputs.new_tokens)
    rows = random_rows(inputs.source_rows, count, inputs.generator, config.std_scale)
    return MethodResult(rows, [[] for _ in range(count)], [[] for _ in range(count)], [False] * count)
