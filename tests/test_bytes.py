"""Exact byte-level probabilities: checked against brute force over canonical token sequences.

The brute force knows nothing of the engine: it enumerates every token sequence that
covers a byte prefix, keeps those the *tokenizer itself* produces (a sequence is kept
when some continuation of its text, from a fixed list that includes unfinished UTF-8
characters, is encoded starting with it), and sums their model probabilities, each
computed by a plain forward pass.
"""

from __future__ import annotations

import functools
import json
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import corpus, load_lm, make_byte_level, make_metaspace, make_model, make_wordpiece
from tokenbridge.bytes import ByteEnsemble, ByteLM
from tokenbridge.bytes.lm import EOS
from tokenbridge.bytes.tree import TokenTree
from tokenbridge.bytes.utf8 import unfinished_tail, utf8_prefix_ok
from tokenbridge.errors import TokenbridgeError

FOLLOWS = [b"", b" ", b"\n", b"\t", b"a", b"s", b"0", b".", b"'", b" a", b"  a", b"\xe3\x80\x80", b"\xc3\xa9"]


@functools.lru_cache(maxsize=None)
def completions(tail: bytes) -> list[bytes]:
    """Characters an unfinished UTF-8 ``tail`` may become: every one in the test corpora, and one of each
    Unicode (category, is-space) kind among all characters with that start."""
    import unicodedata

    seen = {ch.encode() for ch in set(TEXT + corpus("ja", 0, 20000)) if ch.encode().startswith(tail)}
    need = (2 if tail[0] < 0xE0 else 3 if tail[0] < 0xF0 else 4) - len(tail)
    kinds = {}
    for rest in itertools.product(range(0x80, 0xC0), repeat=need) if need <= 2 else \
            itertools.product(range(0x80, 0xC0), range(0x80, 0xC0), (0x80, 0x9F, 0xBF)):
        data = tail + bytes(rest)
        try:
            ch = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        kinds.setdefault((unicodedata.category(ch), ch.isspace()), data)
    return sorted(seen | set(kinds.values()))


class Brute:
    """Next-byte distributions by enumeration (slow; short prefixes only)."""

    def __init__(self, model, tokenizer, prefix_id: int, eos_id: int):
        from tokenbridge.align.token_bytes import vocabulary

        self.model, self.tokenizer, self.prefix_id, self.eos_id = model, tokenizer, prefix_id, eos_id
        self.table = [t.bytes if not t.special else b"" for t in vocabulary(tokenizer).tokens]
        self._encode = functools.lru_cache(maxsize=None)(self._encode_uncached)
        self._logp = {}

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    @functools.lru_cache(maxsize=None)  # noqa: B019 - test helper
    def canonical(self, ids: tuple[int, ...]) -> bool:
        data = b"".join(self.table[i] for i in ids)
        if not utf8_prefix_ok(data):
            return False
        tail = unfinished_tail(data)
        finish = [c[len(tail):] for c in completions(tail)] if tail else [b""]
        for end in finish:
            for follow in FOLLOWS:
                try:
                    text = (data + end + follow).decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if self._encode(text)[: len(ids)] == ids:
                    return True
        return False

    def logprob(self, ids: tuple[int, ...]) -> float:
        if ids[:-1] not in self._logp:
            with torch.no_grad():
                out = self.model(torch.tensor([[self.prefix_id, *ids[:-1]]])).logits[0].double()
            self._logp[ids[:-1]] = torch.log_softmax(out, -1)
        rows = self._logp[ids[:-1]]
        return float(sum(rows[k, t] for k, t in enumerate(ids)))

    @functools.lru_cache(maxsize=None)  # noqa: B019 - test helper
    def segmentations(self, data: bytes) -> list[tuple[int, ...]]:
        if not data:
            return [()]
        return [(t, *rest) for t, b in enumerate(self.table) if b and data.startswith(b)
                for rest in self.segmentations(data[len(b):])]

    def next_byte(self, prefix: bytes) -> np.ndarray:
        mass = np.zeros(257)
        starts = {}
        for byte in range(256):
            target = prefix + bytes([byte])
            for i in range(len(target)):
                if i not in starts:
                    starts[i] = self.segmentations(target[:i])
                rest = target[i:]
                for head in starts[i]:
                    if head and not self.canonical(head):
                        continue  # what the tokenizer produces, it produces prefix by prefix
                    for t, b in enumerate(self.table):
                        if b and b.startswith(rest):
                            ids = (*head, t)
                            if self.canonical(ids):
                                mass[byte] += math.exp(self.logprob(ids))
        try:
            ids = self._encode(prefix.decode("utf-8"))
            if self.canonical(ids):
                with torch.no_grad():
                    out = self.model(torch.tensor([[self.prefix_id, *ids]])).logits[0, -1].double()
                mass[EOS] = math.exp(self.logprob(ids) if ids else 0.0) * float(torch.softmax(out, -1)[self.eos_id])
        except UnicodeDecodeError:
            pass
        return mass / mass.sum()


