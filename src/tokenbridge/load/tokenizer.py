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
    """A transformers fast tokenizer for ``path``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = tokenizer_dir(Path(path))
    try:
        if source.is_file():
            if source.name != "tokenizer.json" and source.suffix != ".json":
                raise TokenbridgeError(f"{source}: expected a tokenizer.json, a tokenizer directory or a .gguf file")
            if (source.parent / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(str(source.parent))
            else:
                tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except TokenbridgeError:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad tokenizer file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TokenbridgeError(f"{path}: tokenizer does not parse ({message})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenbridgeError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    if len(tokenizer) == 0:
        raise TokenbridgeError(f"{path}: the tokenizer's vocabulary is empty")
    return tokenizer
