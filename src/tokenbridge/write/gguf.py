"""Write GGUF files: metadata and tensors, one tensor at a time.

gguf-py (llama.cpp's own Python package) supplies the format's constants, reads the sources and
quantises (:func:`gguf.quants.quantize`).  The header is serialised here, for two reasons: metadata
copied from a source GGUF keeps its exact bytes (gguf-py's writer re-encodes every value, and cannot
write an empty array), and tensor data streams: a tensor copied from a source file is copied in
chunks, and a computed tensor is made only when it is written, so memory holds one tensor at a time.

Types follow llama.cpp's ``convert_hf_to_gguf.py``: one-dimensional tensors and norms stay F32; a
two-dimensional weight takes the requested type, or F16 where its rows are not whole blocks of it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import TokenbridgeError
from .copy import copy_span

ALIGNMENT = 32
PROVENANCE_KEY = "tokenbridge.provenance"  # a transplant's tokenbridge.json, in the file it wrote
# The types tokenbridge offers for a model's weights, best first: those gguf-py can quantise to (it
# dequantises many more).  The ternary TQ1_0/TQ2_0 and MXFP4 it also writes are for models trained
# for them, not for the weights of an ordinary model.
CANDIDATE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q5_1": "MOSTLY_Q5_1", "Q5_0": "MOSTLY_Q5_0", "Q4_1": "MOSTLY_Q4_1", "Q4_0": "MOSTLY_Q4_0"}


# -- types ----------------------------------------------------------------------------------------

def _quant_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


@lru_cache(maxsize=1)
def writable_types() -> tuple:
    """The types gguf-py can write, of :data:`CANDIDATE_TYPES` (probed: a type it cannot quantise is left out)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import quantize

    found = []
    for name in CANDIDATE_TYPES:
        kind = _quant_type(name)
        try:
            quantize(np.zeros((1, GGML_QUANT_SIZES[kind][0]), dtype=np.float32), kind)
        except (NotImplementedError, ValueError):
            continue
        found.append(kind)
    return tuple(found)


def writable_names() -> list[str]:
    return [kind.name.lower() for kind in writable_types()]


def parse_type(text: str, option: str = "--type"):
    """``q8_0`` -> ``GGMLQuantizationType.Q8_0``; a type gguf-py cannot write is a one-line error listing those it can."""
    from gguf import GGMLQuantizationType

    name = str(text).strip().upper()
    kind = GGMLQuantizationType.__members__.get(name)
    if kind is None or kind not in writable_types():
        known = "a GGUF type gguf-py cannot quantise to" if kind is not None else "not a GGUF type"
        raise TokenbridgeError(f"{option} {text}: {known}; supported: {', '.join(writable_names())}")
    return kind


def bits_per_weight(kind) -> float:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    return size * 8 / block


def nearest_writable(kind):
    """For a type gguf-py cannot write (Q4_K, Q6_K, IQ4_XS, ...): the writable type with the fewest bits per
    weight above ``kind``'s, so that a rewritten matrix is never stored with less precision than it had."""
    if kind in writable_types():
        return kind
    above = [k for k in writable_types() if bits_per_weight(k) > bits_per_weight(kind) and k.name != "BF16"]
    return min(above, key=bits_per_weight)


