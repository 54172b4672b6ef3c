"""Checksums of a directory's files, written beside them and verified before the files are trusted.

Cache entries (converted GGUF models, extracted tokenizers) and heal checkpoints carry a
``tokenbridge-manifest.json``: every file's size and SHA-256.  :func:`verify_manifest` says what is
wrong with a directory (a missing, truncated, changed or unexpected file, or no manifest at all);
the caller rebuilds a cache entry, or refuses a checkpoint, instead of using it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "tokenbridge-manifest.json"
MANIFEST_FORMAT = "tokenbridge-manifest/1"
_BLOCK = 8 * 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(directory: Path) -> Path:
    """Record the size and SHA-256 of every file under ``directory`` (call it last, before publishing)."""
    directory = Path(directory)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
               for p in _files(directory)}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1, sort_keys=True) + "\n")
    return path


def verify_manifest(directory: Path) -> str | None:
    """``None`` when every file matches the manifest, else what is wrong, in a few words."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError
        expected = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_NAME} is corrupt"
    present = {p.relative_to(directory).as_posix(): p for p in _files(directory)}
    for name in sorted(set(present) - set(expected)):
        return f"{name} is not in the manifest"
    for name, (size, digest) in sorted(expected.items()):
        file = present.get(name)
        if file is None:
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file_sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


MODEL_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def model_digest(directory: Path) -> str:
    """SHA-256 over a model directory's config, weights and tokenizer: what the model *is*, wherever it lies."""
    directory = Path(directory)
    names = [n for n in MODEL_FILES if (directory / n).is_file()]
    names += sorted(p.name for p in directory.iterdir()
                    if p.is_file() and (p.suffix == ".safetensors" or p.name.startswith("pytorch_model")))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{file_sha256(directory / name)}\n".encode())
    return digest.hexdigest()
