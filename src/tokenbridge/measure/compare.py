"""Compare transplant methods: transplant with each, score every model on the same byte windows.

Each transplant runs in its own process, so that its wall time and peak memory are its own.  The original
model is scored with its own tokenizer on the same windows; each method's bits per byte is reported
next to its ratio to the original.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TokenbridgeError
from ..write.output_dir import check_output, staged_output
from .bpb import DEFAULT_WINDOW, EvalResult, evaluate

ORIGINAL = "original"


@dataclass
class MethodRun:
    """One method's transplant and its score."""

    method: str
    seconds: float | None
    peak_rss_mb: float | None
    result: EvalResult
    counts: dict = field(default_factory=dict)


def run_transplant(source: Path, target: Path, out: Path, method: str, seed: int,
                   options: dict | None = None, allow_pickle: bool = False) -> dict:
    """``tokenbridge transplant`` in a fresh process; returns its JSON report summary.

    ``seconds`` is replaced by the process's wall time (interpreter start and imports included), so that
    it compares with other tools timed from outside; ``peak_rss_mb`` is the process's own peak.
    """
    command = [sys.executable, "-m", "tokenbridge", "transplant", str(source), str(target), str(out),
               "--method", method, "--seed", str(seed), "--quiet", "--json", "--force"]
    if allow_pickle:
        command.append("--allow-pickle")
    for key, value in (options or {}).items():
        command += ["-o", f"{key}={value}"]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        raise TokenbridgeError(f"method {method}: transplant failed: {lines[-1] if lines else completed.returncode}")
    summary = json.loads(completed.stdout)
    summary["seconds"] = round(wall, 2)
    return summary


def run_methods(source_dir: Path, target: Path, methods: list[str], text_paths: list[Path], models_dir: Path,
                limit: int | None = None, window: int = DEFAULT_WINDOW, seed: int = 0, keep_models: bool = False,
                options: dict[str, dict] | None = None, progress: bool = True,
                allow_pickle: bool = False) -> list[MethodRun]:
    """Score the original, then transplant with each method (own process) and score the result."""
    runs = [MethodRun(ORIGINAL, None, None, evaluate(source_dir, text_paths, limit, window, progress=progress,
                                                     allow_pickle=allow_pickle))]
    for method in methods:
        model_dir = models_dir / method
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        summary = run_transplant(source_dir, target, model_dir, method, seed, (options or {}).get(method),
                                 allow_pickle)
        result = evaluate(model_dir, text_paths, limit, window, progress=progress)
        runs.append(MethodRun(method, summary["seconds"], summary["peak_rss_mb"], result, summary["counts"]))
        if not keep_models:
            shutil.rmtree(model_dir)
    if not keep_models and models_dir.exists() and not any(models_dir.iterdir()):
        models_dir.rmdir()
    return runs


def write_report(directory: Path, report: dict) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(report_markdown(report))
    plot_bpb(report, directory / "bpb.png")


def compare(source, target_tokenizer, methods: list[str], text_paths: list[Path], out, limit: int | None = None,
            window: int = DEFAULT_WINDOW, seed: int = 0, force: bool = False, keep_models: bool = False,
            options: dict[str, dict] | None = None, progress: bool = True, allow_pickle: bool = False) -> dict:
    """Write ``report.md``, ``report.json`` and ``bpb.png`` to ``out``; returns the report as a dict."""
    from ..init import get_method
    from ..load.packaged import resolve
    from ..load.model import resolve_source

    source, target, out = resolve(str(source)), resolve(str(target_tokenizer)), Path(out)
    if not methods:
        raise TokenbridgeError("no methods to compare")
    for method in methods:
        get_method(method)
    check_output(out, force, protected=[source, target])
    source_dir = resolve_source(source)
    with staged_output(out, force) as tmp:
        runs = run_methods(source_dir, target, methods, text_paths, tmp / "models", limit, window, seed,
                           keep_models, options, progress, allow_pickle)
        report = report_dict(str(source), str(target), runs, window, limit, seed)
        write_report(tmp, report)
    return report


