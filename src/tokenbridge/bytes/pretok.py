"""The pre-tokenizer's part of canonicity, for byte-level BPE with a GPT-2 style split regex.

The regex cuts text into pieces and BPE never merges across a cut, so at each
junction between two tokens ``a b``:

* a cut strictly inside ``a`` or ``b`` makes the pair invalid;
* a cut at the junction makes the pair valid whatever the merges;
* otherwise the pair is valid when no merge crosses the junction.

Where the regex cuts can depend on characters that have not been seen yet: its
lookahead (``\\s+(?!\\S)`` keeps the last space of a run for the next word) and
unfinished UTF-8 characters at the end of a token.  A pair is then accepted when
*some* continuation makes it valid, and the state carries what the continuation must
look like: a set of label tuples (:data:`LABELS`) for the next characters.  The
regex sees characters only through a few classes (its literal ASCII characters,
letters, digits, spaces, marks, ...), so pairs are decided once per class string.
"""

from __future__ import annotations

import itertools
import json
import re
from functools import cache
from pathlib import Path

import numpy as np

from .utf8 import unfinished_tail

# what a one-character lookahead can tell apart about the next character; 0 is the end of the text
LABELS = ["", " ", "\n", "\t", "x", "0", ".", "'"]
FREE = frozenset({()})  # no constraint on what follows


def meet(first: frozenset, second: frozenset) -> frozenset:
    """Constraints that satisfy both sets (each tuple: labels the next characters must have, in order)."""
    out = set()
    for a in first:
        for b in second:
            n = min(len(a), len(b))
            if a[:n] == b[:n]:
                out.add(a if len(a) >= len(b) else b)
    return frozenset(out)


def consume(constraints: frozenset, lead: tuple[frozenset, ...], count: int) -> frozenset:
    """What remains of ``constraints`` after characters with label sets ``lead`` (``count`` of them finished)."""
    out = set()
    for t in constraints:
        if all(t[i] in lead[i] for i in range(min(len(t), len(lead)))):
            out.add(t[count:])
    return frozenset(out)


def _unicode_kinds() -> tuple[np.ndarray, list[int]]:
    """Per scalar value (surrogates left out): an index into a list of (category, is-space) kinds, and for
    each kind a code point that has it; ASCII characters are kinds of their own.  Cached on disk."""
    import unicodedata

    stem = Path.home() / ".cache" / "tokenbridge" / f"unicode-kinds-{unicodedata.unidata_version}"
    try:
        return np.load(stem.with_suffix(".npy"), allow_pickle=False), json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        pass
    import regex

    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, cps))
    spaces = set(regex.findall(r"\s", text))
    index: dict = {}
    names: list[int] = []
    kinds = np.empty(len(cps), dtype=np.int32)
    for k, ch in enumerate(text):
        key = ch if k < 128 else (unicodedata.category(ch), ch in spaces)
        found = index.get(key)
        if found is None:
            found = index[key] = len(names)
            names.append(cps[k])
        kinds[k] = found
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(stem.with_suffix(".npy"), kinds, allow_pickle=False)
    stem.with_suffix(".json").write_text(json.dumps(names))
    return kinds, names


