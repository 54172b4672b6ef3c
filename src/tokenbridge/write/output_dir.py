"""Publish an output directory atomically: build it in a sibling temp dir, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import TokenbridgeError


def check_output(out: Path, force: bool, protected: list[Path] = ()) -> None:
    """Refuse an OUT that exists and is not empty (unless ``force``) or that holds an input."""
    out = Path(out)
    resolved = out.resolve()
    for path in protected:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            raise TokenbridgeError(f"{out}: the output would overwrite an input ({path})")
    if out.exists():
        if not out.is_dir():
            raise TokenbridgeError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise TokenbridgeError(f"{out}: exists and is not empty (pass --force to replace it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TokenbridgeError(f"{parent}: exists and is not a directory")
            break


@contextlib.contextmanager
def staged_output(out: Path, force: bool):
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # missing parents are created, like mkdir -p
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tokenbridge-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()) and not force:
                raise TokenbridgeError(f"{out}: appeared while writing and is not empty (pass --force)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
