"""``transtok`` (Trans-Tokenization): eflomal word links spread over tokens, checked against independent
computations (the reference's spreading, brute-force symmetrisation and paragraph alignment)."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter, defaultdict

import numpy as np
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
from tokenbridge.init.parallel_corpus import (
    BEAD_PRIORS,
    align_paragraphs,
    anchors,
    bead_cost,
    parallel_from_documents,
    table_rows,
    unmatched_anchors,
)
from tokenbridge.init.static_vectors import split_words
from tokenbridge.init.symmetrize import symmetrize

def reference_spread(source_word, target_word, count):
    """The reference's ``add_word_pair`` (LAGoM-NLP/transtokenizer), written out with numpy's tile/repeat,
    with exact shares instead of its integer ones: {(target token, source token): count}."""
    out: dict = defaultdict(float)
    if len(source_word) == 1 and len(target_word) == 1:
        out[(target_word[0], source_word[0])] += count
        return out
    half = count / 2
    old = np.tile(source_word, len(target_word))  # all to all
    new = np.repeat(target_word, len(source_word))
    for o, n in zip(old.tolist(), new.tolist()):
        out[(n, o)] += half / len(source_word)
    g = math.gcd(len(source_word), len(target_word))  # positional, stretched to a common length
    old = np.repeat(source_word, len(target_word) // g)
    new = np.repeat(target_word, len(source_word) // g)
    for o, n in zip(old.tolist(), new.tolist()):
        out[(n, o)] += half / (len(source_word) // g)
    return out


@pytest.mark.parametrize("source_word, target_word", [((1,), (7,)), ((1, 2), (7,)), ((1,), (7, 8, 9)),
                                                       ((1, 2), (7, 8, 9)), ((1, 2, 3, 4), (7, 8)),
                                                       ((5, 5, 6), (7, 7))])
def test_spread_word_link_is_the_references(source_word, target_word):
    links: dict = {}
    transtok.spread_word_link(source_word, target_word, 6.0, links)
    got = {(t, s): w for t, row in links.items() for s, w in row.items()}
    want = reference_spread(source_word, target_word, 6.0)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k]) for k in want)
    for t in set(target_word):  # each target token of the word gets the whole count, per occurrence
        assert sum(links[t].values()) == pytest.approx(6.0 * target_word.count(t))


def test_link_weights_normalise_and_rank():
    links = {5: {1: 3.0, 2: 1.0, 3: 3.0}, 6: {4: 2.5}}
    assert transtok.link_weights(links) == {5: ([1, 3, 2], [3 / 7, 3 / 7, 1 / 7]), 6: ([4], [1.0])}
    assert transtok.link_weights(links, max_sources=1) == {5: ([1], [1.0]), 6: ([4], [1.0])}


def test_line_words_group_tokens_into_words(tok_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level_de"]))
    lines = ["Die Konfigurationsdatei /etc/apt/sources.list wird gelesen.", "  Größe: 1.2 GB, don't panic!"]
    words = transtok.line_words(tokenizer, lines, len(tokenizer), set())
    for line, groups in zip(lines, words):
        assert [tokenizer.decode(list(g)).strip() for g in groups] == split_words(line)[0]
    special = tokenizer("Die", add_special_tokens=False)["input_ids"][0]
    assert all(special not in g for g in transtok.line_words(tokenizer, lines[:1], len(tokenizer), {special})[0])


def test_eflomal_links_a_word_cipher():
    """Target = a fixed word substitution of the source, adjacent words swapped now and then: eflomal's
    symmetrised links find the substitution."""
    rng = random.Random(0)
    cipher = {w: 100 + (7 * w) % 23 for w in range(23)}
    source, target = [], []
    for _ in range(300):
        words = [rng.randrange(23) for _ in range(rng.randint(3, 8))]
        order = list(range(len(words)))
        if rng.random() < 0.5:
            k = rng.randrange(len(words) - 1)
            order[k], order[k + 1] = order[k + 1], order[k]
        source.append([(w,) for w in words])
        target.append([(cipher[words[i]],) for i in order])
    alignments = transtok.align_words(source, target, transtok.TransTokConfig())
    counts = transtok.word_link_counts(source, target, alignments)
    best = {}
    for (s, t), c in counts.items():
        if c > best.get(t, (None, 0))[1]:
            best[t] = (s, c)
    assert {t[0]: s[0] for t, (s, _) in best.items()} == {code: word for word, code in cipher.items()}


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


def test_weights_are_the_spread_word_links(tok_dirs, parallel_files, monkeypatch):
    """Given eflomal's word links (recorded), the weights are recomputed here: words made of the tokens, link
    counts per word pair (>= min_count), spread as the reference does, normalised per target token."""
    context = _context(tok_dirs["byte_level"], tok_dirs["byte_level_de"])
    en, de = parallel_files
    config = make_config(METHODS["transtok"], {"parallel_source": str(en), "parallel_target": str(de),
                                               "min_count": "2", "smooth": "false"})
    recorded = {}
    align_words = transtok.align_words

    def record(source, target, config, seed=0):
        recorded["links"] = align_words(source, target, config, seed)
        recorded["source"], recorded["target"] = source, target
        return recorded["links"]

    monkeypatch.setattr(transtok, "align_words", record)
    combination = transtok.prepare_transtok(context, config)
    # the words, from the text: every word of split_words is one word given to eflomal, in order
    src_lines = [x for x in en.read_text(encoding="utf-8").splitlines()]
    tgt_lines = [x for x in de.read_text(encoding="utf-8").splitlines()]
    kept = [(s, t) for s, t in zip(src_lines, tgt_lines) if s.strip() and t.strip() and split_words(s)
            and split_words(t)]
    assert [len(w) for w in recorded["source"]] == [len(split_words(s)[0]) for s, _ in kept]
    assert [len(w) for w in recorded["target"]] == [len(split_words(t)[0]) for _, t in kept]
    word_counts: Counter = Counter()
    for src, tgt, links in zip(recorded["source"], recorded["target"], recorded["links"]):
        for i, j in links:
            word_counts[(src[i], tgt[j])] += 1
    tally: dict = defaultdict(lambda: defaultdict(float))
    for (s, t), c in word_counts.items():
        if c >= 2:
            for (tt, ss), w in reference_spread(s, t, c).items():
                tally[tt][ss] += w
    new_ids = {info.id for info in context.new_tokens}
    expected = {}
    for target_id, sources in tally.items():
        if target_id in new_ids:
            total = sum(sources.values())
            expected[target_id] = {s: c / total for s, c in sources.items()}
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
    with pytest.raises(TokenbridgeError, match="eflomal_model"):
        transplant(source, target, tmp_path / "o5", method="transtok", progress=False,
                   options={"parallel_source": str(en), "parallel_target": str(en), "eflomal_model": "4"})


def test_eflomal_missing_names_the_compiler(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "eflomal", None)  # import eflomal -> ImportError
    with pytest.raises(TokenbridgeError, match="C compiler"):
        transtok.eflomal_aligner()


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


def test_eflomal_is_seeded(parallel_files, tok_dirs):
    """eflomal draws its sampler state from /dev/urandom; tokenbridge's seed makes its links repeatable, and
    another seed gives other samples (so the seed really reaches it)."""
    from tokenbridge.load.tokenizer import load_tokenizer

    en, de = parallel_files
    source_lines = en.read_text(encoding="utf-8").splitlines()
    target_lines = de.read_text(encoding="utf-8").splitlines()
    config = transtok.TransTokConfig(parallel_source=str(en), parallel_target=str(de))
    src_tok, tgt_tok = load_tokenizer(tok_dirs["byte_level"]), load_tokenizer(tok_dirs["byte_level_de"])
    source = transtok.line_words(src_tok, source_lines, len(src_tok), set())
    target = transtok.line_words(tgt_tok, target_lines, len(tgt_tok), set())
    pairs = [(s, t) for s, t in zip(source, target) if s and t]
    source, target = [s for s, _ in pairs], [t for _, t in pairs]
    first = transtok.align_words(source, target, config, seed=7)
    assert transtok.align_words(source, target, config, seed=7) == first
    others = [transtok.align_words(source, target, config, seed=s) for s in (8, 9)]
    assert any(other != first for other in others)
