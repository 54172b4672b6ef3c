"""``tokenbridge export MODEL_DIR OUT.gguf``: a Hugging Face causal LM as one GGUF file for llama.cpp.

The conventions are llama.cpp's (``convert_hf_to_gguf.py``), kept as data in ``arch/gguf.json``:
tensor names from gguf-py's ``TensorNameMap``; the rows of ``q_proj``/``k_proj`` permuted per head for
the llama graph (llama, mistral); Gemma's norms stored as ``1 + w`` (its embedding scale, sqrt of the
width, is applied by llama.cpp's graph, not stored); no ``output.weight`` when the embeddings are tied;
the ``<arch>.*`` hyperparameters; the target tokenizer as ``tokenizer.ggml.*``
(:mod:`tokenbridge.write.gguf_tokenizer`).  A configuration llama.cpp's graph would compute
differently is refused, with the reason.

Tensors are read, converted and written one at a time: memory holds one tensor, not the model.
The directory's ``tokenbridge.json`` (a transplant's provenance) goes into the file as the string
``tokenbridge.provenance``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arch import GGUFSpec, arch_spec, gguf_spec
from .errors import TokenbridgeError
from .report import REPORT_NAME, peak_rss_mb
from .write import gguf as gw
from .write.gguf import PROVENANCE_KEY

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote."""

    source: str
    out: str
    model_type: str
    architecture: str  # llama.cpp's
    type: str  # the requested weight type
    tensor_types: dict[str, int]  # type -> how many tensors
    fallbacks: list[str]  # tensors not in the requested type, and why
    tokenizer: dict
    notes: list[str] = field(default_factory=list)
    provenance: bool = False
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def summary(self) -> dict:
        return asdict(self)


# -- configuration ------------------------------------------------------------------------------

def config_value(config, attribute: str):
    """A config attribute, with the defaults llama.cpp assumes for the derived ones (None if absent)."""
    value = getattr(config, attribute, None)
    if value is None and attribute == "head_dim":
        return config.hidden_size // config.num_attention_heads
    if value is None and attribute == "num_key_value_heads":
        return config.num_attention_heads
    return value


def rope_parameters(config, layers: str = "full_attention") -> dict:
    """The rope parameters of the (full-attention) layers: ``{"rope_type": ..., "rope_theta": ..., ...}``."""
    params = getattr(config, "rope_parameters", None) or {}
    if layers in params and isinstance(params[layers], dict):
        params = params[layers]
    params = dict(params)
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _uses_sliding_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return False
    context = getattr(config, "max_position_embeddings", None)
    return not (context and window >= context)


def check_config(config, spec: GGUFSpec, name: str) -> list[str]:
    """Refuse what llama.cpp's graph for ``spec.gguf`` would compute differently; returns notes for what it
    drops harmlessly within a limit (a sliding window it does not have)."""
    notes = []
    activation = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if activation not in spec.activations:
        raise TokenbridgeError(f"{name}: activation {activation!r}; llama.cpp's {spec.gguf} computes "
                               f"{', '.join(spec.activations)}")
    rope = rope_parameters(config)
    if rope["rope_type"] not in spec.rope_types:
        raise TokenbridgeError(f"{name}: rope type {rope['rope_type']!r} cannot be written for llama.cpp's "
                               f"{spec.gguf} (supported: {', '.join(spec.rope_types)})")
    if _uses_sliding_window(config):
        if spec.sliding_window == "refused":
            raise TokenbridgeError(f"{name}: a sliding attention window ({config.sliding_window}); llama.cpp's "
                                   f"{spec.gguf} attends to the whole context")
        if spec.sliding_window == "dropped":
            notes.append(f"sliding_window {config.sliding_window} is not kept: llama.cpp runs {spec.model_type} "
                         f"as {spec.gguf} with full attention, so outputs differ past {config.sliding_window} tokens")
    if spec.gemma3:
        notes += _check_gemma3(config, spec.gemma3, name)
    return notes


def _check_gemma3(config, fixed: dict, name: str) -> list[str]:
    """llama.cpp's Gemma 3 graph fixes what the Hugging Face config leaves open."""
    layers = config.num_hidden_layers
    pattern = fixed["sliding_window_pattern"]
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    layer_types = list(getattr(config, "layer_types", None) or expected)
    if layer_types != expected:
        raise TokenbridgeError(f"{name}: layer_types {layer_types}; llama.cpp's gemma3 makes every "
                               f"{pattern}th layer global, the others sliding")
    local = rope_parameters(config, "sliding_attention")
    if local.get("rope_type", "default") != "default" or float(local.get("rope_theta", 0)) != fixed["sliding_rope_theta"]:
        raise TokenbridgeError(f"{name}: the sliding layers' rope ({local}); llama.cpp's gemma3 uses base "
                               f"{fixed['sliding_rope_theta']:g} without scaling")
    head_dim = config_value(config, "head_dim")
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    llama_cpp = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim
    if scalar != llama_cpp:
        raise TokenbridgeError(f"{name}: query_pre_attn_scalar {scalar}; llama.cpp's gemma3 scales attention by "
                               f"1/sqrt({llama_cpp})")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TokenbridgeError(f"{name}: attn_logit_softcapping; llama.cpp's gemma3 has none")
    if getattr(config, "use_bidirectional_attention", False):
        raise TokenbridgeError(f"{name}: bidirectional attention; llama.cpp's gemma3 is causal")
    return []


