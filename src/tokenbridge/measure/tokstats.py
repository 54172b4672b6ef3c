"""Tokenizer statistics: compression, fertility, byte fallback, unknown tokens, token premium, vocabulary overlap.

Everything here is measured on the tokenizer's own encoding of a text, with no special tokens added
and with literal special-token strings (``<|im_end|>`` written in the text) encoded as ordinary text.

* ``bytes_per_token``: UTF-8 bytes of the text per token (compression; higher is better).
* ``fertility``: tokens per whitespace-separated word (Rust et al. 2021).  It is ``None`` for text
  written mostly without spaces between words (see :data:`UNSPACED_LETTER_SHARE`).
* ``byte_fallback_share``: share of the text's bytes that the tokenizer could only emit byte by byte:
  ``<0xNN>`` byte-fallback tokens (SentencePiece style), or, for byte-level BPE, the bytes of the
  characters that a token holds only in part (a character split into bytes).
* ``unk_share``: share of the text's bytes that were mapped to the unknown token.
* :func:`token_premium`: tokens needed for a text relative to the same content in a reference
  language (Petrov et al. 2023, "Language Model Tokenizers Introduce Unfairness Between
  Languages"; the term as used in "Explaining and Mitigating Crosslingual Tokenizer Inequities").
* :func:`vocab_overlap`: tokens two vocabularies share by exact bytes, and how much of each
  tokenizer's encoding of a text the other vocabulary could express token for token.

A text is encoded in segments of about :data:`SEGMENT` characters, cut where no token can span the
cut, and a file is read in blocks (:func:`count_text`): memory does not grow with the text, and
every count is that of the text encoded whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from ..align.token_bytes import Vocabulary, _walk, is_valid_utf8, tokenizer_spec, vocabulary
from ..errors import TokenbridgeError
from ..tokenizers.style import GPT2_PATTERN, METASPACE_PATTERN, PARAGRAPH
from .texts import check_text, text_blocks

# Code point ranges of scripts written without spaces between words: Thai, Lao, Tibetan, Myanmar,
# Khmer, Hiragana + Katakana, Katakana extensions, CJK ideographs (extension A, unified,
# compatibility, extensions B and later), halfwidth Katakana.  Hangul is written with spaces.
UNSPACED_SCRIPTS = (
    (0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3040, 0x30FF),
    (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F),
    (0x20000, 0x3FFFF),
)
# Fertility is None when at least this share of the text's letters belongs to UNSPACED_SCRIPTS.
# A rule on words per character does not work: technical Japanese or Chinese text is full of
# spaced ASCII (commands, file names), so its characters per word (about 14 in the Debian
# Reference) are close to German's (about 11).  Its letters are a different matter: 31-86% of
# them are Han or kana in any 3 KB slice of debref.ja / debref.zh-cn, 0% in the other languages.
UNSPACED_LETTER_SHARE = 0.2


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TextStats:
    """One tokenizer on one text."""

    tokenizer: str
    text: str
    bytes: int  # UTF-8 bytes of the text
    characters: int
    tokens: int
    words: int  # len(text.split())
    bytes_per_token: float | None  # None for a text with no tokens
    fertility: float | None  # tokens per word; None for text written without spaces between words
    byte_fallback_share: float  # share of the bytes emitted as byte tokens
    unk_share: float  # share of the bytes mapped to the unknown token


@dataclass(frozen=True)
class TextOverlap:
    """How much of each tokenizer's encoding of one text the other vocabulary contains."""

    text: str
    tokens_a: int
    tokens_b: int
    a_in_b: float  # share of A's tokens (in A's encoding of the text) whose bytes are a token of B
    b_in_a: float  # the same, B in A


@dataclass(frozen=True)
class Overlap:
    """The vocabularies of two tokenizers compared by exact bytes."""

    tokenizer_a: str
    tokenizer_b: str
    size_a: int  # tokens in A's vocabulary, special tokens included
    size_b: int
    shared: int  # distinct byte strings that are a non-special token in both
    shared_partial_utf8: int  # of those, byte strings that are not valid UTF-8 on their own
    shared_special: int  # special tokens of both, compared by content
    texts: tuple[TextOverlap, ...] = ()


