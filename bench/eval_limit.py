"""`tokenbridge eval` against the machine's limit and against the naive loop (issue 20, part 0).

One run measures, as whole processes, over --pairs paired runs (order alternating within a pair):

* ``tokenbridge eval MODEL --text <4 slices> --window 1500 --json --quiet``;
* bench/eval_naive.py: stock transformers, one window per forward, log_softmax, gather;

each: wall seconds and peak RSS (``os.wait4`` of that child: ru_maxrss), median, min and max.  Both must agree on
bits per byte.  In the same run, the limit:

* matmul FLOPs of the scored windows, counted from the model's config: per position 2 x the weights of every
  ``nn.Linear`` of the body, per scored position (all but each window's last) 2 x the lm_head's, plus the
  attention matmuls QK^T and AV over the causal triangle (n(n+1)/2 query-key pairs per head and layer) for the
  actual token length n of every window (prefix included);
* divided by the float32 GFLOPS that torch.matmul reaches here, timed (before and after the paired runs, the
  better one used) at the model's own linear shapes (rows = the median window length), each weighted by its
  FLOPs in one forward pass (QK^T at that length is timed and reported too, not weighted);
* plus the fixed cost of a process: the naive run's wall minus its scoring time (interpreter, imports, model
  load), median.

Goals (issue 20): tokenbridge within 1.2x of the limit, faster than the naive loop in every pair, peak RSS at most
1.2x the naive loop's.  Writes --json and --markdown.

    python bench/eval_limit.py [--pairs 3] [--model packaged:smollm2] [--bytes 12000] [--window 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from transplant import machine, write_slices  # noqa: E402


def run_child(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of ``command`` run to completion as a child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def linear_shapes(model_dir: Path):
    """[(in_features, out_features, is_lm_head)] of every nn.Linear of the model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    shapes = [(m.in_features, m.out_features, m is head) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return shapes, text.num_hidden_layers, heads, head_dim


def window_lengths(model_dir: Path, files: list[str], window: int) -> list[int]:
    """Token length (prefix included) of every window, as both commands see them."""
    from eval_naive import windows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [w.decode("utf-8") for f in files for w in windows(Path(f).read_bytes(), window)]
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [1 + len(ids) for ids in encoded]


def matmul_flops(lengths: list[int], shapes, layers: int, heads: int, head_dim: int) -> dict:
    body = sum(i * o for i, o, is_head in shapes if not is_head)
    head = sum(i * o for i, o, is_head in shapes if is_head)
    positions = sum(lengths)
    scored = sum(n - 1 for n in lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    linear = 2 * body * positions + 2 * head * scored
    attention = 2 * 2 * pairs * head_dim * heads * layers  # QK^T and AV
    return {"linear": linear, "attention": attention, "total": linear + attention, "positions": positions,
            "scored_tokens": scored, "body_linear_weights": body, "head_weights": head}


def measure_gflops(rows: int, shapes, heads: int, head_dim: int, seconds: float = 0.25) -> dict:
    """float32 GFLOPS of torch.matmul at the model's linear shapes (``rows`` x in @ in x out), weighted as in one
    forward pass of ``rows`` positions; QK^T of ``rows`` positions is timed and reported alongside."""
    import torch

    torch.manual_seed(0)
    distinct: dict[tuple, int] = {}
    for i, o, _ in shapes:
        distinct[(i, o)] = distinct.get((i, o), 0) + 1
    results, total_flops, total_time = [], 0.0, 0.0
    with torch.inference_mode():
        cases = [("linear", (rows, i), (o, i), count, 2 * rows * i * o) for (i, o), count in distinct.items()]
        cases.append(("attention QK^T", (heads, rows, head_dim), (heads, rows, head_dim), 0,
                      2 * heads * rows * rows * head_dim))
        for name, a_shape, b_shape, count, flops in cases:
            a, b = torch.randn(a_shape), torch.randn(b_shape)
            step = (lambda: torch.matmul(a, b.t())) if name == "linear" else (lambda: torch.matmul(a, b.transpose(1, 2)))
            step()
            reps, started = 0, time.perf_counter()
            best = float("inf")
            while time.perf_counter() - started < seconds or reps < 3:
                t = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - t)
                reps += 1
            mean = (time.perf_counter() - started) / reps
            results.append({"case": name, "a": list(a_shape), "b": list(b_shape), "count": count,
                            "gflops_mean": flops / mean / 1e9, "gflops_best": flops / best / 1e9})
            if count:
                total_flops += flops * count
                total_time += mean * count
    return {"rows": rows, "threads": torch.get_num_threads(), "gflops": total_flops / total_time / 1e9,
            "cases": results}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def markdown(report: dict) -> str:
    tb, nv, lim = report["tokenbridge"], report["naive"], report["limit"]
    rows = [f"# `tokenbridge eval` vs the naive loop vs the matmul limit ({report['model']})", "",
            f"{report['machine']}; load average before {report['load_average_before']:.2f}, after "
            f"{report['load_average_after']:.2f}; {report['pairs']} paired runs; 4 files x {report['bytes']} bytes, "
            f"windows of {report['window']} bytes; {lim['flops']['scored_tokens']} tokens scored", "",
            "| | wall s (median) | min | max | peak RSS MiB (median) | min | max |", "|---|---|---|---|---|---|---|"]
    for name, data in (("tokenbridge eval", tb), ("naive loop", nv)):
        w, m = data["wall"], data["rss_mib"]
        rows.append(f"| {name} | {w['median']:.1f} | {w['min']:.1f} | {w['max']:.1f} | {m['median']:.0f} | "
                    f"{m['min']:.0f} | {m['max']:.0f} |")
    rows += ["", f"Limit: {lim['flops']['total'] / 1e12:.2f} TFLOP of matmuls "
                 f"({lim['flops']['attention'] / 1e12:.2f} of them attention) at {lim['gflops']:.0f} GFLOPS "
                 f"= {lim['matmul_seconds']:.1f} s, plus {lim['fixed_seconds']:.1f} s fixed process cost "
                 f"(naive run wall minus its scoring) = **{lim['seconds']:.1f} s**.", "",
             "| goal | value | met |", "|---|---|---|"]
    for goal in report["goals"]:
        rows.append(f"| {goal['goal']} | {goal['value']} | {'yes' if goal['met'] else 'no'} |")
    rows += ["", f"Bits per byte: tokenbridge {tb['bits_per_byte']:.6f}, naive {nv['bits_per_byte']:.6f}."]
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2")
    parser.add_argument("--bytes", type=int, default=12000)
    parser.add_argument("--window", type=int, default=1500)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "eval_limit.json"))
    parser.add_argument("--markdown", default=str(HERE / "eval_limit.md"))
    args = parser.parse_args()

    from tokenbridge.load.packaged import resolve
    from tokenbridge.pipeline import resolve_source

    model_dir = resolve_source(resolve(args.model))  # warms the conversion cache
    shapes, layers, heads, head_dim = linear_shapes(model_dir)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        slices = [str(p) for p in write_slices(Path(tmp), args.bytes)]
        tb_command = [sys.executable, "-m", "tokenbridge", "eval", args.model, "--text", *slices,
                      "--window", str(args.window), "--json", "--quiet"]
        naive_command = [sys.executable, str(HERE / "eval_naive.py"), str(model_dir), *slices,
                         "--window", str(args.window)]
        lengths = window_lengths(model_dir, slices, args.window)
        rows = int(statistics.median(lengths))
        gflops_before = measure_gflops(rows, shapes, heads, head_dim)
        runs = {"tokenbridge": [], "naive": []}
        for pair in range(args.pairs):
            order = [("tokenbridge", tb_command), ("naive", naive_command)]
            for name, command in order if pair % 2 == 0 else order[::-1]:
                wall, rss, out = run_child(command)
                runs[name].append({"wall": wall, "rss_mib": rss, "result": json.loads(out)})
                print(f"pair {pair + 1}: {name:11s} {wall:6.1f} s {rss:6.0f} MiB", flush=True)
        assert runs["naive"][0]["result"]["window_lengths"] == lengths
        gflops_after = measure_gflops(rows, shapes, heads, head_dim)
    load_after = os.getloadavg()[0]

    gflops = max(gflops_before["gflops"], gflops_after["gflops"])
    flops = matmul_flops(lengths, shapes, layers, heads, head_dim)
    fixed = statistics.median(r["wall"] - r["result"]["score_seconds"] for r in runs["naive"])
    limit_seconds = flops["total"] / (gflops * 1e9) + fixed
    report = {"machine": machine(), "model": args.model, "bytes": args.bytes, "window": args.window,
              "pairs": args.pairs, "load_average_before": load_before, "load_average_after": load_after,
              "limit": {"flops": flops, "gflops": gflops, "gflops_before": gflops_before,
                        "gflops_after": gflops_after, "matmul_seconds": flops["total"] / (gflops * 1e9),
                        "fixed_seconds": fixed, "seconds": limit_seconds,
                        "naive_import_seconds": statistics.median(r["result"]["import_seconds"] for r in runs["naive"]),
                        "naive_load_seconds": statistics.median(r["result"]["load_seconds"] for r in runs["naive"])}}
    for name in runs:
        report[name] = {"wall": summary([r["wall"] for r in runs[name]]),
                        "rss_mib": summary([r["rss_mib"] for r in runs[name]]),
                        "bits_per_byte": runs[name][-1]["result"]["bits_per_byte"]}
    tb, nv = report["tokenbridge"], report["naive"]
    ratio = tb["wall"]["median"] / limit_seconds
    faster = [a["wall"] < b["wall"] for a, b in zip(runs["tokenbridge"], runs["naive"])]
    memory = tb["rss_mib"]["median"] / nv["rss_mib"]["median"]
    agree = abs(tb["bits_per_byte"] - nv["bits_per_byte"]) <= 1e-5 * abs(nv["bits_per_byte"])
    report["goals"] = [
        {"goal": "wall within 1.2x of the limit (median)", "value": f"{ratio:.2f}x", "met": ratio <= 1.2},
        {"goal": "faster than the naive loop in every pair", "value": f"{sum(faster)}/{len(faster)} pairs",
         "met": all(faster)},
        {"goal": "peak RSS at most 1.2x the naive loop's (median)", "value": f"{memory:.2f}x", "met": memory <= 1.2},
        {"goal": "same bits per byte as the naive loop (rel 1e-5)",
         "value": f"{tb['bits_per_byte']:.6f} vs {nv['bits_per_byte']:.6f}", "met": agree},
    ]
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.markdown).write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
