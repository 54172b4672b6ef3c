"""Healing on real models, on this machine: BPB ratio to the original before and after a time budget.

For one pair (1: Gemma-3-270M -> SmolLM2 tokenizer, 2: SmolLM2-135M -> Gemma-3 tokenizer) and one
mode, from the pair's zero-shot transplant:

1. score the original model and the zero-shot student on the four slices of bench/transplant.py
   (8000 bytes of en, de, ja, code, 20000 bytes into each file; never trained on);
2. time a short probe of the heal loop, and set the number of steps so that training fits
   ``--minutes``;
3. heal on the English training text (debref.en from byte 60000 on) and score the healed model.

`python bench/heal.py --report RUN.json...` prints a markdown table of finished runs.

The gap closed on a slice is (zero-shot ratio - healed ratio) / (zero-shot ratio - 1).

Pair 3 distils a different model: the student is SmolLM2-135M itself (``--student packaged:smollm2``,
never transplanted), the teacher Gemma-3-270M; ratios are to the teacher, and the gap closed is the share
of the student's distance to the teacher that training removes.  ``--text de`` trains on German alone.
Pair 4 is SmolLM2-135M moved to bytes (``tokenbridge transplant packaged:smollm2 bytes OUT``), healed
from SmolLM2 itself.

``--text mixed`` trains on the training halves (from byte 60000 on) of en, de, ja and code, sampled
equally (``heal --mix 1 1 1 1``) instead of English alone; ``--steps N`` gives every objective the same
budget (the same windows, so the same bytes and student tokens).  ``--control`` trains the original
model on the same text for the same steps (sft; nothing to distil from itself).
`python bench/heal.py --table CONTROL.json RUN.json...` prints the ALM paper's Table 1 at our scale:
each run's BPB ratio to the original per slice, and the gap it closes measured against the control,
(zero-shot BPB - healed BPB) / (zero-shot BPB - control BPB).

    python bench/heal.py --pair 1 --mode embeddings --student /work/heal/pair1-tokenadapt --minutes 15 \
        --workdir /work/heal --json /work/heal/pair1-embeddings.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))

from transplant import CORPORA, TRAIN_OFFSET, write_slices

PAIRS = {1: ("Gemma-3-270M -> SmolLM2 tokenizer", "packaged:gemma3"),
         2: ("SmolLM2-135M -> Gemma-3 tokenizer", "packaged:smollm2"),
         3: ("Gemma-3-270M distilled into SmolLM2-135M", "packaged:gemma3"),
         4: ("SmolLM2-135M -> bytes", "packaged:smollm2")}


def score(model, slices, size) -> dict:
    from tokenbridge.measure.bpb import evaluate

    result = evaluate(model, slices, size, 2048, progress=False)
    return {Path(f.file).stem: f.bits_per_byte for f in result.files}


def _percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def markdown_report(paths: list[Path]) -> str:
    """A markdown table of several runs' JSON files."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    header = ("| pair | mode (trains) | steps | student tokens | train min | tok/s | slice | original "
              "| zero-shot (ratio) | healed (ratio) | gap closed |")
    lines = [header, "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for run in runs:
        config = run["config"]
        for number, (key, row) in enumerate(run["slices"].items()):
            head = (f"| {run['pair']} | {run['mode']} ({config['train']}) | {run['steps']} | {run['student_tokens']:,} | "
                    f"{run['train_seconds'] / 60:.1f} | {run['tokens_per_second']:.0f} " if number == 0 else
                    "| | | | | | ")
            lines.append(f"{head}| {key} | {row['original']:.4f} | {row['zero_shot']:.4f} ({row['zero_shot_ratio']:.3f}) "
                         f"| {row['healed']:.4f} ({row['healed_ratio']:.3f}) | {_percent(row['gap_closed'])} |")
    return "\n".join(lines)


def table_report(control: Path, paths: list[Path]) -> str:
    """Table 1 at our scale: BPB ratio to the original, and the gap closed against the control."""
    base = json.loads(Path(control).read_text())
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = list(base["slices"])
    lines = ["| objective (trains) | steps | student tokens | train min | " + " | ".join(keys) + " | gap closed vs control: "
             + ", ".join(keys) + " |", "|---|---:|---:|---:|" + "---:|" * len(keys) + "---|"]
    zero = {k: runs[0]["slices"][k]["zero_shot"] for k in keys} if runs else {}
    original = {k: base["slices"][k]["original"] for k in keys}
    lines.append("| zero-shot | 0 | 0 | 0 | " + " | ".join(f"{zero[k] / original[k]:.3f}" for k in keys) + " | |")
    lines.append(f"| control: the original, sft ({base['config']['train']}) | {base['steps']} | {base['student_tokens']:,} "
                 f"| {base['train_seconds'] / 60:.1f} | " + " | ".join(f"{base['slices'][k]['healed_ratio']:.3f}" for k in keys)
                 + " | |")
    for run in runs:
        gaps = []
        for k in keys:
            healed, control = run["slices"][k]["healed"], base["slices"][k]["healed"]
            gaps.append(_percent((zero[k] - healed) / (zero[k] - control)) if abs(zero[k] - control) > 1e-9 else "-")
        config = run["config"]
        variant = "".join([f", {config['chunks']} chunks" if "alm" in run["mode"] and config["chunks"] != "word" else "",
                           ", gradmag" if config.get("balance") == "gradmag" else ""])
        lines.append(f"| {run['mode']}{variant} ({config['train']}) | {run['steps']} | {run['student_tokens']:,} | "
                     f"{run['train_seconds'] / 60:.1f} | " + " | ".join(f"{run['slices'][k]['healed_ratio']:.3f}" for k in keys)
                     + " | " + ", ".join(gaps) + " |")
    return "\n".join(lines)


def training_text(workdir: Path, kind: str) -> tuple[list[Path], list[float] | None]:
    """The training files: English alone, or the training halves of en, de, ja and code, mixed equally."""
    names = {"en": ["debref.en.txt"], "de": ["debref.de.txt"], "mixed": ["debref.en.txt", "debref.de.txt", "debref.ja.txt", "code.python.txt"]}
    paths = []
    for name in names[kind]:
        path = workdir / f"train-{name.split('.')[-2]}.txt"
        if not path.exists():
            data = (CORPORA / name).read_bytes()[TRAIN_OFFSET:]
            while data and (data[0] & 0xC0) == 0x80:
                data = data[1:]
            path.write_bytes(data)
        paths.append(path)
    return paths, ([1.0] * len(paths) if kind == "mixed" else None)


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        print(markdown_report([Path(p) for p in sys.argv[2:]]))
        return
    if sys.argv[1:2] == ["--table"]:
        print(table_report(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=int, choices=sorted(PAIRS), required=True)
    parser.add_argument("--student", help="the pair's zero-shot transplant (or packaged:NAME)")
    parser.add_argument("--control", action="store_true",
                        help="train the original model itself the same way (what the training text alone is worth)")
    parser.add_argument("--mode", default="embeddings")
    parser.add_argument("--text", default="en", choices=["en", "de", "mixed"], help="training text (see above)")
    parser.add_argument("--chunks", default="word")
    parser.add_argument("--distance", default="binary-kl")
    parser.add_argument("--latents", type=float, default=0.0)
    parser.add_argument("--balance", default="sum")
    parser.add_argument("--tag", default="", help="added to the output directory's name")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="score the first 2000 bytes of each slice every N steps (heal --eval), for the curve")
    parser.add_argument("--train", default="")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--embedding-lr", type=float, default=0.0)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="a fixed number of steps instead of --minutes")
    parser.add_argument("--bytes", type=int, default=8000)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from tokenbridge.heal import HealConfig, heal
    from tokenbridge.load.packaged import resolve

    name, teacher_ref = PAIRS[args.pair]
    teacher = resolve(teacher_ref)
    if args.control:
        args.student = teacher
    elif args.student is None:
        parser.error("--student is required (or --control)")
    else:
        args.student = resolve(args.student)
    tag = "control" if args.control else "zero-shot"
    args.workdir.mkdir(parents=True, exist_ok=True)
    slices = write_slices(args.workdir / "slices", args.bytes)
    train, mix = training_text(args.workdir, args.text)
    cache = args.workdir / f"pair{args.pair}-{tag}.json"
    if cache.exists():
        before = json.loads(cache.read_text())
    else:
        before = {"original": score(teacher, slices, args.bytes), "zero_shot": score(args.student, slices, args.bytes)}
        cache.write_text(json.dumps(before, indent=1))

    config = HealConfig(mode=args.mode, train=args.train, steps=1000, batch_size=args.batch_size, window=args.window,
                        lr=args.lr, embedding_lr=args.embedding_lr, chunks=args.chunks, distance=args.distance,
                        latents=args.latents, balance=args.balance, mix=mix or [], eval_every=args.eval_every)
    held_out = write_slices(args.workdir / "eval-slices", 2000) if args.eval_every else []
    if args.steps:
        config.steps = args.steps
    else:
        probe_out = args.workdir / f"probe-{args.pair}-{args.mode}"
        shutil.rmtree(Path(str(probe_out) + ".checkpoints"), ignore_errors=True)
        started = time.perf_counter()
        _, probe = heal(args.student, train, probe_out, replace(config, eval_every=0), teacher=teacher, progress=False,
                        stop_after=args.probe_steps)
        seconds_per_step = probe.seconds / probe.steps_done
        config.steps = max(args.probe_steps, int(args.minutes * 60 / seconds_per_step))
        print(f"probe: {seconds_per_step:.2f} s/step ({time.perf_counter() - started:.0f} s with loading); "
              f"{config.steps} steps", flush=True)

    out = args.workdir / (f"pair{args.pair}-{'control-' if args.control else ''}{args.mode.replace('+', '-')}"
                          f"{'-' + args.train if args.train else ''}{'-' + args.tag if args.tag else ''}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    _, report = heal(args.student, train, out, config, teacher=teacher, force=True, progress=True,
                     checkpoint_every=0, eval_texts=held_out)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    after = score(out, slices, args.bytes)
    original, zero = before["original"], before["zero_shot"]
    rows = {}
    for key in original:
        zs_ratio, healed_ratio = zero[key] / original[key], after[key] / original[key]
        rows[key] = {"original": original[key], "zero_shot": zero[key], "healed": after[key],
                     "zero_shot_ratio": zs_ratio, "healed_ratio": healed_ratio,
                     "gap_closed": (zs_ratio - healed_ratio) / (zs_ratio - 1) if abs(zs_ratio - 1) > 1e-9 else None}
    result = {"pair": name + (" (control: the original trained the same way)" if args.control else ""), "student": str(args.student), "teacher": str(teacher), "mode": args.mode,
              "config": asdict(config.resolved()), "train_text": [str(t) for t in train],
              "train_bytes": sum(t.stat().st_size for t in train),
              "train_seconds": report.seconds, "wall_seconds": wall, "steps": report.steps_done,
              "student_tokens": report.student_tokens, "teacher_tokens": report.teacher_tokens,
              "tokens_per_second": report.tokens_per_second, "loss_first": report.losses[0][1],
              "loss_last": report.losses[-1][1], "load_before": load_before, "load_after": load_after,
              "evals": report.evals, "out": str(out),
              "slices": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.json.write_text(json.dumps(result, indent=1))
    for key, row in rows.items():
        print(f"{key:5s} original {row['original']:.4f}  zero-shot {row['zero_shot']:.4f} ({row['zero_shot_ratio']:.3f})"
              f"  healed {row['healed']:.4f} ({row['healed_ratio']:.3f})  gap closed {_percent(row['gap_closed'])}")
    print(f"{report.steps_done} steps, {report.student_tokens} student tokens, {report.tokens_per_second:.0f} tok/s, "
          f"{report.seconds / 60:.1f} min training")


if __name__ == "__main__":
    main()