# ----------------------------------------------------------------------------------------------
# Encoding


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of ``text``: no special tokens added, special-token strings as text.

    ``tokenizer`` is a transformers fast tokenizer or a ``tokenizers.Tokenizer``.  transformers 5
    implements ``split_special_tokens=True`` by setting the backend's ``encode_special_tokens``
    flag and leaves it set; it is put back here so that later direct uses of the backend are unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a bare tokenizers.Tokenizer
        previous = tokenizer.encode_special_tokens
        try:
            tokenizer.encode_special_tokens = True
            encoding = tokenizer.encode(text, add_special_tokens=False)
        finally:
            tokenizer.encode_special_tokens = previous
        return list(encoding.ids), list(encoding.offsets)
    previous = backend.encode_special_tokens
    try:
        encoding = tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True, verbose=False)
    finally:
        backend.encode_special_tokens = previous
    return list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]


def split_character_bytes(data: bytes) -> int:
    """How many bytes of ``data`` belong to UTF-8 characters that ``data`` holds only in part.

    ``b"\\x81 a\\xe3"`` -> 2: the continuation byte of a character begun in an earlier token and the
    lead byte of one finished in a later token; `` a`` is whole.  Bytes that are never valid UTF-8
    count as split.
    """
    count = 0
    position = 0
    while position < len(data):
        lead = data[position]
        if lead < 0x80:
            position += 1
            continue
        length = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        if length == 0:  # a continuation byte without its lead, or a byte that is never UTF-8
            count += 1
            position += 1
            continue
        end = position + 1
        while end < len(data) and end < position + length and 0x80 <= data[end] <= 0xBF:
            end += 1
        if end - position == length and is_valid_utf8(data[position:end]):
            position = end
            continue
        count += end - position
        position = end
    return count


def _byte_token_bytes(vocab: Vocabulary) -> np.ndarray:
    """Per id, the bytes of text the token emits byte by byte (0 for most tokens)."""
    out = np.zeros(len(vocab), dtype=np.int64)
    for info in vocab.tokens:
        if info.special:
            continue
        if info.byte_fallback:
            out[info.id] = len(info.bytes)
        elif info.partial_utf8:
            out[info.id] = split_character_bytes(info.bytes)
    return out


@lru_cache(maxsize=1)
def _letter_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per code point: is it a letter (``str.isalpha``); is it a letter of one of UNSPACED_SCRIPTS."""
    letters = np.fromiter(map(str.isalpha, map(chr, range(0x110000))), dtype=bool, count=0x110000)
    scripts = np.zeros(0x110000, dtype=bool)
    for low, high in UNSPACED_SCRIPTS:
        scripts[low:high + 1] = True
    return letters, letters & scripts


def _letters(text: str) -> tuple[int, int]:
    """(letters, letters of unspaced scripts) in ``text``."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    letters, unspaced = _letter_tables()
    return int(letters[codes].sum()), int(unspaced[codes].sum())


# ----------------------------------------------------------------------------------------------
# Streaming: a text encoded in segments, with exactly the tokens of the whole
#
# A text is cut at positions p of two kinds:
#
# * newline: right after "\n", before a non-space character X;
# * space: at a single space between two non-space characters (x " " X), before the space.
#
# No token of the whole text's encoding spans p when no token of the vocabulary (added tokens
# included) holds the two units that meet at p as the model sees them after the normalizer
# (bytes for byte-level tokenizers, characters otherwise): "\n" and X's first unit, or x's last
# unit and the space's.  Then BPE never applies a merge across p and applies every other merge in
# the same order on each side.  Unigram and WordPiece need more, a pre-tokenizer that always starts
# a piece at p (otherwise Unigram's path scores add up from another start, and WordPiece would
# continue a word); so does BPE when it marks word starts or ends (``##``, ``</w>``), or when it may
# drop a character missing from its vocabulary (no unknown token and no complete byte alphabet):
# tokenizers counts a piece's token offsets from the piece's start, so those after a dropped
# character slide back.  A tokenizer that fuses unknown tokens needs the unit at p in its
# vocabulary, or an unknown character on each side would become one token.
#
# A segment is encoded with CONTEXT characters of its neighbours on each side, and only the tokens
# that start inside it are counted, so that what happens at the start or end of an encoded string
# (Prepend, a prefix space, Metaspace's prepend scheme, Strip) happens in the context.  This holds
# for the normalizers and pre-tokenizers allowed below, whose effect on a character depends on its
# neighbours no further than that: character-wise normalizers (Strip needs a non-space character
# before a newline cut), composing ones with the characters around a cut ASCII, and pre-tokenizers
# whose pieces are decided locally.  Any other tokenizer gets its texts encoded whole.

