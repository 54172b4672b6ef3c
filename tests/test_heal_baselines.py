"""ULD and MinED (tokenbridge.heal.baselines) against plain-Python references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.heal import baselines
from tokenbridge.heal.baselines import cached_mined_mapping, mined_loss, mined_mapping, uld_distance
from tokenbridge.load.tokenizer import load_tokenizer


def softmax_list(row: list[float], temperature: float = 1.0, valid: list[bool] | None = None) -> list[float]:
    valid = valid or [True] * len(row)
    top = max(x for x, ok in zip(row, valid) if ok)
    weights = [math.exp((x - top) / temperature) if ok else 0.0 for x, ok in zip(row, valid)]
    total = sum(weights)
    return [w / total for w in weights]


def uld_reference(student: list[float], teacher: list[float], temperature: float = 1.0,
                  valid_student=None, valid_teacher=None) -> float:
    s = sorted(softmax_list(student, temperature, valid_student), reverse=True)
    t = sorted(softmax_list(teacher, temperature, valid_teacher), reverse=True)
    width = max(len(s), len(t))
    s += [0.0] * (width - len(s))
    t += [0.0] * (width - len(t))
    return sum(abs(a - b) for a, b in zip(s, t))


# -- ULD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
def test_uld_matches_sorted_loop(vs, vt):
    generator = torch.Generator().manual_seed(vs * 100 + vt)
    student = torch.randn(5, vs, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(5, vt, generator=generator, dtype=torch.float64) * 2
    got = uld_distance(student, teacher, temperature=1.7)
    want = [uld_reference(s.tolist(), t.tolist(), 1.7) for s, t in zip(student, teacher)]
    assert got.shape == (5,)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert min(want) > 0.05


def test_uld_masks_padded_rows_and_computes_bf16_in_float32():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 10, generator=generator) * 3
    teacher = torch.randn(4, 8, generator=generator) * 3
    valid_student = torch.tensor([True] * 7 + [False] * 3)
    valid_teacher = torch.tensor([True, False] * 4)
    got = uld_distance(student, teacher, valid_student=valid_student, valid_teacher=valid_teacher)
    want = [uld_reference(s.tolist(), t.tolist(), 1.0, valid_student.tolist(), valid_teacher.tolist())
            for s, t in zip(student, teacher)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    unmasked = uld_distance(student, teacher)
    assert (unmasked - got).abs().min() > 1e-3  # the masks change the answer

    half = uld_distance(student.bfloat16(), teacher.bfloat16())
    assert half.dtype == torch.float32
    rounded = [uld_reference(s.tolist(), t.tolist())
               for s, t in zip(student.bfloat16().float(), teacher.bfloat16().float())]
    assert half.tolist() == pytest.approx(rounded, abs=1e-5)


def test_uld_is_zero_for_the_same_probabilities_on_other_vocabularies():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=generator)
    valid_teacher = torch.tensor([True, False, True, True, False, True, True, False, True])
    teacher = torch.full((3, 9), 5.0)  # three padded rows, masked out
    for row in range(3):
        teacher[row, valid_teacher] = student[row, torch.randperm(6, generator=generator)]
    assert uld_distance(student, teacher, valid_teacher=valid_teacher).abs().max() < 1e-6
    assert uld_distance(student, teacher).min() > 0.1  # with the padded rows counted it is not 0


def test_uld_gradient_reaches_the_student_only():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 9, generator=generator, requires_grad=True)
    uld_distance(student, teacher, temperature=2.0).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# -- MinED mapping --------------------------------------------------------------------------------

def levenshtein(a: bytes, b: bytes) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def brute_force_mapping(student, teacher) -> tuple[list[int], int]:
    """The documented rule by exhaustive search, and how many student tokens had tied nearest tokens."""
    specials = {t.token: t.id for t in teacher.tokens if t.special}
    candidates = [t for t in teacher.tokens if not t.special and t.bytes]
    out, ties = [], 0
    for s in student.tokens:
        if s.special:
            out.append(specials.get(s.token, -1))
            continue
        if not s.bytes:
            out.append(-1)
            continue
        best, keys = None, []
        for t in candidates:
            if best is not None and abs(len(s.bytes) - len(t.bytes)) > best[0]:  # cannot be nearer, nor tie
                continue
            key = (levenshtein(s.bytes, t.bytes), t.byte_fallback != s.byte_fallback, t.id)
            keys.append(key)
            best = key if best is None or key < best else best
        ties += sum(k[0] == best[0] for k in keys) > 1
        out.append(best[2])
    return out, ties


@pytest.fixture(scope="module")
def vocabs(tok_dirs):
    return {name: vocabulary(load_tokenizer(tok_dirs[name])) for name in ("byte_level", "byte_level_de", "metaspace")}


@pytest.mark.parametrize("student,teacher", [("metaspace", "byte_level"), ("byte_level", "byte_level_de"),
                                             ("byte_level", "metaspace")])
def test_mined_mapping_matches_brute_force(vocabs, student, teacher):
    got = mined_mapping(vocabs[student], vocabs[teacher], workers=1)
    want, ties = brute_force_mapping(vocabs[student], vocabs[teacher])
    assert got.dtype == np.int64 and got.shape == (len(vocabs[student]),)
    assert got.tolist() == want
    assert ties > 20  # the tie-break decides many tokens
    t_tokens = vocabs[teacher].tokens
    for s in vocabs[student].tokens:  # ordinary and special tokens never cross over
        if got[s.id] >= 0:
            assert t_tokens[got[s.id]].special == s.special
    specials = [s for s in vocabs[student].tokens if s.special]
    if student.startswith("byte_level") and teacher.startswith("byte_level"):
        assert all(t_tokens[got[s.id]].token == s.token for s in specials)  # same <|im_...|> content
    else:
        assert all(got[s.id] == -1 for s in specials)  # no special of the same content


def test_mined_mapping_prefers_ordinary_tokens_to_byte_fallback(vocabs):
    """Gemma-like teacher: <0x41> precedes "A" and has the same bytes; the student's "A" maps to "A"."""
    byte_level, metaspace = vocabs["byte_level"], vocabs["metaspace"]
    got = mined_mapping(byte_level, metaspace, workers=1)
    by_bytes = {t.bytes: t for t in metaspace.tokens if not t.special and not t.byte_fallback}
    doubled = [s for s in byte_level.tokens if len(s.bytes) == 1 and s.bytes in by_bytes]
    assert len(doubled) > 20
    assert all(got[s.id] == by_bytes[s.bytes].id for s in doubled)
    fallback = {t.bytes: t.id for t in metaspace.tokens if t.byte_fallback}
    assert all(fallback[s.bytes] < got[s.id] for s in doubled)  # the lowest id alone would pick <0xNN>


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_mined_mapping_of_a_vocabulary_onto_itself_is_the_identity(vocabs, name):
    vocab = vocabs[name]
    got = mined_mapping(vocab, vocab, workers=1)
    assert got.tolist() == [t.id if t.special or t.bytes else -1 for t in vocab.tokens]
    if name == "metaspace":  # non-vacuous: byte-fallback and ordinary tokens share bytes there
        ordinary = {t.bytes for t in vocab.tokens if not t.special and not t.byte_fallback}
        assert sum(t.bytes in ordinary for t in vocab.tokens if t.byte_fallback) > 20


