"""The hypernetwork: a small transformer from a token's source decomposition to its embedding rows.

A new token's bytes are tokenized by the source tokenizer; the first ``max_pieces`` pieces' source rows
(input and output rows side by side when the model's are untied) are the hypernetwork's input
sequence.  Its first position's output, through a final projection, is a *correction* added to the
``subword`` rows (the mean of all the pieces' rows; ALM paper, appendix D).  The projection starts
at zero, so an untrained hypernetwork gives exactly the ``subword`` rows.

Inputs are divided by the source rows' standard deviation and corrections multiplied by it, so the
network sees unit-scale numbers whatever the model's embedding scale.  Sequences are not padded: the
tokens are grouped by piece count and each group runs on its own, so a token's rows do not depend on
the others in its batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import TokenbridgeError
from ..init.subword import combine_rows, piece_weights

SPEC_NAME = "hypernet.json"
WEIGHTS_NAME = "hypernet.safetensors"
FORMAT = 1


@dataclass
class HypernetSpec:
    """The hypernetwork's shape and the base model it belongs to (``hypernet.json``)."""

    dim: int  # the base model's embedding width
    tied: bool  # input and output rows are one matrix
    vocab_sha256: str  # of the base model's vocabulary matrices (float32 bytes)
    source_vocab_size: int
    scale: float  # standard deviation of the source rows
    layers: int = 3
    width: int = 0  # 0: dim
    heads: int = 0  # 0: width // 64 (at least 1)
    ffn: int = 0  # 0: 2 * width
    max_pieces: int = 7
    base: str = ""  # the base model as given to ``hypernet train``
    model_type: str = ""

    def resolved(self) -> HypernetSpec:
        spec = HypernetSpec(**asdict(self))
        spec.width = spec.width or spec.dim
        spec.heads = spec.heads or max(1, spec.width // 64)
        spec.ffn = spec.ffn or 2 * spec.width
        if spec.width % spec.heads:
            raise TokenbridgeError(f"--heads {spec.heads} does not divide the width {spec.width}")
        return spec

    @property
    def row_width(self) -> int:
        return self.dim if self.tied else 2 * self.dim


class Hypernetwork(nn.Module):
    def __init__(self, spec: HypernetSpec):
        super().__init__()
        spec = spec.resolved()
        self.spec = spec
        self.project = nn.Linear(spec.row_width, spec.width)
        self.position = nn.Parameter(torch.randn(spec.max_pieces, spec.width) * 0.02)
        layer = nn.TransformerEncoderLayer(spec.width, spec.heads, spec.ffn, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.width)
        self.out = nn.Linear(spec.width, spec.row_width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Groups ``[n, k, row_width]`` (k <= max_pieces, no padding) -> corrections ``[n, row_width]`` each.

        One call takes every group, so that a DDP-wrapped network runs one forward per backward.
        """
        scale = self.spec.scale
        outputs = []
        for rows in groups:
            hidden = self.project(rows / scale) + self.position[: rows.shape[1]]
            hidden = self.body(hidden)
            outputs.append(self.out(self.norm(hidden[:, 0])) * scale)
        return outputs


def vocab_digest(source_in: torch.Tensor, source_out: torch.Tensor | None) -> str:
    """SHA-256 of the vocabulary matrices as float32 (what names a hypernetwork's base model)."""
    digest = hashlib.sha256()
    for matrix in (source_in, source_out):
        if matrix is not None:
            digest.update(str(tuple(matrix.shape)).encode())
            digest.update(matrix.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def source_rows(source_in: torch.Tensor, source_out: torch.Tensor | None, pieces: list[list[int]],
                max_pieces: int) -> torch.Tensor:
    """The hypernetwork's input for tokens that all have the same number k of (kept) pieces: ``[n, k, w]``."""
    ids = torch.tensor([p[:max_pieces] for p in pieces], dtype=torch.int64)
    rows = source_in[ids]
    if source_out is not None:
        rows = torch.cat([rows, source_out[ids]], dim=-1)
    return rows


def corrections(network, source_in: torch.Tensor, source_out: torch.Tensor | None, pieces: list[list[int]],
                chunk: int = 0) -> torch.Tensor:
    """The hypernetwork's correction for every token (``[n, row_width]``; zero where a token has no pieces).

    ``network``: a :class:`Hypernetwork`, or one wrapped for DDP.  ``chunk`` > 0 runs at most that many
    tokens per call (inference on a whole vocabulary); 0 runs all of them in one call (training).
    """
    spec = getattr(network, "module", network).spec  # DDP wraps the network as ``.module``
    device = next(network.parameters()).device
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pieces):
        if p:
            groups.setdefault(min(len(p), spec.max_pieces), []).append(i)
    parts = [members[b:b + chunk] for members in (groups[k] for k in sorted(groups))
             for b in range(0, len(members), chunk)] if chunk else [groups[k] for k in sorted(groups)]
    calls = [[part] for part in parts] if chunk else [parts] if parts else []
    out = torch.zeros((len(pieces), spec.row_width), dtype=torch.float32, device=device)
    for call in calls:
        inputs = [source_rows(source_in, source_out, [pieces[i] for i in part], spec.max_pieces).to(device)
                  for part in call]
        where = torch.tensor([i for part in call for i in part], dtype=torch.int64, device=device)
        out = out.index_copy(0, where, torch.cat(network(inputs)).float())
    return out


def subword_base(source: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    """The ``subword`` rows (plain mean of the pieces) that corrections are added to."""
    weights = [piece_weights(len(p), 1.0) if p else [] for p in pieces]
    return combine_rows(source, pieces, weights)


def save_hypernet(directory: Path, network: Hypernetwork, extra: dict) -> None:
    """``hypernet.safetensors`` and ``hypernet.json`` into ``directory`` (a staged output)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in network.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    record = {"format": FORMAT, "spec": asdict(network.spec), **extra}
    (directory / SPEC_NAME).write_text(json.dumps(record, indent=1) + "\n")


def load_hypernet(directory: Path) -> tuple[Hypernetwork, dict]:
    """A trained hypernetwork from HN_DIR, with its JSON record; a bad directory is a one-line error."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec_path, weights = directory / SPEC_NAME, directory / WEIGHTS_NAME
    if not spec_path.is_file() or not weights.is_file():
        raise TokenbridgeError(f"{directory}: not a hypernetwork directory (needs {SPEC_NAME} and {WEIGHTS_NAME}; "
                               "make one with `tokenbridge hypernet train`)")
    try:
        record = json.loads(spec_path.read_text())
        spec = HypernetSpec(**record["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise TokenbridgeError(f"{spec_path}: not a hypernetwork description ({error})") from None
    if record.get("format") != FORMAT:
        raise TokenbridgeError(f"{spec_path}: hypernetwork format {record.get('format')!r}, this tokenbridge reads "
                               f"{FORMAT}")
    network = Hypernetwork(spec)
    try:
        state = load_file(str(weights))
        network.load_state_dict(state, strict=True)
    except Exception as error:  # noqa: BLE001 - any failure here is a damaged or mismatched file
        raise TokenbridgeError(f"{weights}: does not hold this hypernetwork's weights "
                               f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
    network.eval()
    return network, record
