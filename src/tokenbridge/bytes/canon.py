"""Which token may follow a canonical token sequence: the tokenizer's own rules, as masks.

A token sequence is *canonical* when the tokenizer produces it for its bytes.  For
BPE tokenizers this is decided locally, one junction at a time, from the state
after the sequence (:class:`State`):

* **BPE junction** (:class:`_BPE`): two adjacent tokens ``a b`` of one segment are
  canonical when no merge joins a symbol at the right edge of ``a`` with one at the
  left edge of ``b`` while both are alive.  Each token's merge history is simulated
  once (HF's rule: lowest rank first, leftmost on ties); a symbol lives from the
  merge that makes it to the merge that consumes it.  For tokens whose merges are
  not applied in increasing rank order the pair is simulated outright.
* **Pre-tokenizer** (byte-level BPE): a junction that the pre-tokenizer's regex
  splits needs no merge check, and a regex boundary inside a token makes it
  invalid.  The regex sees characters only through a few classes (its literal
  ASCII characters, letters, digits, spaces, marks, ...), so pairs are decided once
  per class string.  An unfinished UTF-8 character counts as a letter.
* **UTF-8**: the bytes must stay a prefix of valid UTF-8.
* **Byte fallback** (SentencePiece style): ``<0xNN>`` tokens spell, byte by byte,
  only characters that are not in the vocabulary.
* **Added tokens** that are not special are cut out of the text before BPE
  (leftmost, then longest, as Hugging Face does): their text never occurs inside a
  BPE segment, and one is never followed by text that would make a longer one.

Special tokens never occur inside text; the end of text is handled by the caller.
Tokenizers these rules do not describe exactly are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import numpy as np

from ..align.token_bytes import SPACE_MARK, Vocabulary, _walk
from ..errors import TokenbridgeError
from .pretok import FREE, PretokRules, consume, meet
from .utf8 import unfinished_tail, utf8_prefix_ok

# GPT-2's split regex, which ByteLevel(use_regex=True) applies
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
INF = np.iinfo(np.int64).max


@dataclass(frozen=True)
class State:
    """What the next token's validity depends on, after a canonical sequence."""

    last: int = -1  # last token id; -1 at the start of the text
    utf8: bytes = b""  # an unfinished UTF-8 character at the end
    pending: bytes = b""  # text that may still become (part of) a non-special added token
    pending_added: bool = False  # ``pending`` starts with the last added token
    follow: frozenset = FREE  # (byte-level) what the next characters must look like (see pretok)


@cache
def _completions(prefix: bytes) -> int:
    """How many Unicode scalar values have a UTF-8 encoding starting with ``prefix`` (a valid prefix)."""
    lead = prefix[0]
    need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if len(prefix) == need:
        return 1
    count = 0
    for nxt in range(0x80, 0xC0):
        candidate = prefix + bytes([nxt])
        if utf8_prefix_ok(candidate):
            count += _completions(candidate) if len(candidate) < need else 1
    return count


