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
  per class string.  An unfinished UTF-8 character counts as a letter.  The regex runs on a context
  that starts where one of its matches starts in the text before the left token (the last bytes of the
  text are kept in the state), so a one-character token is cut as it is in the whole text.
* **ignore_merges** (Llama-3; byte-level): a pre-token that is a vocabulary token is that one token, so a
  token BPE cannot make is valid only as a whole pre-token, and two or more tokens that spell a vocabulary
  token are not a whole pre-token.  The state keeps, per way the last junctions may be cut (they can depend
  on characters not seen yet), the pre-token so far (:class:`Word`) and the constraints on what follows;
  a prefix may stop anywhere, so a pre-token still open is valid when some way to finish it is.
* **UTF-8**: the bytes must stay a prefix of valid UTF-8.
* **Byte fallback** (SentencePiece style): ``<0xNN>`` tokens spell, byte by byte,
  only characters that are not in the vocabulary.
* **Added tokens** that are not special are cut out of the text before BPE
  (leftmost, then longest, as Hugging Face does): their text never occurs inside a
  BPE segment, and one is never followed by text that would make a longer one.

Special tokens never occur inside text; the end of text is handled by the caller.
Tokenizers these rules do not describe exactly are refused with the reason.  The analysis of the merges
is cached on disk (``cache=True``), keyed by a hash of the tokenizer's description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import numpy as np

from ..align.token_bytes import SPACE_MARK, Vocabulary, _walk
from ..errors import TokenbridgeError
from .pretok import FREE, LABELS, PretokRules, consume, meet
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
    lead: bytes = b""  # the unfinished character the last token began inside (its first bytes)
    prev: bytes = b""  # (byte-level) the text of the segment before the last token, its last bytes
    words: frozenset = frozenset()  # (ignore_merges) alternatives for the pre-token so far: (follow, Word)


@dataclass(frozen=True)
class Word:
    """Under ``ignore_merges``: what the pre-token that the last token ends in means for canonicity.

    ``kind``: START (no pre-token yet: text start, after an added token), SINGLE (one token so far),
    WHOLE (one token that BPE cannot make: valid only as the whole pre-token), MULTI (two or more).
    ``text``: the pre-token's bytes so far while they are a prefix of some WHOLE token's bytes, else None.
    """

    kind: int
    text: bytes | None = None


START, SINGLE, WHOLE, MULTI = range(4)


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


