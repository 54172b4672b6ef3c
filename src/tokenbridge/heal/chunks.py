"""Aligning two tokenizations of one text into chunks that end where both have a token boundary.

Teacher and student read the same bytes with different tokenizers.  A *chunk* is a run of
teacher tokens and a run of student tokens that spell exactly the same bytes: chunks cover the
text in order, and each ends at a byte offset where both token sequences have a boundary.  The
chunk's likelihood under either model is the product of its tokens' conditionals, so teacher and
student likelihoods of a chunk are comparable although their tokens are not (ALM, Minixhofer et
al. 2025).

Two kinds of chunks:

* ``token``: every common boundary ends a chunk (the finest alignment).
* ``word``: only common boundaries followed by whitespace (or the end of the text) end a chunk.
  A boundary inside a word depends on how each tokenizer splits what follows ("Deb|ian" against
  "Debian"), so likelihoods of chunks cut there are biased.  Ending chunks before whitespace,
  and adding each model's probability that its next token starts with whitespace, compares the
  probability of the same event under both models: "these bytes, then whitespace".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..align.token_bytes import Vocabulary
from ..errors import TokenbridgeError

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
CHUNK_KINDS = ("word", "token")


@dataclass(frozen=True)
class Chunk:
    """Teacher tokens ``[teacher_start, teacher_end)`` and student tokens ``[student_start, student_end)``
    spell the bytes ``[byte_start, byte_end)`` of the text."""

    byte_start: int
    byte_end: int
    teacher_start: int
    teacher_end: int
    student_start: int
    student_end: int


def token_ends(ids: list[int], vocab: Vocabulary, data: bytes) -> np.ndarray:
    """Byte offset at which each token of ``ids`` ends; checks that the tokens spell ``data`` exactly."""
    ends = np.empty(len(ids), dtype=np.int64)
    offset = 0
    for position, index in enumerate(ids):
        info = vocab.tokens[index]
        if info.special:
            raise TokenbridgeError(f"token {info.token!r} is a control token inside the text; it has no bytes")
        piece = info.bytes
        if data[offset:offset + len(piece)] != piece:
            raise TokenbridgeError(
                f"the tokenizer's tokens do not spell the text's bytes at byte {offset} (token {info.token!r}); "
                "healing needs a tokenizer that keeps every byte (no normalizer that changes text)")
        offset += len(piece)
        ends[position] = offset
    if offset != len(data):
        raise TokenbridgeError(f"the tokenizer's tokens spell {offset} of the text's {len(data)} bytes")
    return ends


def align_chunks(teacher_ends: np.ndarray, student_ends: np.ndarray, data: bytes, kind: str = "word",
                 followed_by: int | None = None) -> list[Chunk]:
    """The chunks of ``data`` for two tokenizations given by their token end offsets.

    ``followed_by`` is the byte after ``data`` in the document (None at the end of the document): it
    decides whether the last boundary counts as one before whitespace.  In ``word`` mode bytes after
    the last boundary before whitespace belong to no chunk (they are left out of the loss).
    """
    if kind not in CHUNK_KINDS:
        raise TokenbridgeError(f"unknown chunk kind {kind!r} ({', '.join(CHUNK_KINDS)})")
    length = len(data)
    for name, ends in (("teacher", teacher_ends), ("student", student_ends)):
        if len(ends) and (ends[-1] != length or np.any(np.diff(ends) <= 0)):
            raise TokenbridgeError(f"the {name} token offsets do not cover the text in order")
    common = np.intersect1d(teacher_ends, student_ends, assume_unique=True)
    if kind == "word":
        keep = [e for e in common.tolist() if
                (data[e] in WHITESPACE if e < length else (followed_by is None or followed_by in WHITESPACE))]
    else:
        keep = common.tolist()
    chunks = []
    byte_start = teacher_start = student_start = 0
    teacher_index = {int(e): i + 1 for i, e in enumerate(teacher_ends)}
    student_index = {int(e): i + 1 for i, e in enumerate(student_ends)}
    for end in keep:
        teacher_end, student_end = teacher_index[end], student_index[end]
        chunks.append(Chunk(byte_start, end, teacher_start, teacher_end, student_start, student_end))
        byte_start, teacher_start, student_start = end, teacher_end, student_end
    return chunks


def whitespace_start_mask(vocab: Vocabulary, extra_ids: list[int] = ()) -> np.ndarray:
    """Boolean mask over the vocabulary: tokens whose bytes start with whitespace, plus ``extra_ids`` (EOS)."""
    mask = np.zeros(len(vocab), dtype=bool)
    for info in vocab.tokens:
        if info.bytes and info.bytes[0] in WHITESPACE:
            mask[info.id] = True
    for index in extra_ids:
        if index is not None:
            mask[int(index)] = True
    return mask
