"""Tokenize an arbitrary byte string with a vocabulary, exactly.

``ByteEncoder(vocab).encode(data)`` returns source-token ids whose bytes
concatenate to ``data`` (or ``None`` where some bytes cannot be expressed, e.g. a
WordPiece vocabulary without the character).  Text is never decoded with
replacement characters: bytes that are not valid UTF-8 go through byte tokens
(byte-level alphabet or ``<0xNN>`` fallback).

The tokenizer's own model (BPE merges, Unigram Viterbi) segments the valid
UTF-8 runs, so the pieces are the ones the tokenizer really produces.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .token_bytes import SPACE_MARK, Vocabulary, byte_alphabet


def _utf8_runs(data: bytes) -> list[tuple[bool, bytes]]:
    """Split into (is_valid_utf8, chunk) runs; invalid runs are single bytes."""
    runs: list[tuple[bool, bytes]] = []
    position = 0
    while position < len(data):
        try:
            runs.append((True, data[position:].decode("utf-8").encode("utf-8")))
            break
        except UnicodeDecodeError as error:
            good_end = position + error.start
            if good_end > position:
                runs.append((True, data[position:good_end]))
            bad_end = position + error.end
            for b in data[good_end:bad_end]:
                runs.append((False, bytes([b])))
            position = bad_end
    return runs


class ByteEncoder:
    """Segment byte strings into ids of one vocabulary."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.backend = vocab.backend
        self.model = self.backend.model
        self.token_to_id = {t.token: t.id for t in vocab.tokens if not t.special}
        self.byte_token: dict[int, int] = {}
        for info in vocab.tokens:
            if info.special or len(info.bytes) != 1:
                continue
            # Prefer the byte-fallback entry for lone invalid bytes; plain entries otherwise.
            if info.byte_fallback or info.bytes[0] not in self.byte_token:
                self.byte_token[info.bytes[0]] = info.id
        if vocab.family == "wordpiece":
            self._wordpiece = {t.token: t.id for t in vocab.tokens if not t.special}

    def encode(self, data: bytes) -> list[int] | None:
        if not data:
            return []
        ids: list[int] = []
        for valid, chunk in _utf8_runs(data):
            piece = self._encode_text(chunk.decode("utf-8")) if valid else self._encode_byte(chunk[0])
            if piece is None:
                return None
            ids.extend(piece)
        return ids

    def _encode_byte(self, value: int) -> list[int] | None:
        index = self.byte_token.get(value)
        return None if index is None else [index]

    @lru_cache(maxsize=None)
    def _model_tokenize(self, piece: str) -> tuple[int, ...] | None:
        out = []
        try:
            tokens = self.model.tokenize(piece)
        except Exception:  # noqa: BLE001 - tokenizers raises on characters it cannot represent
            return None
        for token in tokens:
            if token.id is None:
                return None
            out.append(token.id)
        return tuple(out)

    def _encode_text(self, text: str) -> list[int] | None:
        family = self.vocab.family
        if family == "byte_level":
            return self._join(self._byte_level_pieces(text))
        if family == "metaspace":
            marked = text.replace(" ", SPACE_MARK)
            if self.vocab.byte_fallback:
                return self._join([marked])
            return self._join([marked], fallback_bytes=True)
        return self._encode_wordpiece(text)

    def _byte_level_pieces(self, text: str) -> list[str]:
        """Pre-tokenize like the tokenizer does, as long as that keeps the bytes exact."""
        alphabet = byte_alphabet()
        expected = "".join(alphabet[b] for b in text.encode("utf-8"))
        pre = self.backend.pre_tokenizer
        if pre is not None:
            pieces = [piece for piece, _ in pre.pre_tokenize_str(text)]
            if "".join(pieces) == expected:
                return pieces
        # The pre-tokenizer adds a prefix space or changes bytes: split words ourselves.
        return ["".join(alphabet[b] for b in w.encode("utf-8")) for w in re.findall(r" ?[^\s]+|\s+(?!\S)|\s+", text)]

    def _join(self, pieces: list[str], fallback_bytes: bool = False) -> list[int] | None:
        ids: list[int] = []
        for piece in pieces:
            got = self._model_tokenize(piece)
            if got is None or (fallback_bytes and any(i == self._unk_id() for i in got)):
                return None
            ids.extend(got)
        return ids

    def _unk_id(self) -> int | None:
        unk = getattr(self.model, "unk_token", None)
        return self.token_to_id.get(unk) if unk else None

    def _encode_wordpiece(self, text: str) -> list[int] | None:
        """Greedy longest match; a leading space starts a word, otherwise a continuation."""
        prefix = self.vocab.continuing_prefix
        ids: list[int] = []
        words = re.findall(r" *[^ ]+| +", text)
        for word in words:
            start = word.startswith(" ")
            word = word.strip(" ")
            if not word:
                continue
            position = 0
            first = start
            while position < len(word):
                end = len(word)
                found = None
                while end > position:
                    candidate = word[position:end]
                    key = candidate if first else prefix + candidate
                    if key in self._wordpiece:
                        found = self._wordpiece[key]
                        break
                    end -= 1
                if found is None:
                    return None
                ids.append(found)
                position = end
                first = False
        return ids