def test_cached_mined_mapping_reads_verifies_and_rebuilds(vocabs, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(tmp_path))
    student, teacher = vocabs["metaspace"], vocabs["byte_level"]
    want, _ = brute_force_mapping(student, teacher)
    calls = []
    compute = baselines.mined_mapping

    def counted(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(baselines, "mined_mapping", counted)
    first = cached_mined_mapping(student, teacher, workers=1)
    assert first.tolist() == want and len(calls) == 1
    entries = list((tmp_path / "mined").iterdir())
    assert len(entries) == 1 and entries[0].name == baselines.mined_key(student, teacher)[:24]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(baselines, "mined_mapping", fail)
    second = cached_mined_mapping(student, teacher, workers=1)
    assert second.dtype == np.int64 and second.tolist() == want

    monkeypatch.setattr(baselines, "mined_mapping", counted)
    stored = entries[0] / "mapping.npy"
    data = bytearray(stored.read_bytes())
    data[-8:] = ((want[-1] + 1) % len(teacher)).to_bytes(8, "little")  # a valid id: only the checksum tells
    stored.write_bytes(bytes(data))
    assert cached_mined_mapping(student, teacher, workers=1).tolist() == want and len(calls) == 2

    stored.write_bytes(stored.read_bytes()[:100])  # truncated
    assert cached_mined_mapping(student, teacher, workers=1).tolist() == want and len(calls) == 3
    assert [p.name for p in (tmp_path / "mined").iterdir()] == [entries[0].name]  # no temp dirs left

    other = cached_mined_mapping(teacher, student, workers=1)  # the other direction: its own entry
    assert len(other) == len(teacher) and len(calls) == 4
    assert len(list((tmp_path / "mined").iterdir())) == 2


# -- MinED loss -----------------------------------------------------------------------------------

def mined_reference(student, teacher, mapping, one_to_one, student_next, temperature) -> list[float]:
    out = []
    for s_row, t_row, single, nxt in zip(student, teacher, one_to_one, student_next):
        q = softmax_list([x for x in s_row], temperature)
        if not single:
            out.append(-math.log(q[nxt]))
            continue
        logits = [t_row[mapping[v]] / temperature if v < len(mapping) and mapping[v] >= 0 else None
                  for v in range(len(s_row))]
        top = max(x for x in logits if x is not None)
        weights = [math.exp(x - top) if x is not None else 0.0 for x in logits]
        p = [w / sum(weights) for w in weights]
        out.append(sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0))
    return out