SEGMENT = 1 << 16  # characters encoded at a time (a 64K-character encoding takes a few MB; 1M, 250 MB)
CONTEXT = 2  # characters encoded on each side of a segment, whose tokens the next segment counts
NEWLINE, SPACE = "newline", "space"
BOTH = frozenset({NEWLINE, SPACE})
MARK = "\u2581"  # ▁, which metaspace tokenizers write for a space
CUT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= \S)")
# Normalizers that change a character whatever its neighbours (in the middle of a text) ...
CHARACTER_NORMALIZERS = {"Replace", "Prepend", "Strip", "Lowercase", "StripAccents", "Nmt"}
# ... and those that may compose a character with the marks after it: cuts among ASCII characters only.
COMPOSING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "BertNormalizer", "Precompiled"}
# Llama 3's and Qwen 2's pre-tokenizer regexes.  Like GPT-2's, no piece they make holds a newline and
# a following non-space character, or a non-space character and a following space.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PIECE_PATTERNS = {GPT2_PATTERN: BOTH, LLAMA3_PATTERN: BOTH, QWEN2_PATTERN: BOTH,
                  **{pattern: frozenset() for pattern in PARAGRAPH.values()}}


@dataclass(frozen=True)
class Segment:
    """Part of a text, as encoded: ``text[start:stop]`` is counted, the rest is context."""

    text: str
    start: int
    stop: int
    last: bool  # the end of the text: tokens starting at or after ``stop`` count too


def _pieces_start_at(node: dict | None, space: str) -> frozenset[str] | None:
    """The cut kinds at which the pre-tokenizer ``node`` always starts a piece; None if it is not local.

    ``space`` is what the normalizer makes of a space.
    """
    if node is None:
        return frozenset()
    kind = node.get("type")
    if kind == "Sequence":
        parts = [_pieces_start_at(part, space) for part in node.get("pretokenizers", [])]
        return None if None in parts else frozenset().union(*parts)
    if kind == "ByteLevel":
        return BOTH if node.get("use_regex", True) else frozenset()
    if kind in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit"):
        return BOTH
    if kind in ("Digits", "Punctuation"):
        return frozenset()
    if kind == "Metaspace":
        splits = node.get("split", True) and space in (" ", node.get("replacement"))
        return frozenset({SPACE}) if splits else frozenset()
    if kind == "Split" and not node.get("invert"):
        pattern = node.get("pattern", {})
        if len(pattern.get("String", "")) == 1:
            return frozenset()
        if node.get("behavior") == "Isolated" and pattern.get("Regex") == METASPACE_PATTERN:
            return frozenset({SPACE}) if space == MARK else frozenset()
        if node.get("behavior") == "Isolated" and pattern.get("Regex") in PIECE_PATTERNS:
            return PIECE_PATTERNS[pattern["Regex"]]
    return None


def _normalizer_kinds(node: dict | None) -> set[str] | None:
    """The component types of a normalizer; None if one of them is not character-local."""
    if node is None:
        return set()
    kind = node.get("type")
    if kind == "Sequence":
        parts = [_normalizer_kinds(part) for part in node.get("normalizers", [])]
        return None if None in parts else set().union(*parts)
    if kind == "Replace" and len(node.get("pattern", {}).get("String", "")) != 1:
        return None  # a regex, or a string of several characters, can match across a cut
    return {kind} if kind in CHARACTER_NORMALIZERS | COMPOSING_NORMALIZERS else None


@dataclass(frozen=True)
class Cuts:
    """What one tokenizer allows: the kinds of cut, and the units its tokens join across each."""

    kinds: frozenset[str] = frozenset()  # empty: texts are encoded whole
    after_newline: frozenset = frozenset()  # units that follow the newline inside some token
    before_space: frozenset = frozenset()  # units that precede the space inside some token
    ascii_only: bool = False  # a composing normalizer: cut among ASCII characters only
    strips: bool = False  # Strip: the character before a newline cut must be one Strip stops at


