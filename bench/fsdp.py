"""heal --fsdp on this CPU: what one process holds of a full fine-tune, unsharded and sharded over N processes.

For SmolLM2-135M (``packaged:smollm2``), ``tokenbridge heal --mode sft --train all`` for a few steps on the
English training text (debref.en from byte 60000 on; no scored slice), run

* on one process without ``--fsdp`` (every process holds everything: what DDP does), and
* under ``torchrun --nproc_per_node N`` with ``--fsdp``, for each N of ``--processes``.

For each run: the bytes of parameters, gradients and AdamW state the largest process holds (from the run's
``tokenbridge-heal.json``, counted from the tensors each process keeps), every process's peak resident memory
(``/usr/bin/time -v`` around each process), the losses (they must agree: the global batch is the same) and the
wall time.

    python bench/fsdp.py --workdir /work/fsdp --processes 2 --json bench/fsdp.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transplant import CORPORA, TRAIN_OFFSET  # noqa: E402


def _peak_mb(path: Path) -> float:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def run(label: str, processes: int, fsdp: bool, common: list[str], workdir: Path, port: int) -> dict:
    out = workdir / label
    for path in (out, Path(str(out) + ".checkpoints")):
        shutil.rmtree(path, ignore_errors=True)
    rss = workdir / f"{label}.rss"
    rss.mkdir(exist_ok=True)
    heal = [sys.executable, "-m", "tokenbridge", "heal", *common, "--out", str(out), "--quiet"]
    heal += ["--fsdp"] if fsdp else []
    timed = f'/usr/bin/time -v -o {rss}/rank-"${{RANK:-0}}".txt ' + " ".join(heal)
    if processes == 1:
        command = ["bash", "-c", timed]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), "--no-python", "bash", "-c", timed]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{label}: failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((out / "tokenbridge-heal.json").read_text())
    peaks = [round(_peak_mb(p), 1) for p in sorted(rss.glob("rank-*.txt"))]
    return {"label": label, "processes": processes, "fsdp": fsdp, "sharded": report["sharded"],
            "memory_mb": {k: round(v / 2**20, 1) for k, v in report["memory"].items()},
            "peak_rss_mb": peaks, "losses": [v for _, v in report["losses"]], "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    text = args.workdir / "train.en.txt"
    text.write_bytes((CORPORA / "debref.en.txt").read_bytes()[TRAIN_OFFSET:TRAIN_OFFSET + 200_000])
    widest = max(args.processes)
    common = ["packaged:smollm2", "--text", str(text), "--mode", "sft", "--train", "all", "--steps",
              str(args.steps), "--window", str(args.window), "--checkpoint-every", "0", "--precision", "fp32"]
    rows = [run("unsharded-1", 1, False, [*common, "--batch-size", str(widest)], args.workdir, 0)]
    for index, n in enumerate(args.processes):
        if widest % n:
            raise SystemExit(f"--processes: {n} does not divide {widest} (the global batch must be the same)")
        rows.append(run(f"fsdp-{n}", n, True, [*common, "--batch-size", str(widest // n)], args.workdir,
                        29650 + index))
    for row in rows:
        memory = row["memory_mb"]
        print(f"{row['label']:>12}: parameters {memory['parameters']:.0f} MB, gradients {memory['gradients']:.0f} MB, "
              f"AdamW {memory['optimizer']:.0f} MB per process; peak RSS {row['peak_rss_mb']} MB; "
              f"losses {row['losses']}; {row['seconds']} s")
    args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