class _Classes:
    """Characters as the classes a pre-tokenizer regex can tell apart.

    An unfinished character at either end of a token is written as a placeholder that
    stands for the classes of every character its bytes could belong to; pair checks
    try each (a pair is fine when some completion makes it fine, as for any prefix).
    """

    PROBES = ["L", "N", "M", "Lu", "Ll", "Lt", "Lm", "Lo", "P", "S", "Z", "Zs", "Cc", "Nd"]
    CANDIDATES = "жЖéÉ中ａ١٢̀́ʰǅ€«»\u00a0\u3000\u2028·、。！？Ⅻ②¼\ue000"
    PLACEHOLDER = 0x100000  # plane-16 private use: never a class representative

    def __init__(self, pattern: str):
        import regex

        bare = re.sub(r"\\[pP]\{[^}]*\}|\\.|\{\d+(,\d*)?\}", "", pattern)
        literal = {ch for ch in bare if ord(ch) < 128 and ch.isalnum()}
        if "(?i" in pattern:
            literal |= {ch.swapcase() for ch in literal}
        self.literal = literal
        self.letter = next(ch for ch in "xqzjkwyubcfghinopatemldrsv" if ch not in literal)
        self.digit = next((ch for ch in "0123456789" if ch not in literal), None)
        self.probes = [regex.compile(rf"\p{{{name}}}") for name in self.PROBES] + [regex.compile(r"\s")]
        self.rep: dict[tuple, str] = {}
        for ch in self.CANDIDATES:
            self.rep.setdefault(self._signature(ch), ch)
        self.bounded = bool(re.search(r"\{\d", pattern))
        self.options: list[frozenset[str]] = []  # placeholder k stands for any class in options[k]
        self._placeholder: dict[tuple[frozenset[str], bool], str] = {}
        self.unfinished: set[str] = set()  # placeholders of characters still waiting for bytes
        self._table = None

    def _signature(self, ch: str) -> tuple:
        return tuple(bool(p.match(ch)) for p in self.probes)

    @cache  # noqa: B019 - one instance per tokenizer, lives as long as it
    def of(self, ch: str) -> str:
        if ord(ch) < 128:
            if ch.isalpha() and ch not in self.literal:
                return self.letter
            if ch.isdigit() and self.digit is not None and ch not in self.literal:
                return self.digit
            return ch
        return self.rep.setdefault(self._signature(ch), ch)

    def _codepoints(self):
        """Per scalar value: the codes of its first and last 1-3 UTF-8 bytes, its length, its class index."""
        if self._table is None:
            cps = np.arange(0x110000, dtype=np.int64)
            cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
            length = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
            data = np.zeros((len(cps), 4), dtype=np.int64)
            lead = np.array([0, 0, 0xC0, 0xE0, 0xF0])[length]
            for k in range(4):  # byte k of each encoding (0 past its end)
                shift = (6 * (length - 1 - k)).clip(0)
                byte = np.where(k == 0, np.where(length == 1, cps, lead | (cps >> shift)), 0x80 | ((cps >> shift) & 0x3F))
                data[:, k] = np.where(k < length, byte, 0)
            kinds, names = _unicode_kinds()
            reps = [self.of(chr(int(cp))) for cp in names]
            first = [None] + [sum(data[:, j] << (8 * (k - 1 - j)) for j in range(k)) for k in (1, 2, 3)]
            last = [None] + [sum(np.take_along_axis(data, (length - k + j).clip(0)[:, None], axis=1)[:, 0]
                                 << (8 * (k - 1 - j)) for j in range(k)) for k in (1, 2, 3)]
            self._table = (first, last, length, kinds, reps)
        return self._table

    @cache  # noqa: B019 - one instance per tokenizer, lives as long as it
    def _fragment(self, head: bytes = b"", tail: bytes = b"") -> str:
        """Placeholder for a character whose UTF-8 ends with ``head`` or starts with ``tail``."""
        first, last, length, kinds, reps = self._codepoints()
        part = tail or head
        codes = (first if tail else last)[len(part)]
        pick = (codes == int.from_bytes(part, "big")) & (length > len(part))
        classes = frozenset(reps[i] for i in np.unique(kinds[pick]).tolist())
        if not classes:
            return ""
        key = (classes, bool(tail))
        mark = self._placeholder.get(key)
        if mark is None:  # unfinished characters and finished ones seen from their end get apart marks
            mark = self._placeholder[key] = chr(self.PLACEHOLDER + len(self.options))
            self.options.append(classes)
            if tail:
                self.unfinished.add(mark)
        return mark

    def string(self, data: bytes) -> str:
        """Class string of a token's bytes (unfinished characters at the ends as placeholders)."""
        head = 0
        while head < len(data) and head < 3 and data[head] & 0xC0 == 0x80:
            head += 1
        tail = unfinished_tail(data[head:])
        body = data[head:len(data) - len(tail)]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return ""  # not a piece of UTF-8 text at all; such tokens are unreachable anyway
        if head == len(data) and head:
            return self._fragment(head=data)  # only continuation bytes
        return ((self._fragment(head=data[:head]) if head else "") + "".join(self.of(ch) for ch in text)
                + (self._fragment(tail=tail) if tail else ""))

    def key(self, data: bytes) -> str:
        """A shorter class string that the regex treats the same way.

        Literal letters keep their identity only where the regex can use them: the first
        two characters (they may follow an apostrophe in the previous token) and the two
        after an apostrophe.  Without bounded quantifiers, a run of one class longer than
        two behaves as a run of two (boundaries fall at run ends or one before).
        """
        text = self.string(data)
        out = []
        for k, ch in enumerate(text):
            if ch in self.literal and k >= 2 and "'" not in text[max(0, k - 2):k]:
                ch = self.letter
            out.append(ch)
        if self.bounded:
            return "".join(out)
        packed = []
        for k, ch in enumerate(out):
            if k >= 2 and len(packed) >= 2 and packed[-1] == ch and packed[-2] == ch:
                continue
            packed.append(ch)
        return "".join(packed)

    def left(self, key: str) -> str:
        """The part of a left token's class string that can matter at its junction: its last two
        characters, literal letters kept only after an apostrophe."""
        tail = key[-2:]
        return "".join(self.letter if ch in self.literal and "'" not in tail[:k] else ch for k, ch in enumerate(tail))

    @cache  # noqa: B019 - one instance per tokenizer, lives as long as it
    def label(self, ch: str) -> int:
        """Index in LABELS of the class a character falls in, as a one-character lookahead sees it."""
        if ch == " ":
            return 1
        if ch in "\r\n":
            return 2
        sig = self._signature(ch)  # the regex's own idea of \s, \p{L}, \p{N} (str.isspace differs)
        if sig[-1]:
            return 3
        if ch == "'":
            return 7
        if sig[0]:
            return 4
        if sig[1]:
            return 5
        return 6

    def labels_of(self, ch: str) -> frozenset[int]:
        """Labels a class character (or placeholder) may have."""
        if ord(ch) >= self.PLACEHOLDER:
            return frozenset(self.label(option) for option in self.options[ord(ch) - self.PLACEHOLDER])
        return frozenset([self.label(ch)])

    def expand(self, text: str):
        """Every class string ``text`` stands for (placeholders replaced by each of their classes)."""

        slots = [k for k, ch in enumerate(text) if ord(ch) >= self.PLACEHOLDER]
        if not slots:
            yield text
            return
        chars = list(text)
        for choice in itertools.product(*(sorted(self.options[ord(text[k]) - self.PLACEHOLDER]) for k in slots)):
            for k, ch in zip(slots, choice):
                chars[k] = ch
            yield "".join(chars)




