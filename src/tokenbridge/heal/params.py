"""Which parameters a heal run trains.

* ``embeddings``: the input embedding matrix and, when untied, the output matrix (and its bias);
  the body is frozen (ReTok-style embedding tuning).
* ``new-rows``: the same matrices, but only the rows the transplant initialised (read from the
  student's ``tokenbridge.json``); the copied rows keep their values exactly.
* ``all``: every parameter.
* ``lora``: LoRA adapters (PEFT) on every linear layer of the body, plus the embedding matrices;
  the adapters are merged into the weights when the healed model is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TokenbridgeError
from ..report import REPORT_NAME

TRAIN_CHOICES = ("embeddings", "new-rows", "all", "lora")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0


def embedding_parameters(model) -> list[torch.nn.Parameter]:
    """The input embedding matrix, and the output matrix and bias when they are separate parameters."""
    params = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None:
        if output.weight is not params[0]:
            params.append(output.weight)
        if getattr(output, "bias", None) is not None:
            params.append(output.bias)
    return params


def new_rows(student_dir: Path) -> dict[str, list[int]]:
    """``{"input": [...], "output": [...]}``: target rows the transplant initialised, from ``tokenbridge.json``."""
    path = Path(student_dir) / REPORT_NAME
    if not path.is_file():
        raise TokenbridgeError(f"{student_dir}: --train new-rows needs the transplant's {REPORT_NAME} (not found)")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = {matrix: sorted(r["target_id"] for r in entries) for matrix, entries in data["initialised"].items()}
    rows.setdefault("output", rows.get("input", []))
    return rows


def _row_mask_hook(mask: torch.Tensor):
    """A gradient hook keeping only the rows (entries, for a bias) where ``mask`` is 1."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(device=grad.device, dtype=grad.dtype).view(-1, *[1] * (grad.dim() - 1))
    return hook


def select_trainable(model, train: str, student_dir: Path | None = None, lora: LoraSettings = LoraSettings()):
    """Freeze everything but what ``train`` names; returns the (possibly PEFT-wrapped) model.

    For ``new-rows`` a gradient hook zeroes the rows that were copied, so with no weight decay those rows
    never change.
    """
    if train not in TRAIN_CHOICES:
        raise TokenbridgeError(f"unknown --train {train!r} ({', '.join(TRAIN_CHOICES)})")
    if train == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TokenbridgeError("--train lora needs the peft package (pip install peft)") from None
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules="all-linear",
                            bias="none")
        model = get_peft_model(model, config)
        for param in embedding_parameters(model.get_base_model()):
            param.requires_grad_(True)
        return model
    for param in model.parameters():
        param.requires_grad_(train == "all")
    if train == "all":
        return model
    embeddings = embedding_parameters(model)
    for param in embeddings:
        param.requires_grad_(True)
    if train == "new-rows":
        params = dict(model.named_parameters())
        for name, mask in row_masks(model, student_dir).items():
            params[name].register_hook(_row_mask_hook(mask))
    return model


def row_masks(model, student_dir: Path) -> dict[str, torch.Tensor]:
    """``new-rows``: per embedding parameter (by name in ``model``), 1 for the rows the transplant
    initialised and 0 for the copied rows, which must keep their values."""
    rows = new_rows(student_dir)
    embeddings = embedding_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for param in embeddings:  # the input matrix, then the output matrix and bias (their rows: "output")
        wanted = rows["input" if param is embeddings[0] else "output"]
        mask = torch.zeros(param.shape[0])
        mask[[r for r in wanted if r < param.shape[0]]] = 1.0
        masks[names[id(param)]] = mask
    return masks


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors by name (what a checkpoint stores)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def finished_model(model):
    """The plain transformers model to write: LoRA adapters merged, PEFT wrapper removed."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
