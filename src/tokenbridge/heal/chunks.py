"""Aligning two tokenizations of one text into chunks that end where both have a token boundary.

Teacher and student read the same bytes with different tokenizers.  A *chunk* is a run of
teacher tokens and a run of student tokens that spell exactly the same bytes: chunks cover the
text in order, and each ends at a byte offset where both token sequences have a boundary.  The
chunk's likelihood under either model is the product of its tokens' conditionals, so teacher and
student likelihoods of a chunk are comparable although their tokens are not (ALM, Minixhofer et
al. 2025).

Three kinds of chunks:

* ``token``: every common boundary ends a chunk (the finest alignment).
* ``word``: only common boundaries followed by whitespace (or the end of the text) end a chunk.
  A boundary inside a word depends on how each tokenizer splits what follows ("Deb|ian" against
  "Debian"), so likelihoods of chunks cut there are biased.  Ending chunks before whitespace,
  and adding each model's probability that its next token starts with whitespace, compares the
  probability of the same event under both models: "these bytes, then whitespace".  This is
  bias-free only when both tokenizers attach spaces to word starts.
* ``unbiased``: a common boundary ends a chunk when the pair (teacher's last token, student's last
  token) is unbiased (:class:`PairBias`, tokenkit's ``compute_tokenizer_info.py``): under each
  tokenizer, the unigram mass of the ways its next token could straddle the boundary that the
  other tokenizer does not share is at most a threshold.  It needs no assumption about spaces.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..align.token_bytes import Vocabulary, is_valid_utf8
from ..errors import TokenbridgeError

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
CHUNK_KINDS = ("word", "token", "unbiased")
SMOOTHING = 1e-9  # tokenkit configs/compute_tokenizer_info.yaml: additive_smoothing_constant
BIAS_THRESHOLD = 1e-4  # tokenkit configs/cross_tokenizer_distill.yaml: tokenizer_pair_bias_threshold

Encoder = Callable[[list[bytes]], list[list[int]]]  # valid UTF-8 byte strings -> token ids, no special tokens added


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
                 followed_by: int | None = None, *, teacher_ids: Sequence[int] | None = None,
                 student_ids: Sequence[int] | None = None, bias: PairBias | None = None) -> list[Chunk]:
    """The chunks of ``data`` for two tokenizations given by their token end offsets.

    ``followed_by`` is the byte after ``data`` in the document (None at the end of the document): it
    decides whether the last boundary counts as one before whitespace.  In ``word`` and ``unbiased``
    mode bytes after the last kept boundary belong to no chunk (they are left out of the loss).

    ``unbiased`` also needs ``teacher_ids`` and ``student_ids`` (the tokens whose ends are given) and
    ``bias``: a common boundary ends a chunk iff ``bias.unbiased(teacher's last token, student's last
    token)``.  The end of ``data`` is no exception, except at the end of the document
    (``followed_by`` None), where nothing follows.  tokenkit's ``get_unbiased_alignments`` keeps the
    tokens after the last unbiased boundary (up to the last common one) as one more chunk; here they
    are left out, as in ``word`` mode, because the end of that chunk is biased.
    """
    if kind not in CHUNK_KINDS:
        raise TokenbridgeError(f"unknown chunk kind {kind!r} ({', '.join(CHUNK_KINDS)})")
    length = len(data)
    for name, ends in (("teacher", teacher_ends), ("student", student_ends)):
        if len(ends) and (ends[-1] != length or np.any(np.diff(ends) <= 0)):
            raise TokenbridgeError(f"the {name} token offsets do not cover the text in order")
    common = np.intersect1d(teacher_ends, student_ends, assume_unique=True)
    teacher_index = {int(e): i + 1 for i, e in enumerate(teacher_ends)}
    student_index = {int(e): i + 1 for i, e in enumerate(student_ends)}
    if kind == "word":
        keep = [e for e in common.tolist() if
                (data[e] in WHITESPACE if e < length else (followed_by is None or followed_by in WHITESPACE))]
    elif kind == "unbiased":
        if teacher_ids is None or student_ids is None or bias is None:
            raise TokenbridgeError("chunk kind 'unbiased' needs teacher_ids, student_ids and bias (a PairBias)")
        for name, ids, ends in (("teacher", teacher_ids, teacher_ends), ("student", student_ids, student_ends)):
            if len(ids) != len(ends):
                raise TokenbridgeError(f"{len(ids)} {name} token ids for {len(ends)} {name} token offsets")
        keep = [e for e in common.tolist() if (e == length and followed_by is None) or
                bias.unbiased(int(teacher_ids[teacher_index[e] - 1]), int(student_ids[student_index[e] - 1]))]
    else:
        keep = common.tolist()
    chunks = []
    byte_start = teacher_start = student_start = 0
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


# -- unbiased boundaries -------------------------------------------------------------------------------


def unigram_probs(encoded: list[list[int]], size: int, smoothing: float = SMOOTHING) -> np.ndarray:
    """Unigram probability of each of ``size`` token ids [size] (float64), counted over ``encoded``.

    Additive smoothing as tokenkit's ``compute_tokenizer_info.py``: ``count + smoothing * total``,
    normalised, so a token never seen still has a small probability.  (tokenkit's collator also sets
    special tokens to the largest count; the script that computes the biases does not, nor does this.)
    """
    flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)
    if flat.size == 0:
        raise TokenbridgeError("no tokens to count unigram probabilities from")
    if flat.min() < 0 or flat.max() >= size:
        raise TokenbridgeError(f"token id {int(flat.max() if flat.max() >= size else flat.min())} "
                               f"outside a vocabulary of {size}")
    counts = np.bincount(flat, minlength=size).astype(np.float64)
    counts += smoothing * flat.size
    return counts / counts.sum()


def backend_encoder(vocab: Vocabulary) -> Encoder:
    """An :data:`Encoder` through the vocabulary's ``tokenizers`` backend (normalizer, pre-tokenizer, model).

    It encodes as a transformers tokenizer called with ``add_special_tokens=False, split_special_tokens=True``
    (as ``heal.data.Side.encode``), about ten times faster: special tokens' texts are read as plain text.
    Like transformers, it sets the backend's ``encode_special_tokens`` for the call (then restores it), so
    one backend must not be used from two threads at once.
    """
    backend = vocab.backend
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode(texts: list[bytes]) -> list[list[int]]:
        if not texts:
            return []
        decoded = [t.decode("utf-8") for t in texts]
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True  # what transformers sets for split_special_tokens=True
        try:
            return [e.ids for e in batch(decoded, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before

    return encode


def is_space_only(data: bytes) -> bool:
    """Whether a token's bytes decode to nothing but whitespace (tokenkit: ``len(decode(id).strip()) == 0``)."""
    return bool(data) and not data.decode("utf-8", errors="replace").strip()


