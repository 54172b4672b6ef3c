"""Static word vectors: SGNS training checked against brute force, autograd and the corpus; .vec files."""

from __future__ import annotations

import gzip
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.static_vectors import (
    WordVectors,
    keep_probabilities,
    read_vectors,
    sgns_step,
    split_words,
    train_vectors,
    window_pairs,
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


# ---------------------------------------------------------------------------------------------- pieces


def test_window_pairs_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    length, window = 60, 4
    ids = torch.randint(0, 9, (length,), generator=generator)
    sequence = torch.sort(torch.randint(0, 6, (length,), generator=generator)).values
    reach = torch.randint(1, window + 1, (length,), generator=generator)
    centres, contexts = window_pairs(ids, sequence, reach, window)
    expected = Counter()
    for i in range(length):
        for j in range(length):
            if i != j and sequence[i] == sequence[j] and abs(i - j) <= reach[i]:
                expected[(int(ids[i]), int(ids[j]))] += 1
    assert Counter(zip(centres.tolist(), contexts.tolist())) == expected


def test_keep_probability_is_word2vecs():
    counts = torch.tensor([1000, 100, 10, 1])
    t = 1e-2
    total = 1111
    for count, keep in zip(counts.tolist(), keep_probabilities(counts, t).tolist()):
        assert keep == pytest.approx(min(1.0, (math.sqrt(count / (t * total)) + 1) * (t * total) / count))
    assert keep_probabilities(counts, 0).tolist() == [1.0] * 4


def test_sgns_step_is_a_gradient_step():
    """Distinct rows: the in-place update equals ``-lr * grad`` of the summed SGNS loss (autograd)."""
    generator = torch.Generator().manual_seed(1)
    n, d, lr = 40, 6, 0.3
    vectors, context_vectors = torch.randn((n, d), generator=generator), torch.randn((n, d), generator=generator)
    order = torch.randperm(n, generator=generator)
    centres, targets = order[:5], torch.randperm(n, generator=generator)[:15].view(5, 3)
    v, u = vectors.clone().requires_grad_(), context_vectors.clone().requires_grad_()
    scores = (u[targets] * v[centres][:, None, :]).sum(-1)
    loss = -torch.log(torch.sigmoid(scores[:, 0])).sum() - torch.log(torch.sigmoid(-scores[:, 1:])).sum()
    loss.backward()
    reported = sgns_step(vectors, context_vectors, centres, targets, lr)
    assert reported == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(vectors, v.detach() - lr * v.grad, atol=1e-6)
    assert torch.allclose(context_vectors, u.detach() - lr * u.grad, atol=1e-6)


def test_sgns_step_averages_repeated_rows():
    """A row hit twice moves by the mean of its two updates."""
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context_vectors = torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    centres, targets = torch.tensor([0, 0]), torch.tensor([[1], [1]])  # the same pair twice, no noise words
    update = 0.2 * (1 - torch.sigmoid(torch.tensor(1.0)))  # lr * (label - sigmoid(u . v)), u . v = 1
    expect_v = vectors[0] + update * context_vectors[1]
    expect_u = context_vectors[1] + update * vectors[0]
    sgns_step(vectors, context_vectors, centres, targets, 0.2)
    assert torch.allclose(vectors[0], expect_v) and torch.allclose(context_vectors[1], expect_u)


def test_split_words():
    assert split_words("Run apt-get install, don't wait.\n\n  v2.100 (ok)") == [
        ["Run", "apt-get", "install", ",", "don't", "wait", "."], ["v2.100", "(", "ok", ")"]]


# ---------------------------------------------------------------------------------------------- training


def test_same_seed_same_vectors_other_seed_other_vectors():
    sequences = debref("en")[:400]
    a = train_vectors(sequences, dim=16, epochs=2, seed=5)
    b = train_vectors(sequences, dim=16, epochs=2, seed=5)
    c = train_vectors(sequences, dim=16, epochs=2, seed=6)
    assert a.words == b.words == c.words
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.context_vectors, b.context_vectors)
    assert not torch.equal(a.vectors, c.vectors)
    counts = Counter(w for s in sequences for w in s)
    assert a.counts == [counts[w] for w in a.words]
    assert a.counts == sorted(a.counts, reverse=True)
    assert train_vectors(sequences, dim=4, epochs=1, min_count=3).words == [w for w in a.words if counts[w] >= 3]


def test_bad_arguments():
    with pytest.raises(TokenbridgeError, match="min_count"):
        train_vectors([["a", "b"]], min_count=2)
    with pytest.raises(TokenbridgeError):
        train_vectors([["a", "b"]], dim=0)


@pytest.fixture(scope="module")
def english():
    """Vectors trained on the first 90% of the English Debian Reference, and the held-out 10%."""
    sequences = debref("en")
    cut = int(len(sequences) * 0.9)
    return train_vectors(sequences[:cut], dim=50, epochs=5, seed=0), sequences[cut:]


# Singular/plural and closely related pairs, all frequent in the Debian Reference.
RELATED = [("package", "packages"), ("file", "files"), ("directory", "directories"), ("command", "commands"),
           ("program", "programs"), ("user", "users"), ("system", "systems"), ("option", "options"),
           ("script", "scripts"), ("install", "installed"), ("network", "networking"), ("password", "login"),
           ("server", "client"), ("kernel", "modules")]


def test_related_words_rank_far_above_chance(english):
    """The rank of ``b`` among ``a``'s cosine neighbours; a random space puts it in the top 5% with p = 0.05.

    Requiring half of 14 pairs there has probability below 1e-5 by chance.
    """
    wv, _ = english
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


def test_held_out_loss_beats_initial_and_shuffled_vectors(english):
    """SGNS loss on pairs from unseen lines, computed directly: below the untrained loss ((1+K) log 2,
    context vectors start at zero) and below the loss with the word identities of the rows shuffled."""
    wv, held_out = english
    index = wv.index()
    generator = torch.Generator().manual_seed(123)
    centres, contexts = [], []
    for sequence in held_out:
        ids = [index[w] for w in sequence if w in index]
        for i, centre in enumerate(ids):
            for j in range(max(0, i - 2), min(len(ids), i + 3)):
                if j != i:
                    centres.append(centre)
                    contexts.append(ids[j])
    centres, contexts = torch.tensor(centres), torch.tensor(contexts)
    assert len(centres) > 10000
    noise = torch.tensor(wv.counts, dtype=torch.float64) ** 0.75
    negatives = torch.multinomial(noise, len(centres) * 5, replacement=True, generator=generator).view(-1, 5)

    def loss(vectors, context_vectors):
        v = vectors[centres]
        positive = (context_vectors[contexts] * v).sum(-1)
        negative = (context_vectors[negatives] * v[:, None, :]).sum(-1)
        return float((-torch.nn.functional.logsigmoid(positive)
                      - torch.nn.functional.logsigmoid(-negative).sum(-1)).mean())

    trained = loss(wv.vectors, wv.context_vectors)
    initial = 6 * math.log(2)
    assert loss(torch.rand_like(wv.vectors) - 0.5, torch.zeros_like(wv.vectors)) == pytest.approx(initial)
    shuffled = loss(wv.vectors[torch.randperm(len(wv), generator=generator)], wv.context_vectors)
    assert trained < 0.8 * initial
    assert trained < shuffled - 0.3
