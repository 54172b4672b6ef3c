"""``clp`` (CLP-Transfer, Ostendorff & Rehm 2023): neighbours found in a helper model.

A *helper* model already uses the target tokenizer (typically a small model trained on the
target language).  For every new target token, its cosine similarity to the overlapping
tokens is measured in the helper's input-embedding space; the new row is the weighted sum
of the *source* rows of those overlapping tokens.

The reference code (``malteos/clp-transfer``, ``clp.py``) weights every overlapping token by
its similarity divided by the sum of all similarities.  Here ``weighting="topk"`` keeps the
``k`` most similar overlapping tokens and divides their similarities by their sum (so the
weights stay few, non-negative and sum to 1; ``k`` as large as the overlap gives the
reference scheme, with negative similarities counted as 0).  ``weighting="sparsemax"`` puts
sparsemax over all the similarities instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TokenbridgeError
from .combine import Combination, apply_combination, combine_over_overlap
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .sparse import cosine_sparsemax, cosine_topk, normalize_nonnegative

WEIGHTINGS = ("topk", "sparsemax")
CHUNK = 1024  # new tokens scored at a time: one CHUNK x overlap similarity block in memory


def clp_weights(helper_new: torch.Tensor, helper_overlap: torch.Tensor, weighting: str = "topk", k: int = 10,
                chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights over the overlapping tokens for each new token, from helper-space cosine similarity.

    ``helper_new [B, d]``: helper rows of the new tokens; ``helper_overlap [N, d]``: helper rows
    of the overlapping tokens.  Returns ``(indices [B, m], weights [B, m])``: positions in
    ``helper_overlap`` and their weights, most similar first, each row summing to 1.
    ``"topk"``: ``m = min(k, N)``, weight = max(similarity, 0) / sum over the row (uniform when
    none is positive).  ``"sparsemax"``: sparsemax over all ``N`` similarities, padded with
    index -1 and weight 0 to the largest support.
    """
    if weighting == "topk":
        values, indices = cosine_topk(helper_new, helper_overlap, k, chunk)
        return indices, normalize_nonnegative(values)
    if weighting == "sparsemax":
        weights, indices = cosine_sparsemax(helper_new, helper_overlap, chunk)
        return indices, weights
    raise ValueError(f"unknown weighting {weighting!r}")


@dataclass
class ClpConfig:
    donor: str = resource("a model that already uses the target tokenizer (CLP's helper model)")
    weighting: str = "topk"  # "topk": the k most similar overlapping tokens, similarity / sum; "sparsemax": over all
    k: int = 10  # overlapping tokens per new token with weighting=topk


def prepare_clp(context: TransplantContext, config: ClpConfig) -> Combination:
    from .resources import load_vocab_matrices

    if config.weighting not in WEIGHTINGS:
        raise TokenbridgeError(f"clp: weighting={config.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if config.k < 1:
        raise TokenbridgeError(f"clp: k={config.k} must be at least 1")
    if not context.overlap_target.numel():
        raise TokenbridgeError("clp: the source and target vocabularies share no ordinary tokens to combine")
    helper = load_vocab_matrices(config.donor, "donor", expect=context.target).input
    keys = helper[context.overlap_target]
    # a new token whose helper row is all zeros has no neighbours: it is left to the subword fallback
    candidates = torch.tensor([t.id for t in context.new_tokens], dtype=torch.int64)
    new_ids = candidates[helper[candidates].ne(0).any(dim=1)].tolist() if len(candidates) else []
    # clp_weights itself works CHUNK rows at a time; a step bounds the per-step tensors
    return combine_over_overlap(new_ids, lambda ids: clp_weights(helper[ids], keys, config.weighting, config.k),
                                context.overlap_source, "clp: helper neighbours", context.progress, 16 * CHUNK)


@register("clp", ClpConfig, "weighted source rows of the overlapping tokens most similar in a helper model "
          "with the target tokenizer (CLP-Transfer)", prepare=prepare_clp)
def clp(inputs: MethodInputs, config: ClpConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "clp")
