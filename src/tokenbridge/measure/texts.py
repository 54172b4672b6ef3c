"""Reading the user's text files: one rule for every instrument."""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenbridgeError


def read_text(path: Path) -> str:
    """A text file as UTF-8; a missing, unreadable, empty or non-UTF-8 file is a TokenbridgeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenbridgeError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    except OSError as error:
        raise TokenbridgeError(f"{path}: cannot read ({error.strerror or error})") from None
    if not text:
        raise TokenbridgeError(f"{path}: the file is empty")
    return text
