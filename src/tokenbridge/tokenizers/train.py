"""Train BPE and Unigram tokenizers (with the ``tokenizers`` library), optionally with supertokens.

Supertokens follow SuperBPE: a first stage learns ordinary merges inside words up to part of the
vocabulary; a second stage keeps merging on the first stage's segmentation, now inside pieces that
run across the spaces between words (bounded in words per token).  The first stage's merges keep
their ranks, so a supertoken tokenizer is an ordinary BPE tokenizer with a wider pre-tokenizer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import TokenbridgeError
from ..measure.texts import text_blocks
from .merges import learn_merges
from .style import BYTE_LEVEL, BYTE_TOKENS, METASPACE, Style, remap_post_processor

MODELS = ("bpe", "unigram")
BYTE_TOKEN_CHARACTERS = "<>x0123456789ABCDEF"
BLANK_LINE = re.compile(r"(?<=\n)(?=[^\S\n]*\n)")
CLOSING_SPACES = re.compile(r"[^\S\n]*\Z")


@dataclass(frozen=True)
class TrainConfig:
    """What to train.

    ``vocab_size`` counts every id: special tokens, byte tokens and learned tokens.
    ``supertoken_share`` of the learned tokens come from the multi-word stage, each spanning at most
    ``max_words`` words.  Merges need ``min_frequency`` occurrences in the training text.
    """

    vocab_size: int
    model: str = "bpe"
    supertokens: bool = False
    supertoken_share: float = 0.25
    max_words: int = 4
    min_frequency: int = 2
    max_piece_length: int = 16  # Unigram: longest piece, in characters


def _check(config: TrainConfig, style: Style) -> int:
    """The first stage's trainer vocabulary size (specials included, byte tokens not)."""
    if config.model not in MODELS:
        raise TokenbridgeError(f"--type must be one of {', '.join(MODELS)}, not {config.model!r}")
    if config.supertokens and config.model != "bpe":
        raise TokenbridgeError("--supertokens needs --type bpe: supertokens are merges across words")
    if config.supertokens and not 0 < config.supertoken_share < 1:
        raise TokenbridgeError(f"--supertoken-share must be between 0 and 1, not {config.supertoken_share}")
    if config.max_words < 2:
        raise TokenbridgeError(f"--max-words must be at least 2, not {config.max_words}")
    byte_tokens = 256 if style.kind == METASPACE else 0
    alphabet = 256 if style.kind == BYTE_LEVEL else 1
    floor = len(style.specials) + byte_tokens + alphabet + 1
    if config.vocab_size < floor:
        raise TokenbridgeError(f"--vocab-size {config.vocab_size} is too small: the special tokens, byte "
                               f"tokens and alphabet alone take {floor - 1}")
    learned = config.vocab_size - byte_tokens - len(style.specials)
    stage2 = round(learned * config.supertoken_share) if config.supertokens else 0
    return config.vocab_size - byte_tokens - stage2


def _skeleton(style: Style, model: str) -> dict:
    if model == "bpe":
        body = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": {}, "merges": []}
    else:
        body = {"type": "Unigram", "unk_id": None, "vocab": [], "byte_fallback": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": style.normalizer, "pre_tokenizer": style.pre_tokenizer, "post_processor": None,
            "decoder": style.decoder, "model": body}


def paragraphs(texts: list[str | Path]) -> Iterator[str]:
    """The texts cut after blank lines: what the trainers see as one sequence.

    A text is a string or a file's path; a file is read in blocks and never held whole.
    """
    for text in texts:
        yield from _paragraphs(text_blocks(text) if isinstance(text, Path) else [text])


def _paragraphs(blocks: Iterable[str]) -> Iterator[str]:
    """``BLANK_LINE.split`` of the blocks' concatenation without its empty parts, one paragraph held at a time."""
    tail = ""  # the text since the last cut
    for block in blocks:
        text = tail + block
        # A cut not found in the tail yet can only lie in its closing run of spaces, which BLANK_LINE's
        # lookahead ran off the end in; every other one was found already.
        search = max(1, CLOSING_SPACES.search(tail).start())
        last = 0
        for match in BLANK_LINE.finditer(text, search):
            if match.start() > last:
                yield text[last:match.start()]
            last = match.start()
        tail = text[last:]
    if tail:
        yield tail


def train_tokenizer(texts: list[str | Path], config: TrainConfig, style: Style, progress: bool = False) -> dict:
    """A trained tokenizer as ``tokenizer.json`` content; ``texts`` as for :func:`paragraphs`.

    A file gives the same tokenizer as its text in memory: the trainers see the same paragraphs.
    """
    from tokenizers import AddedToken, pre_tokenizers, trainers

    from .files import backend

    first_size = _check(config, style)
    specials = [AddedToken(a["content"], single_word=a.get("single_word", False), lstrip=a.get("lstrip", False),
                           rstrip=a.get("rstrip", False), normalized=a.get("normalized", False), special=True)
                for a in style.specials]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style.kind == BYTE_LEVEL else []
    if config.model == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=first_size, min_frequency=config.min_frequency,
                                      special_tokens=specials, initial_alphabet=alphabet, show_progress=progress)
    else:
        trainer = trainers.UnigramTrainer(vocab_size=first_size, special_tokens=specials, initial_alphabet=alphabet,
                                          unk_token=style.unk if style.kind == METASPACE else None,
                                          max_piece_length=config.max_piece_length, show_progress=progress)
    tokenizer = backend(_skeleton(style, config.model))
    tokenizer.train_from_iterator(paragraphs(texts), trainer)
    data = json.loads(tokenizer.to_str())
    data["normalizer"], data["pre_tokenizer"], data["decoder"] = style.normalizer, style.pre_tokenizer, style.decoder
    if config.model == "unigram":
        _settle_scores(data["model"], len(style.specials))
    if style.kind == METASPACE:
        _add_byte_tokens(data, len(style.specials), style.unk)
    if config.supertokens:
        _supertoken_stage(data, texts, config, style, progress)
    ids = {a["content"]: a["id"] for a in data["added_tokens"]}
    data["post_processor"] = remap_post_processor(style.post_processor, ids)
    return data


