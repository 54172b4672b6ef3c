"""What a transplant did, row by row: the report object and ``tokenbridge.json``."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REPORT_NAME = "tokenbridge.json"
FORMAT = "tokenbridge-transplant/1"


@dataclass(slots=True)
class RowProvenance:
    """Where one initialised target row came from."""

    target_id: int
    token: str
    how: str  # the method's name, "fallback:mean", "special:unmatched", "padding"
    source_ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SpecialMatch:
    target_id: int
    token: str
    source_id: int
    source_token: str
    how: str


@dataclass
class TransplantReport:
    """Returned by :func:`tokenbridge.transplant` and written (less timings) to ``tokenbridge.json``."""

    source: str
    target: str
    method: str
    options: dict
    seed: int
    model_type: str
    tied: bool
    embed_scale: float
    source_vocab_size: int
    target_vocab_size: int
    counts: dict
    specials: list[SpecialMatch]
    copied: list[tuple[int, int]]  # (target id, source id) for rows copied by bytes
    initialised: dict[str, list[RowProvenance]]  # "input" (and "output" when untied)
    selection: dict | None = None  # method "auto": what each candidate scored and which was kept
    gguf: dict | None = None  # a .gguf OUT: the types its vocabulary matrices were written in, its tokenizer
    seconds: float = 0.0  # not written to the file: outputs stay byte-identical across runs
    peak_rss_mb: float = 0.0

    def to_dict(self, with_timings: bool = True) -> dict:
        data = {"format": FORMAT}
        data.update({f.name: getattr(self, f.name) for f in fields(self)})
        data["options"] = dict(self.options)
        data["specials"] = [asdict(s) for s in self.specials]
        data["copied"] = [list(pair) for pair in self.copied]
        data["initialised"] = {matrix: [_row(row) for row in rows] for matrix, rows in self.initialised.items()}
        if data["gguf"] is None:
            data.pop("gguf")
        if not with_timings:
            data.pop("seconds")
            data.pop("peak_rss_mb")
        return data

    def summary(self) -> dict:
        """The report without per-token lists (what ``--json`` prints)."""
        data = self.to_dict()
        for key in ("copied", "initialised", "specials"):
            data.pop(key)
        data["specials"] = [f"{s.token} <- {s.source_token} ({s.how})" for s in self.specials]
        return data

    def write(self, directory: Path) -> Path:
        """Write ``tokenbridge.json`` (no timings), streaming the per-row lists."""
        path = Path(directory) / REPORT_NAME
        with open(path, "w", encoding="utf-8") as handle:
            for chunk in self._json_chunks():
                handle.write(chunk)
        return path

    def to_json(self) -> str:
        """What :meth:`write` writes, as one string (a GGUF file keeps it as ``tokenbridge.provenance``)."""
        return "".join(self._json_chunks())

    def _json_chunks(self):
        dump = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))
        head = {"format": FORMAT}
        head.update({f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("copied", "initialised", "seconds", "peak_rss_mb")})
        if head.get("gguf") is None:
            head.pop("gguf", None)  # directory outputs stay as they were
        head["specials"] = [asdict(s) for s in self.specials]
        yield dump(head)[:-1]
        yield ',"copied":[' + ",".join(f"[{t},{s}]" for t, s in self.copied) + "]"
        yield ',"initialised":{'
        for number, (matrix, rows) in enumerate(self.initialised.items()):
            yield ("," if number else "") + dump(matrix) + ":["
            for index, row in enumerate(rows):
                yield ("," if index else "") + dump(_row(row))
            yield "]"
        yield "}}\n"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's ``VmHWM`` belongs to the process's own address space; ``ru_maxrss`` is used elsewhere, but on
    Linux it also counts the peak of the parent the process was forked from.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource
    import sys

    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def _row(row: RowProvenance) -> dict:
    return {"target_id": row.target_id, "token": row.token, "how": row.how, "source_ids": row.source_ids,
            "weights": row.weights}