class CutRule:
    """Where one tokenizer's encoding of a text may be cut (see the comment above :data:`SEGMENT`).

    The vocabulary is read on the first question, so a text shorter than a segment never costs it.
    """

    def __init__(self, tokenizer, vocab: Vocabulary):
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.vocab = vocab
        self.as_bytes = vocab.family == "byte_level"
        self._images: dict[str, str | None] = {}

    @cached_property
    def cuts(self) -> Cuts:
        """What the tokenizer allows, worked out once from its pipeline and vocabulary."""
        spec = tokenizer_spec(self.backend)
        kinds = _normalizer_kinds(spec["normalizer"])
        added = self.backend.get_added_tokens_decoder().values()
        if kinds is None or any((t.lstrip or t.rstrip) and not t.special for t in added):
            return Cuts()  # an added token that takes in the spaces beside it can reach across a cut
        newline, space = self.image("\n"), self.image(" ")
        starts = _pieces_start_at(spec["pre_tokenizer"], space)
        if starts is None:
            return Cuts()
        metaspace = [p for p in _walk(spec["pre_tokenizer"]) if p.get("type") == "Metaspace"]
        if metaspace and space is not None:
            space = space.replace(" ", metaspace[0].get("replacement", MARK))
        newline_unit = self._units(newline)[-1] if newline and newline.isspace() else None
        space_unit = self._units(space)[0] if space and (space.isspace() or space == MARK) else None
        after, before, single = set(), set(), set()
        for info in self.vocab.tokens:
            units = self._token_units(info)
            if len(units) == 1:
                single.add(units[0])
            at = units.find(newline_unit) if newline_unit is not None else -1
            while 0 <= at < len(units) - 1:
                after.add(units[at + 1])
                at = units.find(newline_unit, at + 1)
            at = units.find(space_unit, 1) if space_unit is not None else -1
            while at > 0:
                before.add(units[at - 1])
                at = units.find(space_unit, at + 1)
        allowed = set(self._model_cuts(starts, single))
        if newline_unit is None:
            allowed.discard(NEWLINE)
        if space_unit is None:
            allowed.discard(SPACE)
        if self._fuses_unknowns():  # unknown characters on both sides of a cut would become one token
            allowed -= {kind for kind, unit in ((NEWLINE, newline_unit), (SPACE, space_unit)) if unit not in single}
        return Cuts(frozenset(allowed), frozenset(after), frozenset(before), bool(kinds & COMPOSING_NORMALIZERS),
                    "Strip" in kinds)

    def _units(self, text: str) -> bytes | str:
        """Text as the model's units: bytes for byte-level tokenizers, characters otherwise."""
        return text.encode("utf-8") if self.as_bytes else text

    def _token_units(self, info) -> bytes | str:
        """A token as the model matches it against the text (special tokens by content, to be safe)."""
        if info.special:
            return self._units(info.token)
        if self.as_bytes:
            return info.bytes
        prefix = self.vocab.continuing_prefix
        if self.vocab.family == "wordpiece" and info.token.startswith(prefix) and len(info.token) > len(prefix):
            return info.token[len(prefix):]
        return info.token

    def _model_cuts(self, starts: frozenset[str], single: set) -> frozenset[str]:
        """The cut kinds the model allows, given those at which the pre-tokenizer starts a piece."""
        model = self.backend.model
        kind = type(model).__name__
        if kind == "BPE":
            if model.dropout:
                return frozenset()
            # A word's tokens depend on where the word starts when it marks its first or last token; and
            # without an unknown token a character missing from the vocabulary is dropped, which moves
            # the offsets of the tokens after it in its piece (tokenizers counts them from the piece's
            # start), so that only a cut at the start of a piece keeps them on its side.
            marks = model.continuing_subword_prefix or model.end_of_word_suffix
            if self.as_bytes:
                complete = len(single) == 256
            else:
                complete = model.byte_fallback and sum(t.byte_fallback for t in self.vocab.tokens) == 256
            drops = model.unk_token is None and not complete
            return starts if marks or drops else BOTH
        if kind == "Unigram":
            return frozenset() if model.alpha or model.nbest_size else starts
        return starts if kind in ("WordPiece", "WordLevel") else frozenset()

    def _fuses_unknowns(self) -> bool:
        model = self.backend.model
        return type(model).__name__ == "Unigram" or bool(getattr(model, "fuse_unk", False))

    def image(self, char: str) -> str | None:
        """What the normalizer makes of ``char`` in the middle of a text; None if that is not clear."""
        if char not in self._images:
            normalizer = self.backend.normalizer
            if normalizer is None:
                self._images[char] = char
            else:
                head, text = normalizer.normalize_str("a"), normalizer.normalize_str(f"a{char}a")
                ok = text.startswith(head) and text.endswith("a") and len(text) > len(head)
                self._images[char] = text[len(head):-1] if ok else None
        return self._images[char]

    def _solid(self, char: str) -> str | None:
        """The image of ``char`` if it begins and ends with a character no pre-tokenizer takes for a space."""
        image = self.image(char)
        if not image or image[0].isspace() or image[-1].isspace() or MARK in (image[0], image[-1]):
            return None
        return image

    def allows(self, text: str, p: int) -> bool:
        """May ``text`` be cut at ``p`` (a match of :data:`CUT`, with CONTEXT characters each side)?"""
        cuts = self.cuts
        if cuts.ascii_only and not text[p - CONTEXT:p + CONTEXT].isascii():
            return False
        if text[p - 1] == "\n":
            right = self._solid(text[p])
            # Strip must not reach the newline; nor may a composing normalizer see "\r\n" as one
            steady = not (cuts.strips or cuts.ascii_only) or self._solid(text[p - 2]) is not None
            return NEWLINE in cuts.kinds and right is not None and steady \
                and self._units(right)[0] not in cuts.after_newline
        left, right = self._solid(text[p - 1]), self._solid(text[p + 1])
        return SPACE in cuts.kinds and left is not None and right is not None \
            and self._units(left)[-1] not in cuts.before_space

    def find(self, text: str, start: int, stop: int) -> int | None:
        """The first position in ``[start, stop]`` where ``text`` may be cut, or None."""
        if not self.cuts.kinds:
            return None
        for match in CUT.finditer(text, start):
            p = match.start()
            if p > stop:
                return None
            if p >= CONTEXT and self.allows(text, p):
                return p
        return None