def _settle_scores(model: dict, n_specials: int) -> None:
    """Unigram scores made reproducible, pieces sorted by them.

    The trainer sums in a varying order, so the last bits of its scores change from run to run: they
    are rounded to 1e-9.  It also appends alphabet characters in a varying order, with scores stepping
    down by 1e-4: each such run gets one score, its lowest.
    """
    entries = [[piece, round(score, 9)] for piece, score in model["vocab"][n_specials:]]
    stepped = [i for i in range(1, len(entries))
               if len(entries[i][0]) == len(entries[i - 1][0]) == 1
               and abs(entries[i - 1][1] - entries[i][1] - 1e-4) < 1e-7]
    run = {i for j in stepped for i in (j - 1, j)}
    if run:
        lowest = round(min(entries[i][1] for i in run), 6)
        for i in run:
            entries[i][1] = lowest
    learned = sorted(entries, key=lambda entry: (-entry[1], entry[0]))
    model["vocab"] = model["vocab"][:n_specials] + learned


def _drop_byte_lookalikes(model: dict) -> None:
    """Remove learned tokens spelled like byte tokens (``<0x41>`` in the text) and merges built on them."""
    bytes_ = set(BYTE_TOKENS)
    if model["type"] == "Unigram":
        model["vocab"] = [entry for entry in model["vocab"] if entry[0] not in bytes_]
        return
    gone = {token for token in model["vocab"] if token in bytes_}
    kept = []
    for left, right in model["merges"]:
        if left in gone or right in gone or left + right in gone:
            gone.add(left + right)
        else:
            kept.append([left, right])
    model["merges"] = kept
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in gone}


def _add_byte_tokens(data: dict, n_specials: int, unk: str) -> None:
    """Byte fallback: ``<0x00>`` ... ``<0xFF>`` right after the special tokens."""
    model = data["model"]
    _drop_byte_lookalikes(model)
    model["byte_fallback"] = True
    if model["type"] == "Unigram":
        vocab = model["vocab"]
        floor = min(score for _, score in vocab[n_specials:]) if len(vocab) > n_specials else 0.0
        # Unigram matches every piece against the text, byte tokens included: keep the characters that
        # spell "<0x41>" in the vocabulary and price byte tokens out, so that only a character no piece
        # covers (the unknown token, replaced by its bytes) ever becomes byte tokens.
        present = {piece for piece, _ in vocab}
        spelling = [[c, floor] for c in BYTE_TOKEN_CHARACTERS if c not in present]
        model["vocab"] = (vocab[:n_specials] + [[t, floor - 1000.0] for t in BYTE_TOKENS] + vocab[n_specials:]
                          + spelling)
        model["unk_id"] = [piece for piece, _ in model["vocab"]].index(unk)
    else:
        learned = sorted((i, t) for t, i in model["vocab"].items() if i >= n_specials)
        vocab = {t: i for t, i in model["vocab"].items() if i < n_specials}
        vocab.update({t: n_specials + b for b, t in enumerate(BYTE_TOKENS)})
        vocab.update({t: n_specials + 256 + k for k, (_, t) in enumerate(learned)})
        model["vocab"] = vocab
        model["unk_token"], model["fuse_unk"] = unk, True


def _supertoken_stage(data: dict, texts: list[str | Path], config: TrainConfig, style: Style,
                      progress: bool) -> None:
    """Learn merges across words on the first stage's segmentation (SuperBPE's second stage)."""
    from .files import backend

    model = data["model"]
    vocab = model["vocab"]
    wanted = config.vocab_size - (max(vocab.values()) + 1)
    data["pre_tokenizer"] = style.supertoken_pre_tokenizer()
    first = backend(data)
    pieces: Counter = Counter()
    for line in paragraphs(texts):
        normalized = first.normalizer.normalize_str(line) if first.normalizer is not None else line
        pieces.update(piece for piece, _ in first.pre_tokenizer.pre_tokenize_str(normalized))
    sequences: Counter = Counter()
    for piece, count in pieces.items():
        sequences[tuple(token.value for token in first.model.tokenize(piece))] += count
    fixed = set(BYTE_TOKENS) | {style.unk}

    def allowed(left: str, right: str) -> bool:
        return left not in fixed and right not in fixed and style.words_in(left + right) <= config.max_words

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=wanted, desc="supertokens", unit="merge")
    merges = learn_merges(dict(sequences), wanted, allowed, set(vocab), config.min_frequency, bar)
    if bar is not None:
        bar.close()
    next_id = max(vocab.values()) + 1
    for merge in merges:
        vocab[merge.token] = next_id
        next_id += 1
        model["merges"].append([merge.left, merge.right])
