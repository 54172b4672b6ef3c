"""``focus`` (FOCUS, Dobler & de Melo 2023): neighbours found in auxiliary static embeddings.

Static token embeddings for the *target* vocabulary are trained here on text the user gives,
tokenised with the target tokenizer (FOCUS trains fastText CBOW on such text; its defaults
are dim 100, 3 epochs, min_count 10).  For every new target token, its cosine similarities
to the overlapping tokens in that auxiliary space go through sparsemax, and the new row is
the sparsemax-weighted sum of the overlapping tokens' *source* rows (a convex combination
of a few of them).

As in the reference (``deepfocus/focus.py``), an overlapping token takes part only if it has
an auxiliary vector (it occurred at least ``min_count`` times).  A new token without one is
initialised randomly there; here it is left out, so it gets the ``subword`` rows and the
label ``focus:fallback:subword``.
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


def tokenized_lines(paths, tokenizer) -> list[list[str]]:
    """Every non-blank line of ``paths`` as target token ids written as strings."""
    sequences: list[list[str]] = []
    for path in paths:
        lines = [line for line in read_text(path).splitlines() if line.strip()]
        for begin in range(0, len(lines), TOKENIZE_BATCH):
            encoded = tokenizer(lines[begin:begin + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
            sequences.extend([str(i) for i in ids] for ids in encoded if ids)
    return sequences


def prepare_focus(context: TransplantContext, config: FocusConfig) -> Combination:
    from .resources import read_text_files
    from .static_vectors import train_vectors

    for name in ("dim", "epochs", "min_count", "window"):
        if getattr(config, name) < 1:
            raise TokenbridgeError(f"focus: {name}={getattr(config, name)} must be at least 1")
    paths = read_text_files(config.corpus, "focus corpus")
    sequences = tokenized_lines(paths, context.target_tokenizer)
    if not sequences:
        raise TokenbridgeError(f"focus corpus {config.corpus}: no text")
    vectors = train_vectors(sequences, dim=config.dim, window=config.window, epochs=config.epochs,
                            min_count=config.min_count, seed=context.seed, progress=context.progress)
    aux = torch.as_tensor(vectors.vectors, dtype=torch.float32)
    row_of = {int(word): row for row, word in enumerate(vectors.words) if bool(aux[row].ne(0).any())}

    overlap = [(t, s) for t, s in zip(context.overlap_target.tolist(), context.overlap_source.tolist())
               if t in row_of]
    if not overlap:
        raise TokenbridgeError(f"focus: none of the {len(context.overlap_target)} overlapping tokens occurs "
                               f"{config.min_count} times in the corpus; give more text or a lower min_count")
    keys = aux[[row_of[t] for t, _ in overlap]]
    overlap_source = torch.tensor([s for _, s in overlap], dtype=torch.int64)
    new_ids = [t.id for t in context.new_tokens if t.id in row_of]
    return combine_over_overlap(new_ids, lambda ids: focus_weights(aux[[row_of[i] for i in ids]], keys),
                                overlap_source, "focus: auxiliary neighbours", context.progress, 16 * CHUNK)


@register("focus", FocusConfig, "sparsemax-weighted source rows of the overlapping tokens nearest in static "
          "embeddings trained on target-tokenised text (FOCUS)", prepare=prepare_focus)
def focus(inputs: MethodInputs, config: FocusConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "focus")
