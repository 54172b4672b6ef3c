"""``wechsel``: Procrustes, PCA, token vectors and top-k softmax weights against direct computations; a transplant
with fastText vectors in both formats (.bin with n-grams, .vec)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPORA, load_lm, read_tensors
from transformers import AutoTokenizer

import tokenbridge.init.wechsel  # noqa: F401 - registers the method
from tokenbridge import transplant
from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.pca import pca, project
from tokenbridge.init.static_vectors import (
    WordVectors,
    read_vectors,
    split_words,
    train_vectors,
    write_vectors,
)
from tokenbridge.init.wechsel import (
    WechselConfig,
    dictionary_rows,
    dictionary_space,
    nearest_sources,
    procrustes,
    read_dictionary,
    token_vectors,
    wechsel_combination,
    word_pieces,
    word_weights,
)

DICTIONARY = Path(__file__).parent / "data" / "en-de.dict.txt"


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn((d, d), generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------------------------- Procrustes


def test_procrustes_recovers_a_known_rotation():
    generator = torch.Generator().manual_seed(0)
    rotation = random_rotation(16, generator)
    source = torch.randn((200, 16), generator=generator, dtype=torch.float64)
    found = procrustes(source, source @ rotation)
    assert torch.allclose(found, rotation, atol=1e-10)
    assert torch.allclose(found.T @ found, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_procrustes_is_the_polar_factor():
    """Noisy pairs: ``W`` equals the orthogonal polar factor ``M (M^T M)^(-1/2)`` of ``M = X^T Y`` (computed
    by an eigendecomposition), and no random orthogonal matrix fits better."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((300, 8), generator=generator, dtype=torch.float64)
    y = x @ random_rotation(8, generator) + 0.5 * torch.randn((300, 8), generator=generator, dtype=torch.float64)
    m = x.T @ y
    values, vectors = torch.linalg.eigh(m.T @ m)
    reference = m @ vectors @ torch.diag(values ** -0.5) @ vectors.T
    found = procrustes(x, y)
    assert torch.allclose(found, reference, atol=1e-10)
    best = torch.linalg.norm(x @ found - y)
    assert all(torch.linalg.norm(x @ random_rotation(8, generator) - y) > best for _ in range(50))


# ---------------------------------------------------------------------------------------------- PCA