def segments(blocks: Iterable[str], rule: CutRule, size: int = SEGMENT) -> Iterator[Segment]:
    """A text (given in blocks) as segments of about ``size`` characters, cut where ``rule`` allows."""
    buffer, base, begin, searched = "", 0, 0, 0  # buffer[base:] is left to encode; counting resumes at begin
    for block in blocks:
        buffer, begin, searched = buffer[base:] + block, begin - base, max(0, searched - base)
        base = 0
        while len(buffer) - CONTEXT >= begin + size:
            stop = len(buffer) - CONTEXT
            cut = rule.find(buffer, max(begin + size, searched), stop)
            if cut is None:
                searched = stop + 1  # no cut up to here: wait for the next block
                break
            yield Segment(buffer[base:cut + CONTEXT], begin - base, cut - base, last=False)
            base, begin, searched = cut - CONTEXT, cut, 0
    yield Segment(buffer[base:], begin - base, len(buffer) - base, last=True)


@dataclass
class TextCounts:
    """What one tokenizer's encoding of one text adds up to; summed segment by segment."""

    ids: np.ndarray  # occurrences of each token id
    bytes: int = 0
    characters: int = 0
    words: int = 0
    letters: int = 0
    unspaced_letters: int = 0  # letters of UNSPACED_SCRIPTS
    unk_bytes: int = 0  # bytes of the characters that unknown tokens cover

    @property
    def tokens(self) -> int:
        return int(self.ids.sum())

    @property
    def unspaced(self) -> bool:
        """Written mostly without spaces between words (see UNSPACED_LETTER_SHARE)."""
        return self.letters > 0 and self.unspaced_letters >= UNSPACED_LETTER_SHARE * self.letters


def count_text(tokenizer, blocks: Iterable[str], vocab: Vocabulary | None = None, *,
               size: int = SEGMENT) -> TextCounts:
    """Encode a text (the concatenation of ``blocks``) segment by segment and count what
    :class:`TextStats` needs; the counts are those of encoding the text whole.

    ``blocks`` is ``[text]`` for a string in memory, or :func:`~tokenbridge.measure.texts.text_blocks`
    of a file, which is then never held whole.
    """
    vocab = vocab if vocab is not None else vocabulary(tokenizer)
    rule = CutRule(tokenizer, vocab)  # reads the vocabulary only if a text needs cutting
    unk_id = getattr(tokenizer, "unk_token_id", None)
    counts = TextCounts(np.zeros(len(vocab), dtype=np.int64))
    for segment in segments(blocks, rule, size):
        ids, offsets = encode(tokenizer, segment.text)
        ids = np.asarray(ids, dtype=np.int64)
        starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
        inside = starts >= segment.start
        if not segment.last:
            inside &= starts < segment.stop
        counts.ids += np.bincount(ids[inside], minlength=len(vocab))
        body = segment.text[segment.start:segment.stop]
        counts.bytes += len(body.encode("utf-8"))
        counts.characters += len(body)
        counts.words += len(body.split())  # cuts fall after or before a space: no word spans one
        letters, unspaced = _letters(body)
        counts.letters += letters
        counts.unspaced_letters += unspaced
        if unk_id is not None:
            covered: set[int] = set()  # several unknown tokens may cover one character
            for index in np.flatnonzero(inside & (ids == unk_id)):
                covered.update(range(*offsets[index]))
            counts.unk_bytes += sum(len(segment.text[i].encode("utf-8")) for i in covered)
    return counts


