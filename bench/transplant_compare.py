"""Compare runs of bench/transplant.py method by method: BPB ratio per slice, fallback rows, transplant time.

Each JSON is one ``bench/transplant.py --json`` run, labelled ``LABEL=PATH``; the first label is the
baseline.  A cell of a later label is marked ``(worse)`` where its ratio is above the baseline's by more
than ``--tolerance`` (default 0.002, about the third digit the tables print).

    python bench/transplant_compare.py before=B.json after=A.json [share=C.json] [--tolerance 0.002]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(path: Path) -> dict[tuple[int, str], dict]:
    """(pair number, method) -> the run's row, for every tokenbridge method of every pair."""
    data = json.loads(path.read_text())
    out = {}
    for report in data["reports"]:
        number = report["pair"]["number"] if isinstance(report["pair"], dict) else report["pair"]
        for row in report["rows"]:
            if row["method"] != "original":
                out[(number, row["method"].removeprefix("tokenbridge "))] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=PATH, the baseline first")
    parser.add_argument("--tolerance", type=float, default=0.002)
    args = parser.parse_args()
    runs = []
    for item in args.runs:
        label, _, path = item.partition("=")
        runs.append((label, rows_of(Path(path))))
    keys = sorted(set().union(*(set(rows) for _, rows in runs)))
    files = ["en.txt", "de.txt", "ja.txt", "code.txt"]
    print("| pair | method | run | " + " | ".join(f.removesuffix(".txt") for f in files)
          + " | fallback rows | transplant s | peak MB |")
    print("|---|---|---|" + "---:|" * (len(files) + 3))
    base_label, base = runs[0]
    for key in keys:
        for label, rows in runs:
            row = rows.get(key)
            if row is None:
                continue
            cells = []
            for name in files:
                ratio = row["files"][name]["ratio"]
                cell = f"{ratio:.3f}"
                reference = base.get(key)
                if label != base_label and reference and ratio > reference["files"][name]["ratio"] + args.tolerance:
                    cell += " (worse)"
                cells.append(cell)
            print(f"| {key[0]} | {key[1]} | {label} | " + " | ".join(cells)
                  + f" | {row['counts'].get('fallback', 0):,} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
