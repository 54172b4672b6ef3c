"""``transtok`` (Trans-Tokenization) and its aligner, each checked against an independent reference."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter, defaultdict

import pytest
import torch
from conftest import corpus, load_lm, read_tensors
from transformers import AutoTokenizer

from tokenbridge import transplant
from tokenbridge.align.encode import ByteEncoder
from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.align.vocab import align
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init import transtok
from tokenbridge.init.registry import METHODS, TransplantContext, make_config
from tokenbridge.init.word_align import (
    BEAD_PRIORS,
    NULL,
    align_corpus,
    align_paragraphs,
    anchors,
    bead_cost,
    count_links,
    parallel_from_documents,
    symmetrize,
    table_rows,
    translation_table,
    unmatched_anchors,
    viterbi,
)

TINY = [([0, 1], [10, 11]), ([0, 2], [10, 12]), ([1, 2, 3], [11, 12, 13]), ([3, 0], [13, 10, 14]),
        ([2, 2, 1], [12, 11])]


def loop_em(pairs, model1_iterations, iterations, p_null=0.08, tension=4.0):
    """Textbook EM, one cell at a time: Model 1, then fast_align's diagonal prior with Z summed directly."""
    t: dict = {}
    for iteration in range(model1_iterations + iterations):
        diagonal = iteration >= model1_iterations
        counts: dict = defaultdict(float)
        for src, tgt in pairs:
            n, m = len(src), len(tgt)
            for j, f in enumerate(tgt, 1):
                if diagonal:
                    z = sum(math.exp(-tension * abs(i / n - j / m)) for i in range(1, n + 1))
                    prior = [p_null] + [(1 - p_null) * math.exp(-tension * abs(i / n - j / m)) / z
                                        for i in range(1, n + 1)]
                else:
                    prior = [1.0 / (n + 1)] * (n + 1)
                words = [NULL] + list(src)
                scores = [t.get((e, f), 1.0) * prior[i] for i, e in enumerate(words)]
                total = sum(scores)
                for e, score in zip(words, scores):
                    counts[(e, f)] += score / total
        totals: dict = defaultdict(float)
        for (e, _), c in counts.items():
            totals[e] += c
        t = {(e, f): c / totals[e] for (e, f), c in counts.items()}
    return t


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_model1_matches_loop_em(iterations):
    src, tgt = [p[0] for p in TINY], [p[1] for p in TINY]
    got = translation_table(src, tgt, model1_iterations=iterations, iterations=0).to_dict()
    want = loop_em(TINY, iterations, 0)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_diagonal_em_and_viterbi_match_loops():
    src, tgt = [p[0] for p in TINY], [p[1] for p in TINY]
    got = translation_table(src, tgt, model1_iterations=2, iterations=3, p_null=0.1, tension=3.0).to_dict()
    want = loop_em(TINY, 2, 3, p_null=0.1, tension=3.0)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 1e-6
    # Viterbi: the argmax of t(f|e) * prior over NULL and every source position (first on ties)
    links = viterbi(src, tgt, model1_iterations=2, iterations=3, p_null=0.1, tension=3.0)
    for (s, t), found in zip(TINY, links):
        n, m = len(s), len(t)
        for j, f in enumerate(t, 1):
            z = sum(math.exp(-3.0 * abs(i / n - j / m)) for i in range(1, n + 1))
            scores = [want[(NULL, f)] * 0.1] + [want[(e, f)] * 0.9 * math.exp(-3.0 * abs(i / n - j / m)) / z
                                                 for i, e in enumerate(s, 1)]
            assert found[j - 1] == scores.index(max(scores)) - 1


def test_symmetrize_heuristics_by_hand():
    forward = {(0, 0), (1, 1), (2, 1)}
    reverse = {(0, 0), (1, 1), (1, 2)}
    assert symmetrize(forward, reverse, "intersection") == {(0, 0), (1, 1)}
    assert symmetrize(forward, reverse, "union") == forward | reverse
    assert symmetrize(forward, reverse, "grow-diag") == forward | reverse  # both neighbours of (1, 1)
    # (0, 2) is no neighbour of (0, 0); its target word is unaligned, its source word is not
    assert symmetrize({(0, 0), (0, 2)}, {(0, 0)}, "grow-diag") == {(0, 0)}
    assert symmetrize({(0, 0), (0, 2)}, {(0, 0)}, "grow-diag-final") == {(0, 0), (0, 2)}
    assert symmetrize({(0, 0), (0, 2)}, {(0, 0)}, "grow-diag-final-and") == {(0, 0)}
    assert symmetrize({(0, 0), (3, 3)}, {(0, 0)}, "grow-diag-final-and") == {(0, 0), (3, 3)}


