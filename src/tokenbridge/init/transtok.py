"""``transtok`` (Trans-Tokenization, Remy et al. 2024): rows from word alignments of a parallel corpus.

As the reference (LAGoM-NLP/transtokenizer), WORDS are aligned, not tokens.  Each line of
``parallel_source`` (the source model's language) is tokenized with the source tokenizer, its
translation in ``parallel_target`` with the target tokenizer, and the tokens of each line are
grouped into its words (:func:`line_words`: the tokens whose characters fall in one word of
:func:`.static_vectors.split_words`).  eflomal (Östling & Tiedemann 2016) aligns the words in both
directions; the two directions are symmetrised with grow-diag-final (:mod:`.symmetrize`).  Every
word link seen at least ``min_count`` times is then spread over the tokens of its two words
(:func:`spread_word_link`, the reference's ``add_word_pair``), and a new target token's row is the
mean of the source rows it was linked to, weighted by the spread counts.

Tokens without links fall back to ``subword`` (the reference uses the unk row).  With
``smooth=true`` they first try the reference's ``smooth_mapping``: borrow the links of linked
target tokens that extend them (``"▁Haus"`` from ``"▁Hausaufgabe"``) or that they are made of
(``"▁Hausaufgabe"`` from ``"▁Haus"`` + ``"aufgabe"``), each lender's normalised distribution
counting once; such rows are labelled ``transtok:smoothed``.  It is off by default: on a corpus of
a few thousand lines most lenders are short frequent pieces.  Numbers and byte-identical tokens
need no extra links: the pipeline copies the tokens both vocabularies share.

eflomal seeds its sampler from ``/dev/urandom`` and has no seed option; tokenbridge gives it the
transplant's seed from outside (:mod:`.eflomal_seed`), so the same seed gives the same links and rows.
"""

from __future__ import annotations

import heapq
import math
import tempfile
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..align.token_bytes import TokenInfo
from ..errors import TokenbridgeError
from ..measure.texts import read_text
from .combine import Combination, apply_combination
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .resources import read_text_files
from .static_vectors import word_spans
from .symmetrize import HEURISTICS, symmetrize

SMOOTH_MAX_BYTES = 64  # longer tokens are not searched for the linked tokens they contain


@dataclass
class TransTokConfig:
    parallel_source: str = resource(
        "text in the source model's language, one segment per line (several files: comma-separated, read in order)")
    parallel_target: str = resource(
        "its translation in the target tokenizer's language: line i translates line i of parallel_source")
    min_count: int = 2  # word links seen fewer times are dropped as noise (the reference drops < 10 on millions of lines)
    max_sources: int = 0  # keep only this many most linked source tokens per target token (0: all)
    smooth: bool = False  # tokens without links borrow the links of linked target tokens they extend or contain
    smooth_tokens: int = 16  # at most this many longer tokens lend their links to one token (most linked first)
    smooth_min_bytes: int = 4  # tokens shorter than this lend nothing (1: any, as the reference)
    symmetrize: str = "grow-diag-final"  # intersection, union, grow-diag, grow-diag-final, grow-diag-final-and
    eflomal_model: int = 3  # eflomal's model: 1 IBM Model 1, 2 adds an HMM of word order, 3 adds fertility
    samplers: int = 3  # eflomal's independent Gibbs samplers, averaged
    null_prior: float = 0.2  # eflomal's prior probability of a NULL link
    max_length: int = 256  # line pairs with more words on either side are skipped


Links = dict[int, dict[int, float]]  # target token -> source token -> spread count