class _BPE:
    """Merge histories of every token, and the pairs whose junction a merge would cross."""

    def __init__(self, symbols: dict[str, int], merges: list[tuple[str, str]], tokens: list[str | None]):
        self.symbols = symbols
        self.merge: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            key = (symbols.get(left, -1), symbols.get(right, -1))
            joined = symbols.get(left + right)
            if key[0] < 0 or key[1] < 0 or joined is None:
                raise TokenbridgeError(f"merge {left!r} + {right!r} uses a symbol missing from the vocabulary")
            self.merge.setdefault(key, (rank, joined))
        by_left: dict[int, list[tuple[int, int]]] = {}
        for (left, right), (rank, _) in self.merge.items():
            by_left.setdefault(left, []).append((right, rank))
        self.by_left = {k: (np.array([r for r, _ in v]), np.array([q for _, q in v])) for k, v in by_left.items()}
        size = len(tokens)
        self.reachable = np.zeros(size, dtype=bool)
        self.monotone = np.ones(size, dtype=bool)
        self.initial: list[list[int] | None] = [None] * size
        self.right: list[list[tuple[int, int, int]] | None] = [None] * size
        entries = []  # (symbol u, token, created, consumed) for left spines
        for index, text in enumerate(tokens):
            if text is None:
                continue
            initial = [symbols.get(ch, -1) for ch in text]
            if any(s < 0 for s in initial):
                continue
            final, left, right, monotone = self.simulate(initial)
            if final != [index]:
                continue
            self.reachable[index] = True
            self.monotone[index] = monotone
            self.initial[index] = initial
            self.right[index] = right
            entries.extend((u, index, made, gone) for u, made, gone in left)
        entries.sort()
        self.left_symbol = np.array([e[0] for e in entries], dtype=np.int64)
        self.left_token = np.array([e[1] for e in entries], dtype=np.int64)
        self.left_made = np.array([e[2] for e in entries], dtype=np.int64)
        self.left_gone = np.array([e[3] for e in entries], dtype=np.int64)

    def simulate(self, symbols: list[int]):
        """HF BPE on ``symbols``: (final symbols, left spine, right spine, ranks increasing)."""
        syms = list(symbols)
        made = [-1] * len(syms)
        left = []  # (symbol, created, consumed) of the first symbol over time
        right = []
        last_rank = -1
        monotone = True
        while len(syms) > 1:
            best = None
            for k in range(len(syms) - 1):
                hit = self.merge.get((syms[k], syms[k + 1]))
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = (hit[0], k, hit[1])
            if best is None:
                break
            rank, k, joined = best
            monotone &= rank >= last_rank  # the same merge again further right is fine
            last_rank = rank
            if k == 0:
                left.append((syms[0], made[0], rank))
            if k + 1 == len(syms) - 1:
                right.append((syms[-1], made[-1], rank))
            syms[k:k + 2] = [joined]
            made[k:k + 2] = [rank]
        left.append((syms[0], made[0], INF))
        right.append((syms[-1], made[-1], INF))
        return syms, left, right, monotone

    def crossing(self, a: int) -> np.ndarray:
        """Token ids ``b`` (monotone ones) such that BPE on ``a b`` merges across the junction."""
        found = []
        for s, made_s, gone_s in self.right[a]:
            hit = self.by_left.get(s)
            if hit is None:
                continue
            rights, ranks = hit
            keep = ranks < gone_s
            for u, rho in zip(rights[keep].tolist(), ranks[keep].tolist()):
                lo = np.searchsorted(self.left_symbol, u, "left")
                hi = np.searchsorted(self.left_symbol, u, "right")
                if lo == hi:
                    continue
                made_u, gone_u = self.left_made[lo:hi], self.left_gone[lo:hi]
                ok = (rho <= gone_u) & (np.maximum(made_u, made_s) < np.minimum(gone_u, gone_s))
                found.append(self.left_token[lo:hi][ok])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def candidates(self, a: int) -> np.ndarray:
        """Tokens ``b`` with some merge between a right-edge symbol of ``a`` and a left-edge one of ``b``."""
        found = []
        for s, _, _ in self.right[a]:
            hit = self.by_left.get(s)
            if hit is None:
                continue
            for u in hit[0].tolist():
                lo = np.searchsorted(self.left_symbol, u, "left")
                hi = np.searchsorted(self.left_symbol, u, "right")
                found.append(self.left_token[lo:hi])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def pair_merges(self, a: int, b: int) -> bool:
        """Exact: does BPE on the symbols of ``a`` then ``b`` give anything but ``[a, b]``?"""
        final, *_ = self.simulate(self.initial[a] + self.initial[b])
        return final != [a, b]