def _setup(tmp_path_factory, kind: str, family: str):
    root = tmp_path_factory.mktemp(f"bytes_{kind}")
    tokdir = make_byte_level(root / "tok") if kind == "byte_level" else make_metaspace(root / "tok")
    modeldir = make_model(root / "model", family, tokdir)
    from transformers import AutoTokenizer

    model = load_lm(modeldir).double()
    tokenizer = AutoTokenizer.from_pretrained(str(modeldir))
    lm = ByteLM(model, tokenizer)
    return lm, Brute(model, tokenizer, lm.prefix_id, lm.eos_id), modeldir


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    return _setup(tmp_path_factory, "byte_level", "llama")


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    return _setup(tmp_path_factory, "metaspace", "gemma3")


TEXT = corpus("en", 0, 4000) + corpus("de", 0, 2000)
ALPHABET = "ab tTs.,'\n  -äß中"


def _text_slice(start: int, size: int) -> bytes:
    """``size`` bytes of the corpora from a character boundary (the end may cut a character)."""
    data = TEXT.encode()
    while 0 < start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:start + size]


prefixes = st.one_of(
    st.builds(_text_slice, st.integers(0, 5000), st.integers(0, 6)),
    st.text(ALPHABET, max_size=4).map(lambda t: t.encode()).map(lambda b: b[:6]),
)
FAST = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(prefix=prefixes)
def test_next_byte_matches_brute_force_byte_level(byte_level, prefix):
    lm, brute, _ = byte_level
    got = np.exp(lm.next_byte_logprobs(prefix))
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(got - brute.next_byte(prefix)).max() < 1e-6


@FAST
@given(prefix=prefixes)
def test_next_byte_matches_brute_force_metaspace(metaspace, prefix):
    lm, brute, _ = metaspace
    got = np.exp(lm.next_byte_logprobs(prefix))
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(got - brute.next_byte(prefix)).max() < 1e-6


@pytest.mark.parametrize("case", [b"x  ", b"\n\n", b"don'", b"de\xc3", b"\xe4\xb8", b" ", b"a  b", b"1.\n\n1"])
def test_next_byte_edge_cases(byte_level, metaspace, case):
    """Whitespace lookahead, contractions, unfinished UTF-8 characters."""
    for lm, brute, _ in (byte_level, metaspace):
        got = np.exp(lm.next_byte_logprobs(case))
        assert np.abs(got - brute.next_byte(case)).max() < 1e-6


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_canonical_prefixes_are_the_tokenizers(request, which):
    """At every character boundary of real text, the engine's canonical encoding is the tokenizer's."""
    lm, brute, _ = request.getfixturevalue(which)
    for text in (corpus("en", 3000, 700), corpus("de", 500, 700), corpus("ja", 0, 300)):
        data = text.encode()
        _, per_position = lm._plan(data)
        for n in range(len(data) + 1):
            if n < len(data) and data[n] & 0xC0 == 0x80:
                continue
            ends = [node for node in per_position[n][1] if lm.canon.can_end(node.state)]
            assert len(ends) == 1, (which, n)
            ids, node = [], ends[0]
            while node.parent is not None:
                ids.append(node.token)
                node = node.parent
            assert ids[::-1] == list(brute._encode(data[:n].decode())), (which, data[max(0, n - 20):n])


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_chain_of_conditionals_is_logprob_and_cursor_agrees(request, which):
    lm, _, _ = request.getfixturevalue(which)
    data = corpus("en", 1200, 90).encode() + "ä中".encode()
    per_byte = lm.byte_logprobs(data)
    assert np.all(np.isfinite(per_byte)) and np.all(per_byte <= 1e-12)
    assert lm.logprob(data) == pytest.approx(per_byte.sum(), abs=1e-9)
    cursor = lm.cursor(data[:7])  # a prompt cut anywhere, then byte by byte on the cached tree
    for n in range(7, len(data)):
        row = cursor.distribution()
        assert np.exp(row).sum() == pytest.approx(1.0, abs=1e-12)
        assert row[data[n]] == pytest.approx(per_byte[n], abs=1e-9)
        cursor.push(data[n:n + 1])


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_logprob_relates_to_token_level(request, which):
    """logprob(x, eos) = log P(T + EOS) - sum_n log(Z_n / M_n), with Z_n <= M_n (the dropped mass)."""
    lm, brute, _ = request.getfixturevalue(which)
    data = corpus("en", 2000, 120).encode()
    log_m, log_z = lm.masses(data, eos=True)
    mass_before = np.concatenate([[0.0], log_m[:-1]])  # M(x[:0]) = 1
    assert np.all(log_z <= mass_before + 1e-9)
    ids = brute._encode(data.decode())
    with torch.no_grad():
        out = lm.model(torch.tensor([[lm.prefix_id, *ids]])).logits[0].double()
    logp = torch.log_softmax(out, -1)
    token_level = float(sum(logp[k, t] for k, t in enumerate(ids)) + logp[len(ids), lm.eos_id])
    assert log_m[-1] == pytest.approx(token_level, abs=1e-9)
    corrections = float(np.sum(log_z - mass_before))
    assert lm.logprob(data, eos=True) == pytest.approx(token_level - corrections, abs=1e-9)