class PretokRules:
    """Pair checks and lookahead constraints for one tokenizer's split regex."""

    def __init__(self, pattern: str, token_bytes: list[bytes], usable: np.ndarray):
        import regex

        self.regex = regex.compile(pattern)
        self.classes = _Classes(pattern)
        self.bytes = token_bytes
        keys = [self.classes.key(b) if usable[i] else "" for i, b in enumerate(token_bytes)]
        uniq, inverse = np.unique(np.array(keys, dtype=object), return_inverse=True)
        self.keys = list(uniq)
        self.key_of = inverse
        self.lead = [self._lead(b) if usable[i] else () for i, b in enumerate(token_bytes)]
        groups: dict[tuple, int] = {}
        self.lead_group = np.array([groups.setdefault(self._lead_key(t), len(groups)) for t in self.lead])
        self.lead_groups = list(groups)
        self._pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._needs: dict[tuple[str, str], tuple[frozenset, frozenset]] = {}
        self._allowed: dict[frozenset, np.ndarray] = {}
        self._contexts: dict[tuple, tuple[str, int]] = {}

    @staticmethod
    def _lead_key(lead):
        return tuple(lead)

    def _lead(self, data: bytes) -> tuple[tuple[frozenset, ...], int]:
        """(label sets of the first two characters, how many characters the token finishes)."""
        text = self.classes.string(data)
        if data and data[0] & 0xC0 == 0x80:
            return (), -1  # starts inside a character: decided with the previous token
        finished = len(text) - (1 if unfinished_tail(data) else 0)
        return tuple(self.classes.labels_of(ch) for ch in text[:2]), finished

    # ----- one class string ---------------------------------------------------------------------------------
    def _sets(self, text: str, junction: int, allowed: int = -1) -> tuple[frozenset, frozenset]:
        """(constraints under which the regex cuts at the junction and nowhere inside, ... cuts nowhere inside).

        Each constraint is the tuple of labels of the coming characters: the one after
        ``text``, or, when ``text`` ends in an unfinished character, that one and the next.
        ``allowed``: cuts up to this position are fine (the left token begins there in its context).
        """
        joined, clean = set(), set()
        unfinished = bool(text) and text[-1] in self.classes.unfinished
        for option in self.classes.expand(text):
            for index, follow in enumerate(LABELS):
                cuts = set()
                for match in self.regex.finditer(option + follow):
                    cuts.add(match.start())
                    cuts.add(match.end())
                if any(allowed < c < len(option) and c > 0 and c != junction for c in cuts):
                    continue
                key = (self.classes.label(option[-1]), index) if unfinished else (index,)
                clean.add(key)
                if junction in cuts:
                    joined.add(key)
        return frozenset(joined), frozenset(clean)

    def _flags(self, text: str, junction: int, allowed: int = -1) -> tuple[bool, bool]:
        """Whether ``_sets`` would be non-empty: (joined, clean), stopping at the first witnesses."""
        joined = clean = False
        for option in self.classes.expand(text):
            for follow in LABELS:
                cuts = set()
                for match in self.regex.finditer(option + follow):
                    cuts.add(match.start())
                    cuts.add(match.end())
                if any(allowed < c < len(option) and c > 0 and c != junction for c in cuts):
                    continue
                clean = True
                joined = joined or junction in cuts
                if joined:
                    return True, True
        return joined, clean

    def _for_left(self, left: str, allowed: int = -1) -> tuple[np.ndarray, np.ndarray]:
        cached = self._pairs.get((left, allowed))
        if cached is None:
            joined = np.zeros(len(self.keys), dtype=bool)
            clean = np.zeros(len(self.keys), dtype=bool)
            for k, right in enumerate(self.keys):
                if right:
                    joined[k], clean[k] = self._flags(left + right, len(left) if left else -1, allowed)
            if len(self._pairs) > 4096:
                self._pairs.pop(next(iter(self._pairs)))
            cached = self._pairs[(left, allowed)] = (joined[self.key_of], clean[self.key_of])
        return cached

    PREV = 16  # bytes of text before a token kept as its context (fewer: the whole segment so far)
    CONTEXT = 4  # characters of context kept for a junction

    def _pack(self, text: str) -> str:
        """Runs of one class longer than two as two (digits kept when the regex counts them)."""
        out = []
        for ch in text:
            if len(out) >= 2 and out[-1] == ch and out[-2] == ch and not (self.classes.bounded and
                                                                           ch == self.classes.digit):
                continue
            out.append(ch)
        return "".join(out)

    def left_context(self, a: int, lead: bytes = b"", prev: bytes = b"") -> tuple[str, int]:
        """The end of the text up to ``a`` as the regex sees it, and up to where cuts are fine (-1: none).

        The context starts where a regex match starts (found by running the regex over ``prev``, the text
        before ``a``, and ``a``), so that what follows is matched as it would be in the whole text; without
        such a start, ``a``'s own last two characters.  ``lead``: the unfinished character ``a`` began
        inside, so that its first character is known whole.
        """
        if a < 0:
            return "", -1
        own = self.classes.key(lead + self.bytes[a]) if lead else self.keys[self.key_of[a]]
        if prev:
            before = self.classes.string(prev)
            if any(ord(ch) >= self.classes.PLACEHOLDER for ch in before):
                before = ""
            cached = self._contexts.get((before, own, len(prev) < self.PREV))
            if cached is not None:
                return cached
            found = self._context(before, own, len(prev) < self.PREV)
            if len(self._contexts) > 65536:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[(before, own, len(prev) < self.PREV)] = found
            return found
        return self.classes.left(own), -1

    def _context(self, before: str, own: str, whole: bool) -> tuple[str, int]:
        joined = before + own
        body = joined.rstrip("".join(self.classes.unfinished)) if self.classes.unfinished else joined
        starts = [m.start() for m in self.regex.finditer(body or joined)]
        starts = [p for p in starts if p <= len(before) and (p > 0 or whole)]
        if not starts or not before:
            return self.classes.left(own), -1
        start = starts[-1]
        head = self._pack(before[start:])
        context, allowed = head + own, len(head)
        if len(context) > self.CONTEXT:  # far enough back: what the regex can still re-cut
            cut = len(context) - self.CONTEXT
            context, allowed = context[cut:], allowed - cut
            if allowed <= 0:
                return self.classes.left(own), -1
        # literal letters matter only just after an apostrophe
        text = "".join(self.classes.letter if ch in self.classes.literal and "'" not in context[max(0, k - 2):k]
                       else ch for k, ch in enumerate(context))
        return text, allowed

    def _joint(self, a: int, pending: bytes, b: int, lead: bytes = b"") -> str:
        """Class string of ``a`` then ``b`` when ``b`` continues the unfinished character ``pending``."""
        text = lead + self.bytes[a] if a >= 0 else b""  # ends in ``pending``
        if not text.endswith(pending):
            text = pending
        return self.classes.string(text + self.bytes[b])

    def pair(self, a: int, pending: bytes, continuation: np.ndarray, lead: bytes = b"",
             prev: bytes = b"") -> tuple[np.ndarray, np.ndarray]:
        """Per right token: (valid if a merge crosses the junction, valid if none does).

        ``a`` is -1 at the start of a BPE segment; ``pending`` is the unfinished character
        the text ends in (the junction then falls inside it, for tokens that continue it);
        ``lead`` the unfinished character that ``a`` itself began inside, ``prev`` the character before ``a``.
        """
        joined, clean = self._for_left(*self.left_context(a, lead, prev))
        if a < 0:
            joined = clean
        if pending:
            joined, clean = joined.copy(), clean.copy()
            for b in continuation:
                _, clean[b] = self._flags(self._joint(a, pending, int(b), lead), -1)
                joined[b] = False
        return joined, clean

    def sets(self, a: int, pending: bytes, b: int, lead: bytes = b"", prev: bytes = b"") -> tuple[frozenset, frozenset]:
        """(constraints on what follows ``b`` under which the regex cuts at the junction ``a|b`` and nowhere
        inside, ... cuts nowhere inside); at the start of a segment (``a`` < 0) the junction is always a cut."""
        if pending:
            return frozenset(), self._sets(self._joint(a, pending, b, lead), -1)[1]
        key = (*self.left_context(a, lead, prev), self.keys[self.key_of[b]])
        found = self._needs.get(key)
        if found is None:
            left, allowed, right = key
            found = self._needs[key] = self._sets(left + right, len(left) if left else -1, allowed)
        joined, clean = found
        return (clean, clean) if a < 0 else found

    def needs(self, a: int, pending: bytes, b: int, crossed: bool, lead: bytes = b"", prev: bytes = b"") -> frozenset:
        """What the characters after ``b`` must look like for the pair ``a b`` to be canonical."""
        joined, clean = self.sets(a, pending, b, lead, prev)
        return clean if a < 0 or pending or not crossed else joined

    # ----- what may come next --------------------------------------------------------------------------------
    def lead_of(self, pending: bytes, b: int) -> tuple[tuple[frozenset, ...], int]:
        """Label sets of the first characters ``b`` finishes or starts, after ``pending`` (an unfinished one)."""
        if not pending:
            return self.lead[b]
        text = self.classes.string(pending + self.bytes[b])
        finished = len(text) - (1 if unfinished_tail(pending + self.bytes[b]) else 0)
        return tuple(self.classes.labels_of(ch) for ch in text[:2]), finished

    def allowed(self, constraints: frozenset, pending: bytes, candidates: np.ndarray) -> np.ndarray:
        """Tokens whose first characters can meet ``constraints`` (mask over ``candidates`` given)."""
        if constraints == FREE:
            return np.ones(len(self.bytes), dtype=bool)
        if pending:
            mask = np.zeros(len(self.bytes), dtype=bool)
            for b in candidates:
                lead, _ = self.lead_of(pending, int(b))
                mask[b] = bool(consume(constraints, lead, 0))
            return mask
        cached = self._allowed.get(constraints)
        if cached is None:
            ok = np.array([bool(consume(constraints, lead, 0)) for lead in self.lead_groups_leads()], dtype=bool)
            cached = ok[self.lead_group]
            if len(self._allowed) > 4096:
                self._allowed.pop(next(iter(self._allowed)))
            self._allowed[constraints] = cached
        return cached

    def lead_groups_leads(self):
        return [group[0] if group else () for group in self.lead_groups]

    @staticmethod
    def can_end(constraints: frozenset) -> bool:
        return any(len(t) == 0 or t[0] == 0 for t in constraints)