class Canon:
    """The canonical-continuation rules of one tokenizer, as boolean masks over token ids."""

    def __init__(self, vocabulary: Vocabulary, model_vocab: int):
        spec = json.loads(vocabulary.backend.to_str())  # merges are needed, so the full description
        model = spec["model"]
        self.family = vocabulary.family
        self.size = model_vocab
        why = _unsupported(vocabulary, spec)
        if why:
            raise TokenbridgeError(f"exact byte probabilities are not available for this tokenizer: {why}")
        tokens = vocabulary.tokens
        self.bytes = [t.bytes for t in tokens] + [b""] * max(0, model_vocab - len(tokens))
        self.special = np.ones(model_vocab, dtype=bool)
        self.special[: len(tokens)] = [t.special or not t.bytes for t in tokens]
        self.fallback = np.zeros(model_vocab, dtype=bool)
        self.fallback[: len(tokens)] = [t.byte_fallback for t in tokens]
        self.added = np.zeros(model_vocab, dtype=bool)
        self.added[: len(tokens)] = [t.added and not t.special for t in tokens]
        self.contents = sorted({t.bytes for t in tokens if t.added and not t.special and t.bytes})
        # BPE over model symbols (the vocabulary strings)
        vocab_strings: list[str | None] = [None] * model_vocab
        for t in tokens:
            if not t.special and not t.byte_fallback and not t.added:
                vocab_strings[t.id] = t.token
        symbols = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.bpe = _BPE(symbols, merges, vocab_strings)
        for (left, right) in self.bpe.merge:
            if self.fallback[left] or self.fallback[right]:
                raise TokenbridgeError("exact byte probabilities are not available: a merge uses a byte-fallback token")
        # tokens that can occur at all
        usable = self.bpe.reachable.copy()
        usable |= self.added & ~self.special
        self.chars_in_vocab = {t.bytes for t in tokens if not t.special and not t.byte_fallback
                               and len(t.bytes.decode("utf-8", "replace")) == 1 and utf8_prefix_ok(t.bytes)
                               and unfinished_tail(t.bytes) == b""}
        if self.family == "metaspace":
            self.chars_in_vocab.add(SPACE_MARK.encode())  # the normalizer turns it into a space first
        self._vocab_prefix_counts: dict[bytes, int] = {}
        for char in self.chars_in_vocab:
            for k in range(1, len(char) + 1):
                self._vocab_prefix_counts[char[:k]] = self._vocab_prefix_counts.get(char[:k], 0) + 1
        if vocabulary.byte_fallback:
            for t in tokens:
                if t.byte_fallback:
                    usable[t.id] = True
        if self.contents:  # BPE text never contains an added token's text
            import re

            inside = re.compile(b"|".join(re.escape(c) for c in self.contents))
            for index in np.flatnonzero(usable & ~self.added):
                if inside.search(self.bytes[index]):
                    usable[index] = False
        self.first = np.array([b[0] if b else -1 for b in self.bytes], dtype=np.int64)
        continuation = (self.first >= 0x80) & (self.first < 0xC0)
        self.self_ok = np.array([bool(b) and utf8_prefix_ok(b) for b in self.bytes]) & ~continuation
        self.usable = usable
        self.continuation_ids = np.flatnonzero(usable & continuation & ~self.fallback)
        self.byte_of_fallback = {int(i): self.bytes[i][0] for i in np.flatnonzero(self.fallback)}
        self.rules = None
        if self.family == "byte_level":
            self.rules = PretokRules(_byte_level_pattern(spec), self.bytes, usable)
        self._masks: dict[State, np.ndarray] = {}
        self._cross: dict[int, np.ndarray] = {}
        self._pairs: dict[tuple[int, bytes], np.ndarray] = {}
        self._utf8: dict[bytes, np.ndarray] = {}
        self._oov_prefix: dict[bytes, bool] = {}
        self._fallback: dict[bytes, np.ndarray] = {}

    # ----- state transitions ---------------------------------------------------------------------------------
    def advance(self, state: State, token: int) -> State:
        data = self.bytes[token]
        pending, pending_added = self._pending_after(state, token, data)
        follow = self._follow(state, int(token)) if self.rules is not None else FREE
        return State(int(token), unfinished_tail(state.utf8 + data), pending, pending_added, follow)

    def can_end(self, state: State) -> bool:
        """Whether the text may end after this state (no unfinished UTF-8 character)."""
        return state.utf8 == b"" and (self.rules is None or self.rules.can_end(state.follow))

    # ----- masks -----------------------------------------------------------------------------------------------
    def valid(self, state: State) -> np.ndarray:
        """Boolean mask over token ids: which tokens keep the sequence canonical after ``state``."""
        mask = self._masks.get(state)
        if mask is not None:
            return mask
        mask = self.usable & self._utf8_mask(state.utf8)
        if self.fallback.any():
            mask = mask & self._fallback_mask(state)
        last = state.last
        regular = last >= 0 and not self.added[last] and not self.fallback[last]
        if self.rules is not None:
            mask = mask & self._pair_ok(last if regular else -1, state.utf8)
            mask = mask & self.rules.allowed(state.follow, state.utf8, self.continuation_ids)
        elif regular:
            mask = mask & ~self._cross_mask(last)
        if self.contents and (state.pending or state.pending_added):
            mask = mask & self._added_mask(state)
        if len(self._masks) > 256:
            self._masks.pop(next(iter(self._masks)))
        self._masks[state] = mask
        return mask

    def _utf8_mask(self, pending: bytes) -> np.ndarray:
        cached = self._utf8.get(pending)
        if cached is not None:
            return cached
        if not pending:
            mask = self.self_ok.copy()
            for index, value in self.byte_of_fallback.items():  # a byte token may begin a character
                mask[index] = utf8_prefix_ok(bytes([value]))
        else:
            mask = np.zeros(self.size, dtype=bool)
            for index in self.continuation_ids:
                mask[index] = utf8_prefix_ok(pending + self.bytes[index])
            for index, value in self.byte_of_fallback.items():
                mask[index] = utf8_prefix_ok(pending + bytes([value]))
        self._utf8[pending] = mask
        return mask

    def _oov_possible(self, prefix: bytes) -> bool:
        """Whether some character whose UTF-8 starts with ``prefix`` is not a vocabulary symbol."""
        known = self._oov_prefix.get(prefix)
        if known is None:
            total = _completions(prefix)
            inside = self._vocab_prefix_counts.get(prefix, 0)
            known = self._oov_prefix[prefix] = total > inside
        return known

    def _fallback_mask(self, state: State) -> np.ndarray:
        """Byte tokens only spell characters outside the vocabulary; nothing else may interrupt them."""
        mask = self._fallback.get(state.utf8)
        if mask is None:
            mask = np.ones(self.size, dtype=bool)
            for index, value in self.byte_of_fallback.items():
                mask[index] = self._oov_possible(state.utf8 + bytes([value]))
            self._fallback[state.utf8] = mask
        return mask

    def _cross_mask(self, a: int) -> np.ndarray:
        """Tokens ``b`` for which BPE on ``a b`` merges across the junction."""
        cached = self._cross.get(a)
        if cached is not None:
            return cached
        cross = np.zeros(self.size, dtype=bool)
        bpe = self.bpe
        if bpe.monotone[a]:
            cross[bpe.crossing(a)] = True
            odd = np.flatnonzero(~bpe.monotone & bpe.reachable)
        else:
            odd = bpe.candidates(a)
        for b in odd:  # pairs the rank-order argument does not cover: simulate them
            cross[b] = bpe.pair_merges(a, int(b))
        cross &= ~self.added & ~self.fallback
        if len(self._cross) > 4096:
            self._cross.pop(next(iter(self._cross)))
        self._cross[a] = cross
        return cross

    def _pair_ok(self, a: int, pending: bytes) -> np.ndarray:
        cached = self._pairs.get((a, pending))
        if cached is not None:
            return cached
        some_joined, some_clean = self.rules.pair(a, pending, self.continuation_ids)
        ok = some_clean if a < 0 else some_joined | (some_clean & ~self._cross_mask(a))
        if len(self._pairs) > 4096:
            self._pairs.pop(next(iter(self._pairs)))
        self._pairs[(a, pending)] = ok
        return ok

    def _follow(self, state: State, b: int) -> frozenset:
        """What the characters after ``b`` must look like: the pair's own needs and what the state carried."""
        last = state.last
        regular = last >= 0 and not self.added[last] and not self.fallback[last]
        a = last if regular else -1
        needs = self.rules.needs(a, state.utf8, b, regular and bool(self._cross_mask(last)[b]))
        lead, finished = self.rules.lead_of(state.utf8, b)
        return meet(needs, consume(state.follow, lead, finished))

    # ----- non-special added tokens -----------------------------------------------------------------------
    def _longer(self, text: bytes) -> bool:
        return any(len(c) > len(text) and c.startswith(text) for c in self.contents)

    def _pending_after(self, state: State, token: int, data: bytes) -> tuple[bytes, bool]:
        if not self.contents:
            return b"", False
        if self.added[token]:
            return (data, True) if self._longer(data) else (b"", False)
        if self.special[token]:
            return b"", False
        if state.pending_added and self._longer(state.pending + data):
            return state.pending + data, True
        text = (b"" if state.pending_added else state.pending) + data
        for start in range(len(text)):
            tail = text[start:]
            if self._longer(tail):
                return tail, False
        return b"", False

    def _added_ok(self, state: State, token: int) -> bool:
        data = self.bytes[token]
        pending = state.pending
        joined = pending + data
        if state.pending_added:
            # the last added token's text followed by this one must not spell a longer added token
            return not any(len(c) > len(pending) and joined.startswith(c) for c in self.contents)
        # an added token's text may not start inside the pending text and reach into this token
        for c in self.contents:
            at = joined.find(c)
            while at != -1:
                if at < len(pending) < at + len(c):
                    return False
                at = joined.find(c, at + 1)
        return True

    def _added_mask(self, state: State) -> np.ndarray:
        mask = np.ones(self.size, dtype=bool)
        nexts = set()
        for c in self.contents:
            for cut in range(1, len(c)):
                if state.pending.endswith(c[:cut]):
                    nexts.add(c[cut])
        for index in np.flatnonzero(self.usable & np.isin(self.first, list(nexts))):
            mask[index] = self._added_ok(state, int(index))
        return mask


