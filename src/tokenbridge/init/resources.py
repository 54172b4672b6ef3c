"""Outside resources that methods read: a model's vocabulary matrices, text files.

A *donor* is a model that already uses the target tokenizer (OMP's donor, CLP-Transfer's
helper).  Only its vocabulary-sized tensors are read, as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..align.token_bytes import Vocabulary, vocabulary
from ..errors import TokenbridgeError


@dataclass
class VocabMatrices:
    """The vocabulary-sized matrices of one model, float32, cut to its tokenizer's size."""

    directory: Path
    vocabulary: Vocabulary
    input: torch.Tensor  # [V, d]
    output: torch.Tensor | None  # [V, d]; None when tied to ``input``
    embed_scale: float

    def matrix(self, which: str) -> torch.Tensor:
        """``"input"`` or ``"output"`` rows (tied models give the input rows for both)."""
        if which == "output" and self.output is not None:
            return self.output
        return self.input


def load_vocab_matrices(model: str | Path, what: str, expect: Vocabulary | None = None,
                        allow_pickle: bool = False) -> VocabMatrices:
    """Read the embedding (and untied head) of ``model`` (a directory, ``.gguf`` or ``packaged:NAME``).

    ``expect``: the vocabulary the model must use, token for token (e.g. the target's for a donor);
    ``what`` names the resource in errors (``"donor"``).
    """
    from ..arch import arch_spec
    from ..load.checkpoint import open_checkpoint
    from ..load.model import resolve_source
    from ..load.packaged import resolve
    from ..load.tokenizer import load_tokenizer
    from ..pipeline import is_tied, locate_vocab_tensors

    path = resolve(str(model))
    if not path.exists():
        raise TokenbridgeError(f"{what} {path}: no such file or directory")
    directory = resolve_source(path)
    checkpoint = open_checkpoint(directory, allow_pickle=allow_pickle)
    spec = arch_spec(checkpoint.config["model_type"])
    tied = is_tied(checkpoint)
    names = locate_vocab_tensors(checkpoint, spec, tied)
    vocab = vocabulary(load_tokenizer(directory))
    if expect is not None:
        check_same_vocabulary(vocab, expect, f"{what} {path}")
    size = len(vocab)
    rows = checkpoint.read(names.input[0])
    if rows.shape[0] < size:
        raise TokenbridgeError(f"{what} {path}: the tokenizer has {size} tokens but the embeddings only "
                               f"{rows.shape[0]} rows")
    input_rows = rows[:size].float()
    del rows
    output_rows = None
    if names.output and not tied:
        output_rows = checkpoint.read(names.output[0])[:size].float()
    return VocabMatrices(directory, vocab, input_rows, output_rows, spec.scale(checkpoint.config))


def check_same_vocabulary(found: Vocabulary, expect: Vocabulary, what: str) -> None:
    """``found`` must list the same tokens as ``expect`` under the same ids."""
    if len(found) != len(expect):
        raise TokenbridgeError(f"{what}: its tokenizer has {len(found)} tokens, the target tokenizer "
                               f"{len(expect)}; it must use the target tokenizer")
    for a, b in zip(found.tokens, expect.tokens):
        if (a.token, a.bytes, a.special) != (b.token, b.bytes, b.special):
            raise TokenbridgeError(f"{what}: token {a.id} is {a.token!r} where the target tokenizer has "
                                   f"{b.token!r}; it must use the target tokenizer")


def read_text_files(spec: str, what: str) -> list[Path]:
    """Comma-separated file names from an option value; each must exist."""
    paths = [Path(p) for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise TokenbridgeError(f"{what}: no file given")
    for path in paths:
        if not path.is_file():
            raise TokenbridgeError(f"{what} {path}: no such file")
    return paths
