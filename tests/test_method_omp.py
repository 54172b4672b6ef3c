"""``omp``: batched pursuit checked against least squares and a plain per-token OMP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_lm, make_model, read_tensors

import tokenbridge.init.omp  # noqa: F401 - registers the method
from tokenbridge import transplant
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.omp import batch_omp, principal_screen

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def reference_omp(x: np.ndarray, atoms: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Textbook OMP: pick the atom of largest |<residual, atom>|, refit by least squares, repeat."""
    chosen: list[int] = []
    residual, coef = x.copy(), np.zeros(0)
    for _ in range(k):
        scores = np.abs(atoms @ residual)
        scores[chosen] = -1.0
        chosen.append(int(np.argmax(scores)))
        coef = np.linalg.lstsq(atoms[chosen].T, x, rcond=None)[0]
        residual = x - atoms[chosen].T @ coef
    return chosen, coef


def used(indices: torch.Tensor, coefficients: torch.Tensor, row: int) -> tuple[list[int], np.ndarray]:
    keep = indices[row] >= 0
    return indices[row][keep].tolist(), coefficients[row][keep].double().numpy()


def test_all_atoms_give_the_least_squares_solution():
    rng = np.random.default_rng(0)
    atoms, targets = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    indices, coefficients = batch_omp(torch.tensor(targets), torch.tensor(atoms), k=5, pool=0)
    expect = torch.linalg.lstsq(torch.tensor(atoms).T, torch.tensor(targets).T).solution.T.numpy()
    for r in range(3):
        ids, coef = used(indices, coefficients, r)
        assert sorted(ids) == list(range(5))
        dense = np.zeros(5)
        dense[ids] = coef
        np.testing.assert_allclose(dense, expect[r], atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_sparse_combination_is_recovered(dtype):
    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(40, 16))
    x = 2.0 * atoms[4] - 1.5 * atoms[11] + 0.7 * atoms[30]
    for k in (3, 6):  # with k > 3 the pursuit stops once the residual has vanished
        indices, coefficients = batch_omp(torch.tensor(x[None], dtype=dtype), torch.tensor(atoms, dtype=dtype), k=k,
                                          pool=0)
        ids, coef = used(indices, coefficients, 0)
        assert sorted(ids) == [4, 11, 30]
        found = dict(zip(ids, coef))
        np.testing.assert_allclose([found[4], found[11], found[30]], [2.0, -1.5, 0.7],
                                   atol=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("k", [1, 4, 9, 16])
def test_matches_reference_omp_over_all_atoms(k):
    rng = np.random.default_rng(2)
    atoms, targets = rng.normal(size=(60, 16)), rng.normal(size=(25, 16))
    indices, coefficients = batch_omp(torch.tensor(targets), torch.tensor(atoms), k=k, pool=0, batch=7)
    single, single_coef = batch_omp(torch.tensor(targets, dtype=torch.float32),
                                    torch.tensor(atoms, dtype=torch.float32), k=k, pool=0, batch=4)
    for r in range(25):
        chosen, coef = reference_omp(targets[r], atoms, k)
        assert indices[r].tolist() == chosen  # same atoms in the same order
        np.testing.assert_allclose(coefficients[r].numpy(), coef, atol=1e-5)
        if k < 16:  # float32 stops once the residual is ~1e-3 of the target: 16 atoms span all 16 dimensions
            assert single[r].tolist() == chosen
            np.testing.assert_allclose(single_coef[r].numpy(), coef, atol=1e-4)


def principal_scores(x: np.ndarray, atoms: np.ndarray, rank: int) -> np.ndarray:
    """|<P(x - mean), P(atom - mean)>|, P removing the top ``rank`` right singular vectors of the centred atoms."""
    mean = atoms.mean(axis=0)
    _, _, vt = np.linalg.svd(atoms - mean, full_matrices=False)
    project = np.eye(atoms.shape[1]) - vt[:rank].T @ vt[:rank]
    return np.abs(((atoms - mean) @ project) @ (project @ (x - mean)))


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("k,pool", [(5, 12), (12, 12), (20, 12), (8, 30)])
def test_pool_is_reference_omp_over_the_screened_atoms(k, pool, rank):
    rng = np.random.default_rng(3)
    atoms = rng.normal(size=(80, 16)) + rng.normal(size=16)  # a shared offset, as embeddings have
    targets = rng.normal(size=(21, 16)) + atoms.mean(axis=0)
    how = principal_screen(torch.tensor(atoms), rank)
    assert (how is None) == (rank == 0)
    indices, coefficients = batch_omp(torch.tensor(targets), torch.tensor(atoms), k=k, pool=pool, batch=5, how=how)
    assert indices.shape == (21, min(k, pool))
    for r in range(21):
        scores = np.abs(atoms @ targets[r]) if rank == 0 else principal_scores(targets[r], atoms, rank)
        candidates = np.sort(np.argsort(-scores, kind="stable")[:pool])
        chosen, coef = reference_omp(targets[r], atoms[candidates], min(k, pool))
        assert indices[r].tolist() == candidates[chosen].tolist()
        np.testing.assert_allclose(coefficients[r].numpy(), coef, atol=1e-5)


@pytest.mark.parametrize("pool", [0, 6])
def test_degenerate_atoms_and_targets(pool):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(6, 10))
    atoms = np.concatenate([base, base[:3], np.zeros((2, 10))])  # atoms 6..8 repeat 0..2; 9, 10 are zero
    targets = np.stack([base[0] - 2 * base[1], np.zeros(10), base[2], rng.normal(size=10)])
    for dtype in (torch.float64, torch.float32):
        indices, coefficients = batch_omp(torch.tensor(targets, dtype=dtype), torch.tensor(atoms, dtype=dtype),
                                          k=8, pool=pool)
        assert torch.isfinite(coefficients).all()
        for r in range(4):
            ids, coef = used(indices, coefficients, r)
            assert len(ids) == len(set(ids))
            assert not {9, 10} & set(ids)  # a zero atom explains nothing
            bases = [i % 6 for i in ids]
            assert len(bases) == len(set(bases))  # never an atom and its copy
            assert all(i >= 0 for i in indices[r][:len(ids)]) and (indices[r][len(ids):] == -1).all()
            assert (coefficients[r][len(ids):] == 0).all()
            if r < 3 and pool == 0:
                np.testing.assert_allclose(coef @ atoms[ids], targets[r], atol=1e-4)
        assert used(indices, coefficients, 1)[0] == []  # nothing to explain in a zero target
        assert used(indices, coefficients, 2)[0] == [2]  # an atom itself (ties go to the lower index)
        if pool == 0:
            assert len(used(indices, coefficients, 3)[0]) == 6  # the 6 independent directions: all it can


