"""``focus`` (FOCUS): sparsemax weights over fastText token vectors, checked against a direct computation."""

from __future__ import annotations

import json

import numpy as np
from gensim.models.fasttext import ft_ngram_hashes
import pytest
import torch
from conftest import corpus, load_lm, read_tensors
from transformers import AutoTokenizer

import tokenbridge.init.focus  # noqa: F401 - registers the method
from tokenbridge import transplant
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.focus import focus_weights

EMBED = "model.embed_tokens.weight"
OPTIONS = {"dim": "16", "epochs": "3", "min_count": "3", "window": "3", "buckets": "5000"}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T) / np.linalg.norm(a, axis=1, keepdims=True) / np.linalg.norm(b, axis=1, keepdims=True).T


def sparsemax_by_support_size(z: np.ndarray) -> np.ndarray:
    """Brute force: the support size s whose tau = (sum of the s largest - 1) / s keeps exactly those s above tau."""
    ordered = np.sort(z)[::-1]
    for s in range(1, len(z) + 1):
        tau = (ordered[:s].sum() - 1) / s
        if ordered[s - 1] > tau and (s == len(z) or ordered[s] <= tau):
            return np.maximum(z - tau, 0)
    raise AssertionError("no support size fits")


def test_focus_weights_are_sparsemax_of_cosine_similarities():
    rng = np.random.default_rng(0)
    new, overlap = rng.normal(size=(25, 8)), rng.normal(size=(70, 8))
    indices, weights = focus_weights(torch.tensor(new), torch.tensor(overlap), chunk=6)
    sims = cosine(new, overlap)
    for r in range(25):
        want = sparsemax_by_support_size(sims[r])
        keep = indices[r] >= 0
        got = np.zeros(70)
        got[indices[r][keep].numpy()] = weights[r][keep].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert abs(weights[r].sum().item() - 1) < 1e-5


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("focus") / "de.txt"
    path.write_text(corpus("de", 20000, 6000), encoding="utf-8")
    return path


def test_transplant_rows_are_the_direct_combination(models_dir, tok_dirs, corpus_file, tmp_path):
    from tokenbridge.init.static_vectors import train_vectors

    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    options = {"corpus": str(corpus_file), **OPTIONS}
    out, report = transplant(source, target, tmp_path / "out", method="focus", options=options, seed=3,
                             progress=False)
    load_lm(out)
    src, dst = read_tensors(source)[EMBED], read_tensors(out)[EMBED]
    for t, s in report.copied:
        assert torch.equal(dst[t], src[s])

    # the auxiliary fastText vectors, trained directly on the same token strings with the same seed
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    lines = [line for line in corpus_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    sequences = [tokenizer.convert_ids_to_tokens(tokenizer(line, add_special_tokens=False)["input_ids"])
                 for line in lines]
    vectors = train_vectors(sequences, dim=16, window=3, negatives=10, epochs=3, min_count=3, seed=3,
                            skipgram=False, buckets=5000)
    own = vectors.index()
    seen = {token for sequence in sequences for token in sequence}

    # an unseen token's vector, computed here from gensim's hashing: the mean of those of its character
    # n-gram rows that some vocabulary word contains (the others were never trained), when they are at
    # least half of its n-grams
    wv = vectors.ngrams
    trained = {int(h) for word in vectors.words for h in ft_ngram_hashes(word, wv.min_n, wv.max_n, wv.bucket)}

    def aux(target_id):
        """(vector, from n-grams) of a target token; None when it has neither a row nor enough seen n-grams."""
        token = tokenizer.convert_ids_to_tokens(target_id)
        if token in own:
            return vectors.vectors[own[token]].double().numpy(), False
        hashes = [int(h) for h in ft_ngram_hashes(token, wv.min_n, wv.max_n, wv.bucket)]
        known = [h for h in hashes if h in trained]
        if not known or len(known) < 0.5 * len(hashes):
            return None
        return np.asarray(wv.vectors_ngrams[known], dtype=np.float64).mean(axis=0), True

    overlap = [(t, s) for t, s in report.copied if tokenizer.convert_ids_to_tokens(t) in own]
    A = np.stack([aux(t)[0] for t, _ in overlap])
    S = src.double().numpy()

    rows = json.loads((out / "tokenbridge.json").read_text())["initialised"]["input"]
    assert len(rows) == report.counts["initialised"]
    assert {r["how"] for r in rows} == {"focus", "focus:ngrams", "focus:fallback:subword"}
    unseen = [r for r in rows if tokenizer.convert_ids_to_tokens(r["target_id"]) not in seen]
    assert any(r["how"] == "focus:ngrams" for r in unseen)  # absent from the corpus: n-grams
    for row in rows:
        if aux(row["target_id"]) is None:
            assert row["how"] == "focus:fallback:subword"
            continue
        vector, from_ngrams = aux(row["target_id"])
        assert from_ngrams == (row["how"] == "focus:ngrams")
        w = sparsemax_by_support_size(cosine(vector[None], A)[0])
        support = np.flatnonzero(w > 1e-7)
        got = dict(zip(row["source_ids"], row["weights"]))
        assert sorted(got) == sorted(overlap[i][1] for i in support)
        for i in support:
            assert abs(got[overlap[i][1]] - w[i]) < 1e-4
        expect = sum(w[i] * S[overlap[i][1]] for i in support)
        np.testing.assert_allclose(dst[row["target_id"]].double().numpy(), expect, atol=1e-4)

    again, _ = transplant(source, target, tmp_path / "again", method="focus", options=options, seed=3,
                          progress=False)
    first, second = read_tensors(out), read_tensors(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "tokenbridge.json").read_bytes() == (again / "tokenbridge.json").read_bytes()


def test_without_ngrams_unseen_tokens_fall_back(models_dir, tok_dirs, corpus_file, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    options = {"corpus": str(corpus_file), **OPTIONS, "max_n": "0"}
    out, _ = transplant(source, target, tmp_path / "out", method="focus", options=options, seed=3, progress=False)
    rows = json.loads((out / "tokenbridge.json").read_text())["initialised"]["input"]
    assert {r["how"] for r in rows} == {"focus", "focus:fallback:subword"}


def test_errors(models_dir, tok_dirs, corpus_file, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    with pytest.raises(TokenbridgeError, match="corpus"):
        transplant(source, target, tmp_path / "a", method="focus", progress=False)
    with pytest.raises(TokenbridgeError, match="no such file"):
        transplant(source, target, tmp_path / "b", method="focus", options={"corpus": str(tmp_path / "none.txt")},
                   progress=False)
    with pytest.raises(TokenbridgeError, match="min_count"):
        transplant(source, target, tmp_path / "c", method="focus",
                   options={"corpus": str(corpus_file), "min_count": "1000000"}, progress=False)
    with pytest.raises(TokenbridgeError, match="dim"):
        transplant(source, target, tmp_path / "d", method="focus", options={"corpus": str(corpus_file), "dim": "0"},
                   progress=False)
    with pytest.raises(TokenbridgeError, match="max_n"):
        transplant(source, target, tmp_path / "e", method="focus",
                   options={"corpus": str(corpus_file), "min_n": "4", "max_n": "2"}, progress=False)
