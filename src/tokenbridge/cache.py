"""Where tokenbridge keeps what it computes once: dequantised GGUF models, extracted tokenizers, assembled packages."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$TOKENBRIDGE_CACHE``, else ``~/.cache/tokenbridge``."""
    root = os.environ.get("TOKENBRIDGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tokenbridge"