def test_prompt_healing(byte_level):
    """A prompt cut inside a word: the next-byte distribution is the marginal of the uncut text."""
    lm, _, _ = byte_level
    text = corpus("en", 1500, 60).encode()
    whole = lm.byte_logprobs(text)
    for cut in (11, 23, 37):
        assert lm.next_byte_logprobs(text[:cut])[text[cut]] == pytest.approx(whole[cut], abs=1e-9)


def test_a_stale_cursor_is_an_error(byte_level):
    lm, _, _ = byte_level
    first = lm.cursor(b"The ")
    lm.cursor(b"A ")  # resets the shared cache
    with pytest.raises(TokenbridgeError, match="stale"):
        first.push(b"x")
    with pytest.raises(TokenbridgeError, match="twice"):
        ByteEnsemble([lm, lm])


def test_impossible_prefix_is_an_error(byte_level, metaspace):
    """No text starts with a stray continuation byte: a clear error, not a made-up distribution."""
    for lm, _, _ in (byte_level, metaspace):
        with pytest.raises(TokenbridgeError, match="no canonical continuation"):
            lm.next_byte_logprobs(b"ab\x80")


def test_generation_reuses_the_cache(byte_level):
    lm, _, _ = byte_level
    first = lm.generate(b"The packa", max_bytes=40, temperature=0.8, seed=3)
    assert first == lm.generate(b"The packa", max_bytes=40, temperature=0.8, seed=3)
    assert lm.generate(b"The packa", max_bytes=40, temperature=0.8, seed=4) != first or len(first) < 5
    calls = lm.tree.calls
    cursor = lm.cursor(b"The packa")
    before = lm.tree.calls - calls
    for byte in first:
        cursor.push(bytes([byte]))
    per_byte = (lm.tree.calls - calls - before) / max(1, len(first))
    assert per_byte <= 1.0  # one forward pass per byte at most (none when no new canonical prefix)
    first.decode("utf-8")  # only valid UTF-8 has probability


def test_ensemble_mixes_distributions(byte_level, metaspace):
    a, b = byte_level[0], metaspace[0]
    prefix = b"Debian sys"
    ens = ByteEnsemble([a, b], [0.25, 0.75])
    mix = np.exp(ens.next_byte_logprobs(prefix))
    expected = 0.25 * np.exp(a.next_byte_logprobs(prefix)) + 0.75 * np.exp(b.next_byte_logprobs(prefix))
    assert mix == pytest.approx(expected, abs=1e-12)
    data = corpus("en", 400, 80).encode()
    rows = ens.byte_logprobs(data)
    single = np.logaddexp(np.log(0.25) + a.byte_logprobs(data), np.log(0.75) + b.byte_logprobs(data))
    assert rows == pytest.approx(single, abs=1e-12)
    assert ByteEnsemble([a]).logprob(data) == pytest.approx(a.logprob(data), abs=1e-12)
    with pytest.raises(TokenbridgeError, match="weight"):
        ByteEnsemble([a, b], [1.0])


def test_unsupported_tokenizers_are_refused(tmp_path):
    from transformers import AutoTokenizer

    tokdir = make_wordpiece(tmp_path / "wp")
    model = load_lm(make_model(tmp_path / "m", "llama", make_byte_level(tmp_path / "bl")))
    with pytest.raises(TokenbridgeError, match="WordPiece|not BPE"):
        ByteLM(model, AutoTokenizer.from_pretrained(str(tokdir)))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2", "mistral"])
