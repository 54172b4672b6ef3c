"""Write safetensors files one tensor at a time.

Tensors are either raw byte ranges of another safetensors file (copied in chunks,
never materialised) or in-memory tensors.  Peak memory is one copy chunk plus the
in-memory tensors the caller already holds.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..load.checkpoint import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, TensorEntry
from .copy import copy_span


@dataclass
class OutTensor:
    """A tensor to write: ``source`` (raw bytes of a checkpoint entry) or ``value``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorEntry | None = None
    value: torch.Tensor | None = None

    @staticmethod
    def copy(entry: TensorEntry) -> "OutTensor":
        return OutTensor(entry.name, entry.dtype, entry.shape, source=entry)

    @staticmethod
    def of(name: str, value: torch.Tensor) -> "OutTensor":
        return OutTensor(name, TORCH_TO_SAFETENSORS[value.dtype], tuple(value.shape), value=value.contiguous())

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * SAFETENSORS_DTYPES[self.dtype].itemsize

    def write_to(self, handle: BinaryIO) -> None:
        if self.source is not None:
            copy_span(self.source.file, self.source.start, self.source.nbytes, handle, self.name)
        elif self.nbytes:
            handle.write(memoryview(self.value.reshape(-1).view(torch.uint8).numpy()))


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None,
                      on_tensor=None) -> int:
    """Write ``tensors`` in order; returns the number of data bytes written."""
    header: dict = {}
    if metadata:  # the format allows only strings here; anything else makes the file unreadable
        header["__metadata__"] = {str(k): v for k, v in metadata.items() if isinstance(v, str)}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors:
            tensor.write_to(handle)
            if on_tensor is not None:
                on_tensor(tensor)
    return offset
