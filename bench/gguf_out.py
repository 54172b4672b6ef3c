"""GGUF out (issue 18) on the packaged models: the transplant to one .gguf file, next to the directory one.

(a) For pair 1 (Gemma-3-270M Q4_K_M onto SmolLM2's tokenizer) and pair 2 (SmolLM2-135M Q4_1 onto
    Gemma 3's), ``tokenbridge transplant SOURCE.gguf TARGET.gguf OUT.gguf`` and the same transplant to a
    Hugging Face directory, each in a fresh process under GNU ``/usr/bin/time`` (wall time, peak RSS),
    with the file sizes.  The GGUF path dequantises only token_embd/output; the directory path reads the
    cached dequantised source (converted before timing, so no dequantisation is timed there either).
(b) When ``llama_cpp`` (llama-cpp-python) is importable: each output GGUF is loaded in llama.cpp, which
    tokenizes the four slices (counted against the target tokenizer), generates a few tokens greedily,
    and scores the en slice from its own logits (``logits_all=True``): bits per byte, windows and prefix as
    ``tokenbridge eval``, next to ``tokenbridge eval`` of the directory output.

The slices are bench/transplant.py's: 8000 bytes at offset 20000 of debref.en/de/ja and code.python.

    python bench/gguf_out.py [--pairs 1 2] [--workdir DIR] [--json PATH] [--out-md PATH] [--no-llama-cpp]
                             [--reuse EARLIER.json]

``--reuse`` takes part (a)'s rows (and their output files, which must still exist) from an earlier run's
JSON and runs part (b) only, so that part (a)'s timings stay those of the earlier, cleaner run.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from transplant_memory import git_state, machine, run_job  # noqa: E402

PAIRS = {1: ("gemma3", "smollm2", "Gemma-3-270M -> SmolLM2 tokenizer"),
         2: ("smollm2", "gemma3", "SmolLM2-135M -> Gemma-3 tokenizer")}
PROMPT = "The capital of France is"
MB = 1024 * 1024


def warm(names: list[str]) -> dict[str, Path]:
    """Resolve the packaged GGUFs and cache their tokenizers and dequantised directories before timing."""
    from tokenbridge.load.model import resolve_source
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import tokenizer_dir

    paths = {}
    for name in names:
        started = time.perf_counter()
        paths[name] = resolve(f"packaged:{name}")
        tokenizer_dir(paths[name])
        resolve_source(paths[name])
        print(f"warm: {name} -> {paths[name]} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return paths


def size_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / MB, 1)
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MB, 1)


def transplant_job(source: Path, target: Path, out: Path) -> dict:
    argv = [sys.executable, "-m", "tokenbridge", "transplant", str(source), str(target), str(out),
            "--method", "subword", "--quiet", "--force", "--json"]
    wall, peak = run_job(argv)
    return {"out": str(out), "wall_s": round(wall, 2), "peak_rss_mb": round(peak), "size_mb": size_mb(out)}


def part_a(pair: int, paths: dict[str, Path], workdir: Path) -> dict:
    source_name, target_name, label = PAIRS[pair]
    source, target = paths[source_name], paths[target_name]
    row = {"pair": pair, "name": label, "source": str(source), "source_mb": size_mb(source)}
    row["gguf"] = transplant_job(source, target, workdir / f"pair{pair}.gguf")
    row["directory"] = transplant_job(source, target, workdir / f"pair{pair}-dir")
    from tokenbridge.load.gguf import read_gguf_header

    header = read_gguf_header(workdir / f"pair{pair}.gguf")
    record = json.loads(header.value("tokenbridge.provenance"))
    row["vocab_types"] = record["gguf"]["tensors"]
    row["tokenizer"] = {k: record["gguf"]["tokenizer"].get(k) for k in ("model", "pre", "tokens", "copied_from")}
    row["vocab_f32_mb"] = round(sum(math.prod(header.tensors[n].shape) * 4 for n in ("token_embd.weight", "output.weight")
                                    if n in header.tensors) / MB, 1)
    print(f"pair {pair}: gguf {row['gguf']['wall_s']} s {row['gguf']['peak_rss_mb']} MB {row['gguf']['size_mb']} MB; "
          f"directory {row['directory']['wall_s']} s {row['directory']['peak_rss_mb']} MB "
          f"{row['directory']['size_mb']} MB", file=sys.stderr)
    return row


def token_differences(expected: list[int], got: list[int]) -> int:
    """Tokens of either sequence outside their longest common runs (0 when identical)."""
    if expected == got:
        return 0
    matcher = difflib.SequenceMatcher(a=expected, b=got, autojunk=False)
    same = sum(block.size for block in matcher.get_matching_blocks())
    return (len(expected) - same) + (len(got) - same)


def llama_cpp_bpb(llm, data: bytes, window: int, prefix: int, tokenizer=None) -> dict:
    """Bits per byte from llama.cpp's logits, windows and prefix as ``tokenbridge eval``; llama.cpp's tokens,
    or, with ``tokenizer``, that tokenizer's (so that only the arithmetic differs from ``tokenbridge eval``)."""
    import numpy as np

    from tokenbridge.measure.bpb import byte_windows

    bits, tokens = 0.0, 0
    for start, end in byte_windows(data, window):
        if tokenizer is None:
            ids = [prefix] + llm.tokenize(data[start:end], add_bos=False, special=False)
        else:
            ids = [prefix] + tokenizer(data[start:end].decode("utf-8"), add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        bits -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum()) / math.log(2)
        tokens += len(ids) - 1
    return {"bits_per_byte": bits / len(data), "tokens": tokens, "bytes": len(data)}


