"""GGUF files: their header and tensors read on demand, or dequantised into a Hugging Face directory (cached).

transformers reads GGUF (``gguf_file=``) and dequantises to float32, but flags the
model as quantized and refuses ``save_pretrained``.  We rebuild the model from its
config on the meta device, assign the dequantised tensors, and save that.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root, staged_entry, usable_entry
from ..errors import TokenbridgeError
from .hf import first_line, quiet_transformers
from ..write.output_dir import check_output, staged_output


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


@dataclass(frozen=True)
class GGUFValue:
    """Where one metadata value lies in the file: ``[start, end)`` spans its type and its payload."""

    vtype: int
    sub_type: int | None  # arrays: the items' type
    start: int
    end: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: ``shape`` in numpy order (rows..., row length), ``offset`` absolute."""

    name: str
    type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor table, read without reading tensor data.

    gguf-py's ``GGUFReader`` parses every item of every array into its own numpy view (Gemma 3's
    262,144-token vocabulary: 9 s and 900 MB); here a value is decoded only when asked for, and copied
    as the bytes it is.
    """

    path: Path
    values: dict[str, GGUFValue]  # in file order
    tensors: dict[str, GGUFTensorInfo]  # in file order
    alignment: int

    def raw(self, key: str) -> bytes:
        """The packed value of ``key`` (its type, then its payload), byte for byte as in the file."""
        entry = self.values[key]
        with open(self.path, "rb") as handle:
            handle.seek(entry.start)
            return handle.read(entry.end - entry.start)

    def value(self, key: str, default=None):
        """``key``'s value decoded: numbers, str (bytes where not UTF-8), lists for arrays."""
        if key not in self.values:
            return default
        return _decode(self.raw(key))

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture", ""))

    def read(self, name: str, rows: slice | None = None):
        """A tensor's stored form (or a slice of its rows): ``[rows, row bytes]`` uint8 for quantised types,
        float arrays for F32/F16."""
        import numpy as np
        from gguf import GGMLQuantizationType

        info = self.tensors[name]
        count = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // count
        first, stop, _ = (rows or slice(None)).indices(count)
        stop = max(stop, first)
        with open(self.path, "rb") as handle:
            handle.seek(info.offset + first * row_bytes)
            data = bytearray(handle.read((stop - first) * row_bytes))
        if len(data) != (stop - first) * row_bytes:
            raise TokenbridgeError(f"{self.path}: truncated while reading {name}")
        shape = (stop - first, *info.shape[1:]) if len(info.shape) > 1 else info.shape
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if info.type in plain:
            return np.frombuffer(data, dtype=plain[info.type]).reshape(shape)
        return np.frombuffer(data, dtype=np.uint8).reshape(*shape[:-1], row_bytes)

    def read_float(self, name: str, chunk_rows: int = 8192):
        """A tensor dequantised to float32 by gguf-py, numpy order; done in chunks of rows, so that memory
        holds the result and one chunk's temporaries."""
        import numpy as np
        from gguf.quants import dequantize

        info = self.tensors[name]
        if len(info.shape) < 2:
            chunk_rows = 1
        out = np.empty(info.shape, dtype=np.float32)
        rows = info.shape[0] if len(info.shape) > 1 else 1
        for first in range(0, rows, chunk_rows):
            part = slice(first, min(first + chunk_rows, rows))
            try:
                values = dequantize(self.read(name, part if len(info.shape) > 1 else None), info.type)
            except NotImplementedError:
                raise TokenbridgeError(f"{self.path}: tensor {name} is {info.type.name}, which gguf-py cannot "
                                       "dequantise") from None
            if len(info.shape) > 1:
                out[part] = values.reshape(out[part].shape)
            else:
                out[...] = values.reshape(info.shape)
        return out


def _decode(packed: bytes):
    import numpy as np

    kind = struct.unpack_from("<I", packed)[0]
    if kind in _SCALAR:
        return struct.unpack_from(_SCALAR[kind], packed, 4)[0]
    if kind == 8:
        return _text(packed[12:])
    item_kind, count = struct.unpack_from("<IQ", packed, 4)
    if item_kind in _SCALAR:
        return np.frombuffer(packed, dtype=np.dtype(_SCALAR[item_kind]), count=count, offset=16).tolist()
    cursor = _Cursor(packed)
    cursor.at = 16
    if item_kind == 8:
        return [_text(cursor.string()) for _ in range(count)]
    return [_decode_item(cursor, item_kind) for _ in range(count)]


