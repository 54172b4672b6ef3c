"""Static word (or token) vectors: trained with gensim's fastText, read and written as fastText ``.bin`` or ``.vec``.

Methods that compare tokens in an auxiliary space (WECHSEL, FOCUS) need static vectors for
words or tokens.  :func:`train_vectors` trains fastText (Bojanowski et al., 2017: skip-gram or
CBOW with negative sampling, plus character n-grams) with gensim, one worker thread and a seed,
so that the same arguments give the same vectors.  :func:`read_vectors`/:func:`write_vectors`
handle the two formats fastText publishes (``cc.de.300.bin``, ``cc.de.300.vec``):

* ``.bin``: fastText's binary model, read and written by gensim
  (:func:`gensim.models.fasttext.load_facebook_vectors` / ``save_facebook_model``).  It holds word
  counts and the character n-gram table, so a word it never saw still gets a vector
  (:meth:`WordVectors.lookup`).
* ``.vec`` (optionally ``.gz``): the word2vec/fastText text format, an optional ``"n dim"`` header
  line, then ``word v1 ... vdim`` per line.  It has words only: no counts, no n-grams.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import TokenbridgeError

FASTTEXT_MAGIC = 793712314  # the int32 a fastText .bin model starts with
BINARY_SUFFIX = ".bin"


def gensim_fasttext():
    """``gensim.models.fasttext``, or a one-line error saying how to install it."""
    try:
        from gensim.models import fasttext
    except ImportError as error:
        raise TokenbridgeError(f"word vectors need gensim ({error}); install it with "
                               f"'pip install gensim -c constraints.txt' (make setup does)") from None
    return fasttext


@dataclass
class WordVectors:
    """Vectors for ``words``, in the order of ``words`` (most frequent first in fastText's files).

    ``counts``: the training corpus counts; zeros when unknown (a ``.vec`` file).
    ``ngrams``: gensim's ``FastTextKeyedVectors`` when the vectors came with character n-grams (trained
    here or read from a ``.bin``), else ``None``; :meth:`lookup` uses it for words not in ``words``.
    ``model``: the whole gensim ``FastText`` model when trained here (needed to write a ``.bin``).
    """

    words: list[str]
    vectors: torch.Tensor  # [n, dim] float32
    counts: list[int]
    ngrams: object | None = field(default=None, repr=False, compare=False)
    model: object | None = field(default=None, repr=False, compare=False)

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
        """word -> row (the first row of a word listed twice)."""
        out: dict[str, int] = {}
        for i, word in enumerate(self.words):
            out.setdefault(word, i)
        return out

    def lookup(self, words: list[str], min_seen: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vectors of ``words`` -> ``(vectors [k, dim], found [k] bool, from_ngrams [k] bool)``.

        A word in :attr:`words` gets its row; any other word, when n-grams are known, a vector from its
        character n-grams (or its own vector, for a word of a ``.bin`` read with a ``limit`` below its
        rank), if that is not zero; else it is not found (a zero row).

        For vectors read from a ``.bin`` that is gensim's vector, the mean of all the word's n-gram rows.
        For vectors trained here (:attr:`model` set), an n-gram row that no training word contains was
        never updated and holds only its random initialisation, so the mean is over the word's *seen*
        n-grams, and a word of which fewer than ``min_seen`` of the n-grams were seen is not found.
        """
        index = self.index()
        out = torch.zeros((len(words), self.dim), dtype=torch.float32)
        found = torch.zeros(len(words), dtype=torch.bool)
        from_ngrams = torch.zeros(len(words), dtype=torch.bool)
        seen = self._seen_buckets()
        for k, word in enumerate(words):
            row = index.get(word)
            if row is not None:
                out[k], found[k] = self.vectors[row], True
            elif self.ngrams is not None and getattr(self.ngrams, "bucket", 0) > 0:
                vector = self._ngram_vector(word, seen, min_seen)
                if vector is not None and bool(vector.ne(0).any()) and bool(torch.isfinite(vector).all()):
                    out[k], found[k], from_ngrams[k] = vector, True, True
        return out, found, from_ngrams

    def _seen_buckets(self) -> np.ndarray | None:
        """For vectors trained here: a bool per n-gram bucket, whether some training word contains it."""
        if self.model is None or self.ngrams is None or getattr(self.ngrams, "bucket", 0) <= 0:
            return None
        seen = np.zeros(self.ngrams.bucket, dtype=bool)
        for hashes in self.ngrams.buckets_word or []:
            seen[np.asarray(hashes, dtype=np.int64)] = True
        return seen

    def _ngram_vector(self, word: str, seen: np.ndarray | None, min_seen: float) -> torch.Tensor | None:
        wv = self.ngrams
        if seen is None:
            return torch.from_numpy(np.asarray(wv.get_vector(word), dtype=np.float32))
        from gensim.models.fasttext import ft_ngram_hashes

        hashes = np.asarray(ft_ngram_hashes(word, wv.min_n, wv.max_n, wv.bucket), dtype=np.int64)
        known = hashes[seen[hashes]] if len(hashes) else hashes
        if not len(known) or len(known) < min_seen * len(hashes):
            return None
        return torch.from_numpy(np.asarray(wv.vectors_ngrams[known], dtype=np.float32).mean(axis=0))


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


