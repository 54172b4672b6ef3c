"""Training text as a deterministic stream of byte windows, and batches for both tokenizers.

Every document is cut into windows of at most ``window`` bytes on character boundaries.  Example
``i`` of the stream is window ``order(epoch)[i mod n]`` with ``epoch = i div n``, where ``order`` is a
permutation drawn from the seed: the examples of any step are a function of (seed, step), which is
what makes ``--resume`` exact and lets every process of a multi-GPU run pick its share without
communication.
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


class Corpus:
    """The training windows of some text files."""

    def __init__(self, paths: list[Path], window: int):
        if not paths:
            raise TokenbridgeError("no training text (pass --text FILE)")
        self.paths = [str(p) for p in paths]
        self.window = window
        self.documents = [read_text(Path(p)).encode("utf-8") for p in paths]
        self.windows = [Window(d, a, b) for d, data in enumerate(self.documents) for a, b in byte_windows(data, window)]
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def bytes(self) -> int:
        return sum(len(d) for d in self.documents)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._orders:
            self._orders = {key: np.random.default_rng([seed, epoch]).permutation(len(self.windows))}
        return self._orders[key]

    def example(self, seed: int, index: int) -> Window:
        epoch, offset = divmod(index, len(self.windows))
        return self.windows[int(self.order(seed, epoch)[offset])]

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


def alm_batch(texts: list[bytes], followers: list[int | None], teacher: Side, student: Side, kind: str) -> dict:
    """:func:`lm_batch` plus the teacher's ids and the chunk alignment as index tensors.

    ``teacher_chunk``/``student_chunk`` [B, T]: the chunk of each token position (-1: none; the prefix
    is position 0, so text token k sits at position k + 1); ``teacher_end``/``student_end`` [B, C]: the
    position of each chunk's last token; ``chunk_weight`` [B, C]: teacher tokens per chunk (0 = padding).
    """
    student_encoded = student.encode(texts)
    batch = lm_batch(texts, student, student_encoded)
    teacher_rows, all_chunks = [], []
    for data, follower, t_ids, s_ids in zip(texts, followers, teacher.encode(texts), student_encoded):
        chunks = align_chunks(token_ends(t_ids, teacher.vocab, data), token_ends(s_ids, student.vocab, data),
                              data, kind, follower)
        teacher_rows.append([teacher.prefix_id] + t_ids)
        all_chunks.append(chunks)
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
                  "chunk_weight": weight, "chunks": count, "teacher_tokens": int(weight.sum())})
    return batch
