"""Reading the user's text files: one rule for every instrument.

A file is UTF-8 text: a missing, unreadable, empty or non-UTF-8 file is a TokenbridgeError naming
it.  :func:`text_blocks` reads it in blocks, so that an instrument can stream a file larger than it
could hold as a Python string; :func:`read_text` is the same reader, joined.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from ..errors import TokenbridgeError

BLOCK = 1 << 20  # bytes read at a time


def text_blocks(path: Path, block: int = BLOCK) -> Iterator[str]:
    """A text file as UTF-8, in strings of at most ``block`` bytes' worth; never the whole file at once.

    The errors are :func:`read_text`'s; they are raised when reached, so a file found not to be
    UTF-8 half-way has already yielded its first half.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes handed to the decoder so far
    try:
        with path.open("rb") as file:
            while True:
                data = file.read(block)
                pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the last block
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as error:
                    offset = consumed - pending + error.start
                    raise TokenbridgeError(f"{path}: not UTF-8 text (invalid byte at offset {offset})") from None
                consumed += len(data)
                if text:
                    yield text
                if not data:
                    break
    except OSError as error:
        raise TokenbridgeError(f"{path}: cannot read ({error.strerror or error})") from None
    if consumed == 0:
        raise TokenbridgeError(f"{path}: the file is empty")


def check_text(path: Path) -> int:
    """Read a text file through (in blocks) and return its size in UTF-8 bytes; errors as :func:`read_text`."""
    return sum(len(block.encode("utf-8")) for block in text_blocks(path))


def read_text(path: Path) -> str:
    """A text file as UTF-8; a missing, unreadable, empty or non-UTF-8 file is a TokenbridgeError naming it."""
    return "".join(text_blocks(path))
