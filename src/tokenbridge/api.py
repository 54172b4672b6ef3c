"""``tokenbridge.transplant``: the transplant a user calls, with ``method="auto"`` included.

A named method runs the pipeline (:func:`tokenbridge.pipeline.transplant`); ``auto`` is method
selection, a step of the planner above the pipeline (:mod:`tokenbridge.adapt.select`), which calls
the pipeline once per candidate.  Routing it here keeps the pipeline free of any import of the
layer above it.
"""

from __future__ import annotations

from pathlib import Path

from . import checks
from .errors import TokenbridgeError
from .pipeline import transplant as pipeline_transplant
from .report import TransplantReport


def transplant(source, target_tokenizer, out, method: str = "subword", options: dict | None = None,
               seed: int = 0, force: bool = False, allow_pickle: bool = False,
               progress: bool = True, gguf_type: str | None = None) -> tuple[Path, TransplantReport]:
    """Give the model at ``source`` the tokenizer at ``target_tokenizer``; write it to ``out``.

    Returns the written directory (or file) and a :class:`TransplantReport`.  ``method="auto"`` tries
    the methods the options allow and keeps the best on held-out text (:mod:`tokenbridge.adapt.select`).
    An ``out`` ending in ``.gguf`` is one GGUF file (:mod:`tokenbridge.transplant_gguf`); ``gguf_type``
    is then the type of its embedding and output matrices.
    """
    if method != "auto":
        return pipeline_transplant(source, target_tokenizer, out, method=method, options=options, seed=seed,
                                   force=force, allow_pickle=allow_pickle, progress=progress, gguf_type=gguf_type)
    seed = checks.seed(seed)
    if Path(out).suffix == ".gguf":
        from .transplant_gguf import transplant_to_gguf

        return transplant_to_gguf(source, target_tokenizer, out, method, options, seed, force, gguf_type,
                                  allow_pickle, progress, directory_transplant=transplant)
    if gguf_type is not None:
        raise TokenbridgeError("--gguf-type applies only to a .gguf OUT")
    from .adapt.select import auto_transplant

    return auto_transplant(source, target_tokenizer, out, options, seed, force, allow_pickle, progress)
