"""``tokenbridge transplant SOURCE TARGET OUT.gguf``: the transplant written as one GGUF file.

From a GGUF source, only the vocabulary matrices (``token_embd.weight``, and ``output.weight`` when
untied) are read and dequantised; the method builds their new rows in float32 as it does for a
directory.  Every other tensor is copied as its stored blocks, byte for byte, and every metadata key
but the tokenizer's is kept as it is (``<arch>.vocab_size`` follows the new vocabulary).  Memory
holds the vocabulary matrices, never the body.

The new matrices are written in the type the source stored them in; rows that are source rows as
they are (tokens copied by their bytes, matched special tokens) keep their stored bytes, so a model
transplanted onto its own tokenizer is the file it was.  ``--gguf-type`` writes them in another
type.  A type gguf-py cannot quantise to (Q4_K, Q6_K, IQ4_XS, ...) is replaced by the writable type
with the fewest bits per weight above it (Q4_K -> Q4_1, Q5_K -> Q5_1, Q6_K -> Q8_0), never a less
precise one, and the report says so.

The tokenizer metadata is the target's: copied key by key when TARGET is a GGUF file, else written
for the target tokenizer and checked (:mod:`tokenbridge.write.gguf_tokenizer`).  The provenance that
a directory keeps in ``tokenbridge.json`` is the string ``tokenbridge.provenance`` in the file.

From a model directory, the directory transplant is made beside OUT and exported
(:func:`tokenbridge.export.export_gguf`, ``--gguf-type`` the weights' type).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .arch import arch_spec, model_type_of_gguf
from .errors import TokenbridgeError
from .report import TransplantReport, peak_rss_mb
from .write import gguf as gw
from .write.gguf import PROVENANCE_KEY

INPUT, OUTPUT = "token_embd.weight", "output.weight"
QUANTISE_CHUNK = 8192  # rows quantised at a time


def vocab_tensor_type(stored, requested, name: str, shape: tuple[int, ...]) -> tuple[object, str]:
    """The type a new vocabulary matrix is written in, and how that was decided (for the report)."""
    if requested is not None:
        kind, why = gw.tensor_type(name, shape, requested)
        return kind, f"{kind.name} (--gguf-type{'; ' + why if why else ''})"
    kind = gw.nearest_writable(stored)
    if kind == stored:
        return kind, f"{kind.name} (as the source)"
    return kind, (f"{kind.name} (the source's {stored.name} cannot be written by gguf-py; {kind.name} is the "
                  f"writable type with the fewest bits per weight above it; --gguf-type chooses another)")


def encode_rows(new: torch.Tensor, kind, stored=None, copies: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``new [rows, d]`` float32 in ``kind``'s stored form.  With ``stored`` (the source matrix in the
    same type) the rows ``copies`` names take the source rows' bytes; only the others are quantised."""
    rows = new.shape[0]
    probe = gw.quantise(np.zeros((1, new.shape[1]), dtype=np.float32), kind)
    out = np.empty((rows, probe.shape[1]), dtype=probe.dtype)
    todo = np.ones(rows, dtype=bool)
    if stored is not None and copies is not None and len(copies[0]):
        targets, sources = copies[0].numpy(), copies[1].numpy()
        out[targets] = stored[sources]
        todo[targets] = False
    pending = np.flatnonzero(todo)
    for first in range(0, len(pending), QUANTISE_CHUNK):
        chosen = pending[first:first + QUANTISE_CHUNK]
        out[chosen] = gw.quantise(new[torch.from_numpy(chosen)].numpy(), kind)
    return out


