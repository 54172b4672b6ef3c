"""Load a tokenizer from a directory, a model directory, a ``tokenizer.json`` or a ``.gguf`` file."""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenbridgeError


def tokenizer_dir(path: Path) -> Path:
    """The directory ``AutoTokenizer`` should read for ``path`` (GGUF tokenizers are extracted, cached)."""
    path = Path(path)
    if not path.exists():
        raise TokenbridgeError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import cached_tokenizer_dir

        return cached_tokenizer_dir(path)
    if path.is_file():
        return path
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise TokenbridgeError(f"{path}: no tokenizer.json or tokenizer_config.json")
    return path


def load_tokenizer(path: Path):
    """A transformers fast tokenizer for ``path``; never runs code from ``path`` (``trust_remote_code=False``)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ..align.token_bytes import ids_by_token
    from .hf import first_line, quiet_transformers, remote_code_hint

    source = tokenizer_dir(Path(path))
    try:
        with quiet_transformers():
            if source.is_file():
                if source.name != "tokenizer.json" and source.suffix != ".json":
                    raise TokenbridgeError(f"{source}: expected a tokenizer.json, a tokenizer directory or a .gguf file")
                if (source.parent / "tokenizer_config.json").is_file():
                    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), trust_remote_code=False)
                else:
                    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source))
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except TokenbridgeError:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad tokenizer file
        _config_problem(source if source.is_dir() else source.parent)
        hint = remote_code_hint(error, "tokenizer")
        if hint:
            raise TokenbridgeError(f"{path}: the tokenizer {hint}") from None
        raise TokenbridgeError(f"{path}: tokenizer does not parse ({first_line(error)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenbridgeError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    tokenizer = _as_written(tokenizer, source)
    ids_by_token(tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True), f"{path}")
    return tokenizer


def _config_problem(directory: Path) -> None:
    """transformers reads a model directory's ``config.json`` to pick the tokenizer class: a bad config is
    reported as such, not as a tokenizer that does not parse."""
    if (directory / "config.json").is_file():
        from .hf import load_config

        load_config(directory)


def _as_written(tokenizer, source: Path):
    """The tokenizer exactly as its ``tokenizer.json`` says.

    transformers 5 maps some model types (``qwen2``, ``phi3``, ...) to a tokenizer class that rebuilds
    the normalizer and pre-tokenizer from the class's own defaults, ignoring ``tokenizer.json``.  A
    transplanted model keeps its architecture's model type but carries another tokenizer, so such a
    class would silently tokenize differently; load the file's own pipeline instead.
    """
    import json

    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if type(tokenizer) is TokenizersBackend:  # the generic class loads tokenizer.json verbatim
        return tokenizer
    file = source if source.is_file() else source / "tokenizer.json"
    if not file.is_file():
        return tokenizer
    written = json.loads(file.read_text(encoding="utf-8"))
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    keys = ("normalizer", "pre_tokenizer", "model", "decoder")
    if all(_model_view(loaded.get(k)) == _model_view(written.get(k)) for k in keys):
        return tokenizer
    directory = file.parent
    if (directory / "tokenizer_config.json").is_file():
        return TokenizersBackend.from_pretrained(str(directory), trust_remote_code=False)
    return TokenizersBackend(tokenizer_file=str(file))


def _model_view(part):
    """A component as compared: the vocabulary and merges are compared by size only (cheap)."""
    if isinstance(part, dict) and "vocab" in part:
        view = {k: v for k, v in part.items() if k not in ("vocab", "merges")}
        view["sizes"] = (len(part.get("vocab") or ()), len(part.get("merges") or ()))
        return view
    return part
