"""Static word (or token) vectors: trained here with skip-gram negative sampling, read and written as ``.vec``.

Methods that compare tokens in an auxiliary space (WECHSEL, FOCUS) need static vectors for
words or tokens.  :func:`train_vectors` trains them on a small corpus in seconds, in torch,
deterministically; :func:`read_vectors`/:func:`write_vectors` use the word2vec/fastText text
format (an optional ``"n dim"`` header line, then ``word v1 ... vdim`` per line).

The training is word2vec's skip-gram with negative sampling (Mikolov et al., 2013):

* frequent words are dropped at random each epoch, keeping word ``w`` with probability
  ``(sqrt(c_w / (t N)) + 1) * t N / c_w`` (``t`` = ``subsample``, ``N`` the corpus size);
* each kept position uses a window drawn uniformly from ``1..window`` (a "dynamic window");
* each (centre, context) pair is scored against ``negatives`` noise words drawn from the
  unigram distribution raised to the power 0.75;
* plain SGD on the pair losses with word2vec's learning rate schedule (linear decay to
  ``lr * 1e-4``), applied to shuffled mini-batches of pairs (gradients of a batch summed).
"""

from __future__ import annotations

import gzip
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TokenbridgeError


@dataclass
class WordVectors:
    """Vectors for ``words``, in the order of ``words`` (most frequent first when trained here).

    ``counts``: the training corpus counts; zeros when unknown (vectors read from a file).
    ``context_vectors``: SGNS's second (output) matrix when trained here, else ``None``;
    it is not written to files.
    """

    words: list[str]
    vectors: torch.Tensor  # [n, dim] float32
    counts: list[int]
    context_vectors: torch.Tensor | None = None  # [n, dim] float32

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words) or len(self.counts) != len(self.words):
            raise ValueError(f"{len(self.words)} words, {len(self.counts)} counts and vectors of shape "
                             f"{tuple(self.vectors.shape)}")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        """word -> row."""
        return {word: i for i, word in enumerate(self.words)}


_WORD = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]")


def split_words(text: str) -> list[list[str]]:
    """One word sequence per non-empty line: runs of letters/digits (``don't``, ``apt-get``, ``1.2``) and
    single punctuation characters.  Case is kept."""
    out = []
    for line in text.splitlines():
        words = _WORD.findall(line)
        if words:
            out.append(words)
    return out


def keep_probabilities(counts: torch.Tensor, subsample: float) -> torch.Tensor:
    """word2vec's probability of keeping each occurrence of a word seen ``counts [n]`` times -> ``[n]``."""
    counts = counts.double()
    if subsample <= 0:
        return torch.ones_like(counts)
    threshold = subsample * counts.sum()
    keep = (torch.sqrt(counts / threshold) + 1) * threshold / counts
    return keep.clamp(max=1.0)


