"""What a transplant did, row by row: the report object and ``tokenbridge.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

REPORT_NAME = "tokenbridge.json"
FORMAT = "tokenbridge-transplant/1"


@dataclass
class RowProvenance:
    """Where one initialised target row came from."""

    target_id: int
    token: str
    how: str  # the method's name, "fallback:mean", "special:unmatched", "padding"
    source_ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
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
    seconds: float = 0.0  # not written to the file: outputs stay byte-identical across runs
    peak_rss_mb: float = 0.0

    def to_dict(self, with_timings: bool = True) -> dict:
        data = {"format": FORMAT}
        data.update({f.name: getattr(self, f.name) for f in fields(self)})
        data["options"] = dict(self.options)
        data["specials"] = [vars(s).copy() for s in self.specials]
        data["copied"] = [list(pair) for pair in self.copied]
        data["initialised"] = {matrix: [vars(row).copy() for row in rows] for matrix, rows in self.initialised.items()}
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
        path = Path(directory) / REPORT_NAME
        text = json.dumps(self.to_dict(with_timings=False), ensure_ascii=False, separators=(",", ":"))
        path.write_text(text + "\n", encoding="utf-8")
        return path


def load_report(directory: Path) -> dict:
    return json.loads((Path(directory) / REPORT_NAME).read_text(encoding="utf-8"))
