"""Cross-tokenizer distillation baselines: ULD and MinED, over already-aligned positions.

The caller gathers ``N`` aligned rows: ``student_logits [N, Vs]`` and ``teacher_logits [N, Vt]`` that
predict what follows the same byte prefix.  ``Vs``/``Vt`` are embedding rows and may exceed the
tokenizers' lengths.  The teacher is always detached; gradient flows into ``student_logits`` only.
Half-precision inputs are computed in float32 (float64 stays float64).

* :func:`uld_distance`: ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
  Logit Distillation Loss"): the L1 distance between the two distributions sorted in descending order,
  the shorter zero-padded (their closed form of Wasserstein-1; as tokenkit's ``compute_baseline_uld_loss``).
* :func:`mined_mapping`: MinED (Wan et al. 2024, FuseLLM; the baseline of DSKD and ALM): each student
  token's teacher token of minimum Levenshtein distance between their byte strings.
  :func:`cached_mined_mapping` keeps it in tokenbridge's cache.
* :func:`mined_loss`: per position, KL(teacher mapped onto the student vocabulary || student) where the
  next chunk is one token on both sides, else the cross-entropy of the student's actual next token.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np
import torch

from ..align.token_bytes import TokenInfo, Vocabulary
from ..cache import cache_root, staged_entry, usable_entry
from ..errors import TokenbridgeError
from .losses import _wide

NO_TOKEN = -1
MINED_FORMAT = "tokenbridge-mined/1"
_MAPPING_FILE = "mapping.npy"
_INFO_FILE = "mined.json"
_ROWS_PER_BLOCK = 1024  # student tokens per distance block: 1024 x 49,152 teacher tokens = 50 MB (uint8)


# -- ULD ------------------------------------------------------------------------------------------

def _probs(logits: torch.Tensor, valid: torch.Tensor | None, temperature: float) -> torch.Tensor:
    logits = _wide(logits) / temperature
    if valid is not None:
        if valid.shape != logits.shape[-1:]:
            raise TokenbridgeError(f"vocabulary mask has shape {tuple(valid.shape)}, the logits have "
                                   f"{logits.shape[-1]} rows")
        logits = logits.masked_fill(~valid.to(logits.device), -math.inf)
    return torch.softmax(logits, dim=-1)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 valid_student: torch.Tensor | None = None,
                 valid_teacher: torch.Tensor | None = None) -> torch.Tensor:
    """ULD's distance between the student's and the teacher's next-token distributions, per position.

    student_logits: [N, Vs]; teacher_logits: [N, Vt] (detached here); valid_student: [Vs] bool and
    valid_teacher: [Vt] bool or None: rows outside a tokenizer (embedding padding) get probability 0.
    Returns [N]: ``sum_k |sort(p_s)[k] - sort(p_t)[k]|`` over both softmaxes at ``temperature``, sorted
    descending, the shorter padded with zeros to the longer length.
    """
    student = _probs(student_logits, valid_student, temperature)
    teacher = _probs(teacher_logits.detach(), valid_teacher, temperature).to(student.dtype)
    student = torch.sort(student, dim=-1, descending=True).values
    teacher = torch.sort(teacher, dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    student = torch.nn.functional.pad(student, (0, width - student.shape[-1]))
    teacher = torch.nn.functional.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum(-1)


# -- MinED mapping --------------------------------------------------------------------------------

def _text(token: TokenInfo) -> str:
    """A token's bytes as a string of the same length (one character per byte), for rapidfuzz."""
    return token.bytes.decode("latin-1")