class _Ragged:
    """One list of ints (``width`` 1) or of int tuples per token, stored flat; None where a token has none."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, present: np.ndarray):
        self.flat, self.offsets, self.present = flat, offsets, present

    @classmethod
    def of(cls, rows: list, width: int) -> _Ragged:
        present = np.array([row is not None for row in rows], dtype=bool)
        lengths = np.array([len(row) if row is not None else 0 for row in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.array([x for row in rows if row is not None for x in row], dtype=np.int64)
        return cls(flat.reshape(-1, width) if width > 1 else flat.reshape(-1), offsets, present)

    def __getitem__(self, index: int):
        if not self.present[index]:
            return None
        return self.flat[self.offsets[index]:self.offsets[index + 1]].tolist()


class _BPE:
    """Merge histories of every token, and the pairs whose junction a merge would cross."""

    ARRAYS = ("merge_keys", "merge_values", "reachable", "monotone", "initial_flat", "initial_offsets",
              "initial_present", "right_flat", "right_offsets", "right_present", "left_symbol", "left_token",
              "left_made", "left_gone")

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the analysis computed, as arrays (what the on-disk cache stores)."""
        return {"merge_keys": self.merge_keys, "merge_values": self.merge_values, "reachable": self.reachable,
                "monotone": self.monotone, "initial_flat": self.initial.flat,
                "initial_offsets": self.initial.offsets, "initial_present": self.initial.present,
                "right_flat": self.right.flat, "right_offsets": self.right.offsets,
                "right_present": self.right.present, "left_symbol": self.left_symbol,
                "left_token": self.left_token, "left_made": self.left_made, "left_gone": self.left_gone}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> _BPE:
        self = cls.__new__(cls)
        self.merge_keys, self.merge_values = arrays["merge_keys"], arrays["merge_values"]
        self._merge = None  # built when first simulated
        self._index_by_left()
        self.reachable, self.monotone = arrays["reachable"], arrays["monotone"]
        self.initial = _Ragged(arrays["initial_flat"], arrays["initial_offsets"], arrays["initial_present"])
        self.right = _Ragged(arrays["right_flat"], arrays["right_offsets"], arrays["right_present"])
        for name in ("left_symbol", "left_token", "left_made", "left_gone"):
            setattr(self, name, arrays[name])
        return self

    def _index_by_left(self) -> None:
        keys, ranks = self.merge_keys, self.merge_values[:, 0] if len(self.merge_values) else np.zeros(0, np.int64)
        order = np.argsort(keys[:, 0], kind="stable") if len(keys) else np.zeros(0, np.int64)
        lefts = keys[order, 0] if len(keys) else np.zeros(0, np.int64)
        starts = np.flatnonzero(np.diff(lefts, prepend=-1)) if len(lefts) else np.zeros(0, np.int64)
        ends = np.append(starts[1:], len(lefts))
        self.by_left = {int(lefts[a]): (keys[order[a:b], 1], ranks[order[a:b]]) for a, b in zip(starts, ends)}

    @property
    def merge(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(left, right) symbol -> (rank, joined symbol)."""
        if self._merge is None:
            self._merge = dict(zip(map(tuple, self.merge_keys.tolist()), map(tuple, self.merge_values.tolist())))
        return self._merge

    def __init__(self, symbols: dict[str, int], merges: list[tuple[str, str]], tokens: list[str | None]):
        self._merge: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            key = (symbols.get(left, -1), symbols.get(right, -1))
            joined = symbols.get(left + right)
            if key[0] < 0 or key[1] < 0 or joined is None:
                raise TokenbridgeError(f"merge {left!r} + {right!r} uses a symbol missing from the vocabulary")
            self._merge.setdefault(key, (rank, joined))
        self.merge_keys = np.array(list(self.merge), dtype=np.int64).reshape(-1, 2)
        self.merge_values = np.array(list(self.merge.values()), dtype=np.int64).reshape(-1, 2)
        self._index_by_left()
        size = len(tokens)
        self.reachable = np.zeros(size, dtype=bool)
        self.monotone = np.ones(size, dtype=bool)
        initials: list[list[int] | None] = [None] * size
        rights: list[list[tuple[int, int, int]] | None] = [None] * size
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
            initials[index] = initial
            rights[index] = right
            entries.extend((u, index, made, gone) for u, made, gone in left)
        self.initial = _Ragged.of(initials, 1)
        self.right = _Ragged.of(rights, 3)
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

    def __init__(self, vocabulary: Vocabulary, model_vocab: int, cache: bool = False):
        """``cache``: keep the analysis of the merges on disk (see :func:`_cached_analysis`), so that the next
        process with this tokenizer skips it."""
        source = vocabulary.backend.to_str()  # merges are needed, so the full description
        self.family = vocabulary.family
        self.size = model_vocab
        tokens = vocabulary.tokens
        vocab_strings: list[str | None] = [None] * model_vocab
        for t in tokens:
            if not t.special and not t.byte_fallback and not t.added:
                vocab_strings[t.id] = t.token
        self.special = np.ones(model_vocab, dtype=bool)
        self.special[: len(tokens)] = [t.special or not t.bytes for t in tokens]
        self.fallback = np.zeros(model_vocab, dtype=bool)
        self.fallback[: len(tokens)] = [t.byte_fallback for t in tokens]
        self.added = np.zeros(model_vocab, dtype=bool)
        self.added[: len(tokens)] = [t.added and not t.special for t in tokens]
        key = self._analysis_key(source, len(tokens)) if cache else None
        stored = _load_analysis(key) if cache else None
        if stored is not None:
            meta, self.bpe = stored
        else:
            spec = json.loads(source)
            why = _unsupported(vocabulary, spec)
            if why:
                raise TokenbridgeError(f"exact byte probabilities are not available for this tokenizer: {why}")
            model = spec["model"]
            meta = {"ignore_merges": bool(model.get("ignore_merges")),
                    "pattern": _byte_level_pattern(spec) if self.family == "byte_level" else None}
            # BPE over model symbols (the vocabulary strings)
            symbols = dict(model["vocab"])
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            self.bpe = _BPE(symbols, merges, vocab_strings)
            if cache:
                _store_analysis(key, meta, self.bpe)
        self.bytes = [t.bytes for t in tokens] + [b""] * max(0, model_vocab - len(tokens))
        self.contents = sorted({t.bytes for t in tokens if t.added and not t.special and t.bytes})
        used = self.bpe.merge_keys.reshape(-1)
        if len(used) and self.fallback[used[used < model_vocab]].any():
            raise TokenbridgeError("exact byte probabilities are not available: a merge uses a byte-fallback token")
        # tokens that can occur at all
        usable = self.bpe.reachable.copy()
        self.ignore_merges = meta["ignore_merges"]
        if self.ignore_merges:  # a pre-token found whole in the vocabulary is that one token, merges or not
            usable |= np.array([text is not None for text in vocab_strings], dtype=bool)
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
        # (ignore_merges) tokens BPE cannot make: each is canonical only as a whole pre-token
        self.whole_only = usable & ~self.added & ~self.fallback
        self.whole_only[: len(self.bpe.reachable)] &= ~self.bpe.reachable
        if not self.ignore_merges:
            self.whole_only[:] = False
        self._whole_texts = sorted(self.bytes[i] for i in np.flatnonzero(self.whole_only))
        self._whole_set = set(self._whole_texts)
        self.rules = None
        if self.family == "byte_level":
            self.rules = PretokRules(meta["pattern"], self.bytes, usable)
        self._masks: dict[State, np.ndarray] = {}
        self._cross: dict[int, np.ndarray] = {}
        self._pairs: dict[tuple[int, bytes], np.ndarray] = {}
        self._utf8: dict[bytes, np.ndarray] = {}
        self._oov_prefix: dict[bytes, bool] = {}
        self._fallback: dict[bytes, np.ndarray] = {}
        self._word_masks: dict[tuple, np.ndarray] = {}
        self._after: dict[tuple[bytes, bool], frozenset] = {}

    def _analysis_key(self, source: str, tokens: int) -> str:
        """What the cached analysis depends on: the tokenizer's full description (its tokenizer.json), the
        token flags the vocabulary adds to it, the sizes and the cache format."""
        import hashlib

        digest = hashlib.sha256(f"tokenbridge-canon/{CACHE_FORMAT}/{self.size}/{tokens}/{self.family}\n".encode())
        digest.update(source.encode())
        for flags in (self.special, self.fallback, self.added):
            digest.update(np.packbits(flags).tobytes())
        return digest.hexdigest()

    # ----- state transitions ---------------------------------------------------------------------------------
    def advance(self, state: State, token: int) -> State:
        data = self.bytes[token]
        pending, pending_added = self._pending_after(state, token, data)
        words = frozenset()
        if self.rules is None:
            follow = FREE
        elif self.ignore_merges:
            words = self._words_after(state, int(token))
            follow = frozenset().union(*(f for f, _ in words))
        else:
            follow = self._follow(state, int(token))
        return State(int(token), unfinished_tail(state.utf8 + data), pending, pending_added, follow, state.utf8,
                     self._prev_text(state), words)

    def _prev_text(self, state: State) -> bytes:
        """The last bytes of the segment's text before the next token's first whole character."""
        last = state.last
        if self.rules is None or last < 0 or self.added[last] or self.fallback[last]:
            return b""
        text = state.prev + state.lead + self.bytes[last]
        text = text[: len(text) - len(state.utf8)]
        size = self.rules.PREV
        if len(text) > size:  # at least ``size`` bytes: shorter means the segment's whole text
            text = text[-(size + 3):]
            start = 0
            while start < len(text) - size and text[start] & 0xC0 == 0x80:
                start += 1
            text = text[start:]
        return text

    def can_end(self, state: State) -> bool:
        """Whether the text may end after this state (no unfinished UTF-8 character)."""
        if state.utf8 != b"":
            return False
        if self.rules is None:
            return True
        if self.ignore_merges and state.words:
            return any(self._ends(word) and self.rules.can_end(follow) for follow, word in state.words)
        return self.rules.can_end(state.follow)

    # ----- ignore_merges: the pre-token as a whole ------------------------------------------------------------
    # A pre-token that is a vocabulary token is that one token; any other is BPE's.  So a token BPE cannot
    # make (WHOLE) is canonical only as a whole pre-token, and two or more tokens are canonical for a pre-token
    # only when it is not a vocabulary token.  Whether a junction is a pre-token boundary may depend on what
    # follows; each alternative keeps its own constraints on the next characters.

    def _prefix_of_whole(self, text: bytes) -> bool:
        import bisect

        at = bisect.bisect_left(self._whole_texts, text)
        return at < len(self._whole_texts) and self._whole_texts[at].startswith(text)

    def _ends(self, word: Word) -> bool:
        """Whether the pre-token may end here."""
        return word.kind != MULTI or word.text not in self._whole_set

    def _after_whole(self, word: Word) -> frozenset | None:
        """Constraints on the next characters that a pre-token boundary right after ``word`` needs (WHOLE:
        there must be one; MULTI spelling a vocabulary token: there must be none); None when free."""
        if word.kind == WHOLE:
            cut = True
        elif word.kind == MULTI and word.text in self._whole_set:
            cut = False
        else:
            return None
        key = (word.text, cut)
        found = self._after.get(key)
        if found is None:
            found = self._after[key] = self._boundary_constraints(word.text, cut)
        return found

    def _boundary_constraints(self, text: bytes, cut: bool, depth: int = 3) -> frozenset:
        """Label tuples of the next characters (LABELS indices, 0 the end of the text) under which the regex
        does (``cut``) or does not put a pre-token boundary right after ``text``, a pre-token from its start."""
        context = self.rules.classes.string(text)
        regex = self.rules.regex

        def boundary(follow: tuple[int, ...]) -> bool:
            joined = context + "".join(LABELS[i] for i in follow)
            return any(m.end() == len(context) for m in regex.finditer(joined))

        out = set()
        todo = [()]
        while todo:
            prefix = todo.pop()
            for i in range(len(LABELS)):
                follow = prefix + (i,)
                if i == 0 or len(follow) == depth:  # the end of the text, or as far as we look
                    if boundary(follow) == cut:
                        out.add(follow)
                    continue
                # decided already by these characters whatever comes next?
                outcomes = {boundary(follow + (j,)) for j in range(len(LABELS))}
                if outcomes == {cut}:
                    out.add(follow)
                elif cut in outcomes:
                    todo.append(follow)
        return frozenset(out)

    def _words_after(self, state: State, c: int) -> frozenset:
        """The alternatives (constraints on what follows, Word) after token ``c``; empty when none is valid."""
        alts = state.words or frozenset({(FREE, Word(START))})
        last = state.last
        regular = last >= 0 and not self.added[last] and not self.fallback[last]
        if self.added[c] or self.special[c]:  # text before an added token is pre-tokenized apart
            if not any(self._ends(word) for _, word in alts):
                return frozenset()
            return frozenset({(self._follow(state, c), Word(START))})
        a = last if regular else -1
        lead, finished = self.rules.lead_of(state.utf8, c)
        joined, clean = self.rules.sets(a, state.utf8, c, *((state.lead, state.prev) if regular else (b"", b"")))
        crossed = regular and bool(self._cross_mask(last)[c])
        inside = clean - joined if (a >= 0 and not crossed) else frozenset()
        data = self.bytes[c]
        out: dict[Word, frozenset] = {}
        for follow, word in alts:
            rest = consume(follow, lead, finished)
            if not rest:
                continue
            if joined and self._ends(word):
                found = meet(rest, joined)
                if found:
                    new = Word(WHOLE if self.whole_only[c] else SINGLE,
                               data if self._prefix_of_whole(data) else None)
                    out[new] = out.get(new, frozenset()) | found
            if inside and word.kind in (SINGLE, MULTI):
                found = meet(rest, inside)
                if found:
                    text = word.text + data if word.text is not None else None
                    new = Word(MULTI, text if text is not None and self._prefix_of_whole(text) else None)
                    out[new] = out.get(new, frozenset()) | found
        result = []
        for word, found in out.items():
            need = self._after_whole(word)
            if need is not None:
                found = meet(found, need)
            if found:
                result.append((found, word))
        return frozenset(result)

    def _word_mask(self, state: State, mask: np.ndarray) -> np.ndarray:
        """(ignore_merges) Exact check of the tokens ``mask`` allows, where the pre-token so far restricts them."""
        alts = state.words
        if not any(word.kind == WHOLE or not self._ends(word) for _, word in alts):
            return mask  # nothing blocked: the pair rules and ``follow`` already say it all
        key = (state.last, state.lead, state.prev, state.utf8, state.follow,
               frozenset((f, w.kind, self._ends(w), self._after_whole(w)) for f, w in alts))
        found = self._word_masks.get(key)
        if found is None:
            found = np.zeros(self.size, dtype=bool)
            for c in np.flatnonzero(mask):
                found[c] = bool(self._words_after(state, int(c)))
            if len(self._word_masks) > 4096:
                self._word_masks.pop(next(iter(self._word_masks)))
            self._word_masks[key] = found
        return mask & found

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
            mask = mask & self._pair_ok(last if regular else -1, state.utf8, state.lead, state.prev)
            mask = mask & self.rules.allowed(state.follow, state.utf8, self.continuation_ids)
        elif regular:
            mask = mask & ~self._cross_mask(last)
        if self.contents and (state.pending or state.pending_added):
            mask = mask & self._added_mask(state)
        if self.ignore_merges and self.rules is not None and state.words:
            mask = self._word_mask(state, mask)
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
        if self.whole_only[a]:  # a token BPE cannot make: never merged with a neighbour
            cross[:] = True
            odd = []
        elif bpe.monotone[a]:
            cross[bpe.crossing(a)] = True
            odd = np.flatnonzero(~bpe.monotone & bpe.reachable)
        else:
            odd = bpe.candidates(a)
        for b in odd:  # pairs the rank-order argument does not cover: simulate them
            cross[b] = bpe.pair_merges(a, int(b))
        cross |= self.whole_only
        cross &= ~self.added & ~self.fallback
        if len(self._cross) > 4096:
            self._cross.pop(next(iter(self._cross)))
        self._cross[a] = cross
        return cross

    def _pair_ok(self, a: int, pending: bytes, lead: bytes = b"", prev: bytes = b"") -> np.ndarray:
        lead, prev = (lead, prev) if a >= 0 else (b"", b"")
        key = (a, pending, lead, self.rules.left_context(a, lead, prev))  # the context, not the text, matters
        cached = self._pairs.get(key)
        if cached is not None:
            return cached
        some_joined, some_clean = self.rules.pair(a, pending, self.continuation_ids, lead, prev)
        ok = some_clean if a < 0 else some_joined | (some_clean & ~self._cross_mask(a))
        if len(self._pairs) > 4096:
            self._pairs.pop(next(iter(self._pairs)))
        self._pairs[key] = ok
        return ok

    def _follow(self, state: State, b: int) -> frozenset:
        """What the characters after ``b`` must look like: the pair's own needs and what the state carried."""
        last = state.last
        regular = last >= 0 and not self.added[last] and not self.fallback[last]
        a = last if regular else -1
        needs = self.rules.needs(a, state.utf8, b, regular and bool(self._cross_mask(last)[b]),
                                 state.lead if regular else b"", state.prev if regular else b"")
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


# ----- the analysis cached on disk ------------------------------------------------------------------------------
CACHE_FORMAT = 1  # bump when the analysis or its layout changes: older entries are then never read


def _analysis_entry(key: str):
    from ..cache import cache_root

    return cache_root() / "canon" / key[:32]


def _load_analysis(key: str):
    """(meta, _BPE) from the cache entry of ``key``, or None when there is none or it cannot be trusted (then
    it is reported, and rebuilt by the caller)."""
    import sys

    from ..cache import usable_entry

    entry = _analysis_entry(key)
    if not usable_entry(entry):  # missing, or files that do not match their manifest (reported there)
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("it was written for another tokenizer or by another version")
        arrays = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in _BPE.ARRAYS}
        return meta, _BPE.from_arrays(arrays)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        print(f"tokenbridge: cache entry {entry} is corrupt ({error}); rebuilding", file=sys.stderr)
        return None


def _store_analysis(key: str, meta: dict, bpe: _BPE) -> None:
    """Write the cache entry atomically (a staged directory with a manifest of checksums, then renamed)."""
    from ..cache import staged_entry

    try:
        with staged_entry(_analysis_entry(key)) as tmp:
            for name, array in bpe.arrays().items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps({**meta, "format": CACHE_FORMAT, "key": key}),
                                           encoding="utf-8")
    except (OSError, TokenbridgeError) as error:  # a read-only or full cache only costs the next process time
        import sys

        print(f"tokenbridge: could not cache the canonicity analysis ({error})", file=sys.stderr)


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
    if model.get("ignore_merges") and vocabulary.family != "byte_level":
        return "ignore_merges (whole pre-tokens looked up before merging) is modelled for byte-level BPE only"
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
