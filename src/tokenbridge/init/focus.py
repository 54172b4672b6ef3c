"""``focus`` (FOCUS, Dobler & de Melo 2023): neighbours found in auxiliary static embeddings.

Static token embeddings for the *target* vocabulary come from fastText, trained here (gensim,
one worker thread, the transplant's seed) on text the user gives, tokenised with the target
tokenizer and written as token strings, as FOCUS does (CBOW, 10 negatives, character n-grams
of 3-6 characters; FOCUS's defaults dim 100, 3 epochs, min_count 10).  For every new target
token, its cosine similarities to the overlapping tokens in that auxiliary space go through
sparsemax, and the new row is the sparsemax-weighted sum of the overlapping tokens' *source*
rows (a convex combination of a few of them).

An overlapping token takes part only if it has a vector of its own (it occurred at least
``min_count`` times), as in the reference (``deepfocus/focus.py``).  A new token seen fewer
times, or never, gets a vector built from its character n-grams and is labelled ``focus:ngrams``;
the reference initialises those randomly.  Only n-grams that occur in some corpus token count (the
others were never trained and hold their random initialisation), and a token needs at least
``ngram_share`` of its n-grams seen; any other falls back to the ``subword`` rows
(``focus:fallback:subword``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TokenbridgeError
from ..measure.texts import read_text
from .clp import CHUNK
from .combine import Combination, apply_combination, combine_over_overlap
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .sparse import cosine_sparsemax

TOKENIZE_BATCH = 1000  # lines tokenised per call


def focus_weights(aux_new: torch.Tensor, aux_overlap: torch.Tensor,
                  chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemax over cosine similarities in the auxiliary space.

    ``aux_new [B, d]``: auxiliary vectors of the new tokens; ``aux_overlap [N, d]``: those of
    the overlapping tokens.  Returns ``(indices [B, m], weights [B, m])``: positions in
    ``aux_overlap`` (the support, most similar first) and their weights, summing to 1 per row;
    rows are padded with index -1 and weight 0 to the largest support ``m``.
    """
    weights, indices = cosine_sparsemax(aux_new, aux_overlap, chunk)
    return indices, weights


@dataclass
class FocusConfig:
    corpus: str = resource("comma-separated text files in the target language, one passage per line, to train "
                           "auxiliary embeddings of the target tokens on")
    dim: int = 100  # dimension of the auxiliary embeddings
    epochs: int = 3  # passes over the corpus
    min_count: int = 10  # tokens seen fewer times get no auxiliary vector
    window: int = 5  # context tokens on each side
    min_n: int = 3  # shortest character n-gram of a token string
    max_n: int = 6  # longest character n-gram (0: none; then unseen tokens fall back to subword)
    buckets: int = 2_000_000  # rows the n-grams are hashed into (fastText's default)
    ngram_share: float = 0.5  # an unseen token's n-gram vector needs this share of its n-grams seen in the corpus


def tokenized_lines(paths, tokenizer) -> list[list[str]]:
    """Every non-blank line of ``paths`` as target token strings (``convert_ids_to_tokens``)."""
    sequences: list[list[str]] = []
    for path in paths:
        lines = [line for line in read_text(path).splitlines() if line.strip()]
        for begin in range(0, len(lines), TOKENIZE_BATCH):
            encoded = tokenizer(lines[begin:begin + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
            sequences.extend(tokenizer.convert_ids_to_tokens(ids) for ids in encoded if ids)
    return sequences


def prepare_focus(context: TransplantContext, config: FocusConfig) -> Combination:
    from .resources import read_text_files
    from .static_vectors import train_vectors

    for name in ("dim", "epochs", "min_count", "window", "min_n", "buckets"):
        if getattr(config, name) < 1:
            raise TokenbridgeError(f"focus: {name}={getattr(config, name)} must be at least 1")
    if not 0.0 <= config.ngram_share <= 1.0:
        raise TokenbridgeError(f"focus: ngram_share={config.ngram_share} must be between 0 and 1")
    if config.max_n and config.max_n < config.min_n:
        raise TokenbridgeError(f"focus: max_n={config.max_n} must be 0 or at least min_n={config.min_n}")
    paths = read_text_files(config.corpus, "focus corpus")
    tokenizer = context.target_tokenizer
    sequences = tokenized_lines(paths, tokenizer)
    if not sequences:
        raise TokenbridgeError(f"focus corpus {config.corpus}: no text")
    vectors = train_vectors(sequences, dim=config.dim, window=config.window, negatives=10, epochs=config.epochs,
                            min_count=config.min_count, seed=context.seed, skipgram=False, min_n=config.min_n,
                            max_n=config.max_n, buckets=config.buckets, progress=context.progress)
    own = vectors.index()

    overlap_target = context.overlap_target.tolist()
    overlap_strings = tokenizer.convert_ids_to_tokens(overlap_target)
    overlap = [(k, s) for k, (s, string) in enumerate(zip(context.overlap_source.tolist(), overlap_strings))
               if string in own and bool(vectors.vectors[own[string]].ne(0).any())]
    if not overlap:
        raise TokenbridgeError(f"focus: none of the {len(overlap_target)} overlapping tokens occurs "
                               f"{config.min_count} times in the corpus; give more text or a lower min_count")
    keys = vectors.vectors[[own[overlap_strings[k]] for k, _ in overlap]]
    overlap_source = torch.tensor([s for _, s in overlap], dtype=torch.int64)

    new_ids = [t.id for t in context.new_tokens]
    aux, found, from_ngrams = vectors.lookup(tokenizer.convert_ids_to_tokens(new_ids), config.ngram_share)
    row_of = {i: r for r, i in enumerate(new_ids) if found[r]}
    placed = [i for i in new_ids if i in row_of]
    combination = combine_over_overlap(placed, lambda ids: focus_weights(aux[[row_of[i] for i in ids]], keys),
                                       overlap_source, "focus: auxiliary neighbours", context.progress, 16 * CHUNK)
    for i in placed:
        if from_ngrams[row_of[i]] and i in combination.ids:
            combination.how[i] = "focus:ngrams"
    return combination


@register("focus", FocusConfig, "sparsemax-weighted source rows of the overlapping tokens nearest in fastText "
          "embeddings (character n-grams) trained on target-tokenised text (FOCUS)", prepare=prepare_focus)
def focus(inputs: MethodInputs, config: FocusConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "focus")
