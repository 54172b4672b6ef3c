"""The transplant pipeline: load -> align -> initialise -> write.

Only the vocabulary-sized tensors (input embeddings, output head, vocabulary
bias) are read into memory; every other tensor is streamed byte for byte from the
source shards into the output shards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks
from .align.encode import ByteEncoder
from .align.token_bytes import Vocabulary, vocabulary
from .align.vocab import ROLES, Alignment, align
from .arch import ArchSpec, arch_spec
from .arch.spec import set_dotted
from .errors import TokenbridgeError
from .init.registry import MethodInputs, TransplantContext, check_resources, get_method, make_config
from .load.checkpoint import Checkpoint, open_checkpoint
from .load.hf import load_config
from .load.model import resolve_source  # noqa: F401 (re-exported for callers of pipeline.resolve_source)
from .load.tokenizer import load_tokenizer
from .report import RowProvenance, SpecialMatch, TransplantReport, peak_rss_mb
from .write.output_dir import check_output, staged_output
from .write.safetensors_stream import OutTensor, write_safetensors


METHOD_CHUNK = 16384  # new tokens handed to a method at a time


@dataclass
class VocabTensors:
    """Checkpoint names of the vocabulary-sized tensors present in one source."""

    input: list[str]
    output: list[str]
    output_bias: list[str]


def locate_vocab_tensors(checkpoint: Checkpoint, spec: ArchSpec, tied: bool) -> VocabTensors:
    present = checkpoint.tensors
    found = VocabTensors(
        input=[n for n in spec.input if n in present],
        output=[n for n in spec.output if n in present],
        output_bias=[n for n in spec.output_bias if n in present],
    )
    if not found.input:
        raise TokenbridgeError(
            f"{checkpoint.directory}: no input embeddings (looked for {', '.join(spec.input)})"
        )
    if not tied and not found.output:
        raise TokenbridgeError(
            f"{checkpoint.directory}: untied model without an output head (looked for {', '.join(spec.output)})"
        )
    for kind, names, dims in (("input embeddings", found.input, 2), ("output head", found.output, 2),
                              ("output bias", found.output_bias, 1)):
        for name in names:
            shape = present[name].shape
            if len(shape) != dims or 0 in shape:
                raise TokenbridgeError(f"{checkpoint.directory}: {kind} {name} has shape {list(shape)}, "
                                       f"expected {dims} non-empty dimension{'s' if dims > 1 else ''}")
    rows = present[found.input[0]].shape[0]
    for name in found.output + found.output_bias:
        if present[name].shape[0] != rows:
            raise TokenbridgeError(f"{checkpoint.directory}: {name} has {present[name].shape[0]} rows, the input "
                                   f"embeddings {rows}")
    known = set(found.input + found.output + found.output_bias)
    for name, entry in present.items():
        if name not in known and rows in entry.shape:
            raise TokenbridgeError(
                f"{checkpoint.directory}: tensor {name} {list(entry.shape)} looks vocabulary-sized but "
                f"architecture {spec.model_type!r} does not say what it is (tokenbridge/arch/architectures.json)"
            )
    return found


def is_tied(checkpoint: Checkpoint) -> bool:
    """The config's ``tie_word_embeddings``, with the architecture's default where it is absent."""
    if "tie_word_embeddings" in checkpoint.config:
        return bool(checkpoint.config["tie_word_embeddings"])
    return bool(getattr(load_config(checkpoint.directory), "tie_word_embeddings", True))


def padded_size(target_size: int, source_rows: int, source_vocab: int) -> int:
    """Keep the source's habit of padding the vocabulary dimension (e.g. to a multiple of 64)."""
    if source_rows <= source_vocab:
        return target_size
    multiple = 1
    while multiple < 256 and source_rows % (multiple * 2) == 0:
        multiple *= 2
    return -(-target_size // multiple) * multiple


class _Builder:
    """Builds one vocabulary-sized matrix from the alignment and a method."""

    def __init__(self, alignment: Alignment, method, config, source_encoder: ByteEncoder, seed: int,
                 rows_out: int, embed_scale: float, progress: bool, prepared=None):
        self.alignment = alignment
        self.prepared = prepared
        self.method = method
        self.config = config
        self.encoder = source_encoder
        self.seed = seed
        self.rows_out = rows_out
        self.embed_scale = embed_scale
        self.progress = progress
        self.target_ids = torch.tensor([m.target_id for m in alignment.matches], dtype=torch.int64)
        self.source_ids = torch.tensor([m.source_id for m in alignment.matches], dtype=torch.int64)
        self.copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def generator(self, matrix: str) -> torch.Generator:
        offset = int.from_bytes(hashlib.sha256(matrix.encode()).digest()[:4], "little")
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def build(self, stored: torch.Tensor, matrix: str) -> tuple[torch.Tensor, list[RowProvenance]]:
        """``stored [V_rows, d]`` (source dtype) -> ``[rows_out, d]`` in the same dtype, plus provenance.

        Which output rows are stored rows as they are is kept in ``self.copies[matrix]``:
        ``(target ids, source ids)``, for writers that copy those rows' stored bytes.
        """
        source_vocab = len(self.alignment.source)
        work = stored[:source_vocab].float()
        out = torch.empty((self.rows_out, stored.shape[1]), dtype=stored.dtype)
        out[self.target_ids] = stored[self.source_ids]
        target = self.alignment.target
        new_tokens = [target.tokens[i] for i in self.alignment.new]
        generator = self.generator(matrix)
        provenance = []
        bar = tqdm(total=len(new_tokens), desc=f"{self.method.name} ({matrix})", unit="tok", mininterval=1.0,
                   disable=not self.progress or not new_tokens)
        # Methods treat each token on its own; chunks bound the memory of their intermediate rows.
        for begin in range(0, len(new_tokens), METHOD_CHUNK):
            chunk = new_tokens[begin:begin + METHOD_CHUNK]
            inputs = MethodInputs(work, matrix, chunk, self.alignment.source, self.encoder, generator,
                                  self.embed_scale, self.prepared)
            result = self.method.fn(inputs, self.config)
            if result.rows.shape != (len(chunk), stored.shape[1]):
                raise AssertionError(f"method {self.method.name} returned rows of shape {tuple(result.rows.shape)}")
            out[torch.tensor([t.id for t in chunk])] = result.rows.to(stored.dtype)
            labels = result.how or [self.method.name] * len(chunk)
            for info, ids, weights, fell, label in zip(chunk, result.source_ids, result.weights, result.fallback,
                                                       labels):
                how = "fallback:mean" if fell else label
                provenance.append(RowProvenance(info.id, info.token, how, list(ids), [round(w, 6) for w in weights]))
            del result
            bar.update(len(chunk))
        bar.close()
        mean = work.mean(dim=0).to(stored.dtype)
        for index in self.alignment.unmatched_special:
            out[index] = mean
            provenance.append(RowProvenance(index, target.tokens[index].token, "special:unmatched"))
        padding = []
        for index in range(len(target), self.rows_out):
            if index < stored.shape[0] and index >= source_vocab:
                out[index] = stored[index]
                padding.append(index)
                provenance.append(RowProvenance(index, "", "padding", [index], [1.0]))
            else:
                out[index] = mean
                provenance.append(RowProvenance(index, "", "padding"))
        provenance.sort(key=lambda p: p.target_id)
        kept = torch.tensor(padding, dtype=torch.int64)
        self.copies[matrix] = (torch.cat([self.target_ids, kept]), torch.cat([self.source_ids, kept]))
        return out, provenance

    def bias(self, stored: torch.Tensor, provenance: list[RowProvenance]) -> torch.Tensor:
        """A vocabulary bias: copied rows copied, new rows combined with the rows' own weights."""
        out = torch.empty((self.rows_out,), dtype=stored.dtype)
        out[self.target_ids] = stored[self.source_ids]
        mean = stored[: len(self.alignment.source)].float().mean()
        for row in provenance:
            if row.source_ids:
                value = sum(w * float(stored[i]) for i, w in zip(row.source_ids, row.weights))
            else:
                value = mean
            out[row.target_id] = value
        return out


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for role in ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            ids[role] = int(token_id)
    return ids


def _map_ids(value, role: str, alignment: Alignment, fallback: int | None):
    """Map the source id(s) of a config's ``<role>_token_id`` to target ids.

    A source id maps to the target specials matched to it by content, by this same role, or by chat
    role (so a source eos ``<|im_end|>`` brings ``<end_of_turn>`` but not a pad that shares its row).
    The target tokenizer's own token for the role comes first.
    """
    def targets(source_id):
        return [m.target_id for m in alignment.matches if m.source_id == source_id and (
            m.how in ("special:content", f"special:role:{role}") or m.how.startswith("special:chat:"))]

    if isinstance(value, list):
        mapped = [] if fallback is None else [fallback]
        for item in value:
            for target in targets(item):
                if target not in mapped:
                    mapped.append(target)
        return mapped
    if fallback is not None:
        return fallback
    found = targets(value) if isinstance(value, int) else []
    return found[0] if found else None


def _update_special_ids(config: dict, target_ids: dict[str, int], alignment: Alignment) -> dict:
    """Set ``<role>_token_id`` keys from the target tokenizer; lists (several eos) keep their mapped members."""
    updated = dict(config)
    for role in ROLES:
        key = f"{role}_token_id"
        if key in updated:
            updated[key] = _map_ids(updated[key], role, alignment, target_ids.get(role))
    return updated


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class VocabSource:
    """A source model's vocabulary-sized matrices, read when the transplant needs them (stored dtype)."""

    label: str  # the model, as messages name it
    rows: int
    tied: bool
    read_input: Callable[[], torch.Tensor]
    read_output: Callable[[], torch.Tensor] | None = None  # None: no output head (tied)
    read_bias: Callable[[], torch.Tensor] | None = None


@dataclass
class VocabBuild:
    """A transplant's new vocabulary matrices and its report, before anything is written."""

    input: torch.Tensor
    output: torch.Tensor | None  # the input matrix itself when tied; None without an output head
    bias: torch.Tensor | None
    rows_out: int
    alignment: Alignment
    target_tokenizer: object
    target_special_ids: dict[str, int]
    copies: dict[str, tuple[torch.Tensor, torch.Tensor]]  # matrix -> rows that are stored rows as they are
    report: TransplantReport


def build_vocab(source: VocabSource, source_tokenizer, target_tok, spec: ArchSpec, model_config: dict,
                method: str, chosen, config, seed: int, source_name: str, target_name: str,
                progress: bool) -> VocabBuild:
    """Align the two vocabularies and build the target's input (and output, bias) rows with ``chosen``."""
    source_vocab: Vocabulary = vocabulary(source_tokenizer)
    target_vocab: Vocabulary = vocabulary(target_tok)
    if len(source_vocab) > source.rows:
        raise TokenbridgeError(
            f"{source.label}: the tokenizer has {len(source_vocab)} tokens but the embeddings only {source.rows} rows"
        )
    encoder = ByteEncoder(source_vocab)
    alignment = align(source_vocab, target_vocab, source_tokenizer, target_tok, encoder)
    rows_out = padded_size(len(target_vocab), source.rows, len(source_vocab))
    embed_scale = spec.scale(model_config)
    has_output = source.read_output is not None
    prepared = None
    if chosen.prepare is not None:
        overlap = [m for m in alignment.matches if m.how == "bytes"]
        context = TransplantContext(
            source_vocab, target_vocab, source_tokenizer, target_tok, encoder,
            torch.tensor([m.target_id for m in overlap], dtype=torch.int64),
            torch.tensor([m.source_id for m in overlap], dtype=torch.int64),
            [target_vocab.tokens[i] for i in alignment.new], seed, progress, source.tied or not has_output,
            lambda matrix: (source.read_output() if matrix == "output" and has_output and not source.tied
                            else source.read_input())[:len(source_vocab)].float())
        prepared = chosen.prepare(context, config)
    builder = _Builder(alignment, chosen, config, encoder, seed, rows_out, embed_scale, progress, prepared)
    # Read after ``prepare``: a method's own working memory (donor matrices, corpora) is gone by then.
    stored_input = source.read_input()

    new_input, input_provenance = builder.build(stored_input, "input")
    del stored_input
    initialised = {"input": input_provenance}
    output_provenance = input_provenance
    new_output = None
    if has_output:
        if source.tied:
            new_output = new_input
        else:
            new_output, output_provenance = builder.build(source.read_output(), "output")
            initialised["output"] = output_provenance
    new_bias = builder.bias(source.read_bias(), output_provenance) if source.read_bias is not None else None
    builder.prepared = prepared = None  # a donor's matrices are not needed while writing

    specials = [
        SpecialMatch(m.target_id, target_vocab.tokens[m.target_id].token, m.source_id,
                     source_vocab.tokens[m.source_id].token, m.how)
        for m in alignment.matches if m.how.startswith("special:")
    ]
    copied = [(m.target_id, m.source_id) for m in alignment.matches if m.how == "bytes"]
    fallback = sum(1 for p in input_provenance if "fallback" in p.how)
    report = TransplantReport(
        source=source_name, target=target_name, method=method, options=asdict(config), seed=seed,
        model_type=spec.model_type, tied=source.tied, embed_scale=embed_scale,
        source_vocab_size=len(source_vocab), target_vocab_size=len(target_vocab),
        counts={
            "copied": len(copied),
            "copied_special": len(specials),
            "initialised": len(alignment.new),
            "fallback": fallback,
            "unmatched_special": len(alignment.unmatched_special),
            "padding": rows_out - len(target_vocab),
        },
        specials=specials, copied=copied, initialised=initialised,
    )
    return VocabBuild(new_input, new_output, new_bias, rows_out, alignment, target_tok, _special_ids(target_tok),
                      builder.copies, report)


def transplant(source, target_tokenizer, out, method: str = "subword", options: dict | None = None,
               seed: int = 0, force: bool = False, allow_pickle: bool = False,
               progress: bool = True, gguf_type: str | None = None) -> tuple[Path, TransplantReport]:
    """Give the model at ``source`` the tokenizer at ``target_tokenizer``; write it to ``out``.

    Returns the written directory (or file) and a :class:`TransplantReport`.  One named method only:
    ``method="auto"`` (method selection) is the planner's, above the pipeline: call
    :func:`tokenbridge.transplant` (:mod:`tokenbridge.api`) for it.  An ``out`` ending in ``.gguf`` is
    one GGUF file (:mod:`tokenbridge.transplant_gguf`); ``gguf_type`` is then the type of its embedding
    and output matrices.
    """
    if method == "auto":
        raise TokenbridgeError("method 'auto' chooses among methods above the pipeline: call tokenbridge.transplant "
                               "(tokenbridge.api), not tokenbridge.pipeline.transplant")
    seed = checks.seed(seed)
    if Path(out).suffix == ".gguf":
        from .transplant_gguf import transplant_to_gguf

        return transplant_to_gguf(source, target_tokenizer, out, method, options, seed, force, gguf_type,
                                  allow_pickle, progress)
    if gguf_type is not None:
        raise TokenbridgeError("--gguf-type applies only to a .gguf OUT")
    started = time.perf_counter()
    source, target_path, out = Path(source), Path(target_tokenizer), Path(out)
    for path in (source, target_path):
        if not path.exists():
            raise TokenbridgeError(f"{path}: no such file or directory")
    check_output(out, force, protected=[source, target_path])
    chosen = get_method(method)
    config = make_config(chosen, options)
    check_resources(chosen, config)

    model_dir = resolve_source(source)
    checkpoint = open_checkpoint(model_dir, allow_pickle=allow_pickle)
    spec = arch_spec(checkpoint.config["model_type"])
    tied = is_tied(checkpoint)
    names = locate_vocab_tensors(checkpoint, spec, tied)
    source_tokenizer = load_tokenizer(model_dir)
    target_tok = load_tokenizer(target_path)
    vocab = VocabSource(
        str(model_dir), checkpoint.tensors[names.input[0]].shape[0], tied,
        read_input=lambda: checkpoint.read(names.input[0]),
        read_output=(lambda: checkpoint.read(names.output[0])) if names.output else None,
        read_bias=(lambda: checkpoint.read(names.output_bias[0])) if names.output_bias else None)
    build = build_vocab(vocab, source_tokenizer, target_tok, spec, checkpoint.config, method, chosen, config, seed,
                        str(source), str(target_path), progress)
    replacements: dict[str, torch.Tensor] = {name: build.input for name in names.input}
    if build.output is not None:
        replacements.update({name: build.output for name in names.output})
    if build.bias is not None:
        replacements.update({name: build.bias for name in names.output_bias})

    new_config = dict(checkpoint.config)
    set_dotted(new_config, spec.vocab_key, build.rows_out)
    new_config = _update_special_ids(new_config, build.target_special_ids, build.alignment)
    report = build.report

    with staged_output(out, force) as tmp:
        _write_shards(checkpoint, replacements, tmp, progress)
        _write_json(tmp / "config.json", new_config)
        generation = model_dir / "generation_config.json"
        if generation.is_file():
            _write_json(tmp / "generation_config.json",
                        _update_special_ids(json.loads(generation.read_text()), build.target_special_ids,
                                            build.alignment))
        target_tok.save_pretrained(str(tmp))
        report.write(tmp)
    report.seconds = round(time.perf_counter() - started, 3)
    report.peak_rss_mb = peak_rss_mb()
    return out, report


def _write_shards(checkpoint: Checkpoint, replacements: dict[str, torch.Tensor], directory: Path,
                  progress: bool) -> None:
    """One output shard per source shard, same names and tensor order; vocabulary tensors replaced."""
    total = sum(e.nbytes for e in checkpoint.tensors.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress, mininterval=0.5)
    weight_map: dict[str, str] = {}
    total_size = 0
    for path in checkpoint.files:
        name = path.name if checkpoint.indexed else "model.safetensors"
        tensors = []
        for entry in checkpoint.tensors_in(path):
            if entry.name in replacements:
                tensors.append(OutTensor.of(entry.name, replacements[entry.name]))
            else:
                tensors.append(OutTensor.copy(entry))
            weight_map[entry.name] = name
        metadata = checkpoint.file_metadata.get(path) or {"format": "pt"}
        written = write_safetensors(
            directory / name, tensors, metadata,
            on_tensor=lambda t: bar.update(t.source.nbytes if t.source else checkpoint.tensors[t.name].nbytes),
        )
        total_size += written
    bar.close()
    if checkpoint.indexed:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / "model.safetensors.index.json", index)