# ----------------------------------------------------------------------------------------------
# Statistics


def _stats(counts: TextCounts, vocab: Vocabulary, tokenizer_name: str, name: str) -> TextStats:
    tokens, n_bytes = counts.tokens, counts.bytes
    fallback_bytes = int(counts.ids @ _byte_token_bytes(vocab))
    return TextStats(
        tokenizer=tokenizer_name,
        text=name,
        bytes=n_bytes,
        characters=counts.characters,
        tokens=tokens,
        words=counts.words,
        bytes_per_token=n_bytes / tokens if tokens else None,
        fertility=None if counts.words == 0 or counts.unspaced else tokens / counts.words,
        byte_fallback_share=fallback_bytes / n_bytes if n_bytes else 0.0,
        unk_share=counts.unk_bytes / n_bytes if n_bytes else 0.0,
    )


def tokenizer_stats(tokenizer, text: str, name: str, *, tokenizer_name: str | None = None,
                    vocab: Vocabulary | None = None) -> TextStats:
    """Statistics of ``tokenizer`` on ``text`` (called ``name``).

    ``tokenizer_name`` defaults to the tokenizer's ``name_or_path``; ``vocab`` is
    ``vocabulary(tokenizer)``, passed when the caller already has it (it takes seconds for a large
    vocabulary).  A file is measured without reading it whole by :func:`count_text` over its
    :func:`~tokenbridge.measure.texts.text_blocks`, as :func:`run_tokstats` does.
    """
    vocab = vocab if vocab is not None else vocabulary(tokenizer)
    if tokenizer_name is None:
        tokenizer_name = str(getattr(tokenizer, "name_or_path", ""))
    return _stats(count_text(tokenizer, [text], vocab), vocab, tokenizer_name, name)


def language_of(path: str | Path) -> str:
    """The language key of a parallel-text file: ``debref.zh-cn.txt`` -> ``zh-cn``; ``notes.txt`` -> ``notes``."""
    name = Path(path).name
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2]:
        return parts[-2]
    return Path(name).stem


def token_premium(stats_by_lang: dict[str, TextStats], reference: str) -> dict[str, float]:
    """tokens(lang) / tokens(reference) for texts with the same content in several languages."""
    if reference not in stats_by_lang:
        raise TokenbridgeError(f"reference language {reference!r} is not among the texts ({', '.join(stats_by_lang)})")
    base = stats_by_lang[reference].tokens
    if base == 0:
        raise TokenbridgeError(f"the reference text {stats_by_lang[reference].text} has no tokens")
    return {lang: stats.tokens / base for lang, stats in stats_by_lang.items()}


def _byte_set(vocab: Vocabulary) -> set[bytes]:
    return {info.bytes for info in vocab.tokens if not info.special and info.bytes}


def vocab_overlap(tok_a, tok_b, texts: dict[str, str], *, name_a: str = "A", name_b: str = "B",
                  vocab_a: Vocabulary | None = None, vocab_b: Vocabulary | None = None) -> Overlap:
    """Compare two vocabularies by exact bytes, and on each of ``texts`` (name -> text).

    Non-special tokens are compared by their bytes (so GPT-2's ``Ġthe`` equals SentencePiece's
    ``▁the``); special tokens by their content.  In a text, a token counts as present in the other
    vocabulary when its bytes are a non-special token there; unknown tokens never do.
    """
    vocab_a = vocab_a if vocab_a is not None else vocabulary(tok_a)
    vocab_b = vocab_b if vocab_b is not None else vocabulary(tok_b)
    counts = {name: (count_text(tok_a, [text], vocab_a).ids, count_text(tok_b, [text], vocab_b).ids)
              for name, text in texts.items()}
    return _overlap(vocab_a, vocab_b, counts, name_a, name_b)