def test_cipher_corpus_recovers_the_known_links():
    """Target = a fixed word substitution of the source, with adjacent words swapped now and then."""
    rng = random.Random(0)
    cipher = {w: 100 + (7 * w) % 23 for w in range(23)}
    source, target, truth = [], [], []
    for _ in range(150):
        words = [rng.randrange(23) for _ in range(rng.randint(3, 8))]
        order = list(range(len(words)))
        if rng.random() < 0.5:
            k = rng.randrange(len(words) - 1)
            order[k], order[k + 1] = order[k + 1], order[k]
        source.append(words)
        target.append([cipher[words[i]] for i in order])
        truth.append(sorted((i, j) for j, i in enumerate(order)))
    found = align_corpus(source, target, iterations=5, model1_iterations=5)
    wrong = [k for k in range(len(truth)) if found[k] != truth[k]]
    # a sentence with a repeated word may link either copy; every other sentence is exact
    assert all(len(set(source[k])) < len(source[k]) for k in wrong)
    assert len(wrong) < 0.3 * len(truth)
    counts = count_links(source, target, found).by_target()
    for word, code in cipher.items():
        if code in counts:
            assert counts[code][0][0] == word  # the most linked source token is the plain word


def _context(source_dir, target_dir) -> TransplantContext:
    source_tok, target_tok = AutoTokenizer.from_pretrained(str(source_dir)), AutoTokenizer.from_pretrained(str(target_dir))
    sv, tv = vocabulary(source_tok), vocabulary(target_tok)
    encoder = ByteEncoder(sv)
    alignment = align(sv, tv, source_tok, target_tok, encoder)
    overlap = [m for m in alignment.matches if m.how == "bytes"]
    return TransplantContext(sv, tv, source_tok, target_tok, encoder,
                             torch.tensor([m.target_id for m in overlap]), torch.tensor([m.source_id for m in overlap]),
                             [tv.tokens[i] for i in alignment.new], 0)


@pytest.fixture(scope="module")
def parallel_files(tmp_path_factory):
    source, target = parallel_from_documents(corpus("en", 0, 9000), corpus("de", 0, 10500))
    root = tmp_path_factory.mktemp("parallel")
    (root / "en.txt").write_text("\n".join(source) + "\n", encoding="utf-8")
    (root / "de.txt").write_text("\n".join(target) + "\n", encoding="utf-8")
    return root / "en.txt", root / "de.txt"


def test_weights_are_normalised_link_counts(tok_dirs, parallel_files):
    context = _context(tok_dirs["byte_level"], tok_dirs["byte_level_de"])
    en, de = parallel_files
    config = make_config(METHODS["transtok"], {"parallel_source": str(en), "parallel_target": str(de),
                                               "min_count": "2", "smooth": "false"})
    combination = transtok.prepare_transtok(context, config)
    # the same corpus, tokenized and counted here link by link
    src_lines = en.read_text(encoding="utf-8").splitlines()
    tgt_lines = de.read_text(encoding="utf-8").splitlines()
    src = [context.source_tokenizer(x, add_special_tokens=False)["input_ids"] for x in src_lines]
    tgt = [context.target_tokenizer(x, add_special_tokens=False)["input_ids"] for x in tgt_lines]
    links = align_corpus(src, tgt, iterations=5, model1_iterations=5, heuristic="grow-diag-final")
    tally: dict = defaultdict(Counter)
    for s, t, pairs in zip(src, tgt, links):
        for i, j in pairs:
            tally[t[j]][s[i]] += 1
    new_ids = {info.id for info in context.new_tokens}
    expected = {}
    for target_id, sources in tally.items():
        kept = {s: c for s, c in sources.items() if c >= 2}
        if target_id in new_ids and kept:
            total = sum(kept.values())
            expected[target_id] = {s: c / total for s, c in kept.items()}
    assert expected and set(combination.ids) == set(expected)
    for target_id, want in expected.items():
        got = dict(zip(combination.ids[target_id], combination.weights[target_id]))
        assert got.keys() == want.keys()
        assert all(abs(got[s] - want[s]) < 1e-12 for s in want)