def _decode_item(cursor: "_Cursor", kind: int):
    start = cursor.at
    cursor.skip_value(kind)
    return _decode(struct.pack("<I", kind) + bytes(cursor.data[start:cursor.at]))


def _text(data: bytes):
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(data)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Walk the GGUF header and tensor table and check that the tensors account for the whole data region.

    Every tensor starts on a multiple of ``general.alignment``, no two overlap, only alignment padding lies
    between them, and the last one ends at the end of the file (give or take padding).  A bogus tensor count
    or a truncated file is a one-line error, found without reading tensor data.
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
            values: dict[str, GGUFValue] = {}
            for _ in range(kv_count):
                key = cursor.string().decode("utf-8", "replace")
                start = cursor.at
                kind = cursor.take("<I")
                sub = struct.unpack_from("<I", data, cursor.at)[0] if kind == 9 else None
                value = cursor.skip_value(kind)
                values[key] = GGUFValue(kind, sub, start, cursor.at)
                if key == "general.alignment":
                    alignment = int(value)
            if alignment <= 0:
                raise ValueError(f"general.alignment is {alignment}")
            tensors, spans = {}, []
            for _ in range(tensor_count):
                name = cursor.string().decode("utf-8", "replace")
                if name in tensors:
                    raise ValueError(f"tensor {name} is listed twice")
                dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
                kind = GGMLQuantizationType(cursor.take("<I"))
                block, type_size = GGML_QUANT_SIZES[kind]
                offset = cursor.take("<Q")
                if dims and dims[0] % block:
                    raise ValueError(f"tensor {name} has rows of {dims[0]}, not whole {kind.name} blocks of {block}")
                if offset % alignment:
                    raise ValueError(f"tensor {name} starts at offset {offset}, not a multiple of {alignment}")
                nbytes = math.prod(dims) // block * type_size
                spans.append((offset, offset + nbytes, name))
                tensors[name] = (kind, tuple(reversed(dims)), offset, nbytes)
            data_start = _align(cursor.at, alignment)
            position = 0
            for offset, stop, name in sorted(spans):
                if offset < position:
                    raise ValueError(f"tensor {name} overlaps the tensor before it")
                if offset != _align(position, alignment):
                    raise ValueError(f"{offset - position} bytes before tensor {name} belong to no tensor")
                position = stop
            end = data_start + position if spans else min(data_start, len(data))
            if end > len(data):
                raise ValueError(f"tensor data ends at byte {end}, file has {len(data)}")
            if len(data) - end >= alignment:
                raise ValueError(f"the last {len(data) - end} bytes belong to none of the "
                                 f"{tensor_count} tensors listed")
    except (ValueError, KeyError, OverflowError, struct.error) as error:
        raise TokenbridgeError(f"{path}: corrupt or truncated GGUF file ({error})") from None
    infos = {name: GGUFTensorInfo(name, kind, shape, data_start + offset, nbytes)
             for name, (kind, shape, offset, nbytes) in tensors.items()}
    return GGUFHeader(path, values, infos, alignment)


def validate_gguf(path: Path) -> None:
    """:func:`read_gguf_header`, for its checks."""
    read_gguf_header(path)


def _align(position: int, alignment: int) -> int:
    return -(-position // alignment) * alignment


ROLE_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
             "unk_token": "tokenizer.ggml.unknown_token_id", "sep_token": "tokenizer.ggml.seperator_token_id",
             "pad_token": "tokenizer.ggml.padding_token_id", "mask_token": "tokenizer.ggml.mask_token_id"}