def _overlap(vocab_a: Vocabulary, vocab_b: Vocabulary, counts: dict[str, tuple[np.ndarray, np.ndarray]],
             name_a: str, name_b: str) -> Overlap:
    """:func:`vocab_overlap` from each text's token counts (name -> (A's per-id counts, B's))."""
    bytes_a, bytes_b = _byte_set(vocab_a), _byte_set(vocab_b)
    shared = bytes_a & bytes_b
    special_a = {info.token for info in vocab_a.tokens if info.special}
    special_b = {info.token for info in vocab_b.tokens if info.special}
    in_b = np.array([info.bytes in shared for info in vocab_a.tokens], dtype=np.int64)
    in_a = np.array([info.bytes in shared for info in vocab_b.tokens], dtype=np.int64)
    per_text = []
    for text_name, (ids_a, ids_b) in counts.items():
        tokens_a, tokens_b = int(ids_a.sum()), int(ids_b.sum())
        shared_a, shared_b = int(ids_a @ in_b), int(ids_b @ in_a)
        per_text.append(TextOverlap(text_name, tokens_a, tokens_b, shared_a / tokens_a if tokens_a else 0.0,
                                    shared_b / tokens_b if tokens_b else 0.0))
    return Overlap(
        tokenizer_a=name_a,
        tokenizer_b=name_b,
        size_a=len(vocab_a),
        size_b=len(vocab_b),
        shared=len(shared),
        shared_partial_utf8=sum(1 for data in shared if not is_valid_utf8(data)),
        shared_special=len(special_a & special_b),
        texts=tuple(per_text),
    )


# ----------------------------------------------------------------------------------------------
# Reports


def to_json(value) -> dict:
    """A JSON-able dict of a :class:`TextStats` or :class:`Overlap`."""
    out = asdict(value)
    if isinstance(value, Overlap):
        out["texts"] = [asdict(t) for t in value.texts]
    return out


def render_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table: text columns left-aligned, numbers right-aligned, ``None`` as ``-``."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_numeric(row[i]) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _numeric(value) -> bool:
    if value is None or isinstance(value, (int, float)):
        return True
    try:
        float(str(value).rstrip("%"))
    except ValueError:
        return False
    return True


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _percent(share: float | None) -> str | None:
    return None if share is None else f"{100 * share:.2f}%"