def spread_word_link(source_word: tuple[int, ...], target_word: tuple[int, ...], count: float,
                     links: Links) -> None:
    """Add one word link seen ``count`` times to ``links``, spread over the two words' tokens.

    As the reference's ``add_word_pair``: two one-token words link their tokens with ``count``.
    Otherwise half of ``count`` goes to every (target token, source token) pair, divided by the
    source word's length, and half to the pairs at matching relative positions: both words are
    stretched to ``lcm(n_source, n_target)`` positions and each position pairs the tokens there,
    with ``half / (lcm / n_target)``.  Each target token of the word thus receives ``count`` in all.
    (The reference rounds each share down to an integer of at least 1; here shares are exact.)
    """
    def add(t: int, s: int, w: float) -> None:
        row = links.setdefault(t, {})
        row[s] = row.get(s, 0.0) + w

    n_s, n_t = len(source_word), len(target_word)
    if n_s == 1 and n_t == 1:
        add(target_word[0], source_word[0], float(count))
        return
    half = count / 2.0
    for t in target_word:
        for s in source_word:
            add(t, s, half / n_s)
    length = n_s * n_t // math.gcd(n_s, n_t)
    for position in range(length):
        add(target_word[position // (length // n_t)], source_word[position // (length // n_s)],
            half / (length // n_t))


def link_weights(links: Links, max_sources: int = 0) -> dict[int, tuple[list[int], list[float]]]:
    """Per target token, its source tokens (most linked first, ties by id) and weights summing to 1.

    Keeps the ``max_sources`` most linked sources when > 0 (then normalised over those).
    """
    out: dict[int, tuple[list[int], list[float]]] = {}
    for target in sorted(links):
        ranked = sorted(((s, c) for s, c in links[target].items() if c > 0), key=lambda sc: (-sc[1], sc[0]))
        if max_sources > 0:
            ranked = ranked[:max_sources]
        if not ranked:
            continue
        total = float(sum(c for _, c in ranked))
        out[target] = ([s for s, _ in ranked], [c / total for _, c in ranked])
    return out


def _mix(distributions: list[tuple[list[int], list[float]]], max_sources: int) -> tuple[list[int], list[float]]:
    """The mean of several (ids, weights) distributions, heaviest first (ties: lower id)."""
    merged: dict[int, float] = {}
    for ids, weights in distributions:
        for i, w in zip(ids, weights):
            merged[i] = merged.get(i, 0.0) + w / len(distributions)
    ranked = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    if max_sources > 0:
        ranked = ranked[:max_sources]
    total = sum(w for _, w in ranked)
    return [i for i, _ in ranked], [w / total for _, w in ranked]


def smooth_weights(tokens: list[TokenInfo], linked: dict[int, tuple[list[int], list[float]]],
                   vocabulary: list[TokenInfo], link_totals: dict[int, float], smooth_tokens: int = 16,
                   max_sources: int = 0, min_bytes: int = 1) -> dict[int, tuple[list[int], list[float]]]:
    """Borrowed links for ``tokens`` that have none (the reference's ``smooth_mapping``, on bytes).

    A token borrows from the linked target tokens (``linked``, keyed by id into ``vocabulary``) whose
    bytes start with its bytes (at most ``smooth_tokens``, those with the largest ``link_totals``
    first), and from the longest linked tokens found inside its bytes (none inside a longer one).
    Each lender's distribution counts once; the mean is returned.  Tokens shorter than ``min_bytes``
    lend nothing (single letters found inside a word say little about it); specials, empty and
    partial UTF-8 tokens borrow nothing and lend nothing.
    """
    lenders = sorted((vocabulary[i].bytes, i) for i in linked
                     if len(vocabulary[i].bytes) >= max(min_bytes, 1) and not vocabulary[i].special
                     and not vocabulary[i].partial_utf8)
    by_bytes: dict[bytes, int] = {}
    for data, i in lenders:
        by_bytes.setdefault(data, i)
    keys = [data for data, _ in lenders]
    out: dict[int, tuple[list[int], list[float]]] = {}
    for info in tokens:
        data = info.bytes
        if info.id in linked or not data or info.special or info.partial_utf8:
            continue
        longer = []
        k = bisect_left(keys, data)
        while k < len(keys) and keys[k].startswith(data):
            if len(keys[k]) > len(data):
                longer.append(lenders[k][1])
            k += 1
        if smooth_tokens > 0:
            longer = heapq.nsmallest(smooth_tokens, longer, key=lambda i: (-link_totals.get(i, 0), i))
        inside = []
        if len(data) <= SMOOTH_MAX_BYTES:
            found = {}
            for size in range(len(data) - 1, max(min_bytes, 1) - 1, -1):
                for start in range(len(data) - size + 1):
                    piece = data[start:start + size]
                    if piece in by_bytes and piece not in found:
                        found[piece] = start
            maximal = []
            for piece in sorted(found, key=lambda p: (-len(p), found[p])):
                if not any(piece in bigger for bigger in maximal):
                    maximal.append(piece)
            inside = [by_bytes[p] for p in sorted(maximal, key=lambda p: (found[p], -len(p)))]
        lending = longer + [i for i in inside if i not in longer]
        if lending:
            out[info.id] = _mix([linked[i] for i in lending], max_sources)
    return out


def read_parallel(source_spec: str, target_spec: str) -> tuple[list[str], list[str]]:
    """The lines of the two sides; both must have the same number of lines."""
    def lines(spec: str, what: str) -> tuple[list[str], list[Path]]:
        paths = read_text_files(spec, what)
        out: list[str] = []
        for path in paths:
            rows = read_text(path).split("\n")
            if rows and rows[-1] == "":
                rows.pop()
            out.extend(row.rstrip("\r") for row in rows)
        return out, paths

    source, source_paths = lines(source_spec, "parallel_source")
    target, target_paths = lines(target_spec, "parallel_target")
    if len(source) != len(target):
        source_names = ",".join(str(p) for p in source_paths)
        target_names = ",".join(str(p) for p in target_paths)
        raise TokenbridgeError(
            f"parallel_source {source_names} has {len(source)} lines but parallel_target {target_names} has "
            f"{len(target)}; line i of one must translate line i of the other")
    return source, target


def _check(config: TransTokConfig) -> None:
    if config.symmetrize not in HEURISTICS:
        raise TokenbridgeError(f"option symmetrize={config.symmetrize!r}: one of {', '.join(HEURISTICS)}")
    if config.min_count < 1:
        raise TokenbridgeError(f"option min_count={config.min_count}: must be at least 1")
    if config.eflomal_model not in (1, 2, 3):
        raise TokenbridgeError(f"option eflomal_model={config.eflomal_model}: 1, 2 or 3")
    if config.samplers < 1:
        raise TokenbridgeError(f"option samplers={config.samplers}: must be at least 1")
    if not 0.0 < config.null_prior < 1.0:
        raise TokenbridgeError(f"option null_prior={config.null_prior}: must be in (0, 1)")
    if config.max_length < 1:
        raise TokenbridgeError(f"option max_length={config.max_length}: must be at least 1")


def line_words(tokenizer, lines: list[str], size: int, drop: set[int]) -> list[list[tuple[int, ...]]]:
    """Each line's words, each the tuple of the token ids that make it up.

    A token belongs to the first word (:func:`.static_vectors.word_spans`) its character span overlaps;
    a token with an empty span goes with the token before it; tokens over whitespace only, ids outside
    the vocabulary and ids in ``drop`` (specials) belong to no word.  Needs a fast tokenizer (offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TokenbridgeError("transtok: the tokenizers must be fast (tokenizer.json) to group tokens into words")
    encoded = tokenizer(lines, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for line, ids, offsets in zip(lines, encoded["input_ids"], encoded["offset_mapping"]):
        spans = word_spans(line)
        members: list[list[int]] = [[] for _ in spans]
        k, last = 0, None
        for token, (start, end) in zip(ids, offsets):
            if start == end:
                word = last
            else:
                while k < len(spans) and spans[k][1] <= start:
                    k += 1
                word = k if k < len(spans) and spans[k][0] < end else None
            if word is not None and 0 <= token < size and token not in drop:
                members[word].append(token)
            last = word if start != end else last
        out.append([tuple(m) for m in members if m])
    return out


def eflomal_aligner():
    """``eflomal.Aligner``, or a one-line error naming what its build needs."""
    try:
        from eflomal import Aligner
    except ImportError as error:
        raise TokenbridgeError(
            f"transtok needs eflomal, which pip builds from source with a C compiler ({error}); install gcc "
            f"(e.g. apt-get install build-essential), then 'pip install eflomal -c constraints.txt'") from None
    return Aligner


def _read_links(path: Path, lines: int) -> list[set[tuple[int, int]]]:
    rows = path.read_text(encoding="utf-8").split("\n")[:lines]
    rows += [""] * (lines - len(rows))
    return [{(int(i), int(j)) for i, j in (link.split("-") for link in row.split())} for row in rows]


def align_words(source: list[list[tuple[int, ...]]], target: list[list[tuple[int, ...]]], config: TransTokConfig,
                seed: int = 0) -> list[set[tuple[int, int]]]:
    """eflomal in both directions, seeded with ``seed``, then symmetrised: per line pair, the (source word,
    target word) links."""
    from .eflomal_seed import seeded

    def text(lines):  # eflomal reads whitespace-separated words; a word is known by its token ids
        return [" ".join("w" + "-".join(map(str, word)) for word in line) for line in lines]

    Aligner = eflomal_aligner()
    aligner = Aligner(model=config.eflomal_model, n_samplers=config.samplers, null_prior=config.null_prior)
    with tempfile.TemporaryDirectory(prefix="tokenbridge-eflomal-") as folder:
        forward, reverse = Path(folder) / "forward", Path(folder) / "reverse"
        try:
            with seeded(seed):
                aligner.align(text(source), text(target),
                              links_filename_fwd=str(forward), links_filename_rev=str(reverse), quiet=True)
        except Exception as error:  # the eflomal binary failed (CalledProcessError) or rejected the input
            raise TokenbridgeError(f"transtok: eflomal failed ({type(error).__name__}: {str(error)[:160]})") from None
        fwd, rev = _read_links(forward, len(source)), _read_links(reverse, len(source))
    return [symmetrize(f, r, config.symmetrize) for f, r in zip(fwd, rev)]


def word_link_counts(source: list[list[tuple[int, ...]]], target: list[list[tuple[int, ...]]],
                     alignments: list[set[tuple[int, int]]]) -> Counter:
    """``(source word, target word) -> how often they were linked`` over the corpus."""
    counts: Counter = Counter()
    for src, tgt, links in zip(source, target, alignments):
        for i, j in links:
            counts[(src[i], tgt[j])] += 1
    return counts


def token_links(counts: Counter, min_count: int) -> Links:
    """The word links seen at least ``min_count`` times, spread over their tokens (in sorted order)."""
    links: Links = {}
    for (source_word, target_word), count in sorted(counts.items()):
        if count >= min_count:
            spread_word_link(source_word, target_word, count, links)
    return links


def prepare_transtok(context: TransplantContext, config: TransTokConfig) -> Combination:
    _check(config)
    source_lines, target_lines = read_parallel(config.parallel_source, config.parallel_target)
    keep = [k for k, (s, t) in enumerate(zip(source_lines, target_lines)) if s.strip() and t.strip()]
    if not keep:
        raise TokenbridgeError(f"parallel_source {config.parallel_source} / parallel_target "
                               f"{config.parallel_target}: no line pair with text on both sides")
    source_special = {t.id for t in context.source.tokens if t.special}
    target_special = {t.id for t in context.target.tokens if t.special}
    source_words = line_words(context.source_tokenizer, [source_lines[k] for k in keep], len(context.source),
                              source_special)
    target_words = line_words(context.target_tokenizer, [target_lines[k] for k in keep], len(context.target),
                              target_special)
    pairs = [(s, t) for s, t in zip(source_words, target_words)
             if s and t and len(s) <= config.max_length and len(t) <= config.max_length]
    if not pairs:
        raise TokenbridgeError(f"parallel_source {config.parallel_source}: no line pair with at most "
                               f"{config.max_length} words on both sides (option max_length)")
    source_words, target_words = [s for s, _ in pairs], [t for _, t in pairs]
    alignments = align_words(source_words, target_words, config, context.seed)
    links = token_links(word_link_counts(source_words, target_words, alignments), config.min_count)
    linked = link_weights(links, config.max_sources)
    combination = Combination()
    for info in context.new_tokens:
        if info.id in linked:
            ids, weights = linked[info.id]
            combination.add(info.id, ids, weights)
    if config.smooth:
        totals = {target: sum(row.values()) for target, row in links.items()}
        borrowed = smooth_weights(context.new_tokens, linked, list(context.target.tokens), totals,
                                  config.smooth_tokens, config.max_sources, config.smooth_min_bytes)
        for target_id in sorted(borrowed):
            ids, weights = borrowed[target_id]
            combination.add(target_id, ids, weights, how="transtok:smoothed")
    return combination


@register("transtok", TransTokConfig,
          "mean of the source tokens of the words aligned (eflomal) to the token's words in a parallel corpus, "
          "weighted by link counts (Trans-Tokenization)", prepare=prepare_transtok)
def transtok(inputs: MethodInputs, config: TransTokConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "transtok")
