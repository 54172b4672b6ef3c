"""A tokenizer as GGUF metadata (``tokenizer.ggml.*``), written only when llama.cpp will read it right.

llama.cpp runs two kinds of BPE vocabulary, and those are the two written:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): ``tokenizer.ggml.model`` ``gpt2``, with the merges
  and one of llama.cpp's named pre-tokenizers (``tokenizer.ggml.pre``), each a fixed list of regexes
  (``gguf_pretokenizers.json``);
- ``▁``/byte-fallback BPE (SentencePiece style: Llama 2, Mistral, Gemma): ``llama``, which llama.cpp
  tokenizes by scores (merge the adjacent pair whose joined text is the best-scored token), with
  ``<0x00>``..``<0xFF>`` for bytes.  Scores are written from the merge ranks (the token a lower-ranked
  merge makes scores higher) and the merges themselves too, which transformers' reader prefers.

Nothing is taken on trust.  A check text (``gguf_check.json``: several scripts, code, numbers,
whitespace runs, emoji, control characters) is encoded by the target tokenizer and by an emulation of
what llama.cpp does with the metadata: its regex splits followed by the same BPE (byte-level), or its
score-driven merging (``▁`` style).  A byte-level tokenizer gets the first named pre-tokenizer that
agrees; when none does, or the ``▁`` emulation disagrees, or the tokenizer is of another kind
(Unigram, WordPiece), the export is refused with the reason.
"""

from __future__ import annotations

import copy
import heapq
import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib.resources import files

from ..errors import TokenbridgeError
from .gguf import kv

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
MARK = "\u2581"
# gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNMERGED_SCORE = -1e6  # tokens no merge makes: never preferred by llama.cpp's score-driven merging


@lru_cache(maxsize=1)
def check_text() -> str:
    return "".join(json.loads(files("tokenbridge.write").joinpath("gguf_check.json").read_text())["lines"])


@lru_cache(maxsize=1)
def pre_tokenizers() -> list[dict]:
    return json.loads(files("tokenbridge.write").joinpath("gguf_pretokenizers.json").read_text())["byte_level"]


@dataclass
class TokenizerCheck:
    """How one tokenizer encodes the check text, next to the target tokenizer."""

    reader: str  # "llama.cpp (emulated)" or "transformers"
    tokens: int  # the target's tokens for the check text
    identical: bool
    first_difference: str | None = None  # where they part, in a few words