def test_smoothing_borrows_from_extending_and_contained_tokens(tok_dirs):
    context = _context(tok_dirs["byte_level"], tok_dirs["byte_level_de"])
    vocab = list(context.target.tokens)
    by_bytes = {t.bytes: t.id for t in vocab if t.bytes and not t.special}
    # a word made of two different shorter tokens (neither inside the other), each given links by hand

    def split(t):
        for k in range(2, len(t.bytes) - 1):
            a, b = t.bytes[:k], t.bytes[k:]
            if a in by_bytes and b in by_bytes and a not in b and b not in a and t.bytes.decode().strip().isalpha():
                return k
        return None

    whole = next(t for t in sorted(vocab, key=lambda t: t.id) if not t.special and not t.partial_utf8 and split(t))
    k = split(whole)
    head, tail = by_bytes[whole.bytes[:k]], by_bytes[whole.bytes[k:]]
    linked = {head: ([1, 2], [0.75, 0.25]), tail: ([2], [1.0])}
    got = transtok.smooth_weights([whole], linked, vocab, {head: 4, tail: 1})
    # no linked token extends it; the maximal contained pieces lend equally: (0.75, 0.25) and (0, 1) -> (0.375, 0.625)
    extending = [i for i in linked if vocab[i].bytes.startswith(whole.bytes) and vocab[i].bytes != whole.bytes]
    assert not extending
    ids, weights = got[whole.id]
    assert dict(zip(ids, weights)) == pytest.approx({1: 0.375, 2: 0.625})
    # a lender shorter than min_bytes lends nothing
    short = min(len(vocab[head].bytes), len(vocab[tail].bytes))
    got = transtok.smooth_weights([whole], linked, vocab, {head: 4, tail: 1}, min_bytes=short + 1)
    longer_one = head if len(vocab[head].bytes) > short else tail
    assert whole.id not in got if len(vocab[head].bytes) == len(vocab[tail].bytes) else (
        got[whole.id] == (linked[longer_one][0], linked[longer_one][1]))
    # and the head borrows from the whole token that extends it
    got = transtok.smooth_weights([vocab[head]], {whole.id: ([5], [1.0])}, vocab, {whole.id: 3})
    assert got[head] == ([5], [1.0])


def test_transplant_end_to_end(models_dir, tok_dirs, parallel_files, tmp_path):
    source = models_dir["llama"]
    en, de = parallel_files
    options = {"parallel_source": str(en), "parallel_target": str(de)}
    out, report = transplant(source, tok_dirs["byte_level_de"], tmp_path / "a", method="transtok", options=options,
                             seed=3, progress=False)
    model = load_lm(out)
    ids = AutoTokenizer.from_pretrained(str(out))("Die Konfiguration des Systems")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()
    before, after = read_tensors(source), read_tensors(out)
    name = "model.embed_tokens.weight"
    for target_id, source_id in report.copied:
        assert torch.equal(after[name][target_id], before[name][source_id])
    data = json.loads((out / "tokenbridge.json").read_text())
    assert data["method"] == "transtok"
    rows = data["initialised"]["input"]
    made = [r for r in rows if r["how"] == "transtok"]
    assert made and any(r["how"] == "transtok:fallback:subword" or r["how"] == "transtok:smoothed" for r in rows)
    for row in made:
        assert row["source_ids"] and abs(sum(row["weights"]) - 1) < 1e-5
        want = sum(w * before[name][i] for i, w in zip(row["source_ids"], row["weights"]))
        assert torch.allclose(after[name][row["target_id"]], want, atol=1e-5)
    again, _ = transplant(source, tok_dirs["byte_level_de"], tmp_path / "b", method="transtok", options=options,
                          seed=3, progress=False)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == {
        p.name: p.read_bytes() for p in sorted(again.iterdir())}


