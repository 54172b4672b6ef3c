"""Sparse weightings and chunked cosine top-k, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenbridge.init.sparse import (
    cosine_sparsemax,
    cosine_topk,
    sparsemax,
    sparsemax_sparse,
    topk_normalized,
    topk_softmax,
)


def simplex_projection_bisection(z: np.ndarray, steps: int = 200) -> np.ndarray:
    """Euclidean projection of ``z`` onto the simplex: find tau with sum(max(z - tau, 0)) = 1 by bisection."""
    low, high = z.max() - 1.0, z.max()  # f(low) >= 1, f(high) = 0
    for _ in range(steps):
        mid = (low + high) / 2
        if np.maximum(z - mid, 0).sum() > 1:
            low = mid
        else:
            high = mid
    return np.maximum(z - (low + high) / 2, 0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = np.linalg.norm(a, axis=1, keepdims=True)
    bn = np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T) / np.maximum(an, 1e-12) / np.maximum(bn, 1e-12).T


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_sparsemax_is_the_simplex_projection(scale):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 17)) * scale
    got = sparsemax(torch.tensor(z)).numpy()
    want = np.stack([simplex_projection_bisection(row) for row in z])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert (got >= 0).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_sparsemax_other_dim_and_float32():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 9, 3)).astype(np.float32)
    got = sparsemax(torch.tensor(z), dim=1).numpy()
    for i in range(5):
        for j in range(3):
            np.testing.assert_allclose(got[i, :, j], simplex_projection_bisection(z[i, :, j].astype(np.float64)),
                                       atol=1e-6)


def test_sparsemax_easy_cases():
    # a clear winner: one-hot, like softmax at low temperature
    assert torch.equal(sparsemax(torch.tensor([[0.0, 3.0, 1.0]])), torch.tensor([[0.0, 1.0, 0.0]]))
    # all equal: uniform, like softmax
    torch.testing.assert_close(sparsemax(torch.full((2, 4), 0.7)), torch.full((2, 4), 0.25))
    # two tied leaders far above the rest share the mass
    torch.testing.assert_close(sparsemax(torch.tensor([[5.0, -1.0, 5.0, 0.0]])),
                               torch.tensor([[0.5, 0.0, 0.5, 0.0]]))
    # two coordinates: the closed form clip((t + 1) / 2, 0, 1)
    for t in [-3.0, -0.4, 0.0, 0.3, 0.99, 2.0]:
        first = min(max((t + 1) / 2, 0.0), 1.0)
        torch.testing.assert_close(sparsemax(torch.tensor([t, 0.0], dtype=torch.float64)),
                                   torch.tensor([first, 1 - first], dtype=torch.float64))
    # shift invariance, as softmax
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sparsemax(z + 10.0), sparsemax(z))


@pytest.mark.parametrize("start", [1, 2, 5, 64])
def test_sparsemax_sparse_matches_dense(start):
    gen = torch.Generator().manual_seed(3)
    # some rows nearly flat (large support, several doubling rounds), some peaked
    scores = torch.cat([torch.randn(20, 50, generator=gen, dtype=torch.float64) * 0.01,
                        torch.randn(20, 50, generator=gen, dtype=torch.float64) * 3])
    weights, indices = sparsemax_sparse(scores, start=start)
    want = np.stack([simplex_projection_bisection(row) for row in scores.numpy()])
    dense = np.zeros_like(want)
    for r in range(scores.shape[0]):
        for w, i in zip(weights[r].tolist(), indices[r].tolist()):
            if i >= 0:
                assert w > 0
                dense[r, i] += w
            else:
                assert w == 0
        kept = [i for i in indices[r].tolist() if i >= 0]
        assert kept == sorted(kept, key=lambda c: -scores[r, c].item())  # best first
    np.testing.assert_allclose(dense, want, atol=1e-9)
    assert (np.count_nonzero(want > 1e-12, axis=1) <= weights.shape[1]).all()


def test_topk_normalized_and_softmax():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(7, 30))
    weights, indices = topk_normalized(torch.tensor(z), 5)
    order = np.argsort(-z, axis=1)[:, :5]
    np.testing.assert_array_equal(indices.numpy(), order)
    top = np.take_along_axis(z, order, axis=1)
    clipped = np.maximum(top, 0)
    np.testing.assert_allclose(weights.numpy(), clipped / clipped.sum(axis=1, keepdims=True))
    # all-negative row: uniform
    w, _ = topk_normalized(torch.tensor([[-1.0, -2.0, -3.0]]), 2)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))
    weights, indices = topk_softmax(torch.tensor(z), 4, temperature=0.3)
    order = np.argsort(-z, axis=1)[:, :4]
    top = np.take_along_axis(z, order, axis=1) / 0.3
    expect = np.exp(top - top.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(indices.numpy(), order)
    np.testing.assert_allclose(weights.numpy(), expect / expect.sum(axis=1, keepdims=True))
    assert topk_softmax(torch.tensor(z), 100)[0].shape == (7, 30)  # k larger than n


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_cosine_topk_matches_full_computation(chunk):
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    keys = rng.normal(size=(41, 8)).astype(np.float32) * rng.uniform(0.1, 10, size=(41, 1)).astype(np.float32)
    queries[3] = 0  # a zero row: similarity 0 to everything
    values, indices = cosine_topk(torch.tensor(queries), torch.tensor(keys), 6, chunk=chunk)
    full = cosine_matrix(queries.astype(np.float64), keys.astype(np.float64))
    for r in range(23):
        if r == 3:
            assert torch.equal(values[r], torch.zeros(6))
            continue
        order = np.argsort(-full[r])[:6]
        np.testing.assert_array_equal(indices[r].numpy(), order)
        np.testing.assert_allclose(values[r].numpy(), full[r, order], atol=1e-5)
    values, indices = cosine_topk(torch.tensor(queries), torch.tensor(keys[:4]), 10, chunk=chunk)
    assert values.shape == (23, 4)


def test_cosine_sparsemax_matches_dense_sparsemax_of_full_similarities():
    rng = np.random.default_rng(6)
    queries = rng.normal(size=(30, 5))
    keys = rng.normal(size=(60, 5))
    weights, indices = cosine_sparsemax(torch.tensor(queries), torch.tensor(keys), chunk=8, start=2)
    full = cosine_matrix(queries, keys)
    for r in range(30):
        want = simplex_projection_bisection(full[r])
        got = np.zeros(60)
        keep = indices[r] >= 0
        got[indices[r][keep].numpy()] = weights[r][keep].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