def test_tree_forward_equals_plain_forward(tmp_path, family):
    kind = "metaspace" if family in ("gemma3", "mistral") else "byte_level"
    tokdir = make_byte_level(tmp_path / "t") if kind == "byte_level" else make_metaspace(tmp_path / "t")
    model = load_lm(make_model(tmp_path / "m", family, tokdir)).double()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(5, 300, (40,), generator=g).tolist()  # longer than gemma3's window of 16
    branch = torch.randint(5, 300, (3,), generator=g).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
        ref_branch = model(torch.tensor([seq[:25] + branch])).logits[0]
    tree = TokenTree(model)
    nodes, hidden = tree.extend([(None, seq[0])] + [(k, t) for k, t in enumerate(seq[1:30])])
    assert torch.allclose(tree.head(hidden), ref[:30], atol=1e-10)
    more, hidden = tree.extend([(nodes[24], branch[0]), (0, branch[1]), (1, branch[2])])
    assert torch.allclose(tree.head(hidden), ref_branch[25:28], atol=1e-10)
    _, hidden = tree.extend([(nodes[29], seq[30])])
    assert torch.allclose(tree.head(hidden)[0], ref[30], atol=1e-10)


def test_cli_bytes_score_and_generate(byte_level, metaspace, tmp_path, capsys):
    from tokenbridge.cli import main

    text = tmp_path / "t.txt"
    text.write_text(corpus("en", 700, 300), encoding="utf-8")
    model_a, model_b = str(byte_level[2]), str(metaspace[2])
    assert main(["bytes", "score", model_a, "--text", str(text), "--window", "120", "--json", "--quiet"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["files"][0]["windows"] == 3 and math.isfinite(single["bits_per_byte"])
    assert main(["bytes", "score", model_a, model_b, "--weights", "1", "3", "--text", str(text), "--window", "120",
                 "--json", "--quiet"]) == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["weights"] == pytest.approx([0.25, 0.75])
    assert pair["member_bits_per_byte"][0] == pytest.approx(single["bits_per_byte"], abs=1e-9)
    assert main(["bytes", "generate", model_a, model_b, "--prompt", "The packa", "--max-bytes", "12",
                 "--temperature", "0.7", "--seed", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["bytes", "generate", model_a, model_b, "--prompt", "The packa", "--max-bytes", "12",
                 "--temperature", "0.7", "--seed", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first


def test_cli_bytes_refuses_what_it_cannot_do_exactly(tmp_path, capsys):
    from tokenbridge.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello there", encoding="utf-8")
    wordpiece = make_model(tmp_path / "bert_like", "llama", make_wordpiece(tmp_path / "wp"))
    assert main(["bytes", "score", str(wordpiece), "--text", str(text)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert error.startswith("tokenbridge: error:") and "WordPiece" in error
    assert main(["bytes", "score", str(wordpiece), str(wordpiece), "--weights", "1", "--text", str(text)]) == 2
    assert "--weights" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_vocabulary_work_in_blocks_is_exact(request, which, monkeypatch):
    """The per-node vocabulary work (batched torch ops over head chunks and row blocks) does not depend on
    how the nodes are grouped: one node at a time gives the same per-byte log-probabilities."""
    import tokenbridge.bytes.lm as lm_module

    lm, _, _ = request.getfixturevalue(which)
    data = corpus("de", 300, 80).encode() + "中.".encode()
    grouped = lm.byte_logprobs(data)
    chunk = lm.chunk
    try:
        lm.chunk = 5
        monkeypatch.setattr(lm_module, "VOCAB_ROWS", 2)
        assert lm.byte_logprobs(data) == pytest.approx(grouped, abs=1e-12)
        lm.chunk = 1
        monkeypatch.setattr(lm_module, "VOCAB_ROWS", 1)
        assert lm.byte_logprobs(data) == pytest.approx(grouped, abs=1e-12)
    finally:
        lm.chunk = chunk


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_attention_in_query_blocks_is_exact(request, which, monkeypatch):
    """A large tree pass runs its attention a few queries at a time against the keys up to each block: the
    per-byte log-probabilities are those of the one-call attention."""
    import tokenbridge.bytes.tree as tree_module

    lm, _, _ = request.getfixturevalue(which)
    data = corpus("en", 500, 70).encode() + "ä中".encode()
    monkeypatch.setattr(tree_module, "QUERY_BLOCK", 10 ** 6)
    whole = lm.byte_logprobs(data)
    monkeypatch.setattr(tree_module, "QUERY_BLOCK", 3)
    assert lm.byte_logprobs(data) == pytest.approx(whole, abs=1e-12)
    cursor = lm.cursor(data[:40])  # blocks over a pass on top of a cache too
    assert cursor.distribution()[data[40]] == pytest.approx(whole[40], abs=1e-9)
