"""Where tokenbridge keeps what it computes once: dequantised GGUF models, extracted tokenizers, assembled
packages, MinED mappings; and the two halves of a directory entry's life: checked on every use, written
staged with a manifest of checksums."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """``$TOKENBRIDGE_CACHE``, else ``~/.cache/tokenbridge``."""
    root = os.environ.get("TOKENBRIDGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tokenbridge"


def usable_entry(entry: Path) -> bool:
    """Whether the cache entry ``entry`` (a directory) exists and matches its manifest; a corrupt one is reported.

    Temp dirs that killed writers left beside it are swept first.
    """
    from .write.manifest import verify_manifest
    from .write.output_dir import sweep_orphans

    if entry.parent.is_dir():
        sweep_orphans(entry.parent)
    if not entry.exists():
        return False
    reason = verify_manifest(entry)
    if reason is None:
        return True
    print(f"tokenbridge: cache entry {entry} is corrupt ({reason}); rebuilding", file=sys.stderr)
    return False


@contextlib.contextmanager
def staged_entry(entry: Path):
    """Write the cache entry ``entry``: yields a temp directory that replaces it, with a manifest, on success."""
    from .write.output_dir import check_output, staged_output

    entry.parent.mkdir(parents=True, exist_ok=True)
    check_output(entry, force=True, allow_cache=True)
    with staged_output(entry, force=True, manifest=True) as tmp:
        yield tmp
