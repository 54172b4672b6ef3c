"""``clp`` (CLP-Transfer): weights and rows checked against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_lm, make_model, read_tensors

import tokenbridge.init.clp  # noqa: F401 - registers the method
from tokenbridge import transplant
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.clp import clp_weights

EMBED = "model.embed_tokens.weight"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T) / np.linalg.norm(a, axis=1, keepdims=True) / np.linalg.norm(b, axis=1, keepdims=True).T


def projection_on_simplex(z: np.ndarray) -> np.ndarray:
    """Sparsemax by bisection on tau: sum(max(z - tau, 0)) = 1."""
    low, high = z.max() - 1.0, z.max()
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.maximum(z - mid, 0).sum() > 1 else (low, mid)
    return np.maximum(z - (low + high) / 2, 0)


def test_topk_weights_are_normalised_similarities_of_the_k_nearest():
    rng = np.random.default_rng(0)
    new, overlap = rng.normal(size=(13, 6)), rng.normal(size=(50, 6))
    indices, weights = clp_weights(torch.tensor(new, dtype=torch.float32), torch.tensor(overlap, dtype=torch.float32),
                                   "topk", k=4, chunk=5)
    sims = cosine(new, overlap)
    for r in range(13):
        order = np.argsort(-sims[r])[:4]
        assert indices[r].tolist() == order.tolist()
        top = np.maximum(sims[r, order], 0)
        np.testing.assert_allclose(weights[r].numpy(), top / top.sum(), rtol=1e-5)


def test_sparsemax_weights_are_sparsemax_of_all_similarities():
    rng = np.random.default_rng(1)
    new, overlap = rng.normal(size=(9, 4)), rng.normal(size=(30, 4))
    indices, weights = clp_weights(torch.tensor(new), torch.tensor(overlap), "sparsemax", chunk=4)
    sims = cosine(new, overlap)
    for r in range(9):
        dense = np.zeros(30)
        keep = indices[r] >= 0
        dense[indices[r][keep].numpy()] = weights[r][keep].numpy()
        np.testing.assert_allclose(dense, projection_on_simplex(sims[r]), atol=1e-5)


@pytest.fixture(scope="module")
def helper(tmp_path_factory, tok_dirs):
    return make_model(tmp_path_factory.mktemp("clp") / "helper", "llama", tok_dirs["byte_level_de"], seed=1)


@pytest.mark.parametrize("weighting", ["topk", "sparsemax"])
def test_transplant_rows_are_the_direct_combination(models_dir, tok_dirs, helper, tmp_path, weighting):
    source = models_dir["llama"]
    options = {"donor": str(helper), "weighting": weighting, "k": "3"}
    out, report = transplant(source, tok_dirs["byte_level_de"], tmp_path / "out", method="clp", options=options,
                             progress=False)
    load_lm(out)
    src, dst, hlp = read_tensors(source)[EMBED], read_tensors(out)[EMBED], read_tensors(helper)[EMBED]
    copied = report.copied
    for t, s in copied:
        assert torch.equal(dst[t], src[s])
    overlap_t = np.array([t for t, _ in copied])
    overlap_s = np.array([s for _, s in copied])
    record = json.loads((out / "tokenbridge.json").read_text())
    rows = record["initialised"]["input"]
    placed = [r for r in rows if r["how"] == "clp"]
    assert len(placed) == report.counts["initialised"] > 0
    H = hlp.double().numpy()
    S = src.double().numpy()
    for row in placed:
        sims = cosine(H[row["target_id"]][None], H[overlap_t])[0]
        if weighting == "topk":
            order = np.argsort(-sims)[:3]
            w = np.maximum(sims[order], 0)
            w = w / w.sum()
        else:
            dense = projection_on_simplex(sims)
            order = np.argsort(-dense)[:np.count_nonzero(dense > 1e-9)]
            w = dense[order]
        assert row["source_ids"] == overlap_s[order].tolist()
        np.testing.assert_allclose(row["weights"], w, atol=1e-5)
        expect = (w[:, None] * S[overlap_s[order]]).sum(axis=0)
        np.testing.assert_allclose(dst[row["target_id"]].double().numpy(), expect, atol=1e-5)
    # same seed -> the same files
    again, _ = transplant(source, tok_dirs["byte_level_de"], tmp_path / "again", method="clp", options=options,
                          progress=False)
    first, second = read_tensors(out), read_tensors(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "tokenbridge.json").read_bytes() == (again / "tokenbridge.json").read_bytes()


def test_errors(models_dir, tok_dirs, helper, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    with pytest.raises(TokenbridgeError, match="donor"):
        transplant(source, target, tmp_path / "a", method="clp", progress=False)
    with pytest.raises(TokenbridgeError, match="target tokenizer"):  # a helper with another tokenizer
        transplant(source, target, tmp_path / "b", method="clp", options={"donor": str(source)}, progress=False)
    with pytest.raises(TokenbridgeError, match="weighting"):
        transplant(source, target, tmp_path / "c", method="clp",
                   options={"donor": str(helper), "weighting": "softmax"}, progress=False)
    with pytest.raises(TokenbridgeError, match="no such"):
        transplant(source, target, tmp_path / "d", method="clp", options={"donor": str(tmp_path / "nothing")},
                   progress=False)
