"""Peak memory and wall time of `tokenbridge tokstats` and `tokenbridge tokenizer train` on large texts.

The texts are the corpora in ``shared/corpora`` (nine Debian Reference translations and Python
code) concatenated over and over to 10, 25 and 100 MB, cut after a newline, written to
``--workdir`` (not the repository).  Every job is a fresh Python process under GNU
``/usr/bin/time``, which reports that process's peak resident set size and nothing else.

``--before SRC`` also runs the jobs with another checkout's ``src`` first on ``PYTHONPATH`` (the code
before streaming, e.g. ``git worktree add /tmp/tb-before HEAD``), on the sizes in ``--before-sizes``
only: before streaming, tokstats took about 250x the text's size, so 100 MB would exhaust the
machine.  Where both ran, the outputs are compared: tokstats' statistics and the trained
``tokenizer.json`` must be identical.

    python bench/text_memory.py [--sizes 10 25 100] [--before /tmp/tb-before/src --before-sizes 10 25]
                                [--jobs JOB ...] [--workdir /tmp/tb-text-memory] [--json PATH] [--out-md PATH]
    python bench/text_memory.py --render PATH.json --out-md PATH.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
TIME = "/usr/bin/time"  # GNU time: peak RSS of exactly one job
MB = 1_000_000  # text sizes are decimal megabytes
JOBS = {  # label -> the tokenbridge arguments after the command; TEXT and OUT are filled in
    "tokstats smollm2 + gemma3": ["tokstats", "packaged:smollm2", "packaged:gemma3", "--text", "TEXT", "--json"],
    "tokstats smollm2": ["tokstats", "packaged:smollm2", "--text", "TEXT", "--json"],
    "tokstats gemma3": ["tokstats", "packaged:gemma3", "--text", "TEXT", "--json"],
    "tokenizer train (8000)": ["tokenizer", "train", "--text", "TEXT", "--vocab-size", "8000", "--out", "OUT",
                               "--quiet"],
    "tokenizer train (8000) --like smollm2": ["tokenizer", "train", "--text", "TEXT", "--vocab-size", "8000",
                                              "--like", "packaged:smollm2", "--out", "OUT", "--quiet"],
    "tokenizer train (8000) --supertokens": ["tokenizer", "train", "--text", "TEXT", "--vocab-size", "8000",
                                             "--supertokens", "--out", "OUT", "--quiet"],
}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transplant_memory import git_state, machine, publish  # noqa: E402 - the same records as the other memory bench


def build_text(size_mb: int, workdir: Path) -> Path:
    """The corpora concatenated until ``size_mb`` MB, cut after the last newline before it."""
    path = workdir / f"corpora-{size_mb}mb.txt"
    if path.is_file():
        return path
    data = b"".join(p.read_bytes() for p in sorted(CORPORA.glob("*.txt")))
    target = size_mb * MB
    with path.open("wb") as out:
        written = 0
        while written + len(data) <= target:
            out.write(data)
            written += len(data)
        rest = data[:target - written]
        out.write(rest[:rest.rfind(b"\n") + 1])
    return path


def others() -> list[dict]:
    """The project's other busy processes at this moment (other engineers' test runs): ps %CPU, RSS, command."""
    table = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True,
                           text=True).stdout.splitlines()[1:]
    busy = []
    for line in table:
        pid, cpu, rss, args = line.split(None, 3)
        if int(pid) != os.getpid() and float(cpu) >= 20 and ("pytest" in args or "tokenbridge" in args):
            busy.append({"cpu": float(cpu), "rss_mb": int(rss) // 1024, "command": args[:100].strip()})
    return busy


def run_job(argv: list[str], env: dict) -> tuple[float, float, str]:
    """Run ``argv`` under GNU time; (wall seconds, peak RSS in MB, stdout)."""
    with tempfile.NamedTemporaryFile("r") as stats, tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%M", "-o", stats.name, *argv], stdout=subprocess.PIPE, stderr=log,
                              env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            log.seek(0)
            sys.exit(f"job failed ({done.returncode}): {shlex.join(argv)}\n{log.read().decode(errors='replace')}")
        peak_kb = int(stats.read().split()[-1])
    return wall, peak_kb / 1024, done.stdout.decode()


def outcome(label: str, stdout: str, out: Path) -> str:
    """What must not change with streaming: tokstats' statistics and overlaps, or the trained tokenizer."""
    if label.startswith("tokstats"):
        result = json.loads(stdout)
        return json.dumps([result["stats"], result["overlap"]], sort_keys=True)
    return (out / "tokenizer.json").read_text(encoding="utf-8")