def tokenizer_block(target: Path, target_tok, rows: int, label: str):
    """``(metadata, summary)`` of the target tokenizer: a GGUF target's ``tokenizer.*`` keys as they are
    (padded to ``rows`` with unused ``[PAD<id>]`` tokens when the matrices are longer), else written anew."""
    from gguf import GGUFValueType as T

    from .load.gguf import read_gguf_header
    from .write.gguf_tokenizer import UNUSED, tokenizer_metadata

    if target.is_file() and target.suffix == ".gguf":
        header = read_gguf_header(target)
        keys = [key for key in header.values if key.startswith("tokenizer.")]
        tokens = header.value("tokenizer.ggml.tokens") or []
        if len(tokens) == len(target_tok) and len(tokens) <= rows:
            metadata = [(key, header.raw(key)) for key in keys]
            if len(tokens) < rows:
                padded = {"tokenizer.ggml.tokens": (tokens + [f"[PAD{i}]" for i in range(len(tokens), rows)], T.STRING)}
                if "tokenizer.ggml.token_type" in header.values:
                    kinds = header.value("tokenizer.ggml.token_type")
                    padded["tokenizer.ggml.token_type"] = (kinds + [UNUSED] * (rows - len(kinds)), T.INT32)
                if "tokenizer.ggml.scores" in header.values:
                    scores = header.value("tokenizer.ggml.scores")
                    padded["tokenizer.ggml.scores"] = (scores + [0.0] * (rows - len(scores)), T.FLOAT32)
                metadata = [gw.kv(key, padded[key][0], T.ARRAY, padded[key][1]) if key in padded else (key, raw)
                            for key, raw in metadata]
            if "tokenizer.huggingface.json" not in header.values:
                # carried whole, as a written tokenizer is: transformers rebuilds a tokenizer from the ggml keys
                # by the file's architecture (a Gemma-3 body makes SmolLM2's byte-level BPE grow a <mask>),
                # so tokenbridge's reader takes this one
                metadata.append(gw.kv("tokenizer.huggingface.json", target_tok.backend_tokenizer.to_str(), T.STRING))
            return metadata, {"model": header.value("tokenizer.ggml.model"), "pre": header.value("tokenizer.ggml.pre"),
                              "tokens": rows, "copied_from": str(target), "checks": [], "notes": []}
    written = tokenizer_metadata(target_tok, rows, label)
    return written.metadata, written.summary()


