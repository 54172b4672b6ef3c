"""The registry of initialisation methods.

A method is a function ``fn(inputs: MethodInputs, config) -> MethodResult`` plus a
config dataclass, registered under a name with :func:`register`.  The pipeline
handles everything shared (copying overlapping rows, special tokens, tying,
biases); a method only computes rows for the ordinary tokens the source lacks.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Callable

import torch

from ..align.encode import ByteEncoder
from ..align.token_bytes import TokenInfo, Vocabulary
from ..errors import TokenbridgeError


@dataclass
class MethodInputs:
    """What a method may read.  ``source_rows`` is float32 ``[V_source, d]``."""

    source_rows: torch.Tensor
    matrix: str  # "input" or "output"
    new_tokens: list[TokenInfo]  # target tokens to initialise, in target-id order
    source: Vocabulary
    source_encoder: ByteEncoder
    generator: torch.Generator
    embed_scale: float = 1.0  # what the model's embedding module multiplies rows by


@dataclass
class MethodResult:
    """Rows for ``new_tokens`` and where each came from.

    ``rows``: float32 ``[len(new_tokens), d]``.  ``source_ids[i]``/``weights[i]``: the
    source rows combined into row i (empty when it came from no particular row, e.g.
    ``random``).  ``fallback[i]``: the method could not treat token i and used the
    mean of the source rows instead.
    """

    rows: torch.Tensor
    source_ids: list[list[int]]
    weights: list[list[float]]
    fallback: list[bool]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[MethodInputs, object], MethodResult]
    config_cls: type
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, summary: str):
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, config_cls, summary)
        return fn

    return wrap


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401 - importing registers the built-in methods

    if name not in METHODS:
        raise TokenbridgeError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available_methods() -> dict[str, Method]:
    from . import methods  # noqa: F401

    return dict(sorted(METHODS.items()))


def make_config(method: Method, options: dict | None):
    """Build the method's config dataclass from ``{name: value}`` (strings are converted)."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(method.config_cls)}
    hints = typing.get_type_hints(method.config_cls)
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise TokenbridgeError(f"method {method.name!r} has no option {key!r} (options: {known})")
        kwargs[key] = _convert(hints[key], value, key)
    return method.config_cls(**kwargs)


def _convert(kind, value, key):
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if kind in (int, float):
            return kind(value)
    except ValueError:
        raise TokenbridgeError(f"option {key}={value!r} is not a valid {kind.__name__}") from None
    return value
