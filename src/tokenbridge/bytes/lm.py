"""Exact byte-level probabilities from a tokenized causal LM (the Byte-Token Representation Lemma).

Notation: ``x`` is a byte string, ``T_i`` the canonical token sequence of its first
``i`` bytes (when one exists), ``P(T)`` the model's probability of a token prefix
(after the prefix token: BOS, else EOS).

A *cover* of ``x[:n]`` is a canonical sequence ``T_i + [t]`` (``i < n``) whose last
token ``t`` starts with ``x[i:n]``.  Every canonical text that starts with
``x[:n]`` begins with exactly one cover, so the mass of such texts is

    M(x[:n]) = sum over covers  P(T_i) * p(t | T_i)

and the next-byte distribution (256 bytes and end of text) is

    P(b | x[:n]) ∝ sum_i P(T_i) * sum{ p(t | T_i) : t valid after T_i, t starts with x[i:n] + b }
    P(end | x[:n]) ∝ P(T_n) * p(EOS | T_n)

normalised over the 257 outcomes.  "Valid" is the tokenizer's own canonicity
(:mod:`.canon`).  The model may give some mass to non-canonical continuations; the
normalisation drops it, so for the end-terminated text

    logprob(x, eos=True) = log P(T_N + [EOS]) - sum_{n=0..N} log(Z_n / M(x[:n]))

where ``Z_n`` is the total valid mass after ``x[:n]`` (``Z_n <= M(x[:n])``; the
two are equal when the model puts no mass on non-canonical sequences).

Only the ``T_i`` are ever run through the model: one new token per byte at most,
each on top of the cached keys and values of its parent (:mod:`.tree`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..align.token_bytes import vocabulary as token_vocabulary
from .. import checks
from ..errors import TokenbridgeError
from ..measure.bpb import prefix_token
from .canon import Canon, State
from .pretok import meet
from .tree import TokenTree, TreeNode

EOS = 256  # index of the end-of-text outcome in a next-byte distribution
COLUMNS = 8  # byte columns kept as an array; deeper offsets are read from the bytes
VOCAB_ROWS = 16  # nodes whose next-token probabilities are computed together (their arrays stay in cache)


class SortedVocab:
    """The usable tokens sorted by their bytes, so every byte prefix is one contiguous range."""

    def __init__(self, canon: Canon):
        usable = np.flatnonzero(canon.usable)
        data = [canon.bytes[i] for i in usable]
        order = sorted(range(len(usable)), key=lambda k: data[k])
        self.ids = usable[order]
        self.data = [data[k] for k in order]
        self.size = len(self.ids)
        self.position = np.full(canon.size, -1, dtype=np.int64)
        self.position[self.ids] = np.arange(self.size)
        self.length = np.array([len(b) for b in self.data], dtype=np.int64)
        self.columns = np.full((self.size, COLUMNS), -1, dtype=np.int16)
        for k, b in enumerate(self.data):
            row = np.frombuffer(b[:COLUMNS], dtype=np.uint8)
            self.columns[k, : len(row)] = row

    def column(self, lo: int, hi: int, offset: int) -> np.ndarray:
        if offset < COLUMNS:
            return self.columns[lo:hi, offset]
        return np.array([b[offset] if len(b) > offset else -1 for b in self.data[lo:hi]], dtype=np.int16)

    def narrow(self, lo: int, hi: int, offset: int, byte: int) -> tuple[int, int]:
        """The sub-range of ``[lo, hi)`` (tokens sharing ``offset`` bytes) whose next byte is ``byte``."""
        col = self.column(lo, hi, offset)
        return lo + int(np.searchsorted(col, byte, "left")), lo + int(np.searchsorted(col, byte, "right"))

    def longer(self, lo: int, hi: int, offset: int) -> int:
        """First index in ``[lo, hi)`` of a token longer than ``offset`` (shorter ones sort first)."""
        while lo < hi and self.length[lo] <= offset:
            lo += 1
        return lo


@dataclass(eq=False)
class _Node:
    """A canonical prefix encoding T_pos."""

    pos: int
    state: State
    token: int  # its last token (the prefix token for the root)
    parent: _Node | None
    tree: TreeNode | None = None
    logp: float = 0.0  # log P(T_pos)
    probs: np.ndarray | None = None  # next-token probabilities in sorted order, invalid ones zeroed
    eos: float = 0.0  # p(EOS | T_pos) if the text may end here, else 0
    total: float = 0.0  # sum of probs


@dataclass
class _Entry:
    node: _Node
    lo: int  # tokens whose bytes start with text[node.pos:n]
    hi: int


@dataclass
class Cursor:
    """A byte prefix under one ByteLM: the canonical nodes that can still cover it."""

    lm: ByteLM
    text: bytearray = field(default_factory=bytearray)
    entries: list[_Entry] = field(default_factory=list)
    last: list[_Node] = field(default_factory=list)  # canonical encodings of the whole prefix
    epoch: int = 0  # the model cache generation this cursor's nodes live in

    def distribution(self) -> np.ndarray:
        """log P(b | text) for the 256 bytes and, at index 256, the end of text."""
        return self.lm._distribution(self)

    def push(self, data: bytes) -> None:
        """Append bytes, running the model on the new canonical prefixes (all in one forward pass)."""
        self.lm._push(self, bytes(data))


class CanonicalPrefixes:
    """The canonical encodings of every prefix of a byte string, from the tokenizer alone (no model)."""

    def __init__(self, tokenizer, rows: int | None = None, prefix: str = "auto"):
        self.tokenizer = tokenizer
        vocabulary = token_vocabulary(tokenizer)
        self.canon = Canon(vocabulary, rows if rows is not None else len(vocabulary), cache=True)
        self.table = SortedVocab(self.canon)
        self.prefix_id, self.prefix = prefix_token(tokenizer, prefix)

    def _root(self) -> _Node:
        return _Node(0, State(), self.prefix_id, None)

    def _step(self, entries: list[_Entry], n: int, byte: int) -> tuple[list[_Entry], list[_Node]]:
        """Entries and the new canonical encodings of text[:n+1] after byte ``byte`` at position ``n``."""
        table, canon = self.table, self.canon
        kept, found = [], []
        for entry in entries:
            offset = n - entry.node.pos
            lo, hi = table.narrow(entry.lo, entry.hi, offset, byte)
            if lo == hi:
                continue
            k = lo
            while k < hi and table.length[k] == offset + 1:  # tokens that end exactly here
                token = int(table.ids[k])
                if canon.valid(entry.node.state)[token]:
                    found.append((entry.node, token))
                k += 1
            if k < hi:
                kept.append(_Entry(entry.node, lo, hi))
        made = [_Node(n + 1, canon.advance(parent.state, token), token, parent) for parent, token in found]
        # a pre-tokenizer's lookahead can make two encodings canonical so far, each for different next
        # characters; two that allow the same next characters would make the tokenizer ambiguous
        for k, first in enumerate(made):
            for second in made[k + 1:]:
                if first.state.utf8 == second.state.utf8 and meet(first.state.follow, second.state.follow):
                    raise TokenbridgeError(
                        f"internal error: two canonical encodings of the same {n + 1} bytes "
                        f"({self._path(first)} and {self._path(second)}); this tokenizer breaks an assumption "
                        "of the exact method")
        kept.extend(_Entry(node, 0, table.size) for node in made)
        return kept, made

    def _path(self, node: _Node, tail: int = 4) -> list[bytes]:
        out = []
        while node.parent is not None and len(out) < tail:
            out.append(self.canon.bytes[node.token])
            node = node.parent
        return out[::-1]

    def _plan(self, data: bytes):
        """All canonical nodes of ``data`` and, per position, the entries alive there and the nodes ending there."""
        root = self._root()
        nodes = [root]
        entries = [_Entry(root, 0, self.table.size)]
        per_position = []
        last = [root]
        for n, byte in enumerate(data):
            per_position.append((entries, last))
            entries, last = self._step(entries, n, byte)
            nodes.extend(last)
        per_position.append((entries, last))
        return nodes, per_position

    def canonical(self, data: bytes) -> list[int] | None:
        """The canonical token ids of ``data`` as this engine derives them (None if the text cannot end there)."""
        _, per_position = self._plan(bytes(data))
        ends = [node for node in per_position[len(data)][1] if self.canon.can_end(node.state)]
        if not ends:
            return None
        node, ids = ends[0], []
        while node.parent is not None:
            ids.append(node.token)
            node = node.parent
        return ids[::-1]



class ByteLM(CanonicalPrefixes):
    """A tokenized causal LM seen as a distribution over bytes, exactly.

    One cursor (or scoring pass) at a time: they share the model's key/value cache.
    """

    def __init__(self, model, tokenizer, prefix: str = "auto", name: str = "model"):
        super().__init__(tokenizer, model.get_output_embeddings().weight.shape[0], prefix)
        self.name = name
        self.model = model.eval()
        self.tree = TokenTree(model)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise TokenbridgeError("the tokenizer has no EOS token, so the end of a text has no probability")
        self.chunk = max(1, (1 << 25) // self.canon.size)  # head rows per batch (~256 MB of float64 logits)
        self._hidden: dict[int, torch.Tensor] = {}
        self._sorted_ids = torch.from_numpy(np.ascontiguousarray(self.table.ids, dtype=np.int64))
        others = np.ones(self.canon.size, dtype=bool)
        others[self.table.ids] = False
        self._other_ids = torch.from_numpy(np.flatnonzero(others))  # outside the sorted table: only in the sum
        self._invalid: dict[State, torch.Tensor] = {}
        self._children: dict[int, list[_Node]] = {}

    # ----- the model -------------------------------------------------------------------------------------------
    def _run(self, nodes: list[_Node]) -> None:
        """Run the model on every node that has no tree node yet (parents first), in one forward pass."""
        todo = [node for node in nodes if node.tree is None]
        self._hidden = {}
        if not todo:
            return
        index = {id(node): k for k, node in enumerate(todo)}
        items = []
        for node in todo:
            parent = node.parent
            if parent is None:
                items.append((None, node.token))
            elif id(parent) in index:
                items.append((index[id(parent)], node.token))
            else:
                items.append((parent.tree, node.token))
        made, hidden = self.tree.extend(items)
        for node, tree, state in zip(todo, made, hidden):
            node.tree = tree
            self._hidden[id(node)] = state

    def _link(self, nodes: list[_Node]) -> None:
        self._children = {}
        for node in nodes:
            if node.parent is not None:
                self._children.setdefault(id(node.parent), []).append(node)

    def _sorted_invalid(self, state: State) -> torch.Tensor:
        """Which tokens would break canonicity after ``state``, in sorted-vocabulary order (cached per state)."""
        mask = self._invalid.get(state)
        if mask is None:
            mask = torch.from_numpy(~self.canon.valid(state)[self.table.ids])
            if len(self._invalid) > 256:
                self._invalid.pop(next(iter(self._invalid)))
            self._invalid[state] = mask
        return mask

    def _probabilities(self, nodes: list[_Node], logits: torch.Tensor) -> np.ndarray:
        """Next-token probabilities of a chunk of nodes from their logits (rows), as batched torch ops: in
        sorted-vocabulary order, float64, the tokens that break canonicity zeroed.  Sets each node's ``total``
        (of the valid ones) and ``eos``.

        ``p = exp(x - max) / sum(exp(x - max))`` over the whole vocabulary, in float64; the sorted usable
        tokens are gathered first, so the sum is theirs plus the few others'."""
        probs = torch.empty((len(nodes), self.table.size), dtype=torch.float64)
        totals, eos = [], []
        for start in range(0, len(nodes), VOCAB_ROWS):  # a few rows at a time: every pass stays in cache
            rows = logits[start:start + VOCAB_ROWS]
            block = probs[start:start + VOCAB_ROWS]
            top = rows.amax(dim=1, keepdim=True)
            block.copy_(rows.index_select(1, self._sorted_ids)).sub_(top).exp_()
            mass = block.sum(dim=1)
            if self._other_ids.numel():
                mass += rows.index_select(1, self._other_ids).double().sub_(top).exp_().sum(dim=1)
            eos += ((rows[:, self.eos_id].double() - top[:, 0]).exp_() / mass).tolist()
            block.div_(mass[:, None])
            block.masked_fill_(torch.stack([self._sorted_invalid(node.state)
                                            for node in nodes[start:start + VOCAB_ROWS]]), 0.0)
            totals += block.sum(dim=1).tolist()
        for node, total, end in zip(nodes, totals, eos):
            node.total = total
            node.eos = end if self.canon.can_end(node.state) else 0.0
        return probs.numpy()

    def _evaluate(self, nodes: list[_Node], keep=lambda node: True, visit=None) -> None:
        """Forward pass for new nodes, then their next-token distributions, chunk by chunk."""
        self._run(nodes)
        pending = [node for node in nodes if node.probs is None and id(node) in self._hidden]
        position = self.table.position
        for start in range(0, len(pending), self.chunk):
            chunk = pending[start:start + self.chunk]
            logits = self.tree.head_logits(torch.stack([self._hidden[id(node)] for node in chunk]))
            rows = self._probabilities(chunk, logits)
            del logits
            for node, row in zip(chunk, rows):
                node.probs = row
                for child in self._children.get(id(node), ()):
                    child.logp = node.logp + _log(row[position[child.token]])
                if visit is not None:
                    visit(node)
                node.probs = row.copy() if keep(node) else None  # kept rows do not pin the chunk
        self._hidden = {}

    # ----- incremental use ---------------------------------------------------------------------------------
    def cursor(self, prefix: bytes = b"") -> Cursor:
        """A fresh cursor at the start of a text (after the prefix token), advanced over ``prefix``."""
        self.tree.reset()
        root = self._root()
        cursor = Cursor(self, bytearray(), [_Entry(root, 0, self.table.size)], [root], self.tree.epoch)
        self._link([root])
        self._evaluate([root])
        if prefix:
            cursor.push(prefix)
        return cursor

    def _push(self, cursor: Cursor, data: bytes) -> None:
        if cursor.epoch != self.tree.epoch:
            raise TokenbridgeError("this cursor is stale: a newer cursor or scoring call on the same ByteLM reset its "
                                   "cache (use one cursor per ByteLM at a time)")
        start = len(cursor.text)
        cursor.text.extend(data)
        entries, last, new = cursor.entries, cursor.last, []
        for k, byte in enumerate(data):
            entries, last = self._step(entries, start + k, byte)
            new.extend(last)
        alive = {id(entry.node) for entry in entries}
        self._link(new)
        for node in new:  # parents evaluated earlier give the new nodes their probability now
            if node.parent is not None and node.parent.probs is not None:
                node.logp = node.parent.logp + _log(node.parent.probs[self.table.position[node.token]])
        self._evaluate(new, keep=lambda node: id(node) in alive)
        for entry in cursor.entries:
            if id(entry.node) not in alive:
                entry.node.probs = None
        cursor.entries, cursor.last = entries, last

    def _distribution(self, cursor: Cursor) -> np.ndarray:
        n = len(cursor.text)
        live = [entry.node.logp for entry in cursor.entries if entry.node.logp > -math.inf]
        ref = max(live) if live else 0.0
        out = np.zeros(257)
        for entry in cursor.entries:
            node = entry.node
            offset = n - node.pos
            lo = self.table.longer(entry.lo, entry.hi, offset)
            if lo == entry.hi or node.logp == -math.inf:
                continue
            col = self.table.column(lo, entry.hi, offset).astype(np.int64)
            out[:256] += math.exp(node.logp - ref) * np.bincount(col, weights=node.probs[lo:entry.hi], minlength=256)
        for node in cursor.last:
            if node.logp > -math.inf:
                out[EOS] += math.exp(node.logp - ref) * node.eos
        total = out.sum()
        if total <= 0:
            raise TokenbridgeError("no canonical continuation has any probability after this prefix: no text the tokenizer "
                                  "can produce starts with it (invalid UTF-8, or bytes it cannot spell)")
        with np.errstate(divide="ignore"):
            return np.log(out / total)

    # ----- public API --------------------------------------------------------------------------------------
    def next_byte_logprobs(self, prefix: bytes) -> np.ndarray:
        """log P(next byte | prefix) for bytes 0..255 and, at index 256, the end of text."""
        return self.cursor(bytes(prefix)).distribution()

    def masses(self, data: bytes, eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(log M, log Z) per position, in one forward pass over every canonical prefix of ``data``.

        ``log M[n]``: mass of the canonical texts that start with ``data[:n+1]`` (its covers);
        ``log Z[n]``: mass after ``data[:n]`` that continues canonically (any byte, or the end).
        With ``eos`` one more position: ``M[N]`` is the mass of ``data`` as a whole text.
        """
        data = bytes(data)
        self.tree.reset()
        nodes, per_position = self._plan(data)
        self._link(nodes)
        table = self.table
        positions = len(data) + (1 if eos else 0)
        wants: dict[int, list[tuple[int, int, int, int]]] = {}  # node -> (n, lo, hi, 0 for Z / 1 for M)
        for n in range(positions):
            for entry in per_position[n][0]:
                offset = n - entry.node.pos
                wants.setdefault(id(entry.node), []).append((n, table.longer(entry.lo, entry.hi, offset), entry.hi, 0))
                if n < len(data):
                    lo, hi = table.narrow(entry.lo, entry.hi, offset, data[n])
                    if lo < hi:
                        wants[id(entry.node)].append((n, lo, hi, 1))
        terms: list[tuple[int, int, float]] = []  # (n, kind, log mass)

        def visit(node: _Node) -> None:
            for n, lo, hi, kind in wants.get(id(node), ()):
                terms.append((n, kind, node.logp + _log(float(node.probs[lo:hi].sum()))))

        self._evaluate(nodes, keep=lambda node: False, visit=visit)
        for n in range(positions):
            for node in per_position[n][1]:
                terms.append((n, 0, node.logp + _log(node.eos)))
                if eos and n == len(data):
                    terms.append((n, 1, node.logp + _log(node.eos)))
        out = np.full((2, positions), -math.inf)
        for n, kind, value in terms:
            out[kind, n] = np.logaddexp(out[kind, n], value)
        return out[1], out[0]

    def byte_logprobs(self, data: bytes, eos: bool = False) -> np.ndarray:
        """log P(data[n] | data[:n]) for every byte (and log P(end | data) last when ``eos``), in one pass."""
        log_m, log_z = self.masses(data, eos=eos)
        with np.errstate(invalid="ignore"):
            return log_m - log_z

    def logprob(self, data: bytes, eos: bool = False) -> float:
        """Exact log-probability (nats) that a text starts with ``data`` (is exactly ``data``, when ``eos``)."""
        return float(self.byte_logprobs(data, eos=eos).sum())

    def generate(self, prompt: bytes, max_bytes: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop_at_end: bool = True) -> bytes:
        """Sample a continuation of ``prompt`` byte by byte (the prompt may end anywhere, even mid-token)."""
        return ByteEnsemble([self]).generate(prompt, max_bytes, temperature, top_p, seed, stop_at_end)


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


class ByteEnsemble:
    """Next-byte distributions of several ByteLMs (any tokenizers) mixed with fixed weights:
    P(b | x) = sum_k w_k P_k(b | x)."""

    def __init__(self, members: list[ByteLM], weights: list[float] | None = None):
        if not members:
            raise TokenbridgeError("an ensemble needs at least one model")
        if len({id(m) for m in members}) != len(members):
            raise TokenbridgeError("an ensemble lists the same ByteLM twice; give each member its own (or one "
                                   "member with the summed weight)")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise TokenbridgeError("ensemble weights: one non-negative weight per model, not all zero")
        for weight in weights:
            checks.number("ensemble weights", weight, low=0)  # NaN and inf never mix
        if sum(weights) <= 0:
            raise TokenbridgeError("ensemble weights: one non-negative weight per model, not all zero")
        self.members = members
        self.log_weights = np.log(np.asarray(weights, dtype=np.float64) / sum(weights))

    def _mix(self, rows: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(rows) + self.log_weights[:, None]
        with np.errstate(divide="ignore"):
            return np.logaddexp.reduce(stacked, axis=0)

    def next_byte_logprobs(self, prefix: bytes) -> np.ndarray:
        return self._mix([m.next_byte_logprobs(prefix) for m in self.members])

    def byte_logprobs(self, data: bytes, eos: bool = False) -> np.ndarray:
        return self._mix([m.byte_logprobs(data, eos=eos) for m in self.members])

    def logprob(self, data: bytes, eos: bool = False) -> float:
        return float(self.byte_logprobs(data, eos=eos).sum())

    def generate(self, prompt: bytes, max_bytes: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop_at_end: bool = True) -> bytes:
        """Sample byte by byte from the mixture; every model keeps its cache across bytes."""
        checks.number("temperature", temperature, low=0)
        checks.number("top_p", top_p, low=0, high=1, low_open=True)
        checks.number("max_bytes", max_bytes, low=0, integer=True)
        rng = np.random.default_rng(checks.seed(seed, "seed"))
        cursors = [m.cursor(bytes(prompt)) for m in self.members]
        out = bytearray()
        for _ in range(max_bytes):
            logp = self._mix([c.distribution() for c in cursors])
            choice = sample(logp, temperature, top_p, rng)
            if choice == EOS:
                if stop_at_end:
                    break
                logp[EOS] = -np.inf
                choice = sample(logp - np.logaddexp.reduce(logp), temperature, top_p, rng)
            out.append(choice)
            for c in cursors:
                c.push(bytes([choice]))
        return bytes(out)


def sample(logp: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One outcome from log-probabilities: greedy at temperature 0, else tempered and nucleus-truncated."""
    if temperature == 0:
        return int(np.argmax(logp))
    scaled = logp / temperature
    probs = np.exp(scaled - np.max(scaled))
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