def window_pairs(ids: torch.Tensor, sequence: torch.Tensor, reach: torch.Tensor, window: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-gram (centre, context) pairs with a per-position window.

    ``ids [L]``: word ids of the (already subsampled) positions; ``sequence [L]``: which sequence each
    position belongs to (pairs never cross sequences); ``reach [L]``: each centre's window, in
    ``1..window``.  Returns ``(centres [P], contexts [P])``: every ``(ids[i], ids[j])`` with
    ``0 < |i - j| <= reach[i]`` inside one sequence, in a fixed order.
    """
    centres, contexts = [], []
    length = ids.shape[0]
    for offset in range(1, window + 1):
        if offset >= length:
            break
        same = sequence[:-offset] == sequence[offset:]
        forward = same & (reach[:-offset] >= offset)  # centre i, context i + offset
        backward = same & (reach[offset:] >= offset)  # centre i + offset, context i
        centres += [ids[:-offset][forward], ids[offset:][backward]]
        contexts += [ids[offset:][forward], ids[:-offset][backward]]
    if not centres:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    return torch.cat(centres), torch.cat(contexts)


def sgns_step(vectors: torch.Tensor, context_vectors: torch.Tensor, centres: torch.Tensor,
              targets: torch.Tensor, lr: float) -> float:
    """One SGD step of SGNS on a batch, in place; returns the batch's summed loss (before the step).

    ``vectors``/``context_vectors [n, d]``; ``centres [B]``; ``targets [B, 1 + K]``: the true context
    first, then ``K`` noise words.  Loss per pair: ``-log s(u_o . v_c) - sum_k log s(-u_k . v_c)``.
    """
    v = vectors[centres]  # [B, d]
    u = context_vectors[targets]  # [B, 1 + K, d]
    scores = torch.bmm(u, v.unsqueeze(2)).squeeze(2)  # [B, 1 + K]
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
    step = (labels - torch.sigmoid(scores)) * lr  # minus the gradient of the loss w.r.t. the scores, times lr
    flat = targets.reshape(-1)
    n = vectors.shape[0]
    # A row hit m times in the batch moves by the mean of its m updates (times lr), not their sum: the
    # sum of stale updates to a frequent noise word overshoots and diverges at large batches.
    centre_hits = torch.bincount(centres, minlength=n).clamp(min=1).to(vectors.dtype)
    target_hits = torch.bincount(flat, minlength=n).clamp(min=1).to(vectors.dtype)
    vectors.index_add_(0, centres, torch.bmm(step.unsqueeze(1), u).squeeze(1) / centre_hits[centres, None])
    context_vectors.index_add_(0, flat, (step.unsqueeze(2) * v.unsqueeze(1)).reshape(-1, v.shape[1])
                               / target_hits[flat, None])
    return float(loss)


def train_vectors(sequences: Iterable[list[str]], dim: int = 100, window: int = 5, negatives: int = 5,
                  epochs: int = 5, min_count: int = 1, lr: float = 0.1, seed: int = 0, subsample: float = 1e-3,
                  batch_size: int = 1024, progress: bool = False) -> WordVectors:
    """Skip-gram with negative sampling on ``sequences`` (lists of words or tokens) -> :class:`WordVectors`.

    Words seen fewer than ``min_count`` times are dropped before windows are taken (as word2vec).  The
    result lists words by descending count (ties by string).  Same arguments and seed -> identical tensors.
    """
    if dim < 1 or window < 1 or negatives < 0 or epochs < 0 or batch_size < 1:
        raise TokenbridgeError("train_vectors: dim, window, batch_size must be >= 1, negatives and epochs >= 0")
    sequences = [list(s) for s in sequences]
    counter = Counter(word for sequence in sequences for word in sequence)
    vocab = sorted((w for w, c in counter.items() if c >= min_count), key=lambda w: (-counter[w], w))
    if not vocab:
        raise TokenbridgeError(f"train_vectors: no word occurs at least min_count={min_count} times")
    index = {word: i for i, word in enumerate(vocab)}
    counts = torch.tensor([counter[w] for w in vocab], dtype=torch.int64)

    flat, sequence_of = [], []
    for number, sequence in enumerate(sequences):
        kept = [index[w] for w in sequence if w in index]
        flat += kept
        sequence_of += [number] * len(kept)
    ids = torch.tensor(flat, dtype=torch.int64)
    sequence_ids = torch.tensor(sequence_of, dtype=torch.int64)

    generator = torch.Generator().manual_seed(seed)
    n = len(vocab)
    vectors = (torch.rand((n, dim), generator=generator) - 0.5) / dim  # word2vec's initialisation
    context_vectors = torch.zeros((n, dim))
    keep = keep_probabilities(counts, subsample)
    noise = counts.double() ** 0.75
    noise_cdf = (noise.cumsum(0) / noise.sum()).float()
    noise_cdf[-1] = 1.0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the batches are small: more threads only add overhead (10x on a busy machine)
    try:
        with torch.no_grad():
            _run_epochs(ids, sequence_ids, vectors, context_vectors, keep, noise_cdf, window, negatives, epochs,
                        lr, batch_size, generator, progress)
    finally:
        torch.set_num_threads(threads)
    return WordVectors(list(vocab), vectors, counts.tolist(), context_vectors)


def _run_epochs(ids, sequence_ids, vectors, context_vectors, keep, noise_cdf, window, negatives, epochs, lr,
                batch_size, generator, progress) -> None:
    from tqdm import tqdm

    n = vectors.shape[0]
    planned = None  # pairs expected in the whole run, known after the first epoch
    done = 0
    for epoch in range(epochs):
        kept = torch.rand(ids.shape[0], generator=generator, dtype=torch.float64) < keep[ids]
        epoch_ids, epoch_seq = ids[kept], sequence_ids[kept]
        reach = torch.randint(1, window + 1, (epoch_ids.shape[0],), generator=generator)
        centres, contexts = window_pairs(epoch_ids, epoch_seq, reach, window)
        order = torch.randperm(centres.shape[0], generator=generator)
        centres, contexts = centres[order], contexts[order]
        if planned is None:
            planned = max(1, centres.shape[0] * epochs)
        total = 0.0
        bar = tqdm(total=centres.shape[0], desc=f"vectors epoch {epoch + 1}/{epochs}", unit="pair",
                   disable=not progress, mininterval=1.0)
        for begin in range(0, centres.shape[0], batch_size):
            batch_centres = centres[begin:begin + batch_size]
            size = batch_centres.shape[0]
            draws = torch.rand(size * negatives, generator=generator)
            noise_ids = torch.searchsorted(noise_cdf, draws).clamp(max=n - 1).view(size, negatives)
            targets = torch.cat([contexts[begin:begin + size, None], noise_ids], dim=1)
            rate = lr * max(1e-4, 1.0 - done / planned)
            total += sgns_step(vectors, context_vectors, batch_centres, targets, rate)
            done += size
            bar.update(size)
        bar.set_postfix(loss=total / max(1, centres.shape[0]))
        bar.close()


def most_similar(wv: WordVectors, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` words nearest to ``word`` by cosine similarity (``word`` itself excluded)."""
    row = wv.index().get(word)
    if row is None:
        raise TokenbridgeError(f"{word!r} has no vector")
    unit = torch.nn.functional.normalize(wv.vectors, dim=1)
    sims = unit @ unit[row]
    sims[row] = -math.inf
    best = torch.topk(sims, min(k, len(wv) - 1))
    return [(wv.words[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def read_vectors(path, limit: int | None = None) -> WordVectors:
    """Read a word2vec/fastText text file (``.vec``, optionally ``.gz``): an optional ``"n dim"`` header,
    then ``word v1 ... vdim`` per line, values separated by single spaces.

    ``limit``: read only the first that many words (files list the most frequent first).  Counts are not
    in the format and come back as zeros.  A word listed twice keeps its first vector.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"word vectors {path}: no such file")
    words: list[str] = []
    rows: list[list[float]] = []
    seen: set[str] = set()
    listed = 0  # vector lines, duplicates included
    dim = None
    expected = None
    try:
        with _open_text(path, "r") as handle:
            for number, line in enumerate(handle, start=1):
                parts = line.rstrip("\r\n").rstrip(" ").split(" ")
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    expected, dim = int(parts[0]), int(parts[1])
                    if dim < 1:
                        raise TokenbridgeError(f"word vectors {path}: line 1: dimension {dim}")
                    continue
                if not line.strip():
                    continue  # a blank line (e.g. at the end)
                if limit is not None and len(words) >= limit:
                    break
                if dim is None:
                    dim = len(parts) - 1
                    if dim < 1:
                        raise TokenbridgeError(f"word vectors {path}: line {number}: a word without values")
                if len(parts) != dim + 1 or not parts[0]:
                    raise TokenbridgeError(f"word vectors {path}: line {number}: {len(parts) - 1} values after "
                                           f"{parts[0][:40]!r}, expected {dim}")
                try:
                    values = [float(p) for p in parts[1:]]
                except ValueError:
                    raise TokenbridgeError(f"word vectors {path}: line {number}: a value is not a number") from None
                listed += 1
                if parts[0] in seen:
                    continue
                seen.add(parts[0])
                words.append(parts[0])
                rows.append(values)
    except UnicodeDecodeError as error:
        raise TokenbridgeError(f"word vectors {path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise TokenbridgeError(f"word vectors {path}: cannot read ({error})") from None
    if not words:
        raise TokenbridgeError(f"word vectors {path}: no vectors in the file")
    if expected is not None and limit is None and listed != expected:
        raise TokenbridgeError(f"word vectors {path}: the header promises {expected} vectors, the file has "
                               f"{listed}")
    vectors = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(vectors).all():
        bad = int((~torch.isfinite(vectors)).any(dim=1).nonzero()[0])
        raise TokenbridgeError(f"word vectors {path}: the vector of {words[bad]!r} is not finite")
    return WordVectors(words, vectors, [0] * len(words))


_SEPARATORS = frozenset(" \t\n\r\v\f\0")  # what fastText splits words on


def write_vectors(path, wv: WordVectors) -> Path:
    """Write ``wv`` as a ``.vec`` text file with an ``"n dim"`` header; float32 values round-trip exactly."""
    path = Path(path)
    for word in wv.words:
        if not word or any(c in _SEPARATORS for c in word):
            raise TokenbridgeError(f"word vectors {path}: the word {word!r} is empty or contains ASCII whitespace, "
                                   f"which the .vec format cannot hold")
    path.parent.mkdir(parents=True, exist_ok=True)
    values = wv.vectors.detach().float().tolist()
    with _open_text(path, "w") as handle:
        handle.write(f"{len(wv)} {wv.dim}\n")
        for word, row in zip(wv.words, values):
            handle.write(word + " " + " ".join(f"{v:.9g}" for v in row) + "\n")
    return path
