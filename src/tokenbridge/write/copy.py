"""Copying a stretch of one file into another, in blocks: how the writers carry stored tensors across."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ..errors import TokenbridgeError

COPY_CHUNK = 16 * 1024 * 1024


def copy_span(path: Path, offset: int, nbytes: int, out: BinaryIO, what: str) -> None:
    """Write ``nbytes`` of ``path`` from ``offset`` on to ``out``; a file that ends first is an error naming ``what``."""
    with open(path, "rb") as source:
        source.seek(offset)
        left = nbytes
        while left:
            block = source.read(min(COPY_CHUNK, left))
            if not block:
                raise TokenbridgeError(f"{path}: ended early while copying {what}")
            out.write(block)
            left -= len(block)