def kept_metadata(header, rows: int, tokenizer: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The source's metadata in its order: the tokenizer's keys replaced by ``tokenizer`` (where they
    were), ``<arch>.vocab_size`` set to ``rows``, ``general.alignment`` and ``tokenbridge.*`` left out."""
    arch = header.architecture
    out = [("general.architecture", header.raw("general.architecture"))]
    placed = False
    for key in header.values:
        if key in ("general.architecture", "general.alignment") or key.startswith("tokenbridge."):
            continue
        if key.startswith("tokenizer."):
            if not placed:
                out += tokenizer
                placed = True
            continue
        out.append(gw.kv(key, rows) if key == f"{arch}.vocab_size" else (key, header.raw(key)))
    return out if placed else out + tokenizer


def _check_vocab_tensors(header, rows: int) -> None:
    for info in header.tensors.values():
        if info.name not in (INPUT, OUTPUT) and rows in info.shape:
            raise TokenbridgeError(f"{header.path}: tensor {info.name} {list(info.shape)} looks vocabulary-sized "
                                   f"but is neither {INPUT} nor {OUTPUT}")


def transplant_to_gguf(source, target, out, method: str, options: dict | None, seed: int, force: bool,
                       gguf_type: str | None, allow_pickle: bool = False, progress: bool = True,
                       directory_transplant=None) -> tuple[Path, TransplantReport]:
    """:func:`tokenbridge.pipeline.transplant` with a ``.gguf`` OUT (see the module).

    ``directory_transplant``: what makes the model directory that a directory SOURCE's GGUF is exported
    from (default :func:`tokenbridge.pipeline.transplant`; :mod:`tokenbridge.api` passes its own, which
    knows ``auto``).
    """
    from .write.output_dir import check_output

    source, target, out = Path(source), Path(target), Path(out)
    for path in (source, target):
        if not path.exists():
            raise TokenbridgeError(f"{path}: no such file or directory")
    requested = gw.parse_type(gguf_type, "--gguf-type") if gguf_type is not None else None
    check_output(out, force, protected=[source, target], file=True)
    if source.is_dir():
        return _from_directory(source, target, out, method, options, seed, force, gguf_type, allow_pickle, progress,
                               directory_transplant)
    if source.suffix != ".gguf":
        raise TokenbridgeError(f"{source}: expected a model directory or a .gguf file")
    if method == "auto":
        raise TokenbridgeError("--method auto with a .gguf OUT needs a model directory SOURCE (it scores complete "
                               "models); transplant to a directory, or name the method")
    return _from_gguf(source, target, out, method, options, seed, force, requested, progress)


def _from_directory(source, target, out, method, options, seed, force, gguf_type, allow_pickle, progress,
                    transplant=None):
    from .arch import gguf_spec
    from .export import check_config, export_gguf
    from .load.hf import load_config

    if transplant is None:
        from .pipeline import transplant
    from .write.output_dir import publish_path, scratch_dir

    # what export would refuse is refused before the transplant, not after it
    config = load_config(source)
    check_config(config, gguf_spec(config.model_type), str(source))
    with scratch_dir(publish_path(out).parent, f"{out.name}.model") as tmp:
        _, report = transplant(source, target, tmp / "model", method=method, options=options, seed=seed,
                               force=True, allow_pickle=allow_pickle, progress=progress)
        _, exported = export_gguf(tmp / "model", out, type=gguf_type, force=force, progress=progress,
                                  name=f"{Path(source).resolve().name}-transplanted")
    exported.source = str(source)
    report.gguf = exported.summary()
    report.peak_rss_mb = peak_rss_mb()
    return out, report


def _from_gguf(source, target, out, method, options, seed, force, requested, progress):
    from tqdm.auto import tqdm

    from .init.registry import check_resources, get_method, make_config
    from .load.gguf import read_gguf_header
    from .load.tokenizer import load_tokenizer
    from .pipeline import VocabSource, build_vocab
    from .write.gguf_tokenizer import transformers_check
    from .write.output_dir import staged_file

    started = time.perf_counter()
    chosen = get_method(method)
    config = make_config(chosen, options)
    check_resources(chosen, config)
    header = read_gguf_header(source)
    model_type = model_type_of_gguf(header.architecture)
    spec = arch_spec(model_type)
    if INPUT not in header.tensors:
        raise TokenbridgeError(f"{source}: no {INPUT}")
    embedding = header.tensors[INPUT]
    rows, width = embedding.shape
    tied = OUTPUT not in header.tensors
    if not tied and header.tensors[OUTPUT].shape != embedding.shape:
        raise TokenbridgeError(f"{source}: {OUTPUT} is {list(header.tensors[OUTPUT].shape)}, {INPUT} "
                               f"{list(embedding.shape)}")
    _check_vocab_tensors(header, rows)
    source_tokenizer = load_tokenizer(source)
    target_tok = load_tokenizer(target)
    vocab = VocabSource(str(source), rows, tied, read_input=lambda: torch.from_numpy(header.read_float(INPUT)),
                        read_output=None if tied else (lambda: torch.from_numpy(header.read_float(OUTPUT))))
    hidden = header.value(f"{header.architecture}.embedding_length", width)
    build = build_vocab(vocab, source_tokenizer, target_tok, spec, {"hidden_size": hidden}, method, chosen, config,
                        seed, str(source), str(target), progress)
    matrices = {INPUT: ("input", build.input)}
    if not tied:
        matrices[OUTPUT] = ("output", build.output)
    shape = (build.rows_out, width)
    types = {name: vocab_tensor_type(header.tensors[name].type, requested, name, shape) for name in matrices}
    tokenizer, tokenizer_summary = tokenizer_block(target, target_tok, build.rows_out, f"{target}")
    report = build.report
    report.gguf = {"tensors": {name: how for name, (_, how) in types.items()}, "tokenizer": tokenizer_summary}
    metadata = kept_metadata(header, build.rows_out, tokenizer) + [gw.kv(PROVENANCE_KEY, report.to_json())]

    def encoded(name: str):
        matrix, values = matrices[name]
        kind = types[name][0]

        def make() -> np.ndarray:  # called when the tensor is written
            stored = header.read(name) if kind == header.tensors[name].type else None
            return encode_rows(values, kind, stored, build.copies.get(matrix))
        return make

    tensors = [gw.GGUFTensor(name, shape, types[name][0], encoded(name)) if name in matrices
               else gw.GGUFTensor(name, info.shape, info.type, gw.FileSpan(source, info.offset, info.nbytes))
               for name, info in header.tensors.items()]
    bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing GGUF",
               disable=not progress, mininterval=0.5)
    with staged_file(out, force=force) as tmp:
        gw.write_gguf(tmp, metadata, tensors, on_tensor=lambda t: bar.update(t.nbytes))
        bar.close()
        # the float32 matrices are written: let them go before transformers rebuilds the tokenizer (1.7 GB
        # for Gemma-3's 262,144 tokens), so that the two peaks do not stack
        del tensors, build, vocab
        matrices.clear()
        # also for a GGUF target's own metadata: transformers picks its tokenizer class by the architecture, so
        # a vocabulary it reads right with Gemma's it may read wrong with the source's
        report.gguf["tokenizer"]["checks"] = list(report.gguf["tokenizer"].get("checks", [])) + [
            vars(transformers_check(tmp, target_tok))]
    report.seconds = round(time.perf_counter() - started, 3)
    report.peak_rss_mb = peak_rss_mb()
    return out, report
