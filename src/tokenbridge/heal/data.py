"""Training text as a deterministic stream of byte windows, and batches for both tokenizers.

Every document is cut into windows of at most ``window`` bytes on character boundaries.  Example
``i`` of the stream is window ``order(epoch)[i mod n]`` with ``epoch = i div n``, where ``order`` is a
permutation drawn from the seed: the examples of any step are a function of (seed, step), which is
what makes ``--resume`` exact and lets every process of a multi-GPU run pick its share without
communication.

With ``mix`` weights (one per file) the stream is a mixture instead: example ``i`` comes from file ``f``
with probability ``mix[f] / sum(mix)`` (drawn from (seed, i)), and each file's examples walk through its
own windows in its own seeded permutations, epoch after epoch, so no window of a file repeats before
all of that file's windows have been seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..align.token_bytes import Vocabulary, vocabulary
from ..errors import TokenbridgeError
from ..measure.bpb import byte_windows, prefix_token
from ..measure.texts import read_text
from .chunks import align_chunks, token_ends, whitespace_start_mask


@dataclass(frozen=True)
class Window:
    document: int
    start: int
    end: int


MIX_BLOCK = 4096  # mixture draws are made (and cached) this many examples at a time


class Corpus:
    """The training windows of some text files, uniformly or mixed by ``mix`` weights (one per file)."""

    def __init__(self, paths: list[Path], window: int, mix: list[float] | None = None):
        if not paths:
            raise TokenbridgeError("no training text (pass --text FILE)")
        if mix is not None:
            if len(mix) != len(paths):
                raise TokenbridgeError(f"--mix has {len(mix)} weights for {len(paths)} --text files; give one per file")
            if any(not (w >= 0 and w < float("inf")) for w in mix) or sum(mix) <= 0:
                raise TokenbridgeError("--mix weights must be finite, non-negative and not all 0")
        self.paths = [str(p) for p in paths]
        self.window = window
        self.mix = list(mix) if mix is not None else None
        self.documents = [read_text(Path(p)).encode("utf-8") for p in paths]
        self.windows = [Window(d, a, b) for d, data in enumerate(self.documents) for a, b in byte_windows(data, window)]
        self._by_document: list[list[int]] = [[] for _ in self.documents]
        for i, x in enumerate(self.windows):
            self._by_document[x.document].append(i)
        if self.mix is not None:
            empty = [self.paths[d] for d, w in enumerate(self.mix) if w > 0 and not self._by_document[d]]
            if empty:
                raise TokenbridgeError(f"{empty[0]}: has no text, but its --mix weight is not 0")
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._file_orders: dict[tuple[int, int, int], np.ndarray] = {}
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def bytes(self) -> int:
        return sum(len(d) for d in self.documents)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._orders:
            self._orders = {key: np.random.default_rng([seed, epoch]).permutation(len(self.windows))}
        return self._orders[key]

    def example(self, seed: int, index: int) -> Window:
        if self.mix is not None:
            return self._mixed_example(seed, index)
        epoch, offset = divmod(index, len(self.windows))
        return self.windows[int(self.order(seed, epoch)[offset])]

    def _block(self, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The files of examples ``[block * MIX_BLOCK, (block + 1) * MIX_BLOCK)`` and, per file, how many of
        its examples come before the block (earlier blocks are drawn once and cached)."""
        weights = np.asarray(self.mix, dtype=np.float64)
        done = max([b for s, b in self._blocks if s == seed and b <= block], default=-1)
        for b in range(done + 1, block + 1):
            if b == 0:
                before = np.zeros(len(self.documents), dtype=np.int64)
            else:
                files, earlier = self._blocks[(seed, b - 1)]
                before = earlier + np.bincount(files, minlength=len(self.documents))
            files = np.random.default_rng([seed, 1, b]).choice(len(self.documents), MIX_BLOCK, p=weights / weights.sum())
            self._blocks[(seed, b)] = (files, before)
        return self._blocks[(seed, block)]

    def _mixed_example(self, seed: int, index: int) -> Window:
        block, offset = divmod(index, MIX_BLOCK)
        files, before = self._block(seed, block)
        document = int(files[offset])
        k = int(before[document] + np.count_nonzero(files[:offset] == document))  # this file's k-th example
        own = self._by_document[document]
        epoch, position = divmod(k, len(own))
        key = (seed, document, epoch)
        if key not in self._file_orders:
            self._file_orders[key] = np.random.default_rng([seed, 2, document, epoch]).permutation(len(own))
        return self.windows[own[int(self._file_orders[key][position])]]

    def text(self, window: Window) -> tuple[bytes, int | None]:
        """The window's bytes and the byte that follows it in its document (None at the end)."""
        data = self.documents[window.document]
        return data[window.start:window.end], (data[window.end] if window.end < len(data) else None)