def hyperparameters(config, spec: GGUFSpec, rows: int, name: str) -> list[tuple[str, bytes]]:
    """The ``<arch>.*`` metadata."""
    out = []
    for key, attribute in spec.keys.items():
        value = config_value(config, attribute)
        if value is None:
            if key in spec.optional:
                continue
            raise TokenbridgeError(f"{name}: the config has no {attribute} (needed for {spec.gguf}.{key})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TokenbridgeError(f"{name}: {attribute} is {value!r}, not a number")
        out.append(gw.kv(f"{spec.gguf}.{key}", value))
    rope = rope_parameters(config)
    out.append(gw.kv(f"{spec.gguf}.rope.freq_base", float(rope.get("rope_theta", 10000.0))))
    if rope["rope_type"] == "linear":
        out.append(gw.kv(f"{spec.gguf}.rope.scaling.type", "linear"))
        out.append(gw.kv(f"{spec.gguf}.rope.scaling.factor", float(rope["factor"])))
    if spec.vocab_size_key:
        out.append(gw.kv(f"{spec.gguf}.vocab_size", rows))
    return out


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3 rope scaling: how much each frequency is divided by,
    from transformers' own rope functions (default inverse frequencies over the scaled ones)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = config_value(config, "head_dim")
    base = float(rope_parameters(config)["rope_theta"])
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.float()).numpy().astype(np.float32)


# -- tensors ------------------------------------------------------------------------------------

def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """The rows of a query or key projection (or bias) reordered per head, from the rotate-half layout of
    Hugging Face's llama to the interleaved pairs of llama.cpp's: row ``h*d + 2i + j`` takes row
    ``h*d + j*d/2 + i``."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def name_map(spec: GGUFSpec, blocks: int):
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf)
    return gguf.get_tensor_name_map(arch, blocks)


@dataclass
class TensorPlan:
    """One tensor of the export: where it comes from and how it is stored."""

    source: str  # checkpoint name ("" for a generated tensor)
    name: str  # GGUF name
    shape: tuple[int, ...]
    type: object
    note: str | None = None


def plan_tensors(checkpoint, spec: GGUFSpec, config, wanted, tied: bool, name: str) -> list[TensorPlan]:
    """Every checkpoint tensor with its GGUF name and type (the tied head left out), in checkpoint order."""
    names = name_map(spec, config.num_hidden_layers)
    heads = arch_spec(spec.model_type)
    plans = []
    for entry in checkpoint.tensors.values():
        if entry.name.endswith(SKIPPED_SUFFIXES) or (tied and entry.name in heads.output):
            continue
        target = names.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TokenbridgeError(f"{name}: tensor {entry.name} has no GGUF name for llama.cpp's {spec.gguf}")
        kind, note = gw.tensor_type(target, entry.shape, wanted)
        plans.append(TensorPlan(entry.name, target, tuple(entry.shape), kind, note))
    if rope_parameters(config)["rope_type"] == "llama3":
        plans.append(TensorPlan("", "rope_freqs.weight", (config_value(config, "head_dim") // 2,),
                                gw._quant_type("F32")))
    return plans


def _converter(checkpoint, plan: TensorPlan, spec: GGUFSpec, config):
    """The function that reads, converts and stores one tensor (called when it is written)."""
    def convert() -> np.ndarray:
        if not plan.source:
            return gw.quantise(llama3_rope_factors(config), plan.type)
        values = checkpoint.read(plan.source).to(torch.float32).numpy()
        if spec.permute_qk and plan.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if ".attn_q." in plan.name else config_value(config, "num_key_value_heads")
            values = permute_qk(values, heads)
        if spec.norm_offset and plan.name.endswith("norm.weight"):
            values = values + np.float32(spec.norm_offset)
        return gw.quantise(values, plan.type)
    return convert


def _default_type(checkpoint) -> object:
    """The weights' own float type (lossless): F32, F16 or BF16, by the first two-dimensional tensor."""
    for entry in checkpoint.tensors.values():
        if len(entry.shape) == 2:
            return gw._quant_type({"BF16": "BF16", "F16": "F16"}.get(entry.dtype, "F32"))
    return gw._quant_type("F32")


# -- the command --------------------------------------------------------------------------------