def test_rows_from_codes_and_the_mean_when_nothing_was_coded():
    from tokenbridge.align.token_bytes import TokenInfo
    from tokenbridge.init.omp import OmpConfig, OmpState, omp
    from tokenbridge.init.registry import MethodInputs

    source = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    overlap_source = torch.tensor([7, 3, 12, 25])
    state = OmpState(torch.tensor([2, 9]), overlap_source)
    state.codes["input"] = (torch.tensor([[2, 0, -1], [-1, -1, -1]], dtype=torch.int32),
                            torch.tensor([[0.5, -2.0, 0.0], [0.0, 0.0, 0.0]]))
    tokens = [TokenInfo(2, "a", b"a"), TokenInfo(9, "b", b"b")]
    result = omp(MethodInputs(source, "input", tokens, None, None, torch.Generator(), 1.0, state),
                 OmpConfig(donor="unused"))
    assert result.source_ids == [[12, 7], []] and result.weights == [[0.5, -2.0], []]
    assert result.fallback == [False, True]
    torch.testing.assert_close(result.rows[0], 0.5 * source[12] - 2.0 * source[7])
    torch.testing.assert_close(result.rows[1], source.mean(dim=0))


@pytest.fixture(scope="module")
def donors(tmp_path_factory, tok_dirs):
    root = tmp_path_factory.mktemp("omp")
    return {"tied": make_model(root / "tied", "llama", tok_dirs["byte_level_de"], seed=1),
            "untied": make_model(root / "untied", "qwen2", tok_dirs["byte_level_de"], seed=2)}


