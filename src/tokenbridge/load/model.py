"""The one way a model is loaded into transformers: every command that runs a model comes here.

* A ``.gguf`` file is dequantised once and cached; ``packaged:NAME`` is resolved by the caller.
* ``trust_remote_code=False`` always: a directory whose config or tokenizer asks for its own code
  (``auto_map``) is loaded with transformers' own classes, or refused when transformers has none.
* Pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle``; then transformers
  reads them with ``torch.load(weights_only=True)``.
* Every safetensors header is validated first, and transformers' load report must be clean: a
  missing, unexpected or mis-shaped tensor is an error, never a silently re-initialised weight.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TokenbridgeError
from .hf import first_line, load_config, quiet_transformers, remote_code_hint


def resolve_source(source: Path) -> Path:
    """A model directory for ``source`` (a ``.gguf`` file is dequantised once and cached)."""
    source = Path(source)
    if not source.exists():
        raise TokenbridgeError(f"{source}: no such file or directory")
    if source.is_file():
        if source.suffix != ".gguf":
            raise TokenbridgeError(f"{source}: expected a model directory or a .gguf file")
        from .gguf import cached_model_dir

        return cached_model_dir(source)
    return source


def context_length(config) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``, ``n_positions``), if it says."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(tokens: int, context: int | None, option: str = "--window", what: str = "a window",
                  model: str = "the model") -> None:
    """A sequence of ``tokens`` tokens must fit the model's ``context`` (when the model states one)."""
    if context is not None and tokens > context:
        raise TokenbridgeError(f"{what} is {tokens} tokens, more than {model}'s context of {context}; "
                               f"use a smaller {option}")


def load_causal_lm(path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32):
    """A model directory (or ``.gguf``) as ``(model, tokenizer)`` in ``dtype``, eval mode."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import read_safetensors_header, weight_files
    from .tokenizer import load_tokenizer

    directory = resolve_source(Path(path))
    if not directory.is_dir():
        raise TokenbridgeError(f"{path}: not a model directory")
    config = load_config(directory)
    files, _ = weight_files(directory, allow_pickle)
    for shard in files:  # a corrupt header is our one-line error, not transformers' traceback
        read_safetensors_header(shard)
    tokenizer = load_tokenizer(directory)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(directory), config=config, dtype=dtype, trust_remote_code=False, use_safetensors=bool(files),
                output_loading_info=True)
    except Exception as error:  # noqa: BLE001 - any load failure is a bad model directory
        message = remote_code_hint(error) or first_line(error)
        raise TokenbridgeError(f"{path}: transformers cannot load it as a causal LM ({message})") from None
    problems = [(kind, sorted(map(str, info.get(key) or ())))
                for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                  ("mis-shaped", "mismatched_keys"))]
    for kind, names in problems:
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise TokenbridgeError(f"{path}: the checkpoint does not match its config: {kind} tensor "
                                   f"{names[0]}{more}")
    if info.get("error_msgs"):
        raise TokenbridgeError(f"{path}: transformers cannot load its weights ({first_line(info['error_msgs'][0])})")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise TokenbridgeError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the embeddings only {rows} rows")
    return model.eval(), tokenizer


def empty_causal_lm(path):
    """``(model, tokenizer)`` like :func:`load_causal_lm`, but the model is built from its config on the
    meta device: its shapes without its weights (sharded training fills them in from another process)."""
    from transformers import AutoModelForCausalLM

    from .tokenizer import load_tokenizer

    directory = resolve_source(Path(path))
    config = load_config(directory)
    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return model.eval(), load_tokenizer(directory)