class _Covers:
    """One tokenizer's cover sets, computed per last token on demand and memoised."""

    def __init__(self, vocab: Vocabulary, probs: np.ndarray, encode: Encoder):
        self.vocab, self.probs, self.encode = vocab, probs, encode
        entries = sorted((info.bytes, info.id) for info in vocab.tokens if info.bytes and not info.special)
        self.keys = [data for data, _ in entries]
        self.ids = [index for _, index in entries]
        self.memo: dict[int, dict[bytes, int]] = {}

    def starting_with(self, prefix: bytes) -> list[int]:
        """Ids of the (non-special) tokens whose bytes start with ``prefix``."""
        lo = bisect_left(self.keys, prefix)
        stem = prefix.rstrip(b"\xff")
        hi = bisect_left(self.keys, stem[:-1] + bytes([stem[-1] + 1])) if stem else len(self.keys)
        return self.ids[lo:hi]

    def _encode(self, texts: list[bytes]) -> list[list[int]]:
        return self.encode(texts) if texts else []  # a transformers tokenizer fails on an empty batch

    def cover(self, index: int) -> dict[bytes, int]:
        """``{overhang: id of the straddling token}`` for the last token ``index``.

        For each split ``i`` of the token's bytes ``x``, a token ``b`` that starts with ``x[i:]`` and is
        longer gives the overhang ``o = b[len(x) - i:]`` when the tokenizer encodes ``x[:i] + b`` as
        ``encode(x[:i]) + [b]``.  Byte strings that are not valid UTF-8 are skipped, as tokenkit skips its
        ``UnicodeDecodeError``.  At most one token is valid per overhang (the text ``x + o`` has one encoding).
        """
        found = self.memo.get(index)
        if found is not None:
            return found
        tokens = self.vocab.tokens
        x = tokens[index].bytes
        if not x or tokens[index].special:  # a control token has no bytes: nothing straddles it
            self.memo[index] = {}
            return self.memo[index]
        heads = [i for i in range(1, len(x)) if is_valid_utf8(x[:i])]
        head_ids = dict(zip(heads, self._encode([x[:i] for i in heads]), strict=True))
        head_ids[0] = []
        candidates = []  # (overhang, text, expected encoding)
        for i in sorted(head_ids, reverse=True):
            tail = x[i:]
            for b in self.starting_with(tail):
                piece = tokens[b].bytes
                text = x[:i] + piece
                if len(piece) > len(tail) and is_valid_utf8(text):
                    candidates.append((piece[len(tail):], text, head_ids[i] + [b]))
        texts = sorted({text for _, text, _ in candidates})  # splits can meet in one text: encode it once
        encoded = dict(zip(texts, self._encode(texts), strict=True))
        found = {overhang: expected[-1] for overhang, text, expected in candidates if encoded[text] == expected}
        self.memo[index] = found
        return found


