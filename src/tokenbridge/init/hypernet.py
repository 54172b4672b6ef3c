"""``hypernet``: rows predicted by a hypernetwork trained for the source model (ZeTT).

``-o hypernet=HN_DIR`` names a directory made by ``tokenbridge hypernet train`` for this source model
(checked by the SHA-256 of its vocabulary matrices).  Every new token's bytes are tokenized by the
source tokenizer; the rows are the ``subword`` rows of those pieces plus the hypernetwork's
correction (:mod:`tokenbridge.hypernet.model`).  Provenance: the pieces and their ``subword`` weights,
labelled ``hypernet:<first 12 hex digits of the hypernetwork's weights>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TokenbridgeError
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .subword import fill_mean, subword_pieces

CHUNK = 8192


@dataclass
class HypernetConfig:
    hypernet: str = resource("a hypernetwork directory made by `tokenbridge hypernet train` for the source model")


def prepare(context: TransplantContext, config: HypernetConfig) -> dict:
    from ..hypernet.model import WEIGHTS_NAME, corrections, load_hypernet, subword_base, vocab_digest
    from ..write.manifest import file_sha256

    directory = Path(config.hypernet)
    network, record = load_hypernet(directory)
    spec = network.spec
    source_in = context.read_rows("input")
    source_out = None if spec.tied else context.read_rows("output")
    if spec.tied != context.source_tied or vocab_digest(source_in, source_out) != spec.vocab_sha256:
        raise TokenbridgeError(f"{directory}: this hypernetwork was trained for another model ({spec.base or '?'}, "
                               f"vocabulary sha256 {spec.vocab_sha256[:12]}); train one for this source with "
                               "`tokenbridge hypernet train`")
    tokens = context.new_tokens
    pieces, weights, missing = subword_pieces(tokens, context.source_encoder)
    rows_in = torch.empty((len(tokens), source_in.shape[1]), dtype=torch.float32)
    rows_out = None if spec.tied else torch.empty_like(rows_in)
    dim = source_in.shape[1]
    bar = tqdm(total=len(tokens), desc="hypernet", unit="tok", mininterval=1.0,
               disable=not context.progress or not tokens)
    with torch.no_grad():
        for begin in range(0, len(tokens), CHUNK):
            chunk = pieces[begin:begin + CHUNK]
            correction = corrections(network, source_in, source_out, chunk, chunk=CHUNK)
            rows_in[begin:begin + len(chunk)] = fill_mean(subword_base(source_in, chunk) + correction[:, :dim],
                                                          source_in, missing[begin:begin + CHUNK])
            if rows_out is not None:
                rows_out[begin:begin + len(chunk)] = fill_mean(
                    subword_base(source_out, chunk) + correction[:, dim:], source_out, missing[begin:begin + CHUNK])
            bar.update(len(chunk))
    bar.close()
    label = f"hypernet:{file_sha256(directory / WEIGHTS_NAME)[:12]}"
    return {"index": {t.id: i for i, t in enumerate(tokens)}, "input": rows_in, "output": rows_out,
            "pieces": pieces, "weights": weights, "missing": missing, "label": label}


@register("hypernet", HypernetConfig, "rows predicted by a trained hypernetwork from the source pieces (ZeTT)",
          prepare)
def hypernet(inputs: MethodInputs, config: HypernetConfig) -> MethodResult:
    state = inputs.prepared
    where = [state["index"][t.id] for t in inputs.new_tokens]
    matrix = state["output"] if inputs.matrix == "output" and state["output"] is not None else state["input"]
    rows = matrix[torch.tensor(where, dtype=torch.int64)]
    return MethodResult(rows, [state["pieces"][i] for i in where], [state["weights"][i] for i in where],
                        [state["missing"][i] for i in where], [state["label"]] * len(where))