def mined_mapping(student: Vocabulary, teacher: Vocabulary, progress: bool = False,
                  workers: int = -1) -> np.ndarray:
    """MinED: for every student token, the teacher token whose bytes are nearest in Levenshtein distance.

    Returns int64 [len(student)]: a teacher id, or -1 (no counterpart).  Ordinary tokens map only to
    ordinary teacher tokens with bytes; ties go to the lowest teacher id, except that a teacher token of
    the other kind (byte-fallback ``<0xNN>`` against an ordinary token) ranks after one of the same kind:
    a student's ``"A"`` maps to Gemma's ``"A"``, not to its earlier ``<0x41>``, which Gemma never
    predicts for text it can spell.  Special tokens map to the teacher special of the same content,
    else -1; tokens without bytes map to -1.  ``workers``: threads for rapidfuzz (-1: all cores).

    Differs from tokenkit's ``compute_mined_mapping``: it compares byte strings (tokenkit: byteified
    vocabulary strings, the same bytes), tie-breaks by id instead of by length-sorted search order, and
    leaves specials and empty tokens unmapped (-1) instead of matching their content as text.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    mapping = np.full(len(student), NO_TOKEN, dtype=np.int64)
    teacher_specials = {t.token: t.id for t in teacher.tokens if t.special}
    candidates = [t for t in teacher.tokens if not t.special and t.bytes]
    if not candidates:
        raise TokenbridgeError("the teacher's vocabulary has no token with bytes: MinED cannot map onto it")
    exact: dict[bytes, list[TokenInfo]] = {}
    for token in candidates:  # ascending id
        exact.setdefault(token.bytes, []).append(token)

    searched: list[TokenInfo] = []
    for token in student.tokens:
        if token.special:
            mapping[token.id] = teacher_specials.get(token.token, NO_TOKEN)
        elif token.bytes in exact:
            same = exact[token.bytes]
            mapping[token.id] = next((t.id for t in same if t.byte_fallback == token.byte_fallback), same[0].id)
        elif token.bytes:
            searched.append(token)

    texts = [_text(t) for t in candidates]
    ids = np.array([t.id for t in candidates], dtype=np.int64)
    # rank = 2 * distance + (kinds differ): argmin's first occurrence is then the lowest id among equals.
    other_kind = {kind: np.array([t.byte_fallback != kind for t in candidates], dtype=np.int32)
                  for kind in (False, True)}
    longest = max(max(len(t) for t in texts), max((len(t.bytes) for t in searched), default=0))
    dtype = np.uint8 if longest < 255 else np.int32  # a distance never exceeds the longer length

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(searched), desc="MinED mapping", unit="tok", mininterval=1.0)
    try:
        for kind in (False, True):
            group = [t for t in searched if t.byte_fallback == kind]
            for start in range(0, len(group), _ROWS_PER_BLOCK):
                block = group[start:start + _ROWS_PER_BLOCK]
                distances = cdist([_text(t) for t in block], texts, scorer=Levenshtein.distance, dtype=dtype,
                                  workers=workers)
                if other_kind[kind].any():
                    distances = distances.astype(np.int32) * 2 + other_kind[kind]
                mapping[[t.id for t in block]] = ids[distances.argmin(axis=1)]
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return mapping


def mined_key(student: Vocabulary, teacher: Vocabulary) -> str:
    """SHA-256 over both vocabularies' (id, special, byte-fallback, bytes, a special's content) and the format."""
    digest = hashlib.sha256(f"{MINED_FORMAT}\n".encode())
    for side, vocab in (("student", student), ("teacher", teacher)):
        digest.update(f"{side} {len(vocab)}\n".encode())
        for token in vocab.tokens:
            content = token.token.encode("utf-8") if token.special else b""
            digest.update(f"{token.id} {int(token.special)} {int(token.byte_fallback)} {len(token.bytes)} "
                          f"{len(content)}\n".encode())
            digest.update(token.bytes)
            digest.update(content)
    return digest.hexdigest()


def _read_entry(entry, key: str, student_size: int, teacher_size: int) -> np.ndarray | None:
    """The cached mapping, or None (reported) when its manifest, key, shape or ids are wrong."""
    if not usable_entry(entry):
        return None
    try:
        info = json.loads((entry / _INFO_FILE).read_text(encoding="utf-8"))
        mapping = np.load(entry / _MAPPING_FILE, allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError):
        mapping, info = None, None
    expected = {"format": MINED_FORMAT, "key": key, "student_size": student_size, "teacher_size": teacher_size}
    if (mapping is not None and info == expected and mapping.dtype == np.int64 and mapping.shape == (student_size,)
            and ((mapping >= NO_TOKEN) & (mapping < teacher_size)).all()):
        return mapping
    print(f"tokenbridge: cache entry {entry} does not hold this MinED mapping; rebuilding", file=sys.stderr)
    return None


def cached_mined_mapping(student: Vocabulary, teacher: Vocabulary, progress: bool = False,
                         workers: int = -1) -> np.ndarray:
    """:func:`mined_mapping`, computed once and kept under ``cache_root()/mined/<key>`` (verified on each use)."""
    key = mined_key(student, teacher)
    entry = cache_root() / "mined" / key[:24]
    cached = _read_entry(entry, key, len(student), len(teacher))
    if cached is not None:
        return cached
    mapping = mined_mapping(student, teacher, progress=progress, workers=workers)
    with staged_entry(entry) as tmp:
        np.save(tmp / _MAPPING_FILE, mapping, allow_pickle=False)
        info = {"format": MINED_FORMAT, "key": key, "student_size": len(student), "teacher_size": len(teacher)}
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return mapping


# -- MinED loss -----------------------------------------------------------------------------------

def mined_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mapping: torch.Tensor,
               one_to_one: torch.Tensor, student_next: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MinED's loss per aligned position.

    student_logits: [N, Vs]; teacher_logits: [N, Vt] (detached here); mapping: [M] long, M <= Vs, a
    teacher id per student id (-1: none); one_to_one: [N] bool, the next chunk is one token on both
    sides; student_next: [N] long, the student's next token.  With ``q = softmax(student_logits / T)``:
    where ``one_to_one``, ``KL(p || q)`` with ``p[v] = softmax_v(teacher_logits[mapping[v]] / T)``, ids
    unmapped or ``>= M`` excluded (probability 0); elsewhere ``-log q[student_next]``.  Returns [N].

    tokenkit's ``compute_baseline_mined_loss`` (after DSKD) gets the second case as a KL from one-hot
    logits of +100 / -100000, which float32 turns into an exact one-hot: here the one-hot is exact, so
    the KL is the cross-entropy.  Its temperature divides the student's logits in both cases; so here.
    """
    student = _wide(student_logits) / temperature
    size = student.shape[-1]
    if mapping.ndim != 1 or mapping.shape[0] > size:
        raise TokenbridgeError(f"MinED mapping has shape {tuple(mapping.shape)}, the student has {size} rows")
    mapping = mapping.to(student.device)
    mapped = mapping >= 0
    if not bool(mapped.any()):
        raise TokenbridgeError("MinED mapping maps no student token to a teacher token")
    log_q = torch.log_softmax(student, dim=-1)
    loss = -log_q.gather(-1, student_next[:, None].to(student.device)).squeeze(-1)

    rows = one_to_one.to(student.device).nonzero().squeeze(-1)
    if rows.numel():
        teacher = _wide(teacher_logits.detach()[rows.to(teacher_logits.device)]).to(student)
        spread = torch.full((rows.numel(), size), -math.inf, dtype=student.dtype, device=student.device)
        columns = mapped.nonzero().squeeze(-1)
        spread[:, columns] = teacher[:, mapping[columns]] / temperature
        log_p = torch.log_softmax(spread, dim=-1)
        p = log_p.exp()
        # 0 log 0 = 0; where p > 0 and the student gives no mass (log_q = -inf) the KL is inf, as it is.
        present = p > 0
        terms = torch.where(present, p * (log_p.masked_fill(~present, 0.0) - log_q[rows]), torch.zeros_like(p))
        loss = loss.index_put((rows,), terms.sum(-1))
    return loss