class PairBias:
    """Biases of a common boundary from the pair (teacher's last token, student's last token), lazily memoised.

    ``bias(t, s) = (bias_teacher, bias_student)`` (tokenkit's bias1, bias2): ``bias_teacher`` is the sum
    of the teacher's unigram probabilities of the straddling tokens whose overhangs are in the teacher's
    cover set of ``t`` and not in the student's cover set of ``s`` (see ``_Covers.cover``), and the other
    way round.  The pair is unbiased when both are at most ``threshold``.  Conventions, as in tokenkit:

    * an id beyond its vocabulary's size, or a special token, is an unbiased boundary (0, 0);
    * a pair where neither token's bytes end with the other's is (0, 0): tokenkit computes biases only
      for pairs where one ends with the other and reads every other pair as a missing entry of its
      sparse matrices, 0.  At a real common boundary both tokens end at the same byte, so one always
      ends with the other and this never decides a chunk;
    * a pair where either token is whitespace only is biased, (1, 1), without computing its covers.

    Where this differs from tokenkit: validity is checked by ``encode`` (by default the tokenizer's
    whole pipeline, normalizer and pre-tokenizer included) and compared by ids, while tokenkit runs
    the BPE model alone over the joined pre-tokens and compares token strings; the question asked is
    how the tokenizer would really split the text.  Tokens with the same bytes (Gemma's ``<0xNN>``
    next to a regular token) are each computed; tokenkit keeps one id per byte string, so pairs with
    the other have no entry in its matrices and count as unbiased.

    ``teacher_probs`` [>= len(teacher)] and ``student_probs`` [>= len(student)]: unigram probabilities
    (:func:`unigram_probs`).  ``teacher_encode``/``student_encode``: how each side tokenizes text; the
    default (:func:`backend_encoder`) encodes as ``heal.data.Side.encode`` does, ten times faster.
    """

    def __init__(self, teacher: Vocabulary, student: Vocabulary, teacher_probs: np.ndarray,
                 student_probs: np.ndarray, threshold: float = BIAS_THRESHOLD, *,
                 teacher_encode: Encoder | None = None, student_encode: Encoder | None = None):
        sides = []
        for name, vocab, probs, encode in (("teacher", teacher, teacher_probs, teacher_encode),
                                           ("student", student, student_probs, student_encode)):
            probs = np.asarray(probs, dtype=np.float64)
            if probs.ndim != 1 or len(probs) < len(vocab):
                raise TokenbridgeError(f"{len(probs)} {name} unigram probabilities for a vocabulary of {len(vocab)}")
            sides.append(_Covers(vocab, probs, encode or backend_encoder(vocab)))
        self.teacher, self.student = sides
        self.threshold = float(threshold)
        self._pairs: dict[tuple[int, int], tuple[float, float]] = {}

    def cover(self, side: str, index: int) -> dict[bytes, int]:
        """``{overhang: straddling token id}`` of ``side`` ("teacher" or "student") for its last token ``index``."""
        covers = {"teacher": self.teacher, "student": self.student}.get(side)
        if covers is None:
            raise TokenbridgeError(f"unknown side {side!r} (teacher, student)")
        if not 0 <= index < len(covers.vocab):
            raise TokenbridgeError(f"token id {index} outside the {side}'s vocabulary of {len(covers.vocab)}")
        return covers.cover(index)

    def bias(self, teacher_id: int, student_id: int) -> tuple[float, float]:
        """(teacher bias, student bias) of a boundary after ``teacher_id`` and ``student_id``."""
        key = (teacher_id, student_id)
        found = self._pairs.get(key)
        if found is None:
            found = self._pairs[key] = self._compute(teacher_id, student_id)
        return found

    def unbiased(self, teacher_id: int, student_id: int) -> bool:
        """Whether both biases of the pair are at most the threshold (tokenkit's ``is_unbiased``)."""
        teacher_bias, student_bias = self.bias(teacher_id, student_id)
        return teacher_bias <= self.threshold and student_bias <= self.threshold

    def _compute(self, teacher_id: int, student_id: int) -> tuple[float, float]:
        t_vocab, s_vocab = self.teacher.vocab, self.student.vocab
        if not (0 <= teacher_id < len(t_vocab) and 0 <= student_id < len(s_vocab)):
            return 0.0, 0.0
        x, y = t_vocab.tokens[teacher_id], s_vocab.tokens[student_id]
        if x.special or y.special or not x.bytes or not y.bytes:
            return 0.0, 0.0
        if not (x.bytes.endswith(y.bytes) or y.bytes.endswith(x.bytes)):
            return 0.0, 0.0
        if is_space_only(x.bytes) or is_space_only(y.bytes):
            return 1.0, 1.0
        t_cover, s_cover = self.teacher.cover(teacher_id), self.student.cover(student_id)
        teacher_bias = sum(float(self.teacher.probs[t_cover[o]]) for o in sorted(t_cover.keys() - s_cover.keys()))
        student_bias = sum(float(self.student.probs[s_cover[o]]) for o in sorted(s_cover.keys() - t_cover.keys()))
        return teacher_bias, student_bias
