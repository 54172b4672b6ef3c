"""The ZeTT hypernetwork on a real model: training SmolLM2-135M's, its loss curve, its prediction speed.

Stages (each its own command; the evaluation itself is bench/transplant.py with ``--hypernet``):

    python bench/hypernet.py text    [--workdir /work/bench-hypernet]
        the training text: every corpus of ../shared/corpora (nine languages and Python code) from byte
        TRAIN_OFFSET on, so never the scored slices (which sit SLICE_OFFSET bytes in)
    python bench/hypernet.py train   [--workdir ...] [--steps 900] [-- extra hypernet train flags]
        runs `tokenbridge hypernet train packaged:smollm2 --text TEXT... --out WORKDIR/hn --json` under GNU time
    python bench/hypernet.py export  CHECKPOINT OUT
        a hypernetwork directory from a run's checkpoint (to score a run part-way, for the trend)
    python bench/hypernet.py predict HN_DIR [--json out.json]
        the time to predict the rows of all 262,144 Gemma-3 tokens (decomposition, then the network)
    python bench/hypernet.py report  LABEL=TRANSPLANT_JSON... [--md out.md]
        one table per pair from bench/transplant.py runs (rows of a later run replace an earlier run's rows of
        the same name; LABEL renames its `tokenbridge hypernet` row), and for each slice whether `hypernet`
        (the row labelled `hypernet`) is the lowest, and by how much it misses if not
    python bench/hypernet.py plot    TRAIN_JSON PNG [--other LABEL=TRAIN_JSON]
        the loss curve (TRAIN_JSON: the --json output of hypernet train, or a hypernet.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transplant import CORPORA, TRAIN_OFFSET, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_text(workdir: Path) -> list[Path]:
    out = workdir / "text"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted(CORPORA.glob("*.txt")):
        data = source.read_bytes()[TRAIN_OFFSET:]
        start = 0
        while (data[start] & 0xC0) == 0x80:
            start += 1
        path = out / source.name
        path.write_bytes(data[start:])
        paths.append(path)
    return paths


def train(workdir: Path, steps: int, extra: list[str]) -> int:
    texts = write_text(workdir)
    command = [sys.executable, "-m", "tokenbridge", "hypernet", "train", "packaged:smollm2", "--text",
               *map(str, texts), "--out", str(workdir / "hn"), "--steps", str(steps), "--batch-size", "8",
               "--lr", "5e-4", "--checkpoint-every", "100", "--seed", "0", "--json", *extra]
    with open(workdir / "train.json", "w") as out, open(workdir / "train.log", "w") as log:
        return subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=log, check=False).returncode


def export(checkpoint: Path, out: Path) -> None:
    """The hypernetwork's weights at a checkpoint, as a hypernetwork directory (same spec as the run's)."""
    from safetensors.torch import load_file

    from tokenbridge.hypernet.model import Hypernetwork, save_hypernet
    from tokenbridge.hypernet.train import FrozenModel, HypernetConfig
    from tokenbridge.load.model import load_causal_lm, resolve_source
    from tokenbridge.load.packaged import resolve
    from tokenbridge.write.manifest import verify_manifest

    problem = verify_manifest(checkpoint)
    if problem:
        raise SystemExit(f"{checkpoint}: {problem}")
    state = json.loads((checkpoint / "state.json").read_text())
    config = state["config"]
    base = state["inputs"]["model"]["path"]
    model, tokenizer = load_causal_lm(resolve_source(Path(resolve(base))))
    spec = FrozenModel(model, tokenizer, "cpu").spec(HypernetConfig(**config), base)
    network = Hypernetwork(spec)
    network.load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=True)
    out.mkdir(parents=True, exist_ok=False)
    save_hypernet(out, network, {"config": config, "report": state["report"], "from_checkpoint": state["step"]})


def predict(hn: Path) -> dict:
    import torch

    from tokenbridge.align.encode import ByteEncoder
    from tokenbridge.align.token_bytes import vocabulary
    from tokenbridge.hypernet.model import corrections, load_hypernet, subword_base
    from tokenbridge.load.model import resolve_source
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer

    network, _ = load_hypernet(hn)
    source_dir = resolve_source(resolve("packaged:smollm2"))
    from tokenbridge.load.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(source_dir)
    rows = checkpoint.read("model.embed_tokens.weight").float()
    source_vocab = vocabulary(load_tokenizer(source_dir))
    rows = rows[:len(source_vocab)]
    target = vocabulary(load_tokenizer(resolve_source(resolve("packaged:gemma3"))))
    encoder = ByteEncoder(source_vocab)
    started = time.perf_counter()
    pieces = [encoder.encode(t.bytes) or [] for t in target.tokens]
    decomposed = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        out = subword_base(rows, pieces) + corrections(network, rows, None, pieces, chunk=8192)
    network_s = time.perf_counter() - started
    lengths = [min(len(p), network.spec.max_pieces) for p in pieces]
    return {"rows": len(pieces), "dim": out.shape[1], "decompose_s": round(decomposed, 1),
            "network_s": round(network_s, 1), "total_s": round(decomposed + network_s, 1),
            "rows_per_s": round(len(pieces) / (decomposed + network_s)),
            "mean_pieces": round(sum(lengths) / len(lengths), 2), "threads": torch.get_num_threads(),
            "machine": machine()}


def plot(runs: dict[str, Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, path in runs.items():
        data = json.loads(path.read_text())
        report = data.get("report", data)  # a hypernet.json, or the --json output of hypernet train
        steps = np.array([s for s, _ in report["losses"]])
        losses = np.array([v for _, v in report["losses"]])
        tokens = report["tokens"] / max(1, report["steps_done"])
        ax.plot(steps, losses, alpha=0.25, linewidth=0.8)
        span = 25
        smooth = np.convolve(losses, np.ones(span) / span, mode="valid")
        ax.plot(steps[span - 1:], smooth, linewidth=2,
                label=f"{label}: {span}-step mean ({report['tokens']:,} tokens, {tokens:.0f} per step)")
        first = losses[:span].mean()
        ax.axhline(first, linestyle="--", linewidth=1, color="grey")
        ax.text(steps[-1], first, f" first {span} steps: {first:.2f}", va="bottom", ha="right", fontsize=8)
    ax.set_xlabel("optimizer step (8 windows of 1,024 bytes, each step a new 32,768-piece sampled tokenizer)")
    ax.set_ylabel("LM loss, nats per sampled token")
    ax.set_title("Hypernetwork for SmolLM2-135M: training loss (step 1 = subword init)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def report(runs: list[tuple[str, Path]]) -> str:
    pairs: dict[int, dict] = {}
    for label, path in runs:
        for rep in json.loads(path.read_text())["reports"]:
            pair = pairs.setdefault(rep["pair"]["number"], {"name": rep["pair"]["name"], "rows": {}, "files": rep["files"]})
            for row in rep["rows"]:
                name = row["method"].removeprefix("tokenbridge ")
                if name == "hypernet" and label:
                    name = label
                pair["rows"][name] = row
    lines = []
    for number, pair in sorted(pairs.items()):
        files = pair["files"]
        rows = {n: r for n, r in pair["rows"].items() if n != "original"}
        others = {n: r for n, r in rows.items() if not n.startswith("hypernet")}
        lines += [f"#### Pair {number}: {pair['name']}", "",
                  "| method | " + " | ".join(f.removesuffix(".txt") for f in files) + " | all |",
                  "|---|" + "---:|" * (len(files) + 1)]
        best = {f: min(r["files"][f]["ratio"] for r in others.values()) for f in files}
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_byte"]):
            cells = []
            for f in files:
                ratio = row["files"][f]["ratio"]
                cells.append(f"**{ratio:.3f}**" if ratio <= min(r["files"][f]["ratio"] for r in rows.values())
                             else f"{ratio:.3f}")
            total = row["bits_per_byte"] / pair["rows"]["original"]["bits_per_byte"]
            cells.append(f"{total:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if "hypernet" in rows:
            verdict = []
            for f in files:
                mine = rows["hypernet"]["files"][f]["ratio"]
                winner = min(others, key=lambda n: others[n]["files"][f]["ratio"])
                if mine < best[f]:
                    verdict.append(f"{f.removesuffix('.txt')}: lowest ({mine:.3f}; next {winner} {best[f]:.3f})")
                else:
                    verdict.append(f"{f.removesuffix('.txt')}: not lowest ({mine:.3f} against {winner} {best[f]:.3f}, "
                                   f"{100 * (mine / best[f] - 1):.1f}% higher)")
            lines += ["Goal (hypernet lowest): " + "; ".join(verdict) + ".", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("text")
    p.add_argument("--workdir", type=Path, default=Path("/work/bench-hypernet"))
    p = sub.add_parser("train")
    p.add_argument("--workdir", type=Path, default=Path("/work/bench-hypernet"))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("extra", nargs="*")
    p = sub.add_parser("export")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("predict")
    p.add_argument("hypernet", type=Path)
    p.add_argument("--json", type=Path)
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+", metavar="LABEL=TRANSPLANT_JSON")
    p.add_argument("--md", type=Path)
    p = sub.add_parser("plot")
    p.add_argument("train_json", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--other", action="append", default=[], metavar="LABEL=TRAIN_JSON")
    args = parser.parse_args()
    if args.stage == "text":
        print("\n".join(map(str, write_text(args.workdir))))
    elif args.stage == "train":
        return train(args.workdir, args.steps, args.extra)
    elif args.stage == "export":
        export(args.checkpoint, args.out)
    elif args.stage == "predict":
        result = predict(args.hypernet)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    elif args.stage == "report":
        text = report([(run.split("=", 1)[0], Path(run.split("=", 1)[1])) for run in args.runs])
        print(text)
        if args.md:
            args.md.write_text(text + "\n")
    else:
        runs = {"SmolLM2-135M": args.train_json}
        runs.update({k: Path(v) for k, v in (o.split("=", 1) for o in args.other)})
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
