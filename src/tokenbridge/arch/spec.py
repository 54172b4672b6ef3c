"""Read ``architectures.json`` into :class:`ArchSpec` records."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from ..errors import TokenbridgeError


@dataclass(frozen=True)
class ArchSpec:
    """Where the vocabulary lives in one architecture's checkpoint and config."""

    model_type: str
    input: tuple[str, ...]
    output: tuple[str, ...]
    output_bias: tuple[str, ...]
    vocab_key: str
    embed_scale: str | None
    head: str  # "causal-lm" or "masked-lm"

    def scale(self, config: dict) -> float:
        """The factor the embedding module multiplies stored rows by."""
        if self.embed_scale is None:
            return 1.0
        if self.embed_scale == "sqrt_hidden_size":
            return math.sqrt(config["hidden_size"])
        raise TokenbridgeError(f"unknown embed_scale {self.embed_scale!r} for {self.model_type}")

    def vocab_size(self, config: dict) -> int:
        return int(get_dotted(config, self.vocab_key))


def get_dotted(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def set_dotted(config: dict, key: str, new) -> None:
    *parents, last = key.split(".")
    value = config
    for part in parents:
        value = value[part]
    value[last] = new


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(files("tokenbridge.arch").joinpath("architectures.json").read_text())


def known_model_types() -> list[str]:
    return sorted(k for k in _table() if not k.startswith("_"))


def arch_spec(model_type: str) -> ArchSpec:
    table = _table()
    entry = table.get(model_type)
    if entry is None or model_type.startswith("_"):
        raise TokenbridgeError(
            f"architecture {model_type!r} is not supported; known: {', '.join(known_model_types())} "
            "(add it to tokenbridge/arch/architectures.json)"
        )
    if "family" in entry:
        merged = dict(table["_families"][entry["family"]])
        merged.update({k: v for k, v in entry.items() if k != "family"})
        entry = merged
    return ArchSpec(
        model_type=model_type,
        input=tuple(entry["input"]),
        output=tuple(entry["output"]),
        output_bias=tuple(entry["output_bias"]),
        vocab_key=entry["vocab_key"],
        embed_scale=entry["embed_scale"],
        head=entry["head"],
    )
