"""``tokenadapt``: TokenAdapt's hybrid of a local and a global estimate (Sharthak et al., 2025).

"Achieving Tokenizer Flexibility in Language Models through Heuristic Adaptation and
Supertoken Learning" (arXiv 2505.09738; reference code Tinycompany-AI/TokenAdapt).  An
auxiliary text-embedding model (default all-MiniLM-L6-v2) embeds the decoded text of tokens;
for every new target token ``t`` with text ``s`` and unit auxiliary embedding ``a``:

* **local** (subword composition): the source tokenizer splits ``t``'s exact bytes into
  pieces ``p_1 .. p_m``.  With ``c_j = cos(a, aux(p_j))``, the semantic weights
  ``softmax(c)``, and the length weights ``len(p_j) / len(s)`` (characters), each piece
  gets ``softmax(((softmax(c)_j + len(p_j) / len(s)) / 2) / temperature)``.
* **global** (neighbours): the ``top_k`` source tokens whose auxiliary embeddings are most
  cosine-similar to ``a`` (over the whole ordinary source vocabulary), weighted
  ``softmax(sim / temperature)``; neighbours with ``sim < threshold`` get weight 0 and the
  rest are renormalised.
* **hybrid**: ``global_weight * global + (1 - global_weight) * local``; when one estimate is
  missing the other is used alone.

Both estimates are weighted sums of source rows, so the result is one list of source ids and
weights per token (a :class:`~tokenbridge.init.combine.Combination`), the same for input and
output rows.  Defaults follow the reference code: temperature 0.3, ``top_k`` 3, global
weight 0.3, threshold 0.0.

Token text is the token's exact bytes decoded as UTF-8, a leading space kept (the reference
embeds ``tokenizer.decode([id])``, which keeps it too; it counts in the lengths, the
embedder itself ignores it).  Tokens that are not valid UTF-8 on their own (byte pieces of a
character), and tokens the auxiliary model sees as nothing but unknown or special tokens (a
script outside its vocabulary, pure whitespace), have no auxiliary embedding: new tokens of
that kind get the ``subword`` rows (labelled ``tokenadapt:fallback:subword``), source tokens
of that kind are left out of the neighbour search, and as local pieces they count with
similarity 0.  Provenance labels: ``tokenadapt`` (both estimates), ``tokenadapt:local`` or
``tokenadapt:global`` (one of them), ``tokenadapt:fallback:subword``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..align.token_bytes import TokenInfo
from ..errors import TokenbridgeError
from .combine import Combination, apply_combination
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .sparse import cosine_topk

CHUNK = 512  # new tokens weighted at a time (bounds the ``chunk x pieces x aux dim`` piece block)


def masked_softmax(scores: Tensor, present: Tensor) -> Tensor:
    """Softmax of ``scores [n, m]`` over the entries where ``present [n, m]``; other entries and empty rows 0."""
    filled = scores.masked_fill(~present, float("-inf"))
    top = filled.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)
    exp = torch.exp(filled - top) * present
    total = exp.sum(dim=-1, keepdim=True)
    return exp / total.clamp(min=torch.finfo(scores.dtype).tiny)


def local_weights(similarities: Tensor, piece_lengths: Tensor, token_lengths: Tensor, present: Tensor,
                  temperature: float) -> Tensor:
    """TokenAdapt's local weights of each token's source pieces.

    ``similarities [n, m]``: cosine of each piece's auxiliary embedding to the token's;
    ``piece_lengths [n, m]``, ``token_lengths [n]``: lengths in characters; ``present [n, m]``:
    real pieces (rows are padded).  Returns ``[n, m]``, each row summing to 1 over its pieces
    (0 for a token without pieces)::

        w = softmax(((softmax(similarities) + piece_lengths / token_length) / 2) / temperature)
    """
    semantic = masked_softmax(similarities, present)
    ratio = piece_lengths / token_lengths.clamp(min=1).unsqueeze(-1)
    return masked_softmax((semantic + ratio) / 2 / temperature, present)


def global_weights(similarities: Tensor, present: Tensor, temperature: float, threshold: float) -> Tensor:
    """TokenAdapt's global weights of each token's nearest source tokens.

    ``similarities [n, k]``: cosine similarities of the ``k`` neighbours; ``present [n, k]``:
    real neighbours.  ``softmax(similarities / temperature)``, then neighbours below
    ``threshold`` set to 0 and the rest renormalised.  Returns ``[n, k]``; a row is all 0 when
    no neighbour reaches the threshold.
    """
    weights = masked_softmax(similarities / temperature, present)
    weights = weights * (similarities >= threshold)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=torch.finfo(weights.dtype).tiny), 0.0)


@dataclass
class HybridWeights:
    """Weights of one batch of tokens; ``local``/``global_`` are the estimates, ``*_share`` the final ones."""

    local: Tensor  # [n, m], rows sum to 1 (or 0: no local estimate)
    global_: Tensor  # [n, k], rows sum to 1 (or 0: no global estimate)
    local_share: Tensor  # [n, m]: local * (1 - global_weight), or local alone when global is missing
    global_share: Tensor  # [n, k]: global * global_weight, or global alone when local is missing


def tokenadapt_weights(tokens: Tensor, pieces: Tensor, piece_present: Tensor, piece_lengths: Tensor,
                       token_lengths: Tensor, neighbour_similarities: Tensor, neighbour_present: Tensor,
                       temperature: float = 0.3, threshold: float = 0.0, global_weight: float = 0.3) -> HybridWeights:
    """The hybrid weights of ``n`` new tokens from their auxiliary embeddings.

    ``tokens [n, a]``: unit auxiliary embeddings of the new tokens; ``pieces [n, m, a]``: those of
    their source pieces (a zero row: no embedding, similarity 0), real where ``piece_present
    [n, m]``; ``piece_lengths [n, m]``, ``token_lengths [n]``: characters;
    ``neighbour_similarities [n, k]``: cosine similarities of the nearest source tokens (see
    :func:`~tokenbridge.init.sparse.cosine_topk`), real where ``neighbour_present [n, k]``.  The final weights of a
    token (``local_share`` over its pieces plus ``global_share`` over its neighbours) sum to 1,
    or to 0 when it has neither estimate.
    """
    similarities = torch.einsum("na,nma->nm", tokens, pieces)
    local = local_weights(similarities, piece_lengths, token_lengths, piece_present, temperature)
    global_ = global_weights(neighbour_similarities, neighbour_present, temperature, threshold)
    has_local = (local.sum(dim=-1, keepdim=True) > 0).to(local.dtype)
    has_global = (global_.sum(dim=-1, keepdim=True) > 0).to(local.dtype)
    # both: the blend; one: that one alone
    local_factor = has_local * (1 - global_weight * has_global)
    global_factor = has_global * (1 - (1 - global_weight) * has_local)
    return HybridWeights(local, global_, local * local_factor, global_ * global_factor)


def char_length(data: bytes) -> int:
    """Characters in UTF-8 ``data`` (its non-continuation bytes; pieces of a split character add up)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