def benchmark(sizes: list[int], before: Path | None, before_sizes: list[int], workdir: Path,
              jobs: list[str]) -> dict:
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import tokenizer_dir

    for name in ("smollm2", "gemma3"):  # the GGUF tokenizers are extracted once, before any timing
        tokenizer_dir(resolve(f"packaged:{name}"))
    workdir.mkdir(parents=True, exist_ok=True)
    code = git_state()
    sides = [("after", None)] + ([("before", before)] if before else [])
    rows = []
    for size in sizes:
        text = build_text(size, workdir)
        for label, args in ((label, JOBS[label]) for label in jobs):
            results = {}
            for side, src in sides:
                if side == "before" and size not in before_sizes:
                    continue
                env = dict(os.environ, PYTHONPATH=str(src)) if src else dict(os.environ)
                out = workdir / f"out-{side}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                argv = [sys.executable, "-m", "tokenbridge",
                        *[str(text) if a == "TEXT" else str(out) if a == "OUT" else a for a in args]]
                load, busy = [round(x, 2) for x in os.getloadavg()], others()
                wall, peak, stdout = run_job(argv, env)
                results[side] = outcome(label, stdout, out)
                row = {"job": label, "text_mb": size, "code": side, "wall_s": round(wall, 1),
                       "peak_rss_mb": round(peak), "loadavg_at_start": load, "busy_processes": busy,
                       "command": shlex.join(["tokenbridge", *argv[3:]])}
                rows.append(row)
                print(f"{label:40s} {size:4d} MB {side:6s} {wall:7.1f} s {peak:7.0f} MB  load {load}", file=sys.stderr)
            if len(results) == 2:
                for row in rows[-2:]:
                    row["same_output"] = results["before"] == results["after"]
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]), "code": code,
            "before": str(before) if before else None, "machine": machine(), "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    head, _, dirty = result["code"].partition(" + ")
    changed = dirty.count(";") + 1 if dirty else 0
    lines = [
        "## Peak memory of tokstats and tokenizer train (issue 14)", "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Code: after = {head} with the working tree's uncommitted changes ({changed} files under src/, the "
        f"streaming change among them); before = {head} as committed, from `{result['before'] or '-'}`  ",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, Python {m['python']}, load average at the end {m['loadavg']}", "",
        "```", m["free_g"], "```", "",
        "Each job is a fresh process; peak RSS is its `ru_maxrss`, from GNU `/usr/bin/time -f %M`. \"same output\" "
        "compares tokstats' statistics and overlaps, or the trained `tokenizer.json`, byte for byte.", "",
        "| job | text MB | code | wall s | peak RSS MB | peak / text | same output as before | load at start |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        same = {True: "yes", False: "NO"}.get(r.get("same_output"), "-")
        lines.append(f"| {r['job']} | {r['text_mb']} | {r['code']} | {r['wall_s']:.1f} | {r['peak_rss_mb']} | "
                     f"{r['peak_rss_mb'] / r['text_mb']:.0f}x | {same} | {r['loadavg_at_start'][0]} |")
    seen: dict[str, dict] = {}
    for r in result["rows"]:
        for p in (p for p in r["busy_processes"] if "pytest" in p["command"] or "tokenbridge" in p["command"]):
            entry = seen.setdefault(p["command"], {"jobs": 0, "cpu": 0.0, "rss_mb": 0})
            entry["jobs"] += 1
            entry["cpu"], entry["rss_mb"] = max(entry["cpu"], p["cpu"]), max(entry["rss_mb"], p["rss_mb"])
    quiet = "No other tokenbridge process was busy when a job started."
    lines += ["", f"Other tokenbridge processes busy (ps %CPU 20 or more) when a job started, of "
                  f"{len(result['rows'])} jobs:" if seen else quiet]
    lines += [f"- `{command}`: at the start of {e['jobs']} jobs, up to {e['cpu']:.0f}% CPU and {e['rss_mb']} MB"
              for command, e in seen.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 100], help="text sizes in MB")
    parser.add_argument("--before", type=Path, help="src directory of the code to compare with (PYTHONPATH)")
    parser.add_argument("--before-sizes", type=int, nargs="+", default=[10, 25], help="sizes to run --before on")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tb-text-memory"), help="texts and outputs")
    parser.add_argument("--json", type=Path, help="write the full results as JSON")
    parser.add_argument("--out-md", type=Path, help="write the Markdown results section")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS), metavar="JOB",
                        help=f"jobs to run (default all: {'; '.join(JOBS)})")
    parser.add_argument("--render", type=Path, help="only write the Markdown of an earlier --json result")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
    else:
        result = benchmark(args.sizes, args.before, args.before_sizes, args.workdir, args.jobs)
    publish(result, markdown, args.json, args.out_md)


if __name__ == "__main__":
    main()
