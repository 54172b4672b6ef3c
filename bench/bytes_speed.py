"""Exact byte-level probabilities on the real models: speed next to token-level scoring, generation cost,
and byte-level ensembles of SmolLM2 and Gemma-3 (issue 5).

    .venv/bin/python bench/bytes_speed.py --bytes 2048 --out bench/bytes_speed.json

For each model and corpus slice (one window of ``--bytes`` bytes from offset 20000, cut on a character
boundary) it measures:

* token-level scoring (``tokenbridge eval``'s Scorer) of the slice: seconds, tokens;
* exact byte-level scoring (``ByteLM.byte_logprobs``): seconds, tokens run through the model, and the
  canonical-encoding check (the engine's encoding of the slice equals the tokenizer's);
* the floor (issue 20): one plain forward pass over a random token sequence as long as the slice has bytes
  (one token per byte position, as the tree has one node per byte), in one pass like the tree's, the
  output head applied in the same chunks (``TokenTree.head``); goal: byte-level scoring within 1.25x of it;
* greedy byte-by-byte generation from the slice's first 200 bytes: bytes/s and forward passes per byte;
* bits per byte: token level, exact byte level, and the byte-level ensemble of the two models (equal
  weights) on the same slice.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tokenbridge.bytes import ByteLM
from tokenbridge.load.packaged import resolve
from tokenbridge.measure.bpb import Scorer, _boundary_at_or_before, load_causal_lm

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SLICES = {"en": "debref.en.txt", "de": "debref.de.txt", "ja": "debref.ja.txt", "code": "code.python.txt"}


def slice_of(name: str, size: int, start: int = 20000) -> bytes:
    data = (CORPORA / SLICES[name]).read_bytes()
    start = _boundary_at_or_before(data, start)
    return data[start:_boundary_at_or_before(data, start + size)]


def floor_seconds(lm: ByteLM, length: int, seed: int = 0) -> float:
    """Seconds of a plain forward pass over ``length`` random tokens, then the output head on every position
    in the ByteLM's chunks: what exact byte-level scoring cannot go below (one node per byte)."""
    model = lm.model
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, length), generator=generator)
    body = model.model if hasattr(model, "model") else model.transformer
    started = time.perf_counter()
    with torch.inference_mode():
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
        for start in range(0, length, lm.chunk):
            lm.tree.head(hidden[start:start + lm.chunk])
    return time.perf_counter() - started


def measure(label: str, path: str, texts: dict[str, bytes], generate_bytes: int) -> dict:
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(resolve(path))
    loaded = time.perf_counter()
    lm = ByteLM(model, tokenizer, name=label)
    ready = time.perf_counter()
    scorer = Scorer(model, tokenizer)
    out = {"model": label, "path": path, "load_seconds": loaded - started, "byte_lm_init_seconds": ready - loaded,
           "texts": {}}
    for name, data in texts.items():
        row: dict = {"bytes": len(data)}
        t0 = time.perf_counter()
        token = scorer.score_file(name, data, window=len(data) + 4)
        row["token_seconds"] = time.perf_counter() - t0
        row["tokens"] = token.tokens
        row["token_bpb"] = token.bits_per_byte
        ids = tokenizer(data.decode("utf-8"), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        row["canonical_matches_tokenizer"] = lm.canonical(data) == list(ids)
        before = lm.tree.tokens
        t0 = time.perf_counter()
        per_byte = lm.byte_logprobs(data)
        row["byte_seconds"] = time.perf_counter() - t0
        row["byte_forward_tokens"] = lm.tree.tokens - before
        row["byte_bpb"] = -float(per_byte.sum()) / math.log(2) / len(data)
        row["byte_over_token_time"] = row["byte_seconds"] / row["token_seconds"]
        row["floor_seconds"] = floor_seconds(lm, len(data))
        row["byte_over_floor"] = row["byte_seconds"] / row["floor_seconds"]
        row["per_byte_logprobs"] = per_byte.tolist()
        # generation: greedy, byte by byte, from the first 200 bytes
        prompt = data[:_boundary_at_or_before(data, 200)]
        cursor = lm.cursor(prompt)
        calls, tokens = lm.tree.calls, lm.tree.tokens
        t0 = time.perf_counter()
        produced = bytearray()
        for _ in range(generate_bytes):
            logp = cursor.distribution()
            byte = int(np.argmax(logp))
            if byte == 256:
                break
            produced.append(byte)
            cursor.push(bytes([byte]))
        seconds = time.perf_counter() - t0
        row["generate_bytes"] = len(produced)
        row["generate_seconds"] = seconds
        row["generate_bytes_per_second"] = len(produced) / seconds if seconds else float("nan")
        row["generate_forward_passes_per_byte"] = (lm.tree.calls - calls) / max(1, len(produced))
        row["generate_tokens_per_byte"] = (lm.tree.tokens - tokens) / max(1, len(produced))
        row["generated"] = produced.decode("utf-8", errors="replace")
        out["texts"][name] = row
        print(f"{label:8s} {name:5s} bytes {len(data):5d} tokens {token.tokens:4d} "
              f"token {row['token_seconds']:6.2f}s  byte {row['byte_seconds']:6.2f}s "
              f"(x{row['byte_over_token_time']:.2f}, {row['byte_forward_tokens']} tokens run; floor "
              f"{row['floor_seconds']:.2f}s, x{row['byte_over_floor']:.2f})  "
              f"BPB tok {row['token_bpb']:.4f} byte {row['byte_bpb']:.4f}  canonical {row['canonical_matches_tokenizer']}  "
              f"gen {row['generate_bytes_per_second']:.1f} B/s, {row['generate_forward_passes_per_byte']:.2f} passes/B",
              flush=True)
    del model, lm, scorer
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bytes", type=int, default=2048)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--langs", nargs="+", default=list(SLICES))
    parser.add_argument("--out", default="bench/bytes_speed.json")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    texts = {name: slice_of(name, args.bytes) for name in args.langs}
    results = [measure(name, f"packaged:{name}", texts, args.generate) for name in args.models]
    ensemble = {}
    for name, data in texts.items() if len(results) == 2 else ():
        rows = [np.array(r["texts"][name]["per_byte_logprobs"]) for r in results]
        mixed = np.logaddexp(np.log(0.5) + rows[0], np.log(0.5) + rows[1])
        ensemble[name] = {
            "bytes": len(data),
            "smollm2_bpb": -rows[0].sum() / math.log(2) / len(data),
            "gemma3_bpb": -rows[1].sum() / math.log(2) / len(data),
            "ensemble_bpb": -mixed.sum() / math.log(2) / len(data),
        }
        print(f"ensemble {name:5s} smollm2 {ensemble[name]['smollm2_bpb']:.4f} gemma3 {ensemble[name]['gemma3_bpb']:.4f} "
              f"0.5/0.5 mix {ensemble[name]['ensemble_bpb']:.4f}")
    for r in results:
        for row in r["texts"].values():
            row.pop("per_byte_logprobs")
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU only",
              "torch": torch.__version__, "bytes_per_slice": args.bytes, "models": results, "ensemble": ensemble}
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