def token_text(info: TokenInfo) -> str | None:
    """The text the auxiliary model embeds, or ``None`` (special, empty or not UTF-8 on its own)."""
    if info.special or not info.bytes or info.partial_utf8:
        return None
    return info.bytes.decode("utf-8")


@dataclass
class TokenAdaptConfig:
    aux_model: str = resource("text-embedding model directory (transformers AutoModel + tokenizer, mean "
                              "pooling) or packaged:minilm", required=False, default="packaged:minilm")
    temperature: float = 0.3  # softmax temperature of both estimates (reference default)
    top_k: int = 3  # source neighbours of the global estimate
    global_weight: float = 0.3  # share of the global estimate; the local one gets 1 - global_weight
    threshold: float = 0.0  # neighbours less cosine-similar than this are dropped from the global estimate
    batch_size: int = 1024  # texts per auxiliary-model batch
    max_length: int = 32  # auxiliary-model tokens per text (longer token texts are cut)
    aux_dtype: str = "float32"  # "bfloat16": ~1.7x faster auxiliary embeddings on CPUs with AVX512-BF16


def _check(config: TokenAdaptConfig) -> None:
    if not config.temperature > 0:
        raise TokenbridgeError(f"tokenadapt: temperature must be positive, got {config.temperature}")
    if config.top_k < 1:
        raise TokenbridgeError(f"tokenadapt: top_k must be at least 1, got {config.top_k}")
    if not 0.0 <= config.global_weight <= 1.0:
        raise TokenbridgeError(f"tokenadapt: global_weight must be in [0, 1], got {config.global_weight}")


def _add_weight(merged: dict[int, float], ids, weights) -> None:
    for i, w in zip(ids, weights):
        if w > 0:
            merged[i] = merged.get(i, 0.0) + w