def embedded_tokenizer(header: GGUFHeader):
    """The tokenizer a file carries whole (``tokenizer.huggingface.json``, as tokenbridge writes it), with the
    roles and chat template of its ggml keys; None when it has none, or one that does not spell the file's
    token list (then the ggml keys are the truth)."""
    text = header.value("tokenizer.huggingface.json")
    if not isinstance(text, str):
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - not a tokenizer: fall back to the ggml keys
        return None
    tokens = header.value("tokenizer.ggml.tokens") or []
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > len(tokens) or any(backend.id_to_token(i) != tokens[i] for i in range(size)):
        return None
    roles = {role: backend.id_to_token(int(header.value(key))) for role, key in ROLE_KEYS.items()
             if header.value(key) is not None and int(header.value(key)) < size}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    template = header.value("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tokenizer.chat_template = template
    return tokenizer


def _save_tokenizer(gguf: Path, directory: Path) -> None:
    from transformers import AutoTokenizer

    embedded = embedded_tokenizer(read_gguf_header(gguf))
    if embedded is not None:
        embedded.save_pretrained(str(directory))
        return
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        raise TokenbridgeError(f"{gguf}: cannot read its tokenizer ({first_line(error)})") from None
    tokenizer.save_pretrained(str(directory))


def _load_report_problem(info: dict) -> str | None:
    """The first problem in transformers' load report (``output_loading_info``), in a few words."""
    for field, state in (("missing_keys", "missing from the file"), ("unexpected_keys", "not in the architecture")):
        keys = sorted(info.get(field) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            return f"weight {keys[0]} is {state}{more}"
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        key, found, expected = mismatched[0]
        return f"weight {key} has shape {list(found)}, the architecture expects {list(expected)}"
    errors = info.get("error_msgs") or []
    if errors:
        return first_line(errors[0])
    return None


def _load_gguf_model(gguf: Path):
    """transformers' dequantised model for ``gguf``.

    Any key its load report flags (missing, unexpected, mismatched) or a non-finite weight is an error.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():  # we report the load report's problems ourselves, as one line
            loaded, info = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False,
                output_loading_info=True, ignore_mismatched_sizes=True)  # mismatches come back in info
    except Exception as error:  # noqa: BLE001
        raise TokenbridgeError(f"{gguf}: transformers cannot load it ({first_line(error)})") from None
    problem = _load_report_problem(info)
    if problem is not None:
        raise TokenbridgeError(f"{gguf}: {problem}; the file does not match its architecture")
    seen = set()
    for name, tensor in loaded.state_dict().items():
        if tensor.data_ptr() in seen or not tensor.is_floating_point():
            continue
        seen.add(tensor.data_ptr())
        if not torch.isfinite(tensor).all():
            raise TokenbridgeError(f"{gguf}: weight {name} holds NaN or infinite values; the file is corrupt")
    return loaded


def convert_gguf(gguf: Path, out: Path, force: bool = False, cache: bool = False) -> Path:
    """Write a dequantised float32 Hugging Face directory (model + tokenizer) for ``gguf``.

    ``cache``: ``out`` is a cache entry (inside :func:`cache_root`); it gets a manifest of checksums.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf, out = Path(gguf), Path(out)
    validate_gguf(gguf)
    check_output(out, force, protected=[gguf], allow_cache=cache)
    # a cache entry's manifest is written by staged_output, after its last changes to the files
    with staged_output(out, force, manifest=cache) as tmp:
        loaded = _load_gguf_model(gguf)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        rebuilt.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        rebuilt.tie_weights()
        del loaded
        rebuilt.save_pretrained(str(tmp))
        if rebuilt.generation_config is not None:
            rebuilt.generation_config.save_pretrained(str(tmp))
        _save_tokenizer(gguf, tmp)
    return out


def cached_model_dir(gguf: Path) -> Path:
    """The converted directory for ``gguf``, converting it on first use (and again when its checksums fail)."""
    gguf = Path(gguf)
    validate_gguf(gguf)
    target = cache_root() / "gguf" / file_digest(gguf)[:24]
    if not usable_entry(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target, force=True, cache=True)
    return target


def cached_tokenizer_dir(gguf: Path) -> Path:
    """A directory holding just the tokenizer embedded in ``gguf`` (cached, verified on every use).

    Its own small entry, not the converted model's: checking the model's checksums would cost every
    tokenizer load a pass over all its weights.
    """
    gguf = Path(gguf)
    validate_gguf(gguf)
    target = cache_root() / "gguf-tokenizer" / file_digest(gguf)[:24]
    if not usable_entry(target):
        with staged_entry(target) as tmp:
            _save_tokenizer(gguf, tmp)
    return target