class Side:
    """One model's view of the text: its tokenizer, prefix token and whitespace-initial tokens."""

    def __init__(self, tokenizer, model_vocab_rows: int | None = None):
        self.tokenizer = tokenizer
        self.vocab: Vocabulary = vocabulary(tokenizer)
        self.prefix_id, self.prefix = prefix_token(tokenizer)
        self.space_mask = torch.from_numpy(whitespace_start_mask(self.vocab, [tokenizer.eos_token_id]))
        if model_vocab_rows is not None and model_vocab_rows > len(self.space_mask):  # padded embedding rows
            pad = torch.zeros(model_vocab_rows - len(self.space_mask), dtype=torch.bool)
            self.space_mask = torch.cat([self.space_mask, pad])

    def encode(self, texts: list[bytes]) -> list[list[int]]:
        decoded = [t.decode("utf-8") for t in texts]
        return self.tokenizer(decoded, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def lm_batch(texts: list[bytes], student: Side, encoded: list[list[int]] | None = None) -> dict:
    """Student ids with the prefix token, attention mask and the positions that carry loss.

    ``encoded``: the student's token ids of ``texts`` when the caller already has them.
    """
    encoded = student.encode(texts) if encoded is None else encoded
    rows = [[student.prefix_id] + ids for ids in encoded]
    ids, mask = _pad(rows, student.prefix_id)
    loss_mask = mask.bool().clone()
    loss_mask[:, 0] = False
    return {"student_ids": ids, "student_mask": mask, "loss_mask": loss_mask,
            "student_tokens": int(loss_mask.sum())}


def alm_batch(texts: list[bytes], followers: list[int | None], teacher: Side, student: Side, kind: str,
              pairs: bool = False, bias=None) -> dict:
    """:func:`lm_batch` plus the teacher's ids and the chunk alignment as index tensors.

    ``teacher_chunk``/``student_chunk`` [B, T]: the chunk of each token position (-1: none; the prefix
    is position 0, so text token k sits at position k + 1); ``teacher_end``/``student_end`` [B, C]: the
    position of each chunk's last token; ``chunk_weight`` [B, C]: teacher tokens per chunk (0 = padding).
    ``bias``: the :class:`~.chunks.PairBias` that ``kind="unbiased"`` needs.

    With ``pairs`` (what the token-level baselines read: uld, mined) also every common token boundary
    that has a next token on both sides, as positions whose next-token distributions predict what
    follows the same bytes: ``pair_teacher``/``pair_student`` [B, P] (the start of the text, the prefix
    position 0, is one), ``pair_real`` [B, P] bool, ``pair_one_to_one`` [B, P] (the bytes up to the next
    common boundary are one token on both sides) and ``pair_next`` [B, P] (the student's next token).
    """
    student_encoded = student.encode(texts)
    batch = lm_batch(texts, student, student_encoded)
    teacher_rows, all_chunks, all_pairs = [], [], []
    for data, follower, t_ids, s_ids in zip(texts, followers, teacher.encode(texts), student_encoded):
        t_ends, s_ends = token_ends(t_ids, teacher.vocab, data), token_ends(s_ids, student.vocab, data)
        extra = {"teacher_ids": t_ids, "student_ids": s_ids, "bias": bias} if kind == "unbiased" else {}
        all_chunks.append(align_chunks(t_ends, s_ends, data, kind, follower, **extra))
        teacher_rows.append([teacher.prefix_id] + t_ids)
        if pairs:
            token_chunks = all_chunks[-1] if kind == "token" else align_chunks(t_ends, s_ends, data, "token", follower)
            starts = ([(0, 0)] if token_chunks else []) + [(c.teacher_end, c.student_end) for c in token_chunks[:-1]]
            all_pairs.append([(t, s, token_chunks[k].teacher_end - t == 1 and token_chunks[k].student_end - s == 1,
                               s_ids[s]) for k, (t, s) in enumerate(starts)])
    teacher_ids, teacher_mask = _pad(teacher_rows, teacher.prefix_id)
    count = max(1, max(len(c) for c in all_chunks))
    rows = len(texts)
    teacher_chunk = torch.full(teacher_ids.shape, -1, dtype=torch.long)
    student_chunk = torch.full(batch["student_ids"].shape, -1, dtype=torch.long)
    teacher_end = torch.zeros((rows, count), dtype=torch.long)
    student_end = torch.zeros((rows, count), dtype=torch.long)
    weight = torch.zeros((rows, count))
    for row, chunks in enumerate(all_chunks):
        for c, chunk in enumerate(chunks):
            teacher_chunk[row, chunk.teacher_start + 1:chunk.teacher_end + 1] = c
            student_chunk[row, chunk.student_start + 1:chunk.student_end + 1] = c
            teacher_end[row, c] = chunk.teacher_end
            student_end[row, c] = chunk.student_end
            weight[row, c] = chunk.teacher_end - chunk.teacher_start
    batch.update({"teacher_ids": teacher_ids, "teacher_mask": teacher_mask, "teacher_chunk": teacher_chunk,
                  "student_chunk": student_chunk, "teacher_end": teacher_end, "student_end": student_end,
                  "chunk_weight": weight, "chunks": count, "teacher_tokens": int(weight.sum()),
                  "real_chunks": int((weight > 0).sum())})
    if pairs:
        width = max(1, max(len(p) for p in all_pairs))
        fields = {name: torch.zeros((rows, width), dtype=dtype) for name, dtype in
                  (("pair_teacher", torch.long), ("pair_student", torch.long), ("pair_real", torch.bool),
                   ("pair_one_to_one", torch.bool), ("pair_next", torch.long))}
        for row, found in enumerate(all_pairs):
            for k, (t, s, one, following) in enumerate(found):
                fields["pair_teacher"][row, k], fields["pair_student"][row, k] = t, s
                fields["pair_real"][row, k], fields["pair_one_to_one"][row, k] = True, one
                fields["pair_next"][row, k] = following
        batch.update(fields)
        batch["pairs"] = int(fields["pair_real"].sum())
    return batch
