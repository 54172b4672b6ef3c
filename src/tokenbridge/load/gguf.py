"""GGUF files: dequantise into a Hugging Face safetensors directory (cached).

transformers reads GGUF (``gguf_file=``) and dequantises to float32, but flags the
model as quantized and refuses ``save_pretrained``.  We rebuild the model from its
config on the meta device, assign the dequantised tensors, and save that.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import TokenbridgeError
from ..write.output_dir import check_output, staged_output


def cache_root() -> Path:
    root = os.environ.get("TOKENBRIDGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tokenbridge"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a corrupt or truncated file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"{path}: no such file")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError("tensor data past end of file")
    except TokenbridgeError:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure means a bad file
        raise TokenbridgeError(f"{path}: corrupt or truncated GGUF file ({error})") from None


def _save_tokenizer(gguf: Path, directory: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as error:  # noqa: BLE001
        raise TokenbridgeError(f"{gguf}: cannot read its tokenizer ({error})") from None
    tokenizer.save_pretrained(str(directory))


def convert_gguf(gguf: Path, out: Path, force: bool = False) -> Path:
    """Write a dequantised float32 Hugging Face directory (model + tokenizer) for ``gguf``."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf, out = Path(gguf), Path(out)
    validate_gguf(gguf)
    check_output(out, force, protected=[gguf])
    with staged_output(out, force) as tmp:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as error:  # noqa: BLE001
            raise TokenbridgeError(f"{gguf}: transformers cannot load it ({error})") from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rebuilt.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        rebuilt.tie_weights()
        del loaded
        rebuilt.save_pretrained(str(tmp))
        if rebuilt.generation_config is not None:
            rebuilt.generation_config.save_pretrained(str(tmp))
        _save_tokenizer(gguf, tmp)
    return out


def cached_model_dir(gguf: Path) -> Path:
    """The converted directory for ``gguf``, converting it on first use."""
    gguf = Path(gguf)
    validate_gguf(gguf)
    target = cache_root() / "gguf" / file_digest(gguf)[:24]
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target, force=True)
    return target


def cached_tokenizer_dir(gguf: Path) -> Path:
    """A directory holding just the tokenizer embedded in ``gguf`` (cached)."""
    gguf = Path(gguf)
    validate_gguf(gguf)
    digest = file_digest(gguf)[:24]
    full = cache_root() / "gguf" / digest
    if (full / "tokenizer_config.json").is_file():
        return full
    target = cache_root() / "gguf-tokenizer" / digest
    if not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        check_output(target, force=True)
        with staged_output(target, force=True) as tmp:
            _save_tokenizer(gguf, tmp)
    return target
