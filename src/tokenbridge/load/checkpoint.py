"""Safetensors checkpoints read tensor by tensor, without instantiating a model.

The header of every shard is parsed and validated here (a truncated or corrupt
file is caught before anything is written).  Vocabulary-sized tensors are read
into memory on request; every other tensor is copied as raw bytes by the writer.
"""

from __future__ import annotations

import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TokenbridgeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a safetensors file: where its bytes are."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Checkpoint:
    """A model directory's config and the tensors of its safetensors shards."""

    directory: Path
    config: dict
    files: list[Path]
    tensors: dict[str, TensorEntry]
    file_metadata: dict[Path, dict] = field(default_factory=dict)
    indexed: bool = False  # the source has model.safetensors.index.json (kept in the output)
    _keepalive: object | None = None  # temporary directory of a converted pickle checkpoint

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory in its stored dtype."""
        entry = self.tensors[name]
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            data = bytearray(handle.read(entry.nbytes))
        if len(data) != entry.nbytes:
            raise TokenbridgeError(f"{entry.file}: truncated while reading {name}")
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat.reshape(entry.shape)

    def tensors_in(self, path: Path) -> list[TensorEntry]:
        return [t for t in self.tensors.values() if t.file == path]


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (header, data start offset)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise TokenbridgeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise TokenbridgeError(f"{path}: corrupt or truncated safetensors header")
            header_bytes = handle.read(header_len)
    except OSError as error:
        raise TokenbridgeError(f"{path}: cannot read ({error.strerror})") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TokenbridgeError(f"{path}: corrupt safetensors header (not JSON)") from None
    except RecursionError:
        raise TokenbridgeError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise TokenbridgeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise TokenbridgeError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop, dtype, shape = _entry(path, name, info)
        numel = 1
        for dim in shape:
            numel *= dim
        if stop - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise TokenbridgeError(f"{path}: corrupt safetensors entry {name!r} (size does not match shape)")
        spans.append((begin, stop, name))
    spans.sort()
    position = 0
    for begin, stop, name in spans:
        if begin != position:
            problem = "overlaps another" if begin < position else "leaves a gap before it"
            raise TokenbridgeError(f"{path}: corrupt safetensors entry {name!r} ({problem})")
        position = stop
    if data_start + position != size:
        raise TokenbridgeError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header describes {data_start + position})"
        )
    return header, data_start


def _entry(path: Path, name: str, info) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, every field's type checked."""
    def bad(why: str):
        return TokenbridgeError(f"{path}: corrupt safetensors entry {name!r} ({why})")

    if not isinstance(info, dict):
        raise bad("not an object")
    offsets, dtype, shape = info.get("data_offsets"), info.get("dtype"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(x) for x in offsets)):
        raise bad("data_offsets must be two non-negative integers")
    if offsets[0] > offsets[1]:
        raise bad("data_offsets end before they begin")
    if not isinstance(dtype, str):
        raise bad("dtype must be a string")
    if dtype not in SAFETENSORS_DTYPES:
        raise TokenbridgeError(f"{path}: unsupported dtype {dtype} for {name}")
    if not (isinstance(shape, list) and all(_whole(x) for x in shape)):
        raise bad("shape must be a list of non-negative integers")
    return offsets[0], offsets[1], dtype, tuple(shape)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _load_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise TokenbridgeError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenbridgeError(f"{path}: does not parse as JSON ({error})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise TokenbridgeError(f"{path}: no model_type")
    return config


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise TokenbridgeError(f"{index}: corrupt index") from None
        names = sorted(set(weight_map.values()))
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TokenbridgeError(f"{index}: shard missing: {missing[0]}")
        return files
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def weight_files(directory: Path, allow_pickle: bool) -> tuple[list[Path], list[Path]]:
    """``(safetensors shards, [])``, or ``([], pickle files)`` when there are only those and ``allow_pickle``."""
    files = _safetensors_files(directory)
    if files:
        return files, []
    pickles = _pickle_files(directory)
    if not pickles:
        raise TokenbridgeError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    if not allow_pickle:
        raise TokenbridgeError(
            f"{directory}: only a pickle checkpoint ({pickles[0].name}); pickle can run code when loaded, "
            "pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    return [], pickles


def _pickle_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name in PICKLE_NAMES or p.name.startswith("pytorch_model-"))


def _convert_pickle(directory: Path, pickles: list[Path]) -> tuple[Path, tempfile.TemporaryDirectory]:
    """Load a pickle checkpoint with ``weights_only=True`` and save it as safetensors in a temp dir."""
    from safetensors.torch import save_file

    from ..write.output_dir import owner_prefix, sweep_orphans

    sweep_orphans(Path(tempfile.gettempdir()))
    tmp = tempfile.TemporaryDirectory(prefix=owner_prefix("pickle"), dir=tempfile.gettempdir())
    state: dict[str, torch.Tensor] = {}
    for path in pickles:
        if path.suffix == ".json":
            continue
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad input
            raise TokenbridgeError(f"{path}: cannot load pickle checkpoint ({type(error).__name__})") from None
        state.update({k: v.contiguous() for k, v in loaded.items()})
    # Tied tensors share storage; safetensors refuses shared storage, so clone duplicates.
    seen: set[int] = set()
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            state[key] = value.clone()
        seen.add(pointer)
    save_file(state, str(Path(tmp.name) / "model.safetensors"))
    return Path(tmp.name) / "model.safetensors", tmp


def open_checkpoint(directory: Path, allow_pickle: bool = False) -> Checkpoint:
    """Open a Hugging Face model directory and validate every safetensors shard."""
    directory = Path(directory)
    if not directory.exists():
        raise TokenbridgeError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise TokenbridgeError(f"{directory}: expected a model directory or a .gguf file")
    config = _load_config(directory)
    files, pickles = weight_files(directory, allow_pickle)
    keepalive = None
    if pickles:
        converted, keepalive = _convert_pickle(directory, pickles)
        files = [converted]
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[Path, dict] = {}
    for path in files:
        header, data_start = read_safetensors_header(path)
        metadata[path] = header.get("__metadata__") or {}
        entries = sorted(
            ((name, info) for name, info in header.items() if name != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        )
        for name, info in entries:
            begin, stop = info["data_offsets"]
            if name in tensors:
                raise TokenbridgeError(f"{path}: tensor {name} appears in two shards")
            tensors[name] = TensorEntry(
                name, path, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + stop
            )
    indexed = (directory / "model.safetensors.index.json").is_file() and keepalive is None
    return Checkpoint(directory, config, files, tensors, metadata, indexed, keepalive)
