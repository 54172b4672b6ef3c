"""Exact byte probabilities, Llama-3 style tokenizer: canonical prefix encodings at every character boundary.

A byte-level BPE with ``ignore_merges`` and Llama-3's split regex is trained (as in
tests/test_bytes_llama3.py: 3000 tokens plus 60 whole pre-tokens its merges cannot make, on corpus text
from byte 60000 on) and, at every character boundary of the four 8000-byte slices of bench/transplant.py,
the engine's canonical encoding of the prefix is compared with the tokenizer's own.

    python bench/llama3_boundaries.py [--bytes 8000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_bytes_llama3 import SLICES, check_boundaries, make_llama3, read_slice, training_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=8000)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from tokenbridge.bytes.lm import CanonicalPrefixes

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(make_llama3(Path(tmp) / "tok", training_text(100000), 3000,
                                                                  whole=60)))
    walk = CanonicalPrefixes(tokenizer)
    total = 0
    for name in SLICES:
        data = read_slice(name, args.bytes)
        start = time.perf_counter()
        checked = check_boundaries(walk, tokenizer, data, name)
        total += checked
        print(f"{name}: {len(data)} bytes, {checked} character boundaries, all equal to the tokenizer's "
              f"({time.perf_counter() - start:.1f} s)")
    print(f"ok: {total} boundaries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