def file_type(kind) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) of a file whose weights are mostly ``kind``."""
    from gguf import LlamaFileType

    return int(LlamaFileType[FILE_TYPES[kind.name]])


def is_norm_or_vector(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) <= 1 or name.endswith("_norm.weight")


def tensor_type(name: str, shape: tuple[int, ...], wanted) -> tuple[object, str | None]:
    """The type a tensor is written in, and why it is not ``wanted`` (None when it is).

    ``shape`` is in numpy order (the row length last).  Norms and vectors stay F32; a quantised type
    needs rows of whole blocks, else the tensor falls back to F16, as llama.cpp's converter does.
    """
    from gguf import GGML_QUANT_SIZES

    f32, f16 = _quant_type("F32"), _quant_type("F16")
    if is_norm_or_vector(name, shape):
        return f32, None if wanted == f32 else "norms and vectors stay F32"
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return f16, f"rows of {shape[-1]} are not whole {wanted.name} blocks of {block}"
    return wanted, None


def stored_nbytes(shape: tuple[int, ...], kind) -> int:
    """Bytes of a tensor of ``shape`` (numpy order) stored as ``kind``."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    if not shape:
        return size
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} are not whole {kind.name} blocks of {block}")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def quantise(values: np.ndarray, kind) -> np.ndarray:
    """``values`` (float32, numpy order) in ``kind``'s stored form, by gguf-py."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(values, dtype=np.float32), kind)


# -- metadata -------------------------------------------------------------------------------------

_SCALARS = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
            "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return struct.pack("<Q", len(data)) + data


def pack_value(value, vtype, sub_type=None) -> bytes:
    """One metadata value as GGUF stores it: its type, then the value (an array: item type, count, items)."""
    from gguf import GGUFValueType

    head = struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return head + _string(value)
    if vtype == GGUFValueType.ARRAY:
        items = list(value)
        body = struct.pack("<IQ", int(sub_type), len(items))
        if sub_type == GGUFValueType.STRING:
            return head + body + b"".join(_string(item) for item in items)
        fmt = _SCALARS[sub_type.name]
        return head + body + np.asarray(items, dtype=np.dtype(fmt)).tobytes()
    return head + struct.pack(_SCALARS[vtype.name], value)


def kv(key: str, value, vtype=None, sub_type=None) -> tuple[str, bytes]:
    """A metadata entry ``(key, packed value)``; the type is taken from the value when not given
    (str, bool, int -> UINT32, float -> FLOAT32, list of str/int/float)."""
    if vtype is None:
        vtype, sub_type = _infer(value)
    return key, pack_value(value, vtype, sub_type)


def _infer(value):
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        return T.BOOL, None
    if isinstance(value, int):
        return T.UINT32, None
    if isinstance(value, float):
        return T.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return T.STRING, None
    if isinstance(value, (list, tuple)) and value:
        return T.ARRAY, _infer(value[0])[0]
    raise TypeError(f"no GGUF type for {value!r}")


# -- tensors and the file -------------------------------------------------------------------------

@dataclass(frozen=True)
class FileSpan:
    """Bytes of another file, copied as they are."""

    path: Path
    offset: int
    nbytes: int


@dataclass
class GGUFTensor:
    """One tensor to write: ``shape`` in numpy order (rows..., row length), ``data`` its stored bytes:
    a :class:`FileSpan`, or a function returning them (called when the tensor is written)."""

    name: str
    shape: tuple[int, ...]
    type: object  # GGMLQuantizationType
    data: FileSpan | Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.shape, self.type)


def _padding(position: int, alignment: int = ALIGNMENT) -> bytes:
    return b"\0" * (-position % alignment)


def write_gguf(path: Path, metadata: list[tuple[str, bytes]], tensors: list[GGUFTensor],
               on_tensor: Callable[[GGUFTensor], None] | None = None) -> int:
    """Write a GGUF v3 file at ``path``; returns its size.  ``metadata``: ``(key, packed value)`` in order
    (``general.architecture`` among them); tensors are written in the order given."""
    from gguf import GGUF_MAGIC

    keys = [key for key, _ in metadata]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate metadata keys: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    with open(path, "wb") as out:
        out.write(struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), len(metadata)))
        for key, packed in metadata:
            out.write(_string(key) + packed)
        offset = 0
        for tensor in tensors:
            dims = tuple(reversed(tensor.shape)) or (1,)
            out.write(_string(tensor.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                      + struct.pack("<IQ", int(tensor.type), offset))
            offset += tensor.nbytes + len(_padding(tensor.nbytes))
        out.write(_padding(out.tell()))
        for tensor in tensors:
            _write_data(out, tensor)
            out.write(_padding(tensor.nbytes))
            if on_tensor is not None:
                on_tensor(tensor)
        return out.tell()


def _write_data(out, tensor: GGUFTensor) -> None:
    if isinstance(tensor.data, FileSpan):
        copy_span(tensor.data.path, tensor.data.offset, tensor.data.nbytes, out, tensor.name)
        return
    data = np.ascontiguousarray(tensor.data())
    if data.nbytes != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: {data.nbytes} bytes for a {tensor.type.name} tensor of "
                             f"{list(tensor.shape)} ({tensor.nbytes} expected)")
    out.write(memoryview(data).cast("B"))
