"""Exact bits per byte of one model or a byte-level ensemble, over the same windows as ``tokenbridge eval``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..measure.bpb import DEFAULT_WINDOW, byte_windows, read_texts
from .lm import ByteEnsemble, ByteLM


@dataclass
class ByteFileScore:
    file: str
    bytes: int
    windows: int
    bits: float  # the ensemble's (or the single model's)
    member_bits: list[float]  # each model alone
    seconds: float
    forward_tokens: list[int]  # tokens each model ran (canonical prefixes of every byte position)

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(bits_per_byte=self.bits_per_byte,
                    member_bits_per_byte=[b / self.bytes if self.bytes else float("nan") for b in self.member_bits])
        return data


@dataclass
class ByteScoreResult:
    models: list[str]
    weights: list[float]
    window_bytes: int
    files: list[ByteFileScore] = field(default_factory=list)

    @property
    def bits_per_byte(self) -> float:
        total = sum(f.bytes for f in self.files)
        return sum(f.bits for f in self.files) / total if total else float("nan")

    def member_bits_per_byte(self) -> list[float]:
        total = sum(f.bytes for f in self.files)
        return [sum(f.member_bits[k] for f in self.files) / total if total else float("nan")
                for k in range(len(self.models))]

    def to_dict(self) -> dict:
        return {"models": self.models, "weights": self.weights, "window_bytes": self.window_bytes,
                "bits_per_byte": self.bits_per_byte, "member_bits_per_byte": self.member_bits_per_byte(),
                "files": [f.to_dict() for f in self.files]}


def score(members: list[ByteLM], texts: dict[str, bytes], weights: list[float] | None = None,
          window: int = DEFAULT_WINDOW, progress: bool = True) -> ByteScoreResult:
    """Exact bits per byte of each text under the byte-level mixture of ``members`` (and each alone)."""
    ensemble = ByteEnsemble(members, weights)
    weights = list(np.exp(ensemble.log_weights))
    result = ByteScoreResult([m.name for m in members], weights, window)
    for name, data in texts.items():
        spans = byte_windows(data, window)
        started = time.perf_counter()
        bits, member_bits = 0.0, [0.0] * len(members)
        tokens = [0] * len(members)
        for a, b in tqdm(spans, desc=Path(name).name, unit="window", disable=not progress):
            rows = []
            for k, member in enumerate(members):
                before = member.tree.tokens
                row = member.byte_logprobs(data[a:b])
                tokens[k] += member.tree.tokens - before
                member_bits[k] -= float(row.sum()) / math.log(2)
                rows.append(row)
            bits -= float(ensemble._mix(rows).sum()) / math.log(2)
        result.files.append(ByteFileScore(name, len(data), len(spans), bits, member_bits,
                                          time.perf_counter() - started, tokens))
    return result


def load_byte_lm(path: str, prefix: str = "auto", allow_pickle: bool = False) -> ByteLM:
    from ..load.model import load_causal_lm
    from ..load.packaged import resolve

    model, tokenizer = load_causal_lm(resolve(path), allow_pickle=allow_pickle)
    return ByteLM(model, tokenizer, prefix=prefix, name=str(path))


def read(paths: list[Path], limit: int | None) -> dict[str, bytes]:
    return read_texts(paths, limit)


def format_result(result: ByteScoreResult) -> str:
    lines = []
    if len(result.models) > 1:
        mix = ", ".join(f"{w:.2f} {m}" for m, w in zip(result.models, result.weights))
        lines.append(f"byte-level ensemble ({mix}): {result.bits_per_byte:.4f} bits per byte")
    for model, bpb in zip(result.models, result.member_bits_per_byte()):
        lines.append(f"{model}: {bpb:.4f} bits per byte (exact, byte level)")
    lines.append(f"  windows of at most {result.window_bytes} bytes")
    lines.append(f"  {'file':40s} {'bytes':>8s} {'BPB':>7s} " + " ".join(f"{'model ' + str(k + 1):>8s}"
                                                                        for k in range(len(result.models)))
                 + f" {'bytes/s':>8s}")
    for f in result.files:
        members = " ".join(f"{b / f.bytes:8.4f}" for b in f.member_bits)
        lines.append(f"  {Path(f.file).name:40s} {f.bytes:8d} {f.bits_per_byte:7.4f} {members} "
                     f"{f.bytes / f.seconds if f.seconds else float('nan'):8.0f}")
    return "\n".join(lines)