def _byte_level_pattern(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = _walk(pre)
    splits = [p for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("use_regex", True) and not splits:
        return GPT2_PATTERN
    if len(splits) == 1 and byte_level and not byte_level[0].get("use_regex", True):
        pattern = splits[0].get("pattern", {})
        if "Regex" in pattern and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert"):
            return pattern["Regex"]
    raise TokenbridgeError("exact byte probabilities are not available: the pre-tokenizer is not a single "
                           "GPT-2 style regex split")


def _unsupported(vocabulary: Vocabulary, spec: dict) -> str | None:
    model = spec["model"]
    if model.get("type") != "BPE":
        return (f"its model is {model.get('type')}; the exact method needs BPE, whose canonical encodings are "
                "decided pair by pair")
    if model.get("dropout"):
        return "BPE dropout makes tokenization random"
    if model.get("ignore_merges"):
        return "ignore_merges (whole words looked up before merging) is not modelled"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "word-internal prefixes/suffixes are not modelled"
    normalizers = _walk(spec.get("normalizer"))
    pre = _walk(spec.get("pre_tokenizer"))
    if vocabulary.family == "byte_level":
        if any(n.get("type") not in ("Sequence",) for n in normalizers):
            return "its normalizer changes the text's bytes"
        if model.get("byte_fallback"):
            return "byte-level BPE with byte fallback is not modelled"
        return None
    if vocabulary.family == "metaspace":
        for n in normalizers:
            if n.get("type") == "Sequence":
                continue
            if not (n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " "
                    and n.get("content") == SPACE_MARK):
                return f"its normalizer {n.get('type')} changes the text's bytes"
        for p in pre:
            if p.get("type") == "Sequence":
                continue
            if p.get("type") == "Split" and p.get("pattern", {}).get("String") == " " and normalizers:
                continue  # splits on spaces the normalizer has already replaced: no effect
            if p.get("type") == "Metaspace" and p.get("prepend_scheme") == "never" and not p.get("split", True):
                continue
            return f"its pre-tokenizer {p.get('type')} is not modelled (only none, or one that never fires)"
        return None
    return f"the {vocabulary.family} family is not BPE"


__all__ = ["Canon", "State"]
