"""GGUF files: dequantise into a Hugging Face safetensors directory (cached).

transformers reads GGUF (``gguf_file=``) and dequantises to float32, but flags the
model as quantized and refuses ``save_pretrained``.  We rebuild the model from its
config on the meta device, assign the dequantised tensors, and save that.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
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


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, data):
        self.data = data
        self.at = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError("file ends inside the header")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> bytes:
        length = self.take("<Q")
        if self.at + length > len(self.data):
            raise ValueError("file ends inside a string")
        value = self.data[self.at:self.at + length]
        self.at += length
        return value

    def skip_value(self, kind: int):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind in _SCALAR:
                size = struct.calcsize(_SCALAR[item_kind]) * count
                if self.at + size > len(self.data):
                    raise ValueError("file ends inside an array")
                self.at += size
            else:
                for _ in range(count):
                    self.skip_value(item_kind)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def validate_gguf(path: Path) -> None:
    """Walk the GGUF header and tensor table and check every tensor's bytes lie inside the file.

    A corrupt or truncated file is a one-line error, found without reading tensor data.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"{path}: no such file")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data)
            if data[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            cursor.at = 4
            version = cursor.take("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
            alignment = 32
            for _ in range(kv_count):
                key = cursor.string()
                value = cursor.skip_value(cursor.take("<I"))
                if key == b"general.alignment":
                    alignment = int(value)
            end = 0
            for _ in range(tensor_count):
                cursor.string()
                dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(cursor.take("<I"))]
                offset = cursor.take("<Q")
                numel = 1
                for dim in dims:
                    numel *= dim
                end = max(end, offset + numel // block * type_size)
            data_start = -(-cursor.at // alignment) * alignment
            if data_start + end > len(data):
                raise ValueError(f"tensor data ends at byte {data_start + end}, file has {len(data)}")
    except (ValueError, KeyError, OverflowError, struct.error) as error:
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