def check_rows(record_rows, matrix_out, source, donor, copied, k):
    """Each placed row: reference OMP of the donor row over the overlap's donor rows, applied to the source."""
    overlap_t = np.array([t for t, _ in copied])
    overlap_s = np.array([s for _, s in copied])
    atoms, src = donor.double().numpy()[overlap_t], source.double().numpy()
    placed = [r for r in record_rows if r["how"] == "omp"]
    assert placed
    for row in placed:
        chosen, coef = reference_omp(donor[row["target_id"]].double().numpy(), atoms, k)
        assert row["source_ids"] == overlap_s[chosen].tolist()
        np.testing.assert_allclose(row["weights"], coef, atol=1e-4)
        expect = coef @ src[overlap_s[chosen]]
        np.testing.assert_allclose(matrix_out[row["target_id"]].double().numpy(), expect, atol=1e-4)
    return placed


def test_transplant_tied_source(models_dir, tok_dirs, donors, tmp_path):
    source = models_dir["llama"]
    options = {"donor": str(donors["tied"]), "k": "6", "pool": "0"}
    out, report = transplant(source, tok_dirs["byte_level_de"], tmp_path / "out", method="omp", options=options,
                             progress=False)
    load_lm(out)
    src, dst = read_tensors(source)[EMBED], read_tensors(out)[EMBED]
    for t, s in report.copied:
        assert torch.equal(dst[t], src[s])
    record = json.loads((out / "tokenbridge.json").read_text())
    placed = check_rows(record["initialised"]["input"], dst, src, read_tensors(donors["tied"])[EMBED],
                        report.copied, 6)
    assert len(placed) == report.counts["initialised"]
    assert record["method"] == "omp" and record["options"]["k"] == 6
    again, _ = transplant(source, tok_dirs["byte_level_de"], tmp_path / "again", method="omp", options=options,
                          progress=False)
    first, second = read_tensors(out), read_tensors(again)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (out / "tokenbridge.json").read_bytes() == (again / "tokenbridge.json").read_bytes()


def test_transplant_untied_source_uses_the_donor_head(models_dir, tok_dirs, donors, tmp_path):
    source = models_dir["qwen2"]
    target = tok_dirs["byte_level_de"]
    out, report = transplant(source, target, tmp_path / "untied", method="omp",
                             options={"donor": str(donors["untied"]), "k": "5", "pool": "0"}, progress=False)
    load_lm(out)
    src, dst, donor = read_tensors(source), read_tensors(out), read_tensors(donors["untied"])
    record = json.loads((out / "tokenbridge.json").read_text())
    check_rows(record["initialised"]["input"], dst[EMBED], src[EMBED], donor[EMBED], report.copied, 5)
    check_rows(record["initialised"]["output"], dst[HEAD], src[HEAD], donor[HEAD], report.copied, 5)
    # a tied donor codes the output rows in its input embeddings: the same code for both matrices
    out2, _ = transplant(source, target, tmp_path / "tied", method="omp",
                         options={"donor": str(donors["tied"]), "k": "5"}, progress=False)
    record2 = json.loads((out2 / "tokenbridge.json").read_text())
    inputs, outputs = record2["initialised"]["input"], record2["initialised"]["output"]
    assert [r["source_ids"] for r in inputs] == [r["source_ids"] for r in outputs]
    assert [r["weights"] for r in inputs] == [r["weights"] for r in outputs]
    assert any(r["how"] == "omp" for r in inputs)


def test_errors(models_dir, tok_dirs, donors, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    with pytest.raises(TokenbridgeError, match="-o donor="):
        transplant(source, target, tmp_path / "a", method="omp", progress=False)
    with pytest.raises(TokenbridgeError, match="target tokenizer"):  # a donor with another tokenizer
        transplant(source, target, tmp_path / "b", method="omp", options={"donor": str(source)}, progress=False)
    with pytest.raises(TokenbridgeError, match="k=0"):
        transplant(source, target, tmp_path / "c", method="omp", options={"donor": str(donors["tied"]), "k": "0"},
                   progress=False)
