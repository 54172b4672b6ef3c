"""Sampled tokenizers: the many vocabularies a hypernetwork trains on (ZeTT, section 3.2).

For each training batch ZeTT draws a fresh tokenizer: a Unigram model over the substrings of the
batch's pretokens, with noised log-frequencies, keeping the top pieces.  Here:

- text is split into pretokens the way byte-level BPE tokenizers split it (a leading space joins the
  word; letters, digits, other symbols and whitespace runs are separate);
- the candidates are the substrings of those pretokens, cut on character boundaries, of 2 to
  ``max_piece_bytes`` bytes, counted by how often they occur;
- a piece's score is its log relative frequency plus Gaussian noise whose standard deviation is itself
  drawn per tokenizer from a log-normal (ZeTT: mean 1e-5, sigma 4, so most tokenizers are nearly
  frequency-ordered and some are close to random);
- the ``vocab_size - 256`` best-scoring candidates are kept, and the 256 single bytes are always in
  (ids 0-255), so every byte string can be spelt: ``decode(encode(x)) == x`` for any input;
- text is segmented by Viterbi search for the highest total score, per pretoken.

ZeTT refines the scores with Unigram EM steps; the scores here are the (noised) frequencies themselves,
which keeps sampling a single pass over the batch (its cost is paid at every training step).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import regex

from ..errors import TokenbridgeError

# GPT-2's split, as most byte-level BPE tokenizers have it.
PRETOKEN = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
BYTES = 256


class TooFewPieces(TokenbridgeError):
    """The text has fewer distinct pieces than the vocabulary asked for."""


def pretokens(data: bytes) -> list[bytes]:
    """``data`` cut into pretokens; they join back to ``data`` exactly (invalid UTF-8 stays one piece)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [data] if data else []
    pieces = [m.group().encode("utf-8") for m in PRETOKEN.finditer(text)]
    if b"".join(pieces) != data:  # the pattern covers every character; this guards the invariant
        raise AssertionError("pretokens do not cover the text")
    return pieces


def _char_starts(piece: bytes) -> list[int]:
    return [i for i, b in enumerate(piece) if b & 0xC0 != 0x80] + [len(piece)]


@dataclass
class SampledTokenizer:
    """A byte-level Unigram tokenizer: ``pieces[i]`` is token i's bytes (ids 0-255: the single bytes)."""

    pieces: list[bytes]
    scores: list[float]
    index: dict[bytes, int] = field(init=False, repr=False)
    longest: int = field(init=False)

    def __post_init__(self):
        self.index = {p: i for i, p in enumerate(self.pieces)}
        if len(self.index) != len(self.pieces) or self.pieces[:BYTES] != [bytes([b]) for b in range(BYTES)]:
            raise TokenbridgeError("a sampled tokenizer needs 256 single bytes first and distinct pieces")
        self.longest = max(len(p) for p in self.pieces)
        self._memo: dict[bytes, list[int]] = {}

    def __len__(self) -> int:
        return len(self.pieces)

    def _segment(self, word: bytes) -> list[int]:
        if word in self._memo:
            return self._memo[word]
        n = len(word)
        best = [0.0] + [-math.inf] * n
        back = [0] * (n + 1)
        index, scores = self.index, self.scores
        for end in range(1, n + 1):
            for begin in range(max(0, end - self.longest), end):
                piece = index.get(word[begin:end])
                if piece is None or best[begin] == -math.inf:
                    continue
                value = best[begin] + scores[piece]
                if value > best[end]:
                    best[end], back[end] = value, begin
        ids, end = [], n
        while end > 0:
            begin = back[end]
            ids.append(index[word[begin:end]])
            end = begin
        ids.reverse()
        if len(self._memo) < 200_000:
            self._memo[word] = ids
        return ids

    def encode(self, data: bytes) -> list[int]:
        return [i for word in pretokens(data) for i in self._segment(word)]

    def decode(self, ids: list[int]) -> bytes:
        return b"".join(self.pieces[i] for i in ids)


def substring_counts(texts: list[bytes], max_piece_bytes: int = 16) -> Counter:
    """How often each substring of 2..max_piece_bytes bytes, on character boundaries, occurs in pretokens."""
    words = Counter(w for text in texts for w in pretokens(text))
    counts: Counter = Counter()
    for word, seen in words.items():
        starts = _char_starts(word)
        for a, begin in enumerate(starts[:-1]):
            for end in starts[a + 1:]:
                if end - begin > max_piece_bytes:
                    break
                if end - begin >= 2:
                    counts[word[begin:end]] += seen
    return counts


def sample_tokenizer(texts: list[bytes], vocab_size: int, seed, noise_mean: float = 1e-5, noise_sigma: float = 4.0,
                     max_piece_bytes: int = 16) -> SampledTokenizer:
    """A tokenizer of exactly ``vocab_size`` pieces drawn from ``texts``; the same for the same seed and texts.

    ``seed``: an int or a sequence of ints (numpy's ``default_rng`` seed).
    """
    if vocab_size <= BYTES:
        raise TokenbridgeError(f"--vocab-size must be more than {BYTES} (the single bytes are always in)")
    counts = substring_counts(texts, max_piece_bytes)
    wanted = vocab_size - BYTES
    if len(counts) < wanted:
        raise TooFewPieces(f"the text has only {len(counts)} distinct pieces, too few for a vocabulary of "
                               f"{vocab_size}: give more text or ask for a smaller --vocab-size")
    rng = np.random.default_rng(seed)
    noise = float(rng.lognormal(math.log(noise_mean), noise_sigma)) if noise_mean > 0 else 0.0
    candidates = sorted(counts)  # a fixed order, whatever order the counting met them in
    frequency = np.array([counts[c] for c in candidates], dtype=np.float64)
    scores = np.log(frequency / frequency.sum()) + rng.normal(0.0, 1.0, len(candidates)) * noise
    keep = np.argsort(-scores, kind="stable")[:wanted]
    floor = float(scores[keep].min()) - 1.0  # single bytes: below every kept piece
    pieces = [bytes([b]) for b in range(BYTES)] + [candidates[i] for i in keep]
    return SampledTokenizer(pieces, [floor] * BYTES + [float(scores[i]) for i in keep])