def prepare_tokenadapt(context: TransplantContext, config: TokenAdaptConfig) -> Combination:
    """Embed token texts with the auxiliary model, then decide every new token's source rows and weights."""
    from .text_embed import TextEmbedder

    _check(config)
    embedder = TextEmbedder(config.aux_model, config.max_length, config.aux_dtype)
    sources = [(t.id, token_text(t)) for t in context.source.tokens]
    sources = [(i, s) for i, s in sources if s is not None]
    targets = [(t, token_text(t)) for t in context.new_tokens]
    targets = [(t, s) for t, s in targets if s is not None]
    encoded = embedder.encode([s for _, s in sources] + [s for _, s in targets])
    seen = embedder.sees(encoded)
    source_seen = [(i, e) for (i, _), e, ok in zip(sources, encoded, seen) if ok]
    target_seen = [(t, e) for (t, _), e, ok in zip(targets, encoded[len(sources):], seen[len(sources):]) if ok]
    vectors, where = embedder.embed_unique([e for _, e in source_seen] + [e for _, e in target_seen],
                                           config.batch_size, context.progress)
    del embedder, encoded

    # The auxiliary row of every source token (-1: none) and the neighbour-search keys.
    source_row = torch.full((len(context.source),), -1, dtype=torch.int64)
    key_ids = torch.tensor([i for i, _ in source_seen], dtype=torch.int64)
    key_rows = where[:len(source_seen)]
    source_row[key_ids] = key_rows
    keys = vectors[key_rows]
    target_rows = where[len(source_seen):]

    source_chars = torch.tensor([char_length(t.bytes) for t in context.source.tokens], dtype=torch.float32)

    # Tokens the auxiliary model sees alike share their neighbours: search once per distinct embedding.
    use_global = config.global_weight > 0 and keys.shape[0] > 0
    if use_global:
        distinct, inverse = torch.unique(target_rows, return_inverse=True)
        distinct_similarities, distinct_neighbours = cosine_topk(vectors[distinct], keys, config.top_k, unit=True)
        del distinct

    combination = Combination()
    for begin in range(0, len(target_seen), CHUNK):
        chunk = target_seen[begin:begin + CHUNK]
        queries = vectors[target_rows[begin:begin + CHUNK]]
        pieces = [context.source_encoder.encode(t.bytes) or [] for t, _ in chunk]
        width = max((len(p) for p in pieces), default=0)
        piece_ids = torch.zeros((len(chunk), width), dtype=torch.int64)
        piece_present = torch.zeros((len(chunk), width), dtype=torch.bool)
        for n, ids in enumerate(pieces):
            if ids:
                piece_ids[n, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
                piece_present[n, :len(ids)] = True
        piece_lengths = source_chars[piece_ids] * piece_present
        token_lengths = torch.tensor([char_length(t.bytes) for t, _ in chunk], dtype=torch.float32)
        rows = source_row[piece_ids]  # -1: no auxiliary row -> a zero vector (similarity 0)
        piece_vectors = vectors[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)
        if use_global:
            at = inverse[begin:begin + CHUNK]
            similarities = distinct_similarities[at]
            neighbour_ids = key_ids[distinct_neighbours[at]]
        else:
            similarities = queries.new_zeros((len(chunk), 0))
            neighbour_ids = torch.zeros((len(chunk), 0), dtype=torch.int64)
        weights = tokenadapt_weights(queries, piece_vectors, piece_present, piece_lengths, token_lengths,
                                     similarities, torch.ones_like(similarities, dtype=torch.bool),
                                     config.temperature, config.threshold, config.global_weight)
        local_share = weights.local_share.tolist()
        global_share = weights.global_share.tolist()
        neighbour_list = neighbour_ids.tolist()
        for n, (info, _) in enumerate(chunk):
            merged: dict[int, float] = {}
            _add_weight(merged, pieces[n], local_share[n])
            _add_weight(merged, neighbour_list[n], global_share[n])
            if not merged:
                continue
            has_local = any(w > 0 for w in local_share[n])
            has_global = any(w > 0 for w in global_share[n])
            how = "tokenadapt" if has_local and has_global else ("tokenadapt:local" if has_local
                                                                  else "tokenadapt:global")
            combination.add(info.id, list(merged), list(merged.values()), how)
    return combination


@register("tokenadapt", TokenAdaptConfig,
          "TokenAdapt: local subword composition + global neighbours in a text-embedding space",
          prepare=prepare_tokenadapt)
def tokenadapt(inputs: MethodInputs, config: TokenAdaptConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "tokenadapt")
