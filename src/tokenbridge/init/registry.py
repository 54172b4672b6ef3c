"""The registry of initialisation methods.

A method is a function ``fn(inputs: MethodInputs, config) -> MethodResult`` plus a
config dataclass, registered under a name with :func:`register`.  The pipeline
handles everything shared (copying overlapping rows, special tokens, tying,
biases); a method only computes rows for the ordinary tokens the source lacks.

Methods that need more than the source rows (a donor model, auxiliary embeddings,
a corpus) also register ``prepare(context: TransplantContext, config) -> state``.
The pipeline calls it once per transplant, before any matrix is built, and hands
the state to every ``fn`` call as ``inputs.prepared``.  Config fields that name
such an outside resource are declared with :func:`resource`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..align.encode import ByteEncoder
from ..align.token_bytes import TokenInfo, Vocabulary
from ..checks import number
from ..errors import TokenbridgeError


@dataclass
class TransplantContext:
    """Facts about one transplant that ``prepare`` steps may read (never modify)."""

    source: Vocabulary
    target: Vocabulary
    source_tokenizer: Any  # transformers tokenizers
    target_tokenizer: Any
    source_encoder: ByteEncoder
    overlap_target: torch.Tensor  # int64 [n]: target ids of ordinary tokens copied by bytes ...
    overlap_source: torch.Tensor  # int64 [n]: ... and the source ids they were copied from
    new_tokens: list[TokenInfo]  # every token the method initialises, in target-id order
    seed: int
    progress: bool = False
    source_tied: bool = True  # only input rows are built (the output head is the same matrix)
    # ``read_rows("input" | "output")``: the source's stored rows as float32 [V_source, d], for methods that
    # need both matrices at once (the output matrix is the input one when tied).
    read_rows: Callable[[str], torch.Tensor] | None = None


@dataclass
class MethodInputs:
    """What a method may read.  ``source_rows`` is float32 ``[V_source, d]``."""

    source_rows: torch.Tensor
    matrix: str  # "input" or "output"
    new_tokens: list[TokenInfo]  # target tokens to initialise (a chunk of the context's), in target-id order
    source: Vocabulary
    source_encoder: ByteEncoder
    generator: torch.Generator
    embed_scale: float = 1.0  # what the model's embedding module multiplies rows by
    prepared: Any = None  # what the method's ``prepare`` returned, if it has one


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
    # Optional per-row label for the provenance record when a row was not made the method's
    # main way, e.g. "focus:subword" for a token the auxiliary embeddings never saw.
    how: list[str] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[MethodInputs, object], MethodResult]
    config_cls: type
    summary: str
    prepare: Callable[[TransplantContext, object], Any] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, summary: str, prepare: Callable | None = None):
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, config_cls, summary, prepare)
        return fn

    return wrap


def resource(help: str, required: bool = True, default: str = ""):
    """A config field naming an outside resource (a model, a file); ``auto`` passes these on."""
    return field(default=default, metadata={"resource": help, "required": required})


def required_resources(method: Method) -> list[str]:
    """Names of the config fields that must be set for ``method`` to run."""
    return [f.name for f in dataclasses.fields(method.config_cls)
            if f.metadata.get("resource") and f.metadata.get("required")]


def check_resources(method: Method, config) -> None:
    """A clear error for every required resource that was not given."""
    missing = [name for name in required_resources(method) if not getattr(config, name)]
    if missing:
        fields = {f.name: f for f in dataclasses.fields(method.config_cls)}
        wants = "; ".join(f"-o {name}=... ({fields[name].metadata['resource']})" for name in missing)
        raise TokenbridgeError(f"method {method.name!r} needs {wants}")


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
        if hints[key] is float and isinstance(kwargs[key], (int, float)):
            number(f"option {key}", kwargs[key])  # NaN and inf are never a setting
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