def test_resource_errors_name_the_files(models_dir, tok_dirs, tmp_path):
    source, target = models_dir["llama"], tok_dirs["byte_level_de"]
    with pytest.raises(TokenbridgeError, match="parallel_source"):
        transplant(source, target, tmp_path / "o1", method="transtok", progress=False)
    en, de = tmp_path / "en.txt", tmp_path / "de.txt"
    en.write_text("one\ntwo\nthree\n")
    de.write_text("eins\nzwei\n")
    with pytest.raises(TokenbridgeError, match=r"parallel_target .*de\.txt: no such file"):
        transplant(source, target, tmp_path / "o2", method="transtok", progress=False,
                   options={"parallel_source": str(en), "parallel_target": str(tmp_path / "missing" / "de.txt")})
    with pytest.raises(TokenbridgeError, match=r"en\.txt has 3 lines .*de\.txt has 2"):
        transplant(source, target, tmp_path / "o3", method="transtok", progress=False,
                   options={"parallel_source": str(en), "parallel_target": str(de)})
    with pytest.raises(TokenbridgeError, match="symmetrize"):
        transplant(source, target, tmp_path / "o4", method="transtok", progress=False,
                   options={"parallel_source": str(en), "parallel_target": str(en), "symmetrize": "diag"})


def test_empty_sides_get_no_links():
    links = align_corpus([[1, 2], [], [3]], [[5, 6], [7], []])
    assert links[1] == [] and links[2] == [] and sorted(j for _, j in links[0]) == [0, 1]


def _path_cost(beads, source, target, ratio, weight):
    total = 0.0
    for s, t in beads:
        total += bead_cost(sum(len(source[i]) for i in s), sum(len(target[j]) for j in t), ratio,
                            BEAD_PRIORS[(len(s), len(t))])
        total += weight * unmatched_anchors(sum((anchors(source[i]) for i in s), Counter()),
                                     sum((anchors(target[j]) for j in t), Counter()))
    return total


def _all_paths(n, m):
    if n == 0 and m == 0:
        yield []
        return
    for di, dj in BEAD_PRIORS:
        if di <= n and dj <= m:
            for rest in _all_paths(n - di, m - dj):
                yield rest + [(tuple(range(n - di, n)), tuple(range(m - dj, m)))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_align_paragraphs_finds_the_cheapest_path(seed):
    rng = random.Random(seed)
    words = ["ls", "the", "apt-get", "42", "/etc", "and", "die", "der", "7", "system"]
    source = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(5)]
    target = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(4)]
    found = align_paragraphs(source, target, ratio=1.1, anchor_weight=0.7)
    best = min(_all_paths(len(source), len(target)), key=lambda p: _path_cost(p, source, target, 1.1, 0.7))
    assert _path_cost(found, source, target, 1.1, 0.7) == pytest.approx(_path_cost(best, source, target, 1.1, 0.7))
    assert [i for s, _ in found for i in s] == list(range(5)) and [j for _, t in found for j in t] == list(range(4))


def test_align_paragraphs_recovers_merges_and_splits():
    rng = random.Random(5)
    source = [" ".join("x" * rng.randint(2, 9) for _ in range(rng.randint(5, 40))) for _ in range(30)]
    target = [s.upper() for s in source]
    target[10:12] = [target[10] + " " + target[11]]  # source 10, 11 -> target 10
    half = len(source[20]) // 2
    target[19:20] = [target[19][:half], target[19][half:]]  # source 20 -> target 19, 20
    beads = align_paragraphs(source, target)
    assert ((10, 11), (10,)) in beads and ((20,), (19, 20)) in beads
    assert sum(1 for s, t in beads if len(s) == len(t) == 1) == 27


def test_table_rows_join_wrapped_cells():
    table = ("+----------------+\n"
             "|command|meaning |\n"
             "|-------+--------|\n"
             "|ls -l  |list in |\n"
             "|       |detail  |\n"
             "|-------+--------|\n"
             "|pwd    |print   |\n"
             "+----------------+")
    assert table_rows(table) == ["command | meaning", "ls -l | list in detail", "pwd | print"]


def test_parallel_from_documents_pairs_translations():
    source, target = parallel_from_documents(corpus("en", 0, 30000), corpus("de", 0, 34000))
    assert len(source) == len(target) > 150
    digits = [(Counter(c for c in s if c.isdigit()), Counter(c for c in t if c.isdigit())) for s, t in zip(source, target)]
    with_digits = [(a, b) for a, b in digits if a and b]
    assert sum(a == b for a, b in with_digits) >= 0.9 * len(with_digits)
    ratios = sorted(len(t) / len(s) for s, t in zip(source, target))
    assert 1.0 < ratios[len(ratios) // 2] < 1.35  # German runs longer than English
    for s, t in itertools.islice(zip(source, target), 0, 200, 40):
        assert s.strip() and t.strip()
