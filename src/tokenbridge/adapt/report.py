"""What an ``adapt`` run did and what it bought: ``report.json``, ``report.md`` and three plots.

Per evaluation file: tokens with the model's tokenizer and with the new one (and the share saved), bits
per byte of the original, the zero-shot transplant and the healed model; the heal's held-out curve; the
time and peak memory of every stage.  The verdict compares the healed model's bits per byte with the
original's on every file: within :data:`~.plan.VERDICT_THRESHOLD` on all of them is "same quality at N%
fewer tokens", else the files that lose more, and by how much.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plan import VERDICT_THRESHOLD, Plan

REPORT_FORMAT = "tokenbridge-adapt-report/1"
PLOTS = {"tokens": "tokens.png", "bpb": "bpb.png", "heal": "heal.png"}


def _saved(before: int, after: int) -> float:
    return 1 - after / before if before else 0.0


def verdict(files: list[dict], threshold: float = VERDICT_THRESHOLD) -> str:
    """One line: "same quality at N% fewer tokens", or what is still lost."""
    before = sum(f["tokens_before"] for f in files)
    after = sum(f["tokens_after"] for f in files)
    saved = _saved(before, after)
    tokens = f"{abs(saved) * 100:.1f}% {'fewer' if saved >= 0 else 'more'} tokens"
    lost = [(f["label"], f["bpb_healed"] / f["bpb_original"] - 1) for f in files
            if f["bpb_healed"] > f["bpb_original"] * (1 + threshold)]
    if not lost:
        return f"same quality at {tokens}"
    losses = ", ".join(f"{label} {loss * 100:+.1f}% bits per byte" for label, loss in lost)
    return (f"at {tokens}, still lost: {losses}"
            + f" (more than {threshold * 100:g}% above the original)")


def build_report(plan: Plan, results: dict, log: list[dict]) -> dict:
    files = []
    for row in results["measure"]["files"]:
        files.append(dict(row, saved=round(_saved(row["tokens_before"], row["tokens_after"]), 6),
                          healed_vs_original=round(row["bpb_healed"] / row["bpb_original"] - 1, 6)))
    before = sum(f["tokens_before"] for f in files)
    after = sum(f["tokens_after"] for f in files)
    size = sum(f["bytes"] for f in files)
    total = {"bytes": size, "tokens_before": before, "tokens_after": after, "saved": round(_saved(before, after), 6)}
    for name in ("original", "transplant", "healed", "original_heal_window"):
        total[f"bpb_{name}"] = round(sum(f[f"bpb_{name}"] * f["bytes"] for f in files) / size, 6)
    choice = results.get("select") or results.get("transplant") or {}
    heal = results["heal"]
    return {
        "format": REPORT_FORMAT,
        "model": plan.model,
        "out": plan.out,
        "work": plan.work,
        "texts": [s.text for s in plan.split],
        "held_out": not plan.config["eval"],
        "eval_files": plan.eval_files,
        "tokenizer": {"step": plan.tokenizer.kind, "size": plan.tokenizer.size, "path": plan.tokenizer.path,
                      "vocab_before": choice.get("source_vocab"), "vocab_after": choice.get("target_vocab")},
        "method": {"chosen": choice.get("method"), "scores": choice.get("scores"), "skipped": choice.get("skipped"),
                   "counts": choice.get("counts")},
        "heal": {**{k: heal[k] for k in ("mode", "train", "steps", "budget", "checkpoint_every", "evals",
                                         "student_tokens", "heal_seconds", "device")},
                 "window": plan.heal["window"]},
        "window": results["measure"]["window"],
        "files": files,
        "total": total,
        "stages": log,
        "threshold": VERDICT_THRESHOLD,
        "verdict": verdict(files),
        "plots": PLOTS,
    }


def format_markdown(report: dict) -> str:
    tok, method, heal, total = report["tokenizer"], report["method"], report["heal"], report["total"]
    where = ("the last part of each --text, held out (never trained on)" if report["held_out"]
             else "the --eval files")
    step = (f"trained to {tok['size']} tokens" if tok["step"] == "train" else
            f"the model's extended by up to {tok['size']} tokens" if tok["step"] == "extend" else
            f"given: {tok['path']}")
    lines = [f"# tokenbridge adapt: {report['model']}", "",
             f"**Verdict: {report['verdict']}.**", "",
             f"- Tokenizer: {step}; {tok['vocab_before']} -> {tok['vocab_after']} tokens.",
             f"- Method: {method['chosen']}" + (" (chosen by bits per byte on a slice of the training text: "
                                                + ", ".join(f"{n} {s['bits_per_byte']:.4f}" if "bits_per_byte" in s
                                                            else f"{n} failed" for n, s in method["scores"].items())
                                                + ")" if method.get("scores") else "") + ".",
             f"- Heal: {heal['mode']} training {heal['train']}, {heal['steps']} steps"
             + (f" (--heal-minutes {heal['budget']['minutes']:g} at {heal['budget']['seconds_per_step']:.3f} s a step)"
                if heal.get("budget") else "") + f" on {heal['device']}.",
             f"- Evaluated on {where}; bits per byte in windows of {report['window']} bytes. \"Same quality\" means "
             f"the healed model's bits per byte is at most {report['threshold'] * 100:g}% above the original's "
             "on every file.", "",
             "## Tokens", "",
             "| file | bytes | tokens before | tokens after | saved |",
             "|---|---:|---:|---:|---:|"]
    for f in report["files"]:
        lines.append(f"| {f['label']} | {f['bytes']} | {f['tokens_before']} | {f['tokens_after']} | "
                     f"{f['saved'] * 100:.1f}% |")
    lines.append(f"| **all** | {total['bytes']} | {total['tokens_before']} | {total['tokens_after']} | "
                 f"{total['saved'] * 100:.1f}% |")
    lines += ["", f"![tokens]({PLOTS['tokens']})", "", "## Bits per byte", "",
              "| file | original | zero-shot transplant | healed | healed vs original |",
              "|---|---:|---:|---:|---:|"]
    for f in report["files"]:
        lines.append(f"| {f['label']} | {f['bpb_original']:.4f} | {f['bpb_transplant']:.4f} | {f['bpb_healed']:.4f} | "
                     f"{f['healed_vs_original'] * 100:+.1f}% |")
    lines.append(f"| **all** | {total['bpb_original']:.4f} | {total['bpb_transplant']:.4f} | "
                 f"{total['bpb_healed']:.4f} | {(total['bpb_healed'] / total['bpb_original'] - 1) * 100:+.1f}% |")
    lines += ["", f"![bits per byte]({PLOTS['bpb']})", "", "## Heal curve", "",
              "| step | held-out bits per byte | vs original |", "|---:|---:|---:|"]
    lines += [f"| {e['step']} | {e['all']:.4f} | {(e['all'] / total['bpb_original_heal_window'] - 1) * 100:+.1f}% |"
              for e in heal["evals"]]
    lines += ["", f"Scored during the heal in its training windows ({heal['window']} bytes; the original scores "
              f"{total['bpb_original_heal_window']:.4f} in those), so the last point differs from the table above."]
    lines += ["", f"![heal curve]({PLOTS['heal']})", "", "## Stages", "",
              "| stage | seconds | peak memory (MB) | peak GPU memory (MB) | |", "|---|---:|---:|---:|---|"]
    for s in report["stages"]:
        gpu = f"{s['peak_gpu_mb']:.0f}" if s.get("peak_gpu_mb") is not None else "-"
        note = "skipped (--resume), time of its run" if s["skipped"] else ""
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} | {gpu} | {note} |")
    lines += ["", "Peak memory is the process's resident high-water mark during the stage (Linux VmHWM, reset "
              "before each stage); GPU memory is CUDA's peak allocation.", "",
              f"**Verdict: {report['verdict']}.**", ""]
    return "\n".join(lines)


def write_report(directory: Path, report: dict) -> None:
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (directory / "report.md").write_text(format_markdown(report))
    plot_tokens(report, directory / PLOTS["tokens"])
    plot_bpb(report, directory / PLOTS["bpb"])
    plot_heal(report, directory / PLOTS["heal"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(report: dict, path: Path) -> None:
    """Tokens with the new tokenizer as a share of the model's own, per file (below 1: fewer tokens)."""
    plt = _pyplot()
    files = report["files"]
    labels = [f["label"] for f in files] + ["all"]
    ratios = [f["tokens_after"] / f["tokens_before"] for f in files]
    ratios.append(report["total"]["tokens_after"] / report["total"]["tokens_before"])
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    bars = axes.bar(range(len(labels)), ratios, color=["#4c72b0"] * len(files) + ["#222222"])
    for bar, ratio in zip(bars, ratios):
        axes.annotate(f"{(1 - ratio) * 100:.1f}% saved" if ratio <= 1 else f"{(ratio - 1) * 100:.1f}% more",
                      (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="the model's own tokenizer")
    axes.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    axes.set_ylabel("tokens, new tokenizer / model's tokenizer")
    axes.set_xlabel("evaluation file")
    axes.set_title("Tokens per file: new tokenizer relative to the original")
    axes.set_ylim(0, max(1.15, max(ratios) * 1.1))
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_bpb(report: dict, path: Path) -> None:
    """Bits per byte of the zero-shot transplant and the healed model as a ratio to the original's, per file."""
    plt = _pyplot()
    files = report["files"]
    labels = [f["label"] for f in files] + ["all"]
    rows = files + [dict(report["total"])]
    width = 0.38
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    series = (("transplant", "#dd8452", "zero-shot transplant"), ("healed", "#55a868", "healed"))
    for offset, (name, colour, label) in zip((-width / 2, width / 2), series):
        values = [r[f"bpb_{name}"] / r["bpb_original"] for r in rows]
        axes.bar([i + offset for i in range(len(rows))], values, width, color=colour, label=label)
    axes.axhline(1.0, color="black", linewidth=1.2, label="original")
    axes.axhline(1.0 + report["threshold"], color="grey", linestyle="--", linewidth=1,
                 label=f"same-quality threshold (+{report['threshold'] * 100:g}%)")
    axes.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    top = max(max(r[f"bpb_{n}"] / r["bpb_original"] for r in rows for n in ("transplant", "healed")),
              1 + report["threshold"])
    axes.set_ylim(0, top * 1.3)  # room for the legend above the bars
    axes.set_ylabel("bits per byte / original's")
    axes.set_xlabel("evaluation file")
    axes.set_title("Bits per byte relative to the original model")
    axes.legend(fontsize=8, loc="upper right", ncol=2)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_heal(report: dict, path: Path) -> None:
    """Held-out bits per byte during the heal as a ratio to the original's, both scored in heal's windows
    (1 = the original's quality)."""
    plt = _pyplot()
    evals = report["heal"]["evals"]
    by_file = {f["file"]: f for f in report["files"]}
    original = report["total"]["bpb_original_heal_window"]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps = [e["step"] for e in evals]
    for name in (evals[0]["files"] if evals else {}):
        if name in by_file:
            axes.plot(steps, [e["files"][name] / by_file[name]["bpb_original_heal_window"] for e in evals], marker="o",
                      markersize=3, label=by_file[name]["label"])
    axes.plot(steps, [e["all"] / original for e in evals], color="black", linewidth=2.2, label="all files")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="original")
    axes.axhline(1.0 + report["threshold"], color="grey", linestyle=":", linewidth=1,
                 label=f"+{report['threshold'] * 100:g}%")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("heal step")
    axes.set_ylabel("held-out bits per byte / original's")
    axes.set_title(f"Heal ({report['heal']['mode']}): held-out bits per byte during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
