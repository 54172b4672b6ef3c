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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..align.token_bytes import Vocabulary, is_valid_utf8, vocabulary
from ..errors import TokenbridgeError
from .texts import read_text

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


def _byte_token_bytes(vocab: Vocabulary) -> dict[int, int]:
    """id -> bytes of text it emits byte by byte, for the ids that emit any."""
    out = {}
    for info in vocab.tokens:
        if info.special:
            continue
        if info.byte_fallback:
            out[info.id] = len(info.bytes)
        elif info.partial_utf8:
            out[info.id] = split_character_bytes(info.bytes)
    return out


def _unspaced(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    unspaced = sum(1 for c in letters if any(low <= ord(c) <= high for low, high in UNSPACED_SCRIPTS))
    return unspaced >= UNSPACED_LETTER_SHARE * len(letters)


# ----------------------------------------------------------------------------------------------
# Statistics


def tokenizer_stats(tokenizer, text: str, name: str, *, tokenizer_name: str | None = None,
                    vocab: Vocabulary | None = None) -> TextStats:
    """Statistics of ``tokenizer`` on ``text`` (called ``name``).

    ``tokenizer_name`` defaults to the tokenizer's ``name_or_path``; ``vocab`` is
    ``vocabulary(tokenizer)``, passed when the caller already has it (it takes seconds for a large
    vocabulary).
    """
    vocab = vocab if vocab is not None else vocabulary(tokenizer)
    ids, offsets = encode(tokenizer, text)
    n_bytes = len(text.encode("utf-8"))
    words = len(text.split())
    byte_tokens = _byte_token_bytes(vocab)
    fallback_bytes = sum(byte_tokens.get(i, 0) for i in ids)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unk_chars: set[int] = set()  # characters covered by unknown tokens (several may cover one)
    if unk_id is not None:
        for index, (start, end) in zip(ids, offsets):
            if index == unk_id:
                unk_chars.update(range(start, end))
    unk_bytes = sum(len(text[i].encode("utf-8")) for i in unk_chars)
    fertility = None if words == 0 or _unspaced(text) else len(ids) / words
    return TextStats(
        tokenizer=tokenizer_name if tokenizer_name is not None else str(getattr(tokenizer, "name_or_path", "")),
        text=name,
        bytes=n_bytes,
        characters=len(text),
        tokens=len(ids),
        words=words,
        bytes_per_token=n_bytes / len(ids) if ids else None,
        fertility=fertility,
        byte_fallback_share=fallback_bytes / n_bytes if n_bytes else 0.0,
        unk_share=unk_bytes / n_bytes if n_bytes else 0.0,
    )


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
    bytes_a, bytes_b = _byte_set(vocab_a), _byte_set(vocab_b)
    shared = bytes_a & bytes_b
    special_a = {info.token for info in vocab_a.tokens if info.special}
    special_b = {info.token for info in vocab_b.tokens if info.special}
    per_text = []
    for text_name, text in texts.items():
        ids_a, _ = encode(tok_a, text)
        ids_b, _ = encode(tok_b, text)
        in_b = sum(1 for i in ids_a if vocab_a.tokens[i].bytes in shared)
        in_a = sum(1 for i in ids_b if vocab_b.tokens[i].bytes in shared)
        per_text.append(TextOverlap(text_name, len(ids_a), len(ids_b),
                                    in_b / len(ids_a) if ids_a else 0.0, in_a / len(ids_b) if ids_b else 0.0))
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
    texts = [read_text(p) for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        names = [str(p) for p in paths]

    loaded = []
    for spec in tokenizer_paths:
        tokenizer = load_tokenizer(resolve(spec))
        loaded.append((spec, tokenizer, vocabulary(tokenizer)))

    stats = [tokenizer_stats(tokenizer, text, name, tokenizer_name=spec, vocab=vocab)
             for spec, tokenizer, vocab in loaded for name, text in zip(names, texts)]

    premiums = None
    if reference_index is not None:
        premiums = {}
        for spec, _, _ in loaded:
            by_lang = {language_of(p): s for p, s in zip(paths, [s for s in stats if s.tokenizer == spec])}
            premiums[spec] = token_premium(by_lang, language_of(paths[reference_index]))

    overlaps = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            (spec_a, tok_a, vocab_a), (spec_b, tok_b, vocab_b) = loaded[i], loaded[j]
            overlaps.append(vocab_overlap(tok_a, tok_b, dict(zip(names, texts)), name_a=spec_a, name_b=spec_b,
                                          vocab_a=vocab_a, vocab_b=vocab_b))

    plot_path = None
    if plot is not None:
        plot_path = str(plot_premiums(premiums, plot, language_of(paths[reference_index])))

    return {
        "tokenizers": [spec for spec, _, _ in loaded],
        "vocab_sizes": {spec: len(vocab) for spec, _, vocab in loaded},
        "texts": [{"name": n, "path": str(p), "language": language_of(p), "bytes": len(t.encode("utf-8"))}
                  for n, p, t in zip(names, paths, texts)],
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