def report_dict(source: str, target: str, runs: list[MethodRun], window: int, limit: int | None, seed: int) -> dict:
    original = runs[0].result.by_file()
    rows = []
    for run in runs:
        files = {}
        for name, score in run.result.by_file().items():
            files[Path(name).name] = {
                "bits_per_byte": score.bits_per_byte,
                "ratio": score.bits_per_byte / original[name].bits_per_byte,
                "tokens": score.tokens,
                "bytes": score.bytes,
            }
        rows.append({"method": run.method, "seconds": run.seconds, "peak_rss_mb": run.peak_rss_mb,
                     "bits_per_byte": run.result.bits_per_byte, "counts": run.counts, "files": files,
                     "prefix": run.result.prefix})
    return {"source": source, "target": target, "window_bytes": window, "bytes_per_file": limit, "seed": seed,
            "files": [Path(f.file).name for f in runs[0].result.files], "rows": rows}


def _best(values: list[float | None]) -> set[int]:
    present = [v for v in values if v is not None]
    if not present:
        return set()
    low = min(present)
    return {i for i, v in enumerate(values) if v == low}


def report_markdown(report: dict) -> str:
    """Method x file table: BPB and ratio to the original; best (lowest) per column in bold."""
    files = report["files"]
    rows = report["rows"]
    methods = rows[1:]
    header = ["method"] + [f"{f} BPB (ratio)" for f in files] + ["all BPB (ratio)", "transplant s", "peak MB"]
    columns = []
    for name in files:
        columns.append(_best([r["files"][name]["bits_per_byte"] for r in methods]))
    best_all = _best([r["bits_per_byte"] for r in methods])
    best_seconds = _best([r["seconds"] for r in methods])
    best_memory = _best([r["peak_rss_mb"] for r in methods])
    original_all = rows[0]["bits_per_byte"]

    def mark(text: str, bold: bool) -> str:
        return f"**{text}**" if bold else text

    lines = ["# Transplant comparison", "",
             f"Source `{report['source']}` onto the tokenizer of `{report['target']}`; seed {report['seed']}; "
             f"windows of at most {report['window_bytes']} bytes"
             + (f", first {report['bytes_per_file']} bytes of each file" if report["bytes_per_file"] else "") + ".",
             f"Prefix token: original model {rows[0]['prefix']}; transplanted models "
             f"{rows[1]['prefix'] if len(rows) > 1 else '-'}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = rows[0]
    lines.append("| " + " | ".join([ORIGINAL] + [f"{first['files'][f]['bits_per_byte']:.4f}" for f in files]
                                   + [f"{original_all:.4f}", "-", "-"]) + " |")
    for index, row in enumerate(methods):
        cells = [row["method"]]
        for column, name in enumerate(files):
            cell = row["files"][name]
            cells.append(mark(f"{cell['bits_per_byte']:.4f} ({cell['ratio']:.3f})", index in columns[column]))
        cells.append(mark(f"{row['bits_per_byte']:.4f} ({row['bits_per_byte'] / original_all:.3f})",
                          index in best_all))
        cells.append(mark(f"{row['seconds']:.1f}", index in best_seconds))
        cells.append(mark(f"{row['peak_rss_mb']:.0f}", index in best_memory))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratio: bits per byte of the transplanted model over the original's on the same bytes (lower is better).", ""]
    return "\n".join(lines)


def plot_bpb(report: dict, path: Path) -> None:
    """Grouped bars: one group per file, one bar per method; the original model as a line over each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = report["files"]
    rows = report["rows"]
    methods = rows[1:]
    width = 0.8 / max(1, len(methods))
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(files) * max(1, len(methods)) / 2), 4.2))
    for index, row in enumerate(methods):
        xs = [f + (index - (len(methods) - 1) / 2) * width for f in range(len(files))]
        axes.bar(xs, [row["files"][name]["bits_per_byte"] for name in files], width, label=row["method"])
    for position, name in enumerate(files):
        value = rows[0]["files"][name]["bits_per_byte"]
        axes.hlines(value, position - 0.45, position + 0.45, colors="black", linestyles="dashed",
                    label=ORIGINAL if position == 0 else None)
    axes.set_xticks(range(len(files)), files)
    axes.set_ylabel("bits per byte (lower is better)")
    axes.set_title("Transplanted models vs the original, same bytes")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
