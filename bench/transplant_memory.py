"""Peak memory and wall time of `tokenbridge transplant` on the packaged models.

Every job runs in a fresh Python subprocess under GNU ``/usr/bin/time``, which
reports that process's peak resident set size (``ru_maxrss``) and nothing else.  Next to each
transplant, a plain transformers load-and-save of the same source model
(``AutoModelForCausalLM.from_pretrained`` + ``save_pretrained``) gives a point of
comparison.

The GGUF -> Hugging Face conversions (and the GGUF-embedded tokenizers) are
cached before anything is timed, and the transplants are given the converted
directories, so no dequantisation is measured.

    python bench/transplant_memory.py [--repeat N] [--json PATH] [--out-md PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}
PAIRS = [("smollm2", "gemma3"), ("gemma3", "smollm2")]  # (source model, target tokenizer)
MB = 1024 * 1024
TIME = "/usr/bin/time"  # GNU time: peak RSS of exactly one job

LOAD_SAVE = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[2])
print(model.dtype)
"""
IMPORTS = "import torch, transformers, tokenizers, tokenbridge"


def warm_caches() -> dict[str, Path]:
    """Convert both packaged GGUF models (and extract their tokenizers) once; return the converted dirs."""
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import tokenizer_dir

    from tokenbridge.pipeline import resolve_source

    dirs = {}
    for name in MODELS:
        started = time.perf_counter()
        gguf = resolve(f"packaged:{name}")
        dirs[name] = resolve_source(gguf)
        tokenizer_dir(gguf)
        print(f"warm cache: {name} -> {dirs[name]} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return dirs


def run_job(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` under ``/usr/bin/time``; return (wall seconds, peak RSS in MB) of that process alone.

    GNU time forks the job from its own small process.  Reading ``ru_maxrss`` from ``os.wait4`` here would not
    do: Linux carries the parent's RSS high-water mark into a vfork()ed child at exec, so every job would report
    at least this (torch-importing) process's peak.
    """
    with tempfile.NamedTemporaryFile("r") as stats, tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        code = subprocess.run([TIME, "-f", "%M", "-o", stats.name, *argv], stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
        if code != 0:
            log.seek(0)
            sys.exit(f"job failed ({code}): {shlex.join(argv)}\n{log.read().decode(errors='replace')}")
        peak_kb = int(stats.read().split()[-1])
    return wall, peak_kb / 1024


def measure(label: str, model: str, argv: list[str], repeat: int) -> dict:
    """Run one job ``repeat`` times: min wall time, max peak RSS."""
    runs = [run_job(argv) for _ in range(repeat)]
    row = {"job": label, "model": model, "wall_s": round(min(w for w, _ in runs), 2),
           "peak_rss_mb": round(max(r for _, r in runs)), "runs": [[round(w, 2), round(r)] for w, r in runs]}
    print(f"{label:40s} {model:14s} {row['wall_s']:7.2f} s {row['peak_rss_mb']:6d} MB", file=sys.stderr)
    return row


def vocab_sizes(model_dir: Path) -> dict:
    """Float32 sizes (MB) of a checkpoint's vocabulary-sized matrices, its largest other tensor and shard."""
    from tokenbridge.arch import arch_spec
    from tokenbridge.load.checkpoint import open_checkpoint
    from tokenbridge.pipeline import is_tied, locate_vocab_tensors
    checkpoint = open_checkpoint(model_dir)
    tied = is_tied(checkpoint)
    names = locate_vocab_tensors(checkpoint, arch_spec(checkpoint.config["model_type"]), tied)
    vocab = list(dict.fromkeys(names.input + names.output + names.output_bias))
    others = [e for n, e in checkpoint.tensors.items() if n not in vocab]
    largest = max(others, key=lambda e: e.nbytes)
    f32 = {n: _numel(checkpoint.tensors[n].shape) * 4 / MB for n in vocab}
    return {
        "tied": tied,
        "vocab_tensors": {n: {"shape": list(checkpoint.tensors[n].shape), "f32_mb": round(f32[n], 1)} for n in vocab},
        "vocab_f32_mb": round(sum(f32.values()), 1),
        "largest_other_tensor": {"name": largest.name, "shape": list(largest.shape), "mb": round(largest.nbytes / MB, 1)},
        "largest_shard_mb": round(max(p.stat().st_size for p in checkpoint.files) / MB, 1),
    }


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def git_state() -> str:
    """The commit measured, plus any uncommitted changes under src/ (the code actually run)."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--short", "--", "src"], capture_output=True, text=True).stdout.split("\n")
    dirty = [line.strip() for line in dirty if line.strip()]
    return head + (f" + uncommitted src changes ({'; '.join(dirty)})" if dirty else "")


def machine() -> dict:
    """CPU model, core count, memory and load average, for the record."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "nproc": os.cpu_count(), "free_g": free, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def benchmark(repeat: int) -> dict:
    """Warm the caches, then time every job; return rows, context sizes and machine info."""
    dirs = warm_caches()
    code, load_before = git_state(), os.getloadavg()
    rows = [measure("python imports only", "-", [sys.executable, "-c", IMPORTS], repeat)]
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
        for source, target in PAIRS:
            out = Path(tmp) / f"{source}-to-{target}"
            cli = [sys.executable, "-m", "tokenbridge", "transplant", str(dirs[source]), str(dirs[target]), str(out),
                   "--method", "subword", "--quiet", "--force"]
            rows.append(measure(f"tokenbridge transplant -> {target} tokenizer", MODELS[source], cli, repeat))
            saved = Path(tmp) / f"{source}-saved"
            rows.append(measure("transformers load + save_pretrained", MODELS[source],
                                [sys.executable, "-c", LOAD_SAVE, str(dirs[source]), str(saved)], repeat))
            sizes[f"{source} (source)"] = vocab_sizes(dirs[source])
            sizes[f"{source} -> {target} tokenizer (output)"] = vocab_sizes(out)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]), "repeat": repeat, "code": code,
            "model_dirs": {k: str(v) for k, v in dirs.items()},
            "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before]},
            "rows": rows, "sizes": sizes}


def markdown(result: dict) -> str:
    """The results section: command, date, machine, context sizes and the table."""
    m = result["machine"]
    lines = [
        "## Transplant: peak memory and wall time (issue 2)", "",
        f"Command: `{result['command']}` (repeat {result['repeat']}: min wall time, max peak RSS)  ",
        f"Date: {result['date']}  ",
        f"Code: {result['code']}  ",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, Python {m['python']}, "
        f"load average before timing {m['loadavg_before']}, after {m['loadavg']}", "",
        "```", m["free_g"], "```", "",
        "GGUF conversions and tokenizer extraction were cached before timing; the transplants read the converted "
        "float32 directories, so no dequantisation is timed. Each job is a fresh Python process (interpreter start "
        "and imports included); peak RSS is that process's `ru_maxrss`, from GNU `/usr/bin/time -f %M`.", "",
        "| job | model | wall s | peak RSS MB |", "|---|---|---:|---:|",
        *(f"| {r['job']} | {r['model']} | {r['wall_s']:.2f} | {r['peak_rss_mb']} |" for r in result["rows"]), "",
        "Context (float32 MB): vocabulary-sized matrices, largest other tensor, largest shard file.", "",
        "| checkpoint | tied | vocabulary matrices | f32 MB | largest other tensor MB | largest shard MB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, s in result["sizes"].items():
        shapes = ", ".join(f"{n} {'x'.join(map(str, t['shape']))}" for n, t in s["vocab_tensors"].items())
        lines.append(f"| {name} | {s['tied']} | {shapes} | {s['vocab_f32_mb']} | "
                     f"{s['largest_other_tensor']['mb']} | {s['largest_shard_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per job (min wall time, max peak RSS)")
    parser.add_argument("--json", type=Path, help="write the full results as JSON")
    parser.add_argument("--out-md", type=Path, help="write the Markdown results section")
    args = parser.parse_args()
    publish(benchmark(max(1, args.repeat)), markdown, args.json, args.out_md)


def publish(result: dict, markdown, json_path: Path | None, md_path: Path | None) -> None:
    """Print the Markdown section; write it and the full JSON where asked (shared by the memory benches)."""
    text = markdown(result)
    print(text)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        md_path.write_text(text)


if __name__ == "__main__":
    main()