def test_mined_loss_matches_hand_computation():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(6, 7, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2
    mapping = torch.tensor([3, -1, 0, 3, 4, 1])  # 6 < 7 student rows: the last has no counterpart
    one_to_one = torch.tensor([True, False, True, True, False, True])
    student_next = torch.tensor([0, 2, 6, 1, 6, 3])
    got = mined_loss(student, teacher, mapping, one_to_one, student_next, temperature=1.5)
    want = mined_reference(student.tolist(), teacher.tolist(), mapping.tolist(), one_to_one.tolist(),
                           student_next.tolist(), 1.5)
    assert got.shape == (6,)
    assert got.tolist() == pytest.approx(want, abs=1e-10)

    half = mined_loss(student.bfloat16(), teacher.bfloat16(), mapping, one_to_one, student_next)
    assert half.dtype == torch.float32
    want = mined_reference(student.bfloat16().double().tolist(), teacher.bfloat16().double().tolist(),
                           mapping.tolist(), one_to_one.tolist(), student_next.tolist(), 1.0)
    assert half.tolist() == pytest.approx(want, abs=1e-5)


def test_mined_loss_is_zero_for_the_teacher_itself():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 12, generator=generator) * 4
    everywhere = torch.ones(8, dtype=torch.bool)
    got = mined_loss(logits, logits, torch.arange(12), everywhere, torch.zeros(8, dtype=torch.long))
    assert got.abs().max() < 1e-6
    assert mined_loss(logits, logits.roll(1, dims=1), torch.arange(12), everywhere,
                      torch.zeros(8, dtype=torch.long)).min() > 1e-2


def test_mined_loss_gradient_reaches_the_student_only():
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(5, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 4, generator=generator, requires_grad=True)
    mapping = torch.tensor([0, 1, -1, 2, 3])
    loss = mined_loss(student, teacher, mapping, torch.tensor([True, False, True, False, True]),
                      torch.tensor([1, 2, 3, 4, 5]), temperature=2.0)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad.abs().sum(-1) > 0).all()
    assert teacher.grad is None
