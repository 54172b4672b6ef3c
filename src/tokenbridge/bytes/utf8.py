"""UTF-8 prefixes: what a byte string may still become."""

from __future__ import annotations

import codecs


def utf8_prefix_ok(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 up to a possibly unfinished last character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def unfinished_tail(data: bytes) -> bytes:
    """The bytes of an unfinished UTF-8 character at the end of ``data`` (b"" if none)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:
            need = 1 if byte < 0x80 else 2 if byte >= 0xC0 and byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[-back:] if back < need else b""
    return b""
