"""Principal component analysis of a matrix of vectors, for spaces whose dimensions differ (WECHSEL)."""

from __future__ import annotations

import torch

CHUNK = 65536  # rows per step when summing the covariance (a 2M x 300 fastText matrix is never copied to float64)


def pca(vectors: torch.Tensor, dim: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dim`` leading principal directions of the rows of ``vectors [n, d]``.

    Returns ``(components [d, dim], mean [d])`` (float64): the eigenvectors of the covariance of the
    centred rows with the largest eigenvalues, largest first, each signed so that its largest-magnitude
    entry is positive (a fixed choice of sign, so that the result is reproducible).
    """
    n, d = vectors.shape
    if not 1 <= dim <= d:
        raise ValueError(f"pca: cannot keep {dim} of {d} dimensions")
    mean = torch.zeros(d, dtype=torch.float64)
    for begin in range(0, n, chunk):
        mean += vectors[begin:begin + chunk].double().sum(0)
    mean /= max(n, 1)
    scatter = torch.zeros((d, d), dtype=torch.float64)
    for begin in range(0, n, chunk):
        centred = vectors[begin:begin + chunk].double() - mean
        scatter += centred.T @ centred
    _, eigenvectors = torch.linalg.eigh(scatter)  # ascending eigenvalues
    components = eigenvectors.flip(1)[:, :dim]
    rows = components.abs().argmax(0)
    components = components * torch.sign(components[rows, torch.arange(dim)])
    return components, mean


def project(vectors: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(vectors - mean) @ components`` in float64, returned as float32 ``[n, dim]``."""
    return ((vectors.double() - mean) @ components).float()
