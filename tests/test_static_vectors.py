"""Static word vectors: fastText (gensim) training, .bin and .vec files, n-gram vectors of unseen words."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
import torch

from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.static_vectors import (
    WordVectors,
    read_vectors,
    split_words,
    train_vectors,
    word_spans,
    write_vectors,
)

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def debref(lang: str) -> list[list[str]]:
    return split_words((CORPORA / f"debref.{lang}.txt").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- files


def test_write_read_round_trip_is_exact(tmp_path):
    generator = torch.Generator().manual_seed(3)
    words = ["the", "Über", "apt-get", "ß", "日本", "x\u00a0y", "."]  # a no-break space is not a separator
    vectors = torch.randn((len(words), 7), generator=generator) * torch.logspace(-8, 8, 7)
    original = WordVectors(words, vectors, [5, 4, 3, 3, 2, 1, 1])
    for name in ("v.vec", "v.vec.gz"):
        back = read_vectors(write_vectors(tmp_path / name, original))
        assert back.words == words
        assert torch.equal(back.vectors, vectors)
        assert back.counts == [0] * len(words)
        assert back.index() == {w: i for i, w in enumerate(words)}
    assert (tmp_path / "v.vec").read_text(encoding="utf-8").splitlines()[0] == "7 7"
    with gzip.open(tmp_path / "v.vec.gz", "rt", encoding="utf-8") as handle:
        assert handle.readline() == "7 7\n"


def test_read_without_header_trailing_spaces_and_limit(tmp_path):
    path = tmp_path / "plain.vec"
    path.write_text("a 1 2 3 \nb 4 5 6\r\nc -1e-3 0 7.5\n\n", encoding="utf-8")  # fastText ends lines with a space
    wv = read_vectors(path)
    assert wv.words == ["a", "b", "c"]
    assert torch.equal(wv.vectors, torch.tensor([[1, 2, 3], [4, 5, 6], [-1e-3, 0, 7.5]]))
    assert read_vectors(path, limit=2).words == ["a", "b"]
    path.write_text("2 2\na 1 2\na 3 4\n", encoding="utf-8")
    twice = read_vectors(path)
    assert twice.words == ["a"] and torch.equal(twice.vectors, torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("text, where", [
    ("2 3\na 1 2 3\nb 1 2\n", "line 3"),
    ("a 1 2 3\nb 1 x 3\n", "line 2"),
    ("a 1 2 3\nb 1 2 3 4\n", "line 2"),
    ("3 2\na 1 2\nb 1 2\n", "promises 3"),
    ("", "no vectors"),
    ("a 1 nan\n", "not finite"),
    ("a\n", "line 1"),
])
def test_bad_files_name_the_problem(tmp_path, text, where):
    path = tmp_path / "bad.vec"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenbridgeError, match=where):
        read_vectors(path)


def test_unwritable_and_missing(tmp_path):
    with pytest.raises(TokenbridgeError, match="no such file"):
        read_vectors(tmp_path / "missing.vec")
    (tmp_path / "latin1.vec").write_bytes("\u00fcber 1 2\n".encode("latin-1"))
    with pytest.raises(TokenbridgeError, match="not UTF-8"):
        read_vectors(tmp_path / "latin1.vec")
    with pytest.raises(TokenbridgeError, match="whitespace"):
        write_vectors(tmp_path / "out.vec", WordVectors(["a b"], torch.zeros((1, 2)), [1]))


# ---------------------------------------------------------------------------------------------- fastText .bin


@pytest.fixture(scope="module")
def trained():
    """fastText vectors with character n-grams on a slice of the English Debian Reference."""
    return train_vectors(debref("en")[:1500], dim=12, epochs=2, min_count=2, seed=1, buckets=4096)


def test_bin_written_by_gensim_is_read_with_counts_and_ngrams(trained, tmp_path):
    path = write_vectors(tmp_path / "en.bin", trained)
    assert path.read_bytes()[:4] == (793712314).to_bytes(4, "little")  # fastText's magic number
    back = read_vectors(path)
    assert back.words == trained.words
    assert torch.equal(back.vectors, trained.vectors)
    counts = Counter(w for s in debref("en")[:1500] for w in s)
    assert back.counts == [counts[w] for w in back.words] and back.counts == sorted(back.counts, reverse=True)
    assert back.ngrams is not None
    assert read_vectors(path, limit=5).words == trained.words[:5]
    # a word the file does not list gets its n-gram vector, the same as the model that wrote the file
    unseen = ["packagesx", "Debianization", "installs1"]
    assert not set(unseen) & set(back.words)
    rows, found, from_ngrams = back.lookup(unseen + [trained.words[3]])
    assert found.all() and from_ngrams.tolist() == [True, True, True, False]
    assert torch.equal(rows[3], trained.vectors[3])
    for k, word in enumerate(unseen):
        assert torch.allclose(rows[k], torch.from_numpy(trained.model.wv.get_vector(word)), atol=1e-6)
        assert rows[k].abs().sum() > 0


def test_vec_has_no_ngrams(trained, tmp_path):
    back = read_vectors(write_vectors(tmp_path / "en.vec", trained))
    assert back.words == trained.words and torch.equal(back.vectors, trained.vectors)
    assert back.ngrams is None
    rows, found, from_ngrams = back.lookup(["packagesx", trained.words[0]])
    assert found.tolist() == [False, True] and not from_ngrams.any() and not rows[0].any()


def test_bad_bin_files_name_the_problem(trained, tmp_path):
    good = write_vectors(tmp_path / "good.bin", trained)
    (tmp_path / "text.bin").write_text("2 2\na 1 2\nb 3 4\n", encoding="utf-8")
    with pytest.raises(TokenbridgeError, match="not a fastText .bin model"):
        read_vectors(tmp_path / "text.bin")
    (tmp_path / "cut.bin").write_bytes(good.read_bytes()[:300])
    with pytest.raises(TokenbridgeError, match="damaged fastText .bin"):
        read_vectors(tmp_path / "cut.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(TokenbridgeError, match="not a fastText .bin model"):
        read_vectors(tmp_path / "empty.bin")
    from_text = read_vectors(write_vectors(tmp_path / "v.vec", trained))
    with pytest.raises(TokenbridgeError, match="only vectors trained here"):
        write_vectors(tmp_path / "out.bin", from_text)


def test_split_words():
    assert split_words("Run apt-get install, don't wait.\n\n  v2.100 (ok)") == [
        ["Run", "apt-get", "install", ",", "don't", "wait", "."], ["v2.100", "(", "ok", ")"]]
    line = "Run apt-get install, don't"
    assert [line[a:b] for a, b in word_spans(line)] == split_words(line)[0]


# ---------------------------------------------------------------------------------------------- training


def test_same_seed_same_vectors_other_seed_other_vectors():
    sequences = debref("en")[:400]
    a = train_vectors(sequences, dim=16, epochs=2, seed=5, buckets=2048)
    b = train_vectors(sequences, dim=16, epochs=2, seed=5, buckets=2048)
    c = train_vectors(sequences, dim=16, epochs=2, seed=6, buckets=2048)
    assert a.words == b.words == c.words
    assert torch.equal(a.vectors, b.vectors)
    assert torch.equal(a.lookup(["Debianish"])[0], b.lookup(["Debianish"])[0])
    assert not torch.equal(a.vectors, c.vectors)
    counts = Counter(w for s in sequences for w in s)
    assert a.counts == [counts[w] for w in a.words]
    assert a.counts == sorted(a.counts, reverse=True)
    few = train_vectors(sequences, dim=4, epochs=1, min_count=3, buckets=64)
    assert sorted(few.words) == sorted(w for w in a.words if counts[w] >= 3)
    plain = train_vectors(sequences, dim=4, epochs=1, max_n=0)
    assert plain.ngrams is None and not plain.lookup(["Debianish"])[1].any()


def test_bad_arguments():
    with pytest.raises(TokenbridgeError, match="min_count"):
        train_vectors([["a", "b"]], min_count=2)
    with pytest.raises(TokenbridgeError):
        train_vectors([["a", "b"]], dim=0)
    with pytest.raises(TokenbridgeError, match="n-grams"):
        train_vectors([["a", "b"]], min_n=5, max_n=3)


@pytest.fixture(scope="module")
def english():
    """Vectors trained on the English Debian Reference."""
    return train_vectors(debref("en"), dim=50, epochs=5, seed=0, buckets=50000)


# Singular/plural and closely related pairs, all frequent in the Debian Reference.
RELATED = [("package", "packages"), ("file", "files"), ("directory", "directories"), ("command", "commands"),
           ("program", "programs"), ("user", "users"), ("system", "systems"), ("option", "options"),
           ("script", "scripts"), ("install", "installed"), ("network", "networking"), ("password", "login"),
           ("server", "client"), ("kernel", "modules")]


def test_related_words_rank_far_above_chance(english):
    """The rank of ``b`` among ``a``'s cosine neighbours; a random space puts it in the top 5% with p = 0.05.

    Requiring half of 14 pairs there has probability below 1e-5 by chance.
    """
    wv = english
    index = wv.index()
    unit = wv.vectors / wv.vectors.norm(dim=1, keepdim=True)
    top = int(0.05 * len(wv))
    hits = []
    for a, b in RELATED:
        sims = unit @ unit[index[a]]
        sims[index[a]] = -2.0
        rank = int((sims > sims[index[b]]).sum())
        hits.append(rank < top)
    assert sum(hits) >= len(RELATED) // 2, hits


def test_ngram_vectors_of_unseen_forms_are_near_their_word(english):
    """An unseen misspelling's n-gram vector ranks its word among the nearest few percent of all words (a
    random vector: each rank uniform on [0, 1))."""
    wv = english
    unit = wv.vectors / wv.vectors.norm(dim=1, keepdim=True)
    index = wv.index()
    words = ["packages", "directories", "configuration", "installation", "filesystem", "repository"]
    forms = [w[:-1] + "x" + w[-1] for w in words]  # "packagexs": not in the corpus
    rows, found, from_ngrams = wv.lookup(forms)
    assert from_ngrams.all()
    ranks = []
    for word, row in zip(words, rows):
        sims = unit @ (row / row.norm())
        ranks.append(int((sims > sims[index[word]]).sum()) / len(wv))
    assert sorted(ranks)[len(ranks) // 2] < 0.01 and max(ranks) < 0.2, ranks  # measured: median 0.0008