def test_pca_matches_numpy_svd():
    """The components are the leading right singular vectors of the centred matrix (numpy), up to sign."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn((500, 10), generator=generator) @ torch.diag(torch.linspace(3.0, 0.1, 10)) + 2.0
    components, mean = pca(x, 4, chunk=37)
    centred = x.double().numpy() - x.double().numpy().mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean.numpy(), x.double().numpy().mean(0), atol=1e-12)
    for k in range(4):
        reference = vt[k] * np.sign(vt[k][np.argmax(np.abs(vt[k]))])  # the same sign rule
        np.testing.assert_allclose(components[:, k].numpy(), reference, atol=1e-8)
    reduced = project(x, components, mean).double().numpy()
    np.testing.assert_allclose((reduced ** 2).sum(0), singular[:4] ** 2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- token vectors


def test_token_vectors_match_a_direct_loop():
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn((30, 5), generator=generator)
    weights = torch.rand(30, generator=generator) + 0.1
    pieces = [torch.randint(0, 12, (int(torch.randint(1, 5, (1,), generator=generator)),),
                            generator=generator).tolist() for _ in range(30)]
    rows, found = token_vectors(pieces, vectors, weights, 15)
    for token in range(15):
        words = [i for i, p in enumerate(pieces) if token in p]  # a repeated piece counts once
        assert bool(found[token]) == bool(words)
        if not words:
            assert not rows[token].any()
            continue
        expected = sum(float(weights[i]) * vectors[i].double() for i in words) / sum(float(weights[i]) for i in words)
        assert torch.allclose(rows[token].double(), expected, atol=1e-6)


def test_word_weights():
    wv = WordVectors(["a", "b", "c"], torch.zeros((3, 2)), [0, 0, 0])
    assert word_weights(wv, "frequency").tolist() == [1.0, 0.5, 1 / 3]  # Zipf from the file order
    assert word_weights(WordVectors(["a", "b"], torch.zeros((2, 2)), [9, 3]), "frequency").tolist() == [9.0, 3.0]
    assert word_weights(wv, "uniform").tolist() == [1.0, 1.0, 1.0]


def test_word_pieces_find_word_start_and_bare_forms(tok_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level"]))
    vocab = vocabulary(tokenizer)
    words = ["package", "Debian", "the"]
    for word, ids in zip(words, word_pieces(vocab, words)):
        expected = set(tokenizer(word, add_special_tokens=False)["input_ids"])
        expected |= set(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        assert set(ids) == expected
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("\u0120") for i in word_pieces(vocab, ["the"])[0])


# ---------------------------------------------------------------------------------------------- neighbours


def test_nearest_sources_match_a_per_token_computation():
    generator = torch.Generator().manual_seed(3)
    target, source = torch.randn((7, 6), generator=generator), torch.randn((40, 6), generator=generator)
    indices, weights, sims = nearest_sources(target, source, k=10, temperature=0.1, chunk=3)
    for row in range(7):
        t = target[row].tolist()
        cosines = []
        for j in range(40):
            s = source[j].tolist()
            dot = sum(a * b for a, b in zip(t, s))
            cosines.append((dot / math.sqrt(sum(a * a for a in t)) / math.sqrt(sum(b * b for b in s)), j))
        top = sorted(cosines, reverse=True)[:10]
        exps = [math.exp((c - top[0][0]) / 0.1) for c, _ in top]
        assert indices[row].tolist() == [j for _, j in top]
        assert sims[row].tolist() == pytest.approx([c for c, _ in top], abs=1e-6)
        assert weights[row].tolist() == pytest.approx([e / sum(exps) for e in exps], abs=1e-6)
    few, few_weights, _ = nearest_sources(target, source[:4], k=10, temperature=1.0)
    assert few.shape == (7, 4) and torch.allclose(few_weights.sum(1), torch.ones(7))


# ---------------------------------------------------------------------------------------------- dictionary


def test_read_dictionary(tmp_path):
    pairs = read_dictionary(DICTIONARY)
    assert 40 <= len(pairs) <= 80 and ("package", "Paket") in pairs
    path = tmp_path / "d.txt"
    path.write_text("ice cream\tEis\n\nhouse  Haus\n", encoding="utf-8")
    assert read_dictionary(path) == [("ice cream", "Eis"), ("house", "Haus")]
    path.write_text("a b\nc d e\n", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="line 2"):
        read_dictionary(path)
    with pytest.raises(TokenbridgeError, match="no such file"):
        read_dictionary(tmp_path / "none.txt")


def test_dictionary_rows_try_lower_and_title_case():
    source = {"house": 0, "House": 1, "the": 2}
    target = {"Haus": 5, "der": 6}
    pairs = [("House", "haus"), ("the", "der"), ("the", "der"), ("cat", "Katze")]
    assert dictionary_rows(pairs, source, target) == ([1, 0, 2], [5, 5, 6])


# ---------------------------------------------------------------------------------------------- with real text


@pytest.fixture(scope="session")
def debref_vectors(tmp_path_factory):
    """Small vectors of the English and German Debian Reference, trained once with gensim: word vectors
    (no n-grams) of both written as .vec, and German fastText vectors with n-grams written as .bin
    ("de_bin").  On 60k words, n-grams make the two spaces much less alike (the held-out test below: median
    rank 0.30 with n-grams, 0.017 without), so the alignment test uses the plain ones."""
    root = tmp_path_factory.mktemp("wechsel_vectors")
    out = {}
    for key, lang, suffix, max_n in (("en", "en", "vec", 0), ("de", "de", "vec", 0), ("de_bin", "de", "bin", 6)):
        text = (CORPORA / f"debref.{lang}.txt").read_text(encoding="utf-8")
        wv = train_vectors(split_words(text), dim=32, epochs=4, seed=0, max_n=max_n, buckets=20000)
        out[key] = (write_vectors(root / f"{lang}.{suffix}", wv), wv)
    return out


def test_dictionary_words_missing_from_a_bin_get_ngram_vectors(debref_vectors):
    path, trained = debref_vectors["de_bin"]
    de = read_vectors(path)
    words = ["Paket", "Paketverwaltungsx", "Konfigurationsdateix"]
    matrix, index, extra = dictionary_space(de, words)
    assert extra >= 2 and matrix.shape == (len(de) + extra, de.dim)
    assert torch.equal(matrix[:len(de)], de.vectors) and index["Paket"] == de.index()["Paket"]
    for word in words[1:]:
        assert index[word] >= len(de)
        assert torch.allclose(matrix[index[word]], torch.from_numpy(trained.model.wv.get_vector(word)), atol=1e-6)
    plain = read_vectors(debref_vectors["en"][0])  # a .vec: no n-grams, nothing added
    assert dictionary_space(plain, ["packagesx"])[2] == 0


def test_alignment_on_identical_strings_translates_held_out_words(debref_vectors):
    """Procrustes fitted only on strings that occur in both corpora (numbers, commands, names) puts the
    hand-written pairs' translations far above chance among all German words."""
    en, de = debref_vectors["en"][1], debref_vectors["de"][1]
    en_index, de_index = en.index(), de.index()
    shared = [w for w in en.words if w in de_index]
    held_out = [(a, b) for a, b in read_dictionary(DICTIONARY) if a in en_index and b in de_index and a != b]
    held_out_words = {a for a, _ in held_out}
    seed = [(w, w) for w in shared if w not in held_out_words]
    rows = dictionary_rows(seed, en_index, de_index)
    rotation = procrustes(en.vectors[rows[0]], de.vectors[rows[1]])
    german = torch.nn.functional.normalize(de.vectors, dim=1)
    ranks = []
    for a, b in held_out:
        sims = german @ torch.nn.functional.normalize(en.vectors[en_index[a]] @ rotation, dim=0)
        ranks.append(int((sims > sims[de_index[b]]).sum()) / len(de))
    # A random map gives each rank uniform on [0, 1): the median of ~70 such ranks is 0.5 +- 0.06.
    assert sorted(ranks)[len(ranks) // 2] < 0.1, sorted(ranks)  # measured: 0.011


def test_transplant_end_to_end(models_dir, tok_dirs, debref_vectors, tmp_path):
    source = models_dir["llama"]
    options = {"source_vectors": str(debref_vectors["en"][0]), "target_vectors": str(debref_vectors["de_bin"][0]),
               "dictionary": str(DICTIONARY)}
    out, report = transplant(source, tok_dirs["byte_level_de"], tmp_path / "a", method="wechsel",
                             options=options, seed=3, progress=False)
    before = read_tensors(source)["model.embed_tokens.weight"]
    after = read_tensors(out)["model.embed_tokens.weight"]
    for target_id, source_id in report.copied:
        assert torch.equal(after[target_id], before[source_id])
    rows = json.loads((out / "tokenbridge.json").read_text())["initialised"]["input"]
    placed = [r for r in rows if r["how"] == "wechsel"]
    assert len(placed) > 0.5 * len([r for r in rows if r["how"].startswith("wechsel")])
    source_vocab = vocabulary(AutoTokenizer.from_pretrained(str(source)))
    for row in placed:
        assert len(row["source_ids"]) == 10 and len(set(row["source_ids"])) == 10
        assert sum(row["weights"]) == pytest.approx(1.0, abs=1e-4)
        assert row["weights"] == sorted(row["weights"], reverse=True)
        assert not any(source_vocab.tokens[i].special for i in row["source_ids"])
        expected = (before[row["source_ids"]] * torch.tensor(row["weights"])[:, None]).sum(0)
        assert torch.allclose(after[row["target_id"]], expected, atol=1e-4)
    assert all(r["how"] == "wechsel:fallback:subword" for r in rows if r["how"].startswith("wechsel:"))
    model = load_lm(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 40, 50]])).logits).all()
    again, _ = transplant(source, tok_dirs["byte_level_de"], tmp_path / "b", method="wechsel", options=options,
                          seed=3, progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_weights_follow_the_aligned_token_vectors(tok_dirs, debref_vectors):
    """One new token's weights recomputed directly: its vector is the weighted mean of the German words that
    contain it; the source tokens' vectors the same over rotated English words."""
    source_tok = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level"]))
    target_tok = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level_de"]))
    source, target = vocabulary(source_tok), vocabulary(target_tok)
    # the words only (no n-grams: every dictionary row is a word's row), with their corpus counts
    en, de = (WordVectors(wv.words, wv.vectors, wv.counts) for wv in (debref_vectors[k][1] for k in ("en", "de")))
    pairs = read_dictionary(DICTIONARY)
    chosen = target_tok.convert_tokens_to_ids("\u0120Paket")
    combination = wechsel_combination(en, de, pairs, source, target, [chosen], WechselConfig(neighbors=5))

    rows = dictionary_rows(pairs, en.index(), de.index())
    rotation = procrustes(en.vectors[rows[0]], de.vectors[rows[1]])

    def token_means(tokenizer, wv, matrix):
        """token id -> count-weighted mean of the rows of the words whose tokenization contains it."""
        alone = tokenizer(wv.words, add_special_tokens=False)["input_ids"]
        spaced = tokenizer([" " + w for w in wv.words], add_special_tokens=False)["input_ids"]
        words_of = defaultdict(list)
        for word, (a, b) in enumerate(zip(alone, spaced)):
            for token in set(a) | set(b):
                words_of[token].append(word)
        counts = torch.tensor(wv.counts, dtype=torch.float64)
        means = {}
        for token, words in words_of.items():
            words = torch.tensor(words)
            means[token] = (matrix[words].double() * counts[words, None]).sum(0) / counts[words].sum()
        return means

    target_vector = token_means(target_tok, de, de.vectors)[chosen]
    scored = [(float(torch.nn.functional.cosine_similarity(v, target_vector, dim=0)), token)
              for token, v in token_means(source_tok, en, en.vectors @ rotation).items()
              if token not in source_tok.all_special_ids]
    top = sorted(scored, reverse=True)[:5]
    exps = [math.exp((c - top[0][0]) / 0.1) for c, _ in top]
    assert combination.ids[chosen] == [i for _, i in top]
    assert combination.weights[chosen] == pytest.approx([e / sum(exps) for e in exps], abs=1e-5)


def test_missing_and_bad_resources(models_dir, tok_dirs, debref_vectors, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    with pytest.raises(TokenbridgeError, match="source_vectors"):
        transplant(source, target, tmp_path / "a", method="wechsel", progress=False)
    good = {"source_vectors": str(debref_vectors["en"][0]), "target_vectors": str(debref_vectors["de_bin"][0]),
            "dictionary": str(DICTIONARY)}
    with pytest.raises(TokenbridgeError, match="no such file"):
        transplant(source, target, tmp_path / "b", method="wechsel", progress=False,
                   options={**good, "target_vectors": str(tmp_path / "none.vec")})
    (tmp_path / "text.bin").write_text("1 4\nPaket 1 1 1 1\n", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="not a fastText .bin model"):
        transplant(source, target, tmp_path / "c", method="wechsel", progress=False,
                   options={**good, "target_vectors": str(tmp_path / "text.bin")})
    (tmp_path / "cut.bin").write_bytes(Path(good["target_vectors"]).read_bytes()[:5000])
    with pytest.raises(TokenbridgeError, match="damaged fastText .bin model"):
        transplant(source, target, tmp_path / "c", method="wechsel", progress=False,
                   options={**good, "target_vectors": str(tmp_path / "cut.bin")})
    (tmp_path / "bad.vec").write_text("2 3\na 1 2 3\nb 1 2\n", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="line 3"):
        transplant(source, target, tmp_path / "c", method="wechsel", progress=False,
                   options={**good, "source_vectors": str(tmp_path / "bad.vec")})
    (tmp_path / "empty.dict").write_text("xyzzy\tplugh\n", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="none of the 1 dictionary pairs"):
        transplant(source, target, tmp_path / "d", method="wechsel", progress=False,
                   options={**good, "dictionary": str(tmp_path / "empty.dict")})
    with pytest.raises(TokenbridgeError, match="weighting"):
        transplant(source, target, tmp_path / "e", method="wechsel", progress=False,
                   options={**good, "weighting": "idf"})


def test_vector_sizes_that_differ_are_reduced_by_pca(tok_dirs, debref_vectors, tmp_path):
    """English at 32 dimensions, German at 12: the result is the one computed on English vectors projected
    by numpy's PCA (SVD of the centred matrix, the same sign rule) to 12 dimensions."""
    source_tok = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level"]))
    target_tok = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level_de"]))
    source, target = vocabulary(source_tok), vocabulary(target_tok)
    en = read_vectors(debref_vectors["en"][0])  # .vec: no n-gram rows to project
    text = (CORPORA / "debref.de.txt").read_text(encoding="utf-8")
    de = read_vectors(write_vectors(tmp_path / "de12.vec", train_vectors(split_words(text), dim=12, epochs=2,
                                                                         seed=0, max_n=0)))
    pairs = read_dictionary(DICTIONARY)
    new_ids = [i for i in target_tok.convert_tokens_to_ids(["\u0120Paket", "\u0120Datei", "\u0120Verzeichnis"])]
    config = WechselConfig(neighbors=5)
    got = wechsel_combination(en, de, pairs, source, target, new_ids, config)

    x = en.vectors.double().numpy()
    centred = x - x.mean(0)
    vt = np.linalg.svd(centred, full_matrices=False)[2][:12]
    vt = vt * np.sign(vt[np.arange(12), np.abs(vt).argmax(1)])[:, None]
    reduced = WordVectors(en.words, torch.from_numpy(centred @ vt.T).float(), en.counts)
    want = wechsel_combination(reduced, de, pairs, source, target, new_ids, config)
    assert got.ids and got.ids.keys() == want.ids.keys()
    for target_id in want.ids:
        assert got.ids[target_id] == want.ids[target_id]
        assert got.weights[target_id] == pytest.approx(want.weights[target_id], abs=1e-4)