def plot_premiums(premiums: dict[str, dict[str, float]], path: str | Path, reference: str | None = None) -> Path:
    """Grouped bar chart (PNG) of token premiums (tokenizer -> language -> premium).

    Languages on x, one bar per tokenizer, a horizontal line at 1.0 (the reference language).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TokenbridgeError("plotting needs matplotlib (pip install matplotlib)") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise TokenbridgeError(f"{path.parent}: no such directory")
    languages: list[str] = []
    for by_lang in premiums.values():
        languages.extend(lang for lang in by_lang if lang not in languages)
    figure = Figure(figsize=(max(4.0, 1.2 + len(languages) * (0.5 + 0.35 * len(premiums))), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(premiums))
    for k, (name, by_lang) in enumerate(premiums.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i, lang in enumerate(languages) if lang in by_lang]
        axes.bar(xs, [by_lang[lang] for lang in languages if lang in by_lang], width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(languages)), languages)
    axes.set_ylabel(f"token premium (tokens / tokens in {reference})" if reference else "token premium")
    if premiums:
        axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise TokenbridgeError(f"{path}: cannot write the plot ({error.strerror or error})") from None
    return path


# ----------------------------------------------------------------------------------------------
# The command


def run_tokstats(tokenizer_paths: list[str], text_paths: list[Path], reference: Path | None = None,
                 plot: Path | None = None) -> dict:
    """Statistics of every tokenizer on every text, premiums, pairwise overlap; a JSON-able dict.

    ``tokenizer_paths`` are paths or ``packaged:NAME``; ``reference`` (one of ``text_paths``) turns
    on token premiums, keyed by :func:`language_of` each file; ``plot`` writes them as a PNG.
    """
    from ..load.packaged import resolve
    from ..load.tokenizer import load_tokenizer

    if not tokenizer_paths:
        raise TokenbridgeError("no tokenizer given")
    if not text_paths:
        raise TokenbridgeError("no text file given")
    if len(set(tokenizer_paths)) != len(tokenizer_paths):
        raise TokenbridgeError(f"tokenizer {_first_repeat(tokenizer_paths)} is given twice")
    paths = [Path(p) for p in text_paths]
    if len({p.resolve() for p in paths}) != len(paths):
        raise TokenbridgeError(f"text file {_first_repeat([p.resolve() for p in paths])} is given twice")
    if plot is not None and reference is None:
        raise TokenbridgeError("a premium plot needs a reference text")
    reference_index = None
    if reference is not None:
        matches = [i for i, p in enumerate(paths) if p.resolve() == Path(reference).resolve()]
        if not matches:
            raise TokenbridgeError(f"reference {reference} is not one of the text files")
        reference_index = matches[0]
        languages = [language_of(p) for p in paths]
        if len(set(languages)) != len(languages):
            repeated = _first_repeat(languages)
            named = [str(p) for p, lang in zip(paths, languages) if lang == repeated]
            raise TokenbridgeError(f"files {' and '.join(named)} both give language {repeated!r}")
    sizes = [check_text(p) for p in paths]  # every text is UTF-8 before any tokenizer loads; none is held
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        names = [str(p) for p in paths]

    loaded = []
    for spec in tokenizer_paths:
        tokenizer = load_tokenizer(resolve(spec))
        loaded.append((spec, tokenizer, vocabulary(tokenizer)))

    counts = [[count_text(tokenizer, text_blocks(p), vocab) for p in paths] for _, tokenizer, vocab in loaded]
    stats = [_stats(c, vocab, spec, name)
             for (spec, _, vocab), by_text in zip(loaded, counts) for name, c in zip(names, by_text)]

    premiums = None
    if reference_index is not None:
        premiums = {}
        for spec, _, _ in loaded:
            by_lang = {language_of(p): s for p, s in zip(paths, [s for s in stats if s.tokenizer == spec])}
            premiums[spec] = token_premium(by_lang, language_of(paths[reference_index]))

    overlaps = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            (spec_a, _, vocab_a), (spec_b, _, vocab_b) = loaded[i], loaded[j]
            by_text = {name: (a.ids, b.ids) for name, a, b in zip(names, counts[i], counts[j])}
            overlaps.append(_overlap(vocab_a, vocab_b, by_text, spec_a, spec_b))

    plot_path = None
    if plot is not None:
        plot_path = str(plot_premiums(premiums, plot, language_of(paths[reference_index])))

    return {
        "tokenizers": [spec for spec, _, _ in loaded],
        "vocab_sizes": {spec: len(vocab) for spec, _, vocab in loaded},
        "texts": [{"name": n, "path": str(p), "language": language_of(p), "bytes": size}
                  for n, p, size in zip(names, paths, sizes)],
        "stats": [to_json(s) for s in stats],
        "reference": None if reference_index is None else language_of(paths[reference_index]),
        "premiums": premiums,
        "overlap": [to_json(o) for o in overlaps],
        "plot": plot_path,
    }


def _first_repeat(values: list) -> object:
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def format_tokstats(result: dict) -> str:
    """The terminal report of a :func:`run_tokstats` result."""
    sections = [render_table(
        ["tokenizer", "text", "bytes", "tokens", "bytes/token", "words", "fertility", "byte fallback", "unk"],
        [[s["tokenizer"], s["text"], s["bytes"], s["tokens"], s["bytes_per_token"], s["words"], s["fertility"],
          _percent(s["byte_fallback_share"]), _percent(s["unk_share"])] for s in result["stats"]],
        title="Tokenizer statistics (fertility = tokens per word; '-' for text without spaces between words)",
    )]
    if result.get("premiums"):
        languages: list[str] = []
        for by_lang in result["premiums"].values():
            languages.extend(lang for lang in by_lang if lang not in languages)
        sections.append(render_table(
            ["tokenizer"] + languages,
            [[name] + [by_lang.get(lang) for lang in languages] for name, by_lang in result["premiums"].items()],
            title=f"Token premium (tokens relative to the reference, {result['reference']})",
        ))
    for overlap in result.get("overlap", []):
        a, b = overlap["tokenizer_a"], overlap["tokenizer_b"]
        summary = (f"Vocabulary overlap: A = {a} ({overlap['size_a']} tokens), B = {b} ({overlap['size_b']} tokens)\n"
                   f"shared by bytes: {overlap['shared']} (of which {overlap['shared_partial_utf8']} partial UTF-8), "
                   f"special tokens shared by content: {overlap['shared_special']}")
        sections.append(render_table(
            ["text", "A tokens", "B tokens", "A tokens in B", "B tokens in A"],
            [[t["text"], t["tokens_a"], t["tokens_b"], _percent(t["a_in_b"]), _percent(t["b_in_a"])]
             for t in overlap["texts"]],
            title=summary,
        ))
    if result.get("plot"):
        sections.append(f"Premium plot: {result['plot']}")
    return "\n\n".join(sections)
