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


@dataclass(frozen=True)
class GGUFSpec:
    """How one architecture is written as GGUF for llama.cpp (``arch/gguf.json``)."""

    model_type: str
    gguf: str  # llama.cpp's architecture name
    keys: dict  # "<gguf>.<key>" suffix -> config attribute
    optional: tuple[str, ...]
    permute_qk: bool
    norm_offset: float
    activations: tuple[str, ...]
    rope_types: tuple[str, ...]
    sliding_window: str  # "kept", "dropped" or "refused"
    vocab_size_key: bool
    gemma3: dict | None = None


@lru_cache(maxsize=1)
def _gguf_table() -> dict:
    return json.loads(files("tokenbridge.arch").joinpath("gguf.json").read_text())


def gguf_model_types() -> list[str]:
    """The Hugging Face model types tokenbridge writes as GGUF."""
    return sorted(k for k in _gguf_table() if not k.startswith("_"))


def gguf_spec(model_type: str) -> GGUFSpec:
    """The GGUF conventions of ``model_type``; an architecture llama.cpp does not run is a one-line error."""
    table = _gguf_table()
    entry = table.get(model_type)
    if entry is None or model_type.startswith("_"):
        raise TokenbridgeError(
            f"architecture {model_type!r} cannot be written as GGUF; tokenbridge writes "
            f"{', '.join(gguf_model_types())} (tokenbridge/arch/gguf.json)")
    common = table["_common"]
    merged = {**common, **entry, "keys": {**common["keys"], **entry.get("keys", {})}}
    return GGUFSpec(
        model_type=model_type, gguf=merged["gguf"], keys=merged["keys"], optional=tuple(merged["optional"]),
        permute_qk=merged["permute_qk"], norm_offset=float(merged["norm_offset"]),
        activations=tuple(merged["activations"]), rope_types=tuple(merged["rope_types"]),
        sliding_window=merged["sliding_window"], vocab_size_key=merged["vocab_size_key"],
        gemma3=merged.get("gemma3"))


def model_type_of_gguf(architecture: str) -> str:
    """The Hugging Face model type a GGUF ``general.architecture`` is read as (``llama`` for llama and mistral)."""
    for model_type in gguf_model_types():
        if _gguf_table()[model_type]["gguf"] == architecture:
            return model_type
    names = sorted({_gguf_table()[m]["gguf"] for m in gguf_model_types()})
    raise TokenbridgeError(f"GGUF architecture {architecture!r} is not supported; tokenbridge transplants "
                           f"{', '.join(names)}")