def open_llama(gguf) -> object:
    """llama.cpp on ``gguf``, with every position's logits kept."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=4096, logits_all=True, verbose=False,
                 n_threads=max(1, (os.cpu_count() or 2) - 1))


def tokenbridge_eval_bpb(model, text: Path, window: int) -> float:
    """``tokenbridge eval MODEL --text TEXT`` as a fresh process: its bits per byte."""
    evaluated = subprocess.run([sys.executable, "-m", "tokenbridge", "eval", str(model), "--text", str(text),
                                "--window", str(window), "--json", "--quiet"],
                               capture_output=True, text=True, check=True)
    return json.loads(evaluated.stdout)["bits_per_byte"]


def part_b(row: dict, paths: dict[str, Path], slices: list[Path], window: int) -> dict:
    from tokenbridge.load.tokenizer import load_tokenizer
    from tokenbridge.measure.bpb import prefix_token

    target = load_tokenizer(paths[PAIRS[row["pair"]][1]])
    llm = open_llama(row["gguf"]["out"])
    result = {"tokenization": {}}
    for path in slices:
        text = path.read_text(encoding="utf-8")
        expected = target(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        result["tokenization"][path.stem] = {"target_tokens": len(expected), "llama_cpp_tokens": len(got),
                                             "differing_tokens": token_differences(expected, got)}
    completion = llm(PROMPT, max_tokens=16, temperature=0.0)
    result["generation"] = {"prompt": PROMPT, "continuation": completion["choices"][0]["text"]}
    en = next(p for p in slices if p.stem == "en")
    prefix, _ = prefix_token(target)
    result["en_bpb_llama_cpp"] = llama_cpp_bpb(llm, en.read_bytes(), window, prefix)
    result["en_bpb_llama_cpp_target_tokens"] = llama_cpp_bpb(llm, en.read_bytes(), window, prefix, target)
    for key, model in (("directory", row["directory"]["out"]), ("gguf", row["gguf"]["out"])):
        # the directory holds float32 vocabulary matrices; the .gguf, read back by tokenbridge (dequantised),
        # holds the quantised ones llama.cpp runs: their difference is the quantisation error
        result[f"en_bpb_tokenbridge_eval_{key}"] = tokenbridge_eval_bpb(model, en, window)
    return result


def originals(names: list[str], paths: dict[str, Path], slices: list[Path], window: int) -> dict:
    """The packaged GGUFs themselves, scored both ways on their own tokenizer's tokens: the gap between
    llama.cpp's arithmetic on a quantised body and tokenbridge's dequantised float32, with no transplant."""
    from tokenbridge.load.tokenizer import load_tokenizer
    from tokenbridge.measure.bpb import prefix_token

    en = next(p for p in slices if p.stem == "en")
    out = {}
    for name in names:
        tokenizer = load_tokenizer(paths[name])
        prefix, _ = prefix_token(tokenizer)
        llm = open_llama(paths[name])
        got = llama_cpp_bpb(llm, en.read_bytes(), window, prefix, tokenizer)
        del llm
        out[name] = {"en_bpb_llama_cpp_own_tokens": got["bits_per_byte"],
                     "en_bpb_tokenbridge_eval": tokenbridge_eval_bpb(paths[name], en, window)}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["## GGUF out: transplant to one .gguf file (issue 18)", "",
             f"Command: `{result['command']}`  ", f"Date: {result['date']}  ", f"Code: {result['code']}  ",
             f"Machine: {m['cpu']}, nproc {m['nproc']}, load average {m['loadavg']}", ""]
    if result.get("part_a_from"):
        a = result["part_a_from"]
        lines += [f"Part (a) below is reused from `{a['command']}` ({a['date']}, load average "
                  f"{a['machine']['loadavg']}).", ""]
    lines += [
             "Each transplant (method subword) is a fresh process under GNU `/usr/bin/time -f %M`; the directory "
             "transplant reads the cached dequantised source, converted before timing.", "",
             "| pair | output | wall s | peak RSS MB | size MB | vocabulary matrices |", "|---|---|---:|---:|---:|---|"]
    for row in result["pairs"]:
        types = ", ".join(f"{n}: {t}" for n, t in row["vocab_types"].items())
        lines.append(f"| {row['pair']} {row['name']} | .gguf | {row['gguf']['wall_s']:.2f} | {row['gguf']['peak_rss_mb']} | "
                     f"{row['gguf']['size_mb']} | {types} |")
        lines.append(f"| {row['pair']} {row['name']} | directory | {row['directory']['wall_s']:.2f} | "
                     f"{row['directory']['peak_rss_mb']} | {row['directory']['size_mb']} | float32 |")
    lines.append("")
    lines.append("Source sizes: " + ", ".join(f"pair {r['pair']} {r['source_mb']} MB (vocabulary matrices as float32 "
                                              f"{r['vocab_f32_mb']} MB)" for r in result["pairs"]))
    if result.get("llama_cpp"):
        lines += ["", "llama.cpp on the .gguf outputs:", "",
                  "| pair | slice | target tokens | llama.cpp tokens | differing |", "|---|---|---:|---:|---:|"]
        for pair, res in result["llama_cpp"].items():
            for name, t in res["tokenization"].items():
                lines.append(f"| {pair} | {name} | {t['target_tokens']} | {t['llama_cpp_tokens']} | {t['differing_tokens']} |")
        lines += ["", "| pair | en BPB, llama.cpp's logits and tokens | llama.cpp's logits, the target tokenizer's "
                  "tokens | tokenbridge eval of the .gguf | tokenbridge eval of the directory | quantisation error "
                  "(.gguf - directory) | greedy continuation |", "|---|---:|---:|---:|---:|---:|---|"]
        for pair, res in result["llama_cpp"].items():
            own, directory = res["en_bpb_tokenbridge_eval_gguf"], res["en_bpb_tokenbridge_eval_directory"]
            same = res.get("en_bpb_llama_cpp_target_tokens", {}).get("bits_per_byte", float("nan"))
            lines.append(f"| {pair} | {res['en_bpb_llama_cpp']['bits_per_byte']:.4f} | {same:.4f} | {own:.4f} | "
                         f"{directory:.4f} | {own - directory:+.4f} | {res['generation']['continuation']!r} |")
        if result.get("llama_cpp_originals"):
            lines += ["", "The packaged originals, each on its own tokenizer's tokens (no transplant: llama.cpp's "
                      "arithmetic on the quantised body against tokenbridge's dequantised float32):", "",
                      "| original GGUF | en BPB, llama.cpp's logits | tokenbridge eval | llama.cpp - tokenbridge |",
                      "|---|---:|---:|---:|"]
            for name, res in result["llama_cpp_originals"].items():
                a, b = res["en_bpb_llama_cpp_own_tokens"], res["en_bpb_tokenbridge_eval"]
                lines.append(f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    else:
        lines += ["", f"llama.cpp: {result.get('llama_cpp_skipped', 'not run')}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 2], choices=sorted(PAIRS))
    parser.add_argument("--workdir", type=Path, help="keep the outputs here (default: a temporary directory)")
    parser.add_argument("--size", type=int, default=8000, help="bytes per slice (default 8000)")
    parser.add_argument("--window", type=int, default=2048, help="scoring window in bytes (default 2048)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip part (b) even if llama_cpp is installed")
    parser.add_argument("--reuse", type=Path, help="part (a)'s rows from this earlier --json; run part (b) only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out-md", type=Path)
    args = parser.parse_args()

    from transplant import write_slices

    names = sorted({n for pair in args.pairs for n in PAIRS[pair][:2]})
    paths = warm(names)
    with tempfile.TemporaryDirectory(prefix="tb-gguf-out-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        slices = write_slices(workdir / "slices", args.size)
        result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(["python", *sys.argv]), "code": git_state(), "machine": machine()}
        if args.reuse:
            earlier = json.loads(args.reuse.read_text())
            rows = [row for row in earlier["pairs"] if row["pair"] in args.pairs]
            missing = [p for row in rows for p in (row["gguf"]["out"], row["directory"]["out"]) if not Path(p).exists()]
            if len(rows) != len(args.pairs) or missing:
                sys.exit(f"--reuse {args.reuse}: pairs {args.pairs} or their outputs are missing ({missing})")
            result["part_a_from"] = {"json": str(args.reuse), "date": earlier["date"], "command": earlier["command"],
                                     "code": earlier["code"], "machine": earlier["machine"]}
            result["pairs"] = rows
        else:
            result["pairs"] = [part_a(pair, paths, workdir) for pair in args.pairs]
        if args.no_llama_cpp:
            result["llama_cpp_skipped"] = "skipped (--no-llama-cpp)"
        elif importlib.util.find_spec("llama_cpp") is None:
            result["llama_cpp_skipped"] = "llama_cpp is not installed (pip install llama-cpp-python), part (b) not run"
        else:
            result["llama_cpp"] = {row["pair"]: part_b(row, paths, slices, args.window) for row in result["pairs"]}
            result["llama_cpp_originals"] = originals(names, paths, slices, args.window)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.out_md:
        args.out_md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