def word_spans(line: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words :func:`split_words` finds in one line."""
    return [m.span() for m in _WORD.finditer(line)]


def train_vectors(sequences: Iterable[list[str]], dim: int = 100, window: int = 5, negatives: int = 5,
                  epochs: int = 5, min_count: int = 1, seed: int = 0, skipgram: bool = True, min_n: int = 3,
                  max_n: int = 6, buckets: int = 2_000_000, progress: bool = False) -> WordVectors:
    """fastText (gensim) on ``sequences`` (lists of words or tokens) -> :class:`WordVectors` with n-grams.

    ``skipgram``: skip-gram (fastText's default) or CBOW; character n-grams of ``min_n..max_n`` characters
    hashed into ``buckets`` rows (``max_n=0``: none, plain word2vec).  Words seen fewer than ``min_count``
    times get no row of their own.  The result lists words by descending count.  One worker thread and
    ``seed``: same arguments -> identical tensors.
    """
    if dim < 1 or window < 1 or negatives < 1 or epochs < 1 or min_count < 1:
        raise TokenbridgeError("train_vectors: dim, window, negatives, epochs and min_count must be >= 1")
    if max_n and (min_n < 1 or max_n < min_n or buckets < 1):
        raise TokenbridgeError(f"train_vectors: n-grams of {min_n}..{max_n} characters in {buckets} buckets")
    sequences = [list(s) for s in sequences if s]
    counts: dict[str, int] = {}
    for sequence in sequences:
        for word in sequence:
            counts[word] = counts.get(word, 0) + 1
    if not any(c >= min_count for c in counts.values()):
        raise TokenbridgeError(f"train_vectors: no word occurs at least min_count={min_count} times")
    model = gensim_fasttext().FastText(vector_size=dim, window=window, negative=negatives, min_count=min_count, sg=int(skipgram),
                     min_n=min_n, max_n=max_n, bucket=buckets if max_n else 0, seed=seed, workers=1,
                     sorted_vocab=1)
    model.build_vocab(corpus_iterable=sequences)
    model.train(corpus_iterable=sequences, total_examples=len(sequences), epochs=epochs)
    wv = model.wv
    words = list(wv.index_to_key)
    return WordVectors(words, torch.from_numpy(np.array(wv.vectors, dtype=np.float32)),
                       [int(wv.get_vecattr(w, "count")) for w in words], ngrams=wv if max_n else None, model=model)


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


def read_vectors(path, limit: int | None = None) -> WordVectors:
    """Read word vectors: a fastText ``.bin`` model, else a ``.vec`` text file (optionally ``.gz``).

    ``limit``: keep only the first that many words (files list the most frequent first); a ``.bin``
    keeps its n-grams for the other words.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"word vectors {path}: no such file")
    if path.suffix == BINARY_SUFFIX:
        return read_fasttext_bin(path, limit)
    return read_vec(path, limit)


def check_fasttext_bin(path: Path) -> None:
    """Walk a fastText ``.bin`` model's header, word list and input matrix size, without loading it.

    gensim loops forever on a file that ends inside the word list, and trusts the sizes it reads; this
    one-pass check (a memory map, so a 7 GB ``cc.de.300.bin`` is not read into memory) raises a
    one-line :class:`TokenbridgeError` instead.
    """
    import mmap
    import struct

    def damaged(why: str) -> TokenbridgeError:
        return TokenbridgeError(f"word vectors {path}: a damaged fastText .bin model ({why})")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 4 or int.from_bytes(handle.read(4), "little", signed=True) != FASTTEXT_MAGIC:
                raise TokenbridgeError(f"word vectors {path}: not a fastText .bin model (it does not start with "
                                       f"fastText's magic number); a text file of vectors should be named .vec")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise TokenbridgeError(f"word vectors {path}: cannot read ({error})") from None
    with data:
        header = 4 + 4 + 12 * 4 + 8 + 3 * 4 + 8 + 8  # magic, version, 12 int32 args, t, sizes, ntokens, pruneidx
        if size < header:
            raise damaged("it ends inside the header")
        dim = struct.unpack_from("<i", data, 8)[0]
        words, _, labels = struct.unpack_from("<3i", data, 64)
        pruned = struct.unpack_from("<q", data, 84)[0]
        if dim < 1 or words < 0 or labels != 0:
            raise damaged(f"dimension {dim}, {words} words, {labels} labels: not an unsupervised model")
        position = header
        for number in range(words):
            end = data.find(b"\0", position)
            if end < 0 or end + 10 > size:
                raise damaged(f"it ends inside word {number + 1} of {words}")
            position = end + 10  # the word, NUL, int64 count, int8 type
        position += max(pruned, 0) * 8 + 1  # pruned ids, then the quantisation flag
        if position + 16 > size:
            raise damaged("it ends before the vectors")
        rows, columns = struct.unpack_from("<2q", data, position)
        if columns != dim or rows < words or size < position + 16 + rows * columns * 4:
            raise damaged(f"{rows} x {columns} input vectors for {words} words of dimension {dim} do not fit the "
                          f"file's {size} bytes")


def read_fasttext_bin(path: Path, limit: int | None = None) -> WordVectors:
    """A fastText binary model (as fastText or gensim write it), through gensim, with its counts and n-grams."""
    check_fasttext_bin(path)
    try:
        wv = gensim_fasttext().load_facebook_vectors(str(path))
    except Exception as error:  # gensim raises struct.error, EOFError, ValueError, ... on a damaged file
        raise TokenbridgeError(f"word vectors {path}: a damaged fastText .bin model "
                               f"({type(error).__name__}: {str(error)[:120]})") from None
    words = list(wv.index_to_key)[:limit] if limit else list(wv.index_to_key)
    if not words:
        raise TokenbridgeError(f"word vectors {path}: no vectors in the file")
    vectors = torch.from_numpy(np.array(wv.vectors[:len(words)], dtype=np.float32))
    if not torch.isfinite(vectors).all():
        bad = int((~torch.isfinite(vectors)).any(dim=1).nonzero()[0])
        raise TokenbridgeError(f"word vectors {path}: the vector of {words[bad]!r} is not finite")
    counts = [int(wv.get_vecattr(w, "count")) for w in words]
    return WordVectors(words, vectors, counts, ngrams=wv if wv.bucket > 0 else None)


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def read_vec(path: Path, limit: int | None = None) -> WordVectors:
    """A word2vec/fastText text file: an optional ``"n dim"`` header, then ``word v1 ... vdim`` per line,
    values separated by single spaces.  Counts are not in the format and come back as zeros; a word listed
    twice keeps its first vector.  (Read here rather than with gensim's ``load_word2vec_format``, which
    needs the header and names no line in its errors.)
    """
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
    """Write ``wv``: a ``.bin`` path gets fastText's binary model (gensim; only for vectors trained here,
    which carry the whole model), any other a ``.vec`` text file with an ``"n dim"`` header, whose float32
    values round-trip exactly."""
    path = Path(path)
    if path.suffix == BINARY_SUFFIX:
        if wv.model is None:
            raise TokenbridgeError(f"word vectors {path}: a fastText .bin holds a whole model; only vectors "
                                   f"trained here can be written as .bin (write a .vec instead)")
        path.parent.mkdir(parents=True, exist_ok=True)
        gensim_fasttext().save_facebook_model(wv.model, str(path), encoding="utf-8")
        return path
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