def export_gguf(model, out, type: str | None = None, force: bool = False, progress: bool = True,
                name: str | None = None) -> tuple[Path, ExportReport]:
    """Write the causal LM in directory ``model`` as the GGUF file ``out``; returns it and a report.

    ``type``: the weights' type (``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``,
    ``q4_0``; default: the checkpoint's own float type).  Norms and vectors stay F32; a weight whose rows
    are not whole blocks of a quantised type falls back to F16.  ``name``: ``general.name`` (default: the
    directory's name).
    """
    from tqdm.auto import tqdm

    from .load.checkpoint import open_checkpoint
    from .load.tokenizer import load_tokenizer
    from .pipeline import is_tied
    from .write.gguf_tokenizer import tokenizer_metadata, transformers_check
    from .write.output_dir import check_output, staged_file

    started = time.perf_counter()
    model, out = Path(model), Path(out)
    if not model.exists():
        raise TokenbridgeError(f"{model}: no such file or directory")
    if model.is_file():
        raise TokenbridgeError(f"{model}: export reads a Hugging Face model directory"
                               + (" (this is GGUF already)" if model.suffix == ".gguf" else ""))
    if out.suffix != ".gguf":
        raise TokenbridgeError(f"{out}: OUT must end in .gguf")
    wanted = gw.parse_type(type) if type is not None else None
    check_output(out, force, protected=[model], file=True)
    checkpoint = open_checkpoint(model)
    from .load.hf import load_config

    config = load_config(model)
    spec = gguf_spec(checkpoint.config["model_type"])
    label = str(model)
    notes = check_config(config, spec, label)
    tied = is_tied(checkpoint)
    heads = arch_spec(spec.model_type)
    embedding = next((n for n in heads.input if n in checkpoint.tensors), None)
    if embedding is None:
        raise TokenbridgeError(f"{label}: no input embeddings ({', '.join(heads.input)})")
    rows = checkpoint.tensors[embedding].shape[0]
    wanted = wanted or _default_type(checkpoint)
    plans = plan_tensors(checkpoint, spec, config, wanted, tied, label)
    tokenizer = load_tokenizer(model)
    gguf_tokenizer = tokenizer_metadata(tokenizer, rows, f"{label} (its tokenizer)")
    metadata = general_metadata(spec, name or model.resolve().name, wanted, tensors=True)
    metadata += hyperparameters(config, spec, rows, label)
    metadata += gguf_tokenizer.metadata
    provenance = model / REPORT_NAME
    if provenance.is_file():
        metadata.append(gw.kv(PROVENANCE_KEY, provenance.read_text(encoding="utf-8")))
    tensors = [gw.GGUFTensor(p.name, p.shape, p.type, _converter(checkpoint, p, spec, config)) for p in plans]
    bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing GGUF",
               disable=not progress, mininterval=0.5)
    with staged_file(out, force=force) as tmp:
        size = gw.write_gguf(tmp, metadata, tensors, on_tensor=lambda t: bar.update(t.nbytes))
        bar.close()
        gguf_tokenizer.checks.append(transformers_check(tmp, tokenizer))
    report = ExportReport(
        source=str(model), out=str(out), model_type=spec.model_type, architecture=spec.gguf,
        type=wanted.name.lower(), tensor_types=dict(sorted(Counter(p.type.name for p in plans).items())),
        fallbacks=[f"{p.name}: {p.type.name} ({p.note})" for p in plans if p.note and p.type != wanted
                   and not gw.is_norm_or_vector(p.name, p.shape)],
        tokenizer=gguf_tokenizer.summary(), notes=notes + gguf_tokenizer.notes, provenance=provenance.is_file(),
        bytes=size, seconds=round(time.perf_counter() - started, 3), peak_rss_mb=peak_rss_mb())
    return out, report


def general_metadata(spec_or_arch, name: str, wanted, tensors: bool) -> list[tuple[str, bytes]]:
    """``general.*`` of a written file: architecture first, as llama.cpp's writer puts it."""
    from gguf import GGML_QUANT_VERSION

    arch = spec_or_arch.gguf if isinstance(spec_or_arch, GGUFSpec) else spec_or_arch
    out = [gw.kv("general.architecture", arch), gw.kv("general.type", "model"), gw.kv("general.name", name)]
    if tensors:
        out.append(gw.kv("general.file_type", gw.file_type(wanted)))
        out.append(gw.kv("general.quantization_version", GGML_QUANT_VERSION))
    return out


def format_export(report: ExportReport) -> str:
    lines = [f"wrote {report.out}",
             f"  {report.model_type} as llama.cpp's {report.architecture}, {report.type}; tensors "
             + ", ".join(f"{n} {k}" for k, n in report.tensor_types.items())
             + f"; {report.bytes / 1e6:.1f} MB"]
    tok = report.tokenizer
    lines.append(f"  tokenizer {tok['model']} (pre {tok['pre']}), {tok['tokens']} tokens, add BOS {tok['add_bos']}, "
                 f"add EOS {tok['add_eos']}")
    lines += [f"  {check['reader']}: " + ("check text identical" if check["identical"]
                                           else f"differs {check['first_difference']}") for check in tok["checks"]]
    lines += [f"  {line}" for line in report.fallbacks[:5]]
    if len(report.fallbacks) > 5:
        lines.append(f"  ... {len(report.fallbacks) - 5} more tensors in F16")
    lines += [f"  note: {note}" for note in report.notes]
    lines.append(f"  {report.seconds:.1f} s, peak memory {report.peak_rss_mb:.0f} MB"
                 + ("; provenance in tokenbridge.provenance" if report.provenance else ""))
    return "\n".join(lines)