@dataclass
class GGUFTokenizer:
    """The ``tokenizer.*`` metadata for one tokenizer, and what was checked."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    metadata: list[tuple[str, bytes]] = field(repr=False)
    checks: list[TokenizerCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("metadata")
        return data


# -- reading the tokenizer ------------------------------------------------------------------------

def _tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _has(node, kind: str) -> bool:
    return any(part.get("type") == kind for part in _walk(node))


def kind_of(data: dict, name: str) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (``▁``/byte-fallback BPE); any other tokenizer is refused."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenbridgeError(
            f"{name}: a {model.get('type', 'unknown')} tokenizer cannot be written as GGUF; tokenbridge writes "
            "byte-level BPE and ▁/byte-fallback BPE (llama.cpp's unigram tokenizer is T5's, with its own "
            "normaliser)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenbridgeError(f"{name}: BPE with a subword prefix or suffix cannot be written as GGUF")
    if _has(data.get("pre_tokenizer"), "ByteLevel") or _has(data.get("decoder"), "ByteLevel"):
        return "gpt2"
    marks = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    if model.get("byte_fallback") or MARK in marks:
        return "llama"
    raise TokenbridgeError(f"{name}: a BPE tokenizer that is neither byte-level nor ▁-style cannot be written "
                           "as GGUF (llama.cpp would not cover every byte)")


def _merges(data: dict, name: str) -> list[tuple[str, str]]:
    merges = []
    for merge in data["model"].get("merges") or []:
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2 or any(" " in part or not part for part in pair):
            raise TokenbridgeError(f"{name}: merge {merge!r} holds a space; GGUF writes merges as 'left right'")
        merges.append(pair)
    return merges


def token_table(tokenizer, data: dict, rows: int, kind: str) -> tuple[list[str], list[int]]:
    """The token strings and llama.cpp token types of ids ``0 .. rows-1`` (ids past the tokenizer are
    ``[PAD<id>]``, unused, as llama.cpp's converter names them)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: token for token, i in vocab.items()}
    if max(by_id, default=-1) >= rows:
        raise TokenbridgeError(f"the tokenizer has ids up to {max(by_id)}, the embeddings {rows} rows")
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:
            token, kind_of_token = f"[PAD{i}]", UNUSED
            while token in vocab:
                token += "_"
        elif i in added:
            kind_of_token = CONTROL if added[i].get("special") else USER_DEFINED
        elif kind == "llama" and BYTE_TOKEN.fullmatch(token):
            kind_of_token = BYTE
        elif i == unk:
            kind_of_token = UNKNOWN
        else:
            kind_of_token = NORMAL
        tokens.append(token)
        types.append(kind_of_token)
    if len(set(tokens)) != len(tokens):
        raise TokenbridgeError("two ids share one token string; llama.cpp refuses such a vocabulary")
    return tokens, types


def merge_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """llama.cpp's score per token for ``▁``-style BPE: ``-(rank + 1)`` of the first merge making it."""
    index = {token: i for i, token in enumerate(tokens)}
    scores = [UNMERGED_SCORE] * len(tokens)
    for rank, (left, right) in enumerate(merges):
        target = index.get(left + right)
        if target is not None and scores[target] == UNMERGED_SCORE:
            scores[target] = -float(rank + 1)
    return scores


def special_flags(tokenizer, name: str) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS first and EOS last; anything else its post-processor adds is refused."""
    probe = "Hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for add_bos in (False, True):
        for add_eos in (False, True):
            if ((add_bos and bos is None) or (add_eos and eos is None)):
                continue
            if full == [bos] * add_bos + plain + [eos] * add_eos:
                return add_bos, add_eos
    raise TokenbridgeError(f"{name}: its post-processor adds {tokenizer.convert_ids_to_tokens(full)} to "
                           f"{tokenizer.convert_ids_to_tokens(plain)}; GGUF can only say 'add BOS' and 'add EOS'")


# -- llama.cpp, emulated --------------------------------------------------------------------------

def _candidate(data: dict, entry: dict):
    """The target tokenizer as llama.cpp runs it with pre-tokenizer ``entry``: no normaliser, its regex
    splits, bytes mapped to the byte-level alphabet, the same BPE."""
    from tokenizers import Tokenizer

    spec = copy.deepcopy(data)
    spec["normalizer"] = None
    spec["post_processor"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
          for regex in entry["splits"]),
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["model"]["ignore_merges"] = bool(entry.get("ignore_merges", False))
    return Tokenizer.from_str(json.dumps(spec))


def partition(text: str, specials: list[str]) -> list[str | int]:
    """llama.cpp's first step (``tokenizer_st_partition``): the special and user-defined tokens are cut out of
    the text, longest first, leftmost first; returns raw pieces (str) and the cut tokens' indices into ``specials``."""
    fragments: list[str | int] = [text]
    for index in sorted(range(len(specials)), key=lambda i: -len(specials[i])):
        token = specials[index]
        if not token:
            continue
        cut: list[str | int] = []
        for fragment in fragments:
            if not isinstance(fragment, str) or token not in fragment:
                cut.append(fragment)
                continue
            parts = fragment.split(token)
            for number, part in enumerate(parts):
                if number:
                    cut.append(index)
                if part:
                    cut.append(part)
        fragments = cut
    return fragments


def spm_encode(text: str, ids: dict[str, int], scores: list[float], add_space_prefix: bool,
               specials: dict[str, int] | None = None) -> list[int]:
    """llama.cpp's SentencePiece-style tokenizer (``llama_vocab::tokenize`` for ``llama`` vocabularies).

    The special and user-defined tokens (``specials``: text -> id) are cut out first; in each piece of text
    between them spaces become ``▁`` (one is prepended with ``add_space_prefix``, at the start and after a
    special token), it is cut into characters, and the adjacent pair whose joined text is a token is merged,
    the best-scored first (the leftmost among equals), until none is left; a character that is no token is
    written as its byte tokens.
    """
    specials = specials or {}
    names = list(specials)
    out: list[int] = []
    previous_special = True
    for fragment in partition(text, names) if names else [text]:
        if isinstance(fragment, int):
            out.append(specials[names[fragment]])
            previous_special = True
            continue
        out += _spm_fragment((" " if add_space_prefix and previous_special else "") + fragment, ids, scores)
        previous_special = False
    return out


def _spm_fragment(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    text = text.replace(" ", MARK)
    symbols = [[char, i - 1, i + 1 if i + 1 < len(text) else -1] for i, char in enumerate(text)]
    queue: list[tuple[float, int, int, int]] = []
    last_pair: dict[str, tuple[int, int]] = {}

    def offer(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = symbols[left][0] + symbols[right][0]
        token = ids.get(joined)
        if token is None:
            return
        heapq.heappush(queue, (-scores[token], left, right, len(joined.encode("utf-8"))))
        last_pair[joined] = (left, right)

    for right in range(1, len(symbols)):
        offer(right - 1, right)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        a, b = symbols[left], symbols[right]
        if not a[0] or not b[0] or len((a[0] + b[0]).encode("utf-8")) != size:
            continue
        a[0], b[0] = a[0] + b[0], ""
        a[2] = b[2]
        if b[2] >= 0:
            symbols[b[2]][1] = left
        offer(a[1], left)
        offer(left, a[2])
    out: list[int] = []

    def emit(piece: str, depth: int = 0) -> None:
        token = ids.get(piece)
        if token is not None:
            out.append(token)
        elif piece in last_pair and depth < 64:
            left, right = last_pair[piece]
            emit(symbols[left][0], depth + 1)
            emit(symbols[right][0], depth + 1)
        else:
            out.extend(ids[f"<0x{byte:02X}>"] for byte in piece.encode("utf-8"))

    position = 0 if symbols else -1
    while position != -1:
        if symbols[position][0]:
            emit(symbols[position][0])
        position = symbols[position][2]
    return out


def compare(reader: str, expected: list[int], got: list[int], tokens_of) -> TokenizerCheck:
    """A :class:`TokenizerCheck` of ``got`` against ``expected``; ``tokens_of`` spells ids for the message."""
    if got == expected:
        return TokenizerCheck(reader, len(expected), True)
    at = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))
    return TokenizerCheck(reader, len(expected), False, f"from token {at} of {len(expected)}: "
                          f"{tokens_of(got[at:at + 4])} instead of {tokens_of(expected[at:at + 4])}")


def _pieces(tokenizer, text: str) -> list[str]:
    """What a ``tokenizers.Tokenizer``'s normaliser and pre-tokenizer make of ``text``: the pieces BPE merges within."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    if tokenizer.pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def _common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def match_pre_tokenizer(backend, data: dict, expected: list[int], text: str, tokens_of,
                        name: str) -> tuple[str, TokenizerCheck]:
    """The first of llama.cpp's named byte-level pre-tokenizers that cuts ``text`` into the same pieces as the
    target and, with the same BPE, gives the same tokens.  (The pieces are compared as well as the tokens: on a
    small vocabulary two pre-tokenizers can give the same tokens for one text and not for another.)"""
    pieces = _pieces(backend, text)
    tried = []
    for entry in pre_tokenizers():
        candidate = _candidate(data, entry)
        got_pieces = _pieces(candidate, text)
        check = compare("llama.cpp (emulated)", expected, candidate.encode(text, add_special_tokens=False).ids,
                        tokens_of)
        if got_pieces == pieces and check.identical:
            return entry["name"], check
        agree = _common_prefix(pieces, got_pieces)
        if got_pieces != pieces:
            check = TokenizerCheck(check.reader, check.tokens, False,
                                   f"from piece {agree} of {len(pieces)}: {got_pieces[agree:agree + 4]} instead of "
                                   f"{pieces[agree:agree + 4]}")
        tried.append((agree if got_pieces != pieces else len(pieces), entry["name"], check))
    _, nearest, check = max(tried, key=lambda t: t[0])
    names = ", ".join(e["name"] for e in pre_tokenizers())
    raise TokenbridgeError(f"{name}: its pre-tokenizer matches none of llama.cpp's ({names}); on the check text "
                           f"the nearest, {nearest}, differs {check.first_difference}")


# -- the metadata ---------------------------------------------------------------------------------

def tokenizer_metadata(tokenizer, rows: int, name: str = "the tokenizer") -> GGUFTokenizer:
    """``tokenizer.*`` metadata for ``tokenizer`` over ``rows`` embedding rows, checked (see the module)."""
    from gguf import GGUFValueType as T
    from gguf import Keys

    data = _tokenizer_json(tokenizer)
    kind = kind_of(data, name)
    tokens, types = token_table(tokenizer, data, rows, kind)
    merges = _merges(data, name)
    add_bos, add_eos = special_flags(tokenizer, name)
    text = check_text()
    expected = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    spell = lambda ids: [tokens[i] if 0 <= i < len(tokens) else i for i in ids]  # noqa: E731
    notes: list[str] = []
    scores = None
    add_space_prefix = None
    if kind == "gpt2":
        pre, check = match_pre_tokenizer(tokenizer.backend_tokenizer, data, expected, text, spell, name)
    else:
        pre = "default"
        present = set(tokens)
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
        if missing:
            raise TokenbridgeError(f"{name}: a ▁-style tokenizer without byte tokens ({missing[0]} is missing) "
                                   "cannot be written as GGUF: llama.cpp fails on a character outside its vocabulary")
        scores = merge_scores(tokens, merges)
        index = {token: i for i, token in enumerate(tokens)}
        specials = {token: i for i, (token, kind_of_token) in enumerate(zip(tokens, types))
                    if kind_of_token in (CONTROL, USER_DEFINED, UNKNOWN)}
        tried = []
        for prefix in (False, True):
            check = compare("llama.cpp (emulated)", expected, spm_encode(text, index, scores, prefix, specials), spell)
            if check.identical:
                add_space_prefix = prefix
                break
            tried.append(check)
        else:
            raise TokenbridgeError(f"{name}: llama.cpp's SentencePiece-style tokenizer would not encode the check "
                                   f"text as this tokenizer does: it differs {tried[0].first_difference}")
    if tokenizer.eos_token_id is None:
        notes.append("the tokenizer has no EOS token; llama.cpp falls back to its default id")
    metadata = [kv(Keys.Tokenizer.MODEL, kind), kv(Keys.Tokenizer.PRE, pre),
                kv(Keys.Tokenizer.LIST, tokens, T.ARRAY, T.STRING),
                kv(Keys.Tokenizer.TOKEN_TYPE, types, T.ARRAY, T.INT32)]
    if scores is not None:
        metadata.append(kv(Keys.Tokenizer.SCORES, scores, T.ARRAY, T.FLOAT32))
    if merges:
        metadata.append(kv(Keys.Tokenizer.MERGES, [f"{a} {b}" for a, b in merges], T.ARRAY, T.STRING))
    for key, token_id in ((Keys.Tokenizer.BOS_ID, tokenizer.bos_token_id), (Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id),
                          (Keys.Tokenizer.UNK_ID, tokenizer.unk_token_id), (Keys.Tokenizer.SEP_ID, tokenizer.sep_token_id),
                          (Keys.Tokenizer.PAD_ID, tokenizer.pad_token_id), (Keys.Tokenizer.MASK_ID, tokenizer.mask_token_id)):
        if token_id is not None:
            metadata.append(kv(key, int(token_id), T.UINT32))
    metadata += [kv(Keys.Tokenizer.ADD_BOS, add_bos, T.BOOL), kv(Keys.Tokenizer.ADD_EOS, add_eos, T.BOOL)]
    if add_space_prefix is not None:
        metadata.append(kv(Keys.Tokenizer.ADD_PREFIX, add_space_prefix, T.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        metadata.append(kv(Keys.Tokenizer.CHAT_TEMPLATE, template, T.STRING))
    # the tokenizer itself, as GGUF's spec allows: readers that rebuild one from the ggml keys (transformers)
    # may read a tokenizer otherwise than llama.cpp does; tokenbridge's own reader takes this one
    metadata.append(kv(Keys.Tokenizer.HF_JSON, json.dumps(data, ensure_ascii=False), T.STRING))
    return GGUFTokenizer(kind, pre, len(tokens), add_bos, add_eos, add_space_prefix, metadata, [check], notes)


def transformers_check(gguf_path, tokenizer) -> TokenizerCheck:
    """How the tokenizer transformers rebuilds from ``gguf_path`` encodes the check text, against ``tokenizer``."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..load.hf import first_line, quiet_transformers

    gguf_path = Path(gguf_path)
    text = check_text()
    expected = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    try:
        with quiet_transformers():
            rebuilt = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                    trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        return TokenizerCheck("transformers", len(expected), False, f"cannot read it ({first_line(error)})")
    got = rebuilt(text, add_special_tokens=False)["input_ids"]
    return compare("transformers", expected, got, tokenizer.convert_ids_to_tokens)
