"""Speed of `tokenbridge eval`: 4 files x 12 KB with SmolLM2-135M (goal: under 60 s on 2 cores).

The files are 12,000-byte slices of en, de, ja and Python code from ../shared/corpora. The command runs
in a fresh process and is timed from outside, model loading included. The GGUF conversion is cached
beforehand.

    python bench/eval_speed.py [--repeat 2] [--model packaged:smollm2] [--bytes 12000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transplant import machine, write_slices  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2")
    parser.add_argument("--bytes", type=int, default=12000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from tokenbridge.load.packaged import resolve
    from tokenbridge.pipeline import resolve_source

    resolve_source(resolve(args.model))  # warm the conversion cache
    with tempfile.TemporaryDirectory() as tmp:
        slices = write_slices(Path(tmp), args.bytes)
        command = [sys.executable, "-m", "tokenbridge", "eval", args.model, "--text", *map(str, slices), "--json",
                   "--quiet"]
        walls, result = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - started)
            result = json.loads(completed.stdout)
    tokens = sum(f["tokens"] for f in result["files"])
    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"command: tokenbridge eval {args.model} --text <4 slices of {args.bytes} bytes>")
    print(f"wall seconds (model load included): {', '.join(f'{w:.1f}' for w in walls)}; best {min(walls):.1f}")
    print(f"tokens scored: {tokens}; bits per byte: {result['bits_per_byte']:.4f}")
    for f in result["files"]:
        print(f"  {Path(f['file']).name}: {f['bytes']} bytes, {f['tokens']} tokens, BPB {f['bits_per_byte']:.4f}, "
              f"{f['tokens_per_second']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
