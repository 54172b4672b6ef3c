"""Tokenizer training on real text: supertokens on English, one tokenizer for nine languages (issue 7).

Part A (supertokens): byte-level BPE tokenizers trained on debref.en.txt from byte TRAIN_OFFSET on, for
each vocabulary size: plain BPE, supertoken BPE (SuperBPE-style second stage, default share 0.25 and at
most 4 words per token) and Unigram, all with the same ``vocab_size``.  Each is scored in bytes per token
on the held-out bytes SLICE_OFFSET..TRAIN_OFFSET of the same file (cut on character boundaries; never
trained on), next to SmolLM2's and Gemma-3's tokenizers.  The issue's goal: a supertoken tokenizer
reaches at least 15% more bytes per token than plain BPE of the same size.  Nothing is tuned on the
held-out slice.

Part B (multilingual): one 49,152-token byte-level BPE tokenizer like SmolLM2's (its pre-tokenizer and
special tokens) trained on all nine Debian Reference translations from byte TRAIN_OFFSET on.  On 8000
bytes of each language from SLICE_OFFSET (the slices of bench/transplant.py), both tokenizers are scored
in bytes per token and token premium (tokens relative to en on the parallel text); then SmolLM2-135M is
transplanted onto the new tokenizer (``tokenbridge transplant --method tokenadapt``, own process) and the
original and the transplant are scored in bits per byte on the same byte windows.

    python bench/tokenizer_training.py [--part a|b|both] [--sizes 2048,4096,8192,16384] [--min-frequency 2]
                                       [--bytes 8000] [--window 2048] [--workdir /work/bench-tokenizers]
                                       [--json out.json] [--md out.md]

``--min-frequency`` is the fewest occurrences a merge needs, for every tokenizer trained here.  With 2
(the default) plain BPE runs out of merges on this small corpus before large sizes; with 1 every
tokenizer reaches its size, the extra merges being pairs seen once.

The results in bench/RESULTS.md (and bench/tokenizer-training-f{1,2}.{md,json}) came from

    python bench/tokenizer_training.py --min-frequency 1 --md bench/tokenizer-training-f1.md --json bench/tokenizer-training-f1.json
    python bench/tokenizer_training.py --min-frequency 2 --md bench/tokenizer-training-f2.md --json bench/tokenizer-training-f2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from transplant import CORPORA, SLICE_OFFSET, TRAIN_OFFSET, machine

LANGUAGES = ("de", "en", "es", "fr", "id", "it", "ja", "pt", "zh-cn")
SIZES = "2048,4096,8192,16384"
MULTILINGUAL_SIZE = 49152
GOAL = 0.15  # supertoken bytes per token over plain BPE's, same size
KINDS = {"plain": {"model": "bpe"}, "supertoken": {"model": "bpe", "supertokens": True},
         "unigram": {"model": "unigram"}}


def corpus_bytes(file: str, start: int, size: int | None = None) -> bytes:
    """``size`` bytes of a corpus from ``start`` (moved on to a character boundary), cut as write_slices cuts."""
    from tokenbridge.measure.bpb import cut_text

    data = (CORPORA / file).read_bytes()
    while (data[start] & 0xC0) == 0x80:
        start += 1
    return cut_text(data[start:], size)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stats(tokenizer, path: Path, name: str):
    from tokenbridge.measure.tokstats import tokenizer_stats

    return tokenizer_stats(tokenizer, path.read_text(encoding="utf-8"), path.stem, tokenizer_name=name)


def packaged_tokenizers() -> dict[str, object]:
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer

    return {"SmolLM2": load_tokenizer(resolve("packaged:smollm2")),
            "Gemma-3": load_tokenizer(resolve("packaged:gemma3"))}


def train_one(texts: list[Path], out: Path, config, like: Path | None = None) -> dict:
    """Train into ``out``; the report's size, time and bytes per token on each training text."""
    from tokenbridge.tokenizers.api import train

    report = train(texts, out, config, like=like, force=True, progress=False)
    return {"dir": str(out), "vocab_size": config.vocab_size, "vocab_reached": report.vocab_after,
            "train_seconds": report.seconds,
            "train_bytes_per_token": {Path(c.text).stem: c.after for c in report.compression}}


# ----------------------------------------------------------------------------------------------
# Part A


def part_a(workdir: Path, sizes: list[int], min_frequency: int) -> dict:
    from tokenbridge.load.tokenizer import load_tokenizer
    from tokenbridge.tokenizers.train import TrainConfig

    train_text = write(workdir / "train-en.txt", corpus_bytes("debref.en.txt", TRAIN_OFFSET))
    held_out = write(workdir / "heldout-en.txt",
                     corpus_bytes("debref.en.txt", SLICE_OFFSET, TRAIN_OFFSET - SLICE_OFFSET))
    rows = []
    for size in sizes:
        row = {"vocab_size": size}
        for kind, options in KINDS.items():
            print(f"part A: {size} {kind}", file=sys.stderr, flush=True)
            config = TrainConfig(size, min_frequency=min_frequency, **options)
            trained = train_one([train_text], workdir / f"{kind}-{size}-f{min_frequency}", config)
            held = stats(load_tokenizer(Path(trained["dir"])), held_out, f"{kind}-{size}")
            row[kind] = dict(trained, tokens=held.tokens, bytes_per_token=held.bytes_per_token)
        row["gain"] = row["supertoken"]["bytes_per_token"] / row["plain"]["bytes_per_token"] - 1
        row["goal_met"] = row["gain"] >= GOAL
        rows.append(row)
    references = {}
    for name, tokenizer in packaged_tokenizers().items():
        held = stats(tokenizer, held_out, name)
        references[name] = {"vocab_size": len(tokenizer), "tokens": held.tokens,
                            "bytes_per_token": held.bytes_per_token}
    return {"train_text": str(train_text), "train_bytes": train_text.stat().st_size,
            "held_out": str(held_out), "held_out_bytes": held_out.stat().st_size,
            "held_out_range": [SLICE_OFFSET, TRAIN_OFFSET], "goal": GOAL, "min_frequency": min_frequency, "rows": rows, "references": references}


def part_a_markdown(result: dict) -> list[str]:
    intro = (f"Trained on debref.en.txt from byte {TRAIN_OFFSET:,} on ({result['train_bytes']:,} bytes); "
             f"scored on bytes {SLICE_OFFSET:,}..{TRAIN_OFFSET:,} ({result['held_out_bytes']:,} bytes, never "
             f"trained on). Merges need {result['min_frequency']} occurrence(s). Bytes per token on the held-out slice; the size reached is the tokenizer's length "
             "(special tokens included) against the size asked for.")
    header = ("| vocab size | plain BPE: reached | bytes/token | supertoken BPE: reached | bytes/token | gain "
              f"| goal (>= {GOAL:.0%}) | Unigram: reached | bytes/token |")
    lines = ["### Part A: supertokens on English", "", intro, "", header,
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in result["rows"]:
        plain, superb, unigram = row["plain"], row["supertoken"], row["unigram"]
        lines.append(f"| {row['vocab_size']:,} | {plain['vocab_reached']:,} | {plain['bytes_per_token']:.3f} "
                     f"| {superb['vocab_reached']:,} | {superb['bytes_per_token']:.3f} | {row['gain']:+.1%} "
                     f"| {'met' if row['goal_met'] else 'not met'} | {unigram['vocab_reached']:,} "
                     f"| {unigram['bytes_per_token']:.3f} |")
    lines += ["", "| reference tokenizer | vocab size | bytes/token |", "|---|---:|---:|"]
    for name, ref in result["references"].items():
        lines.append(f"| {name} | {ref['vocab_size']:,} | {ref['bytes_per_token']:.3f} |")
    lines += ["", "Bytes per token on the training text itself (for comparison with the held-out slice):", "",
              "| vocab size | plain BPE | supertoken BPE | Unigram |", "|---:|---:|---:|---:|"]
    for row in result["rows"]:
        cells = " | ".join(f"{row[k]['train_bytes_per_token']['train-en']:.3f}" for k in KINDS)
        lines.append(f"| {row['vocab_size']:,} | {cells} |")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# Part B


def part_b(workdir: Path, size: int, window: int, min_frequency: int) -> dict:
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer
    from tokenbridge.measure.bpb import evaluate
    from tokenbridge.measure.compare import run_transplant
    from tokenbridge.measure.tokstats import token_premium
    from tokenbridge.pipeline import resolve_source
    from tokenbridge.tokenizers.train import TrainConfig

    texts = [write(workdir / "train" / f"{lang}.txt", corpus_bytes(f"debref.{lang}.txt", TRAIN_OFFSET))
             for lang in LANGUAGES]
    slices = [write(workdir / "slices" / f"{lang}.txt", corpus_bytes(f"debref.{lang}.txt", SLICE_OFFSET, size))
              for lang in LANGUAGES]
    like = resolve("packaged:smollm2")
    print(f"part B: training a {MULTILINGUAL_SIZE:,}-token tokenizer like SmolLM2's", file=sys.stderr, flush=True)
    config = TrainConfig(MULTILINGUAL_SIZE, min_frequency=min_frequency)
    trained = train_one(texts, workdir / f"multilingual-{MULTILINGUAL_SIZE}-f{min_frequency}", config,
                        like=like)
    tokenizers = {"SmolLM2": load_tokenizer(like), "new": load_tokenizer(Path(trained["dir"]))}
    languages = {lang: {"bytes": path.stat().st_size} for lang, path in zip(LANGUAGES, slices)}
    for name, tokenizer in tokenizers.items():
        by_lang = {lang: stats(tokenizer, path, name) for lang, path in zip(LANGUAGES, slices)}
        premium = token_premium(by_lang, "en")
        for lang, row in by_lang.items():
            languages[lang][name] = {"tokens": row.tokens, "bytes_per_token": row.bytes_per_token,
                                     "token_premium": premium[lang]}

    source = resolve_source(like)
    model = workdir / f"smollm2-tokenadapt-f{min_frequency}"
    print("part B: transplanting SmolLM2 onto it (tokenadapt)", file=sys.stderr, flush=True)
    summary = run_transplant(source, Path(trained["dir"]), model, "tokenadapt", 0)
    print("part B: scoring the original and the transplant", file=sys.stderr, flush=True)
    for name, directory in (("SmolLM2", source), ("new", model)):
        result = evaluate(directory, slices, size, window, progress=False)
        for score in result.files:
            languages[Path(score.file).stem][name]["bits_per_byte"] = score.bits_per_byte
    for row in languages.values():
        row["bpb_ratio"] = row["new"]["bits_per_byte"] / row["SmolLM2"]["bits_per_byte"]
    return {"train_texts": [str(p) for p in texts], "train_bytes": sum(p.stat().st_size for p in texts),
            "slice_bytes": size, "window": window, "min_frequency": min_frequency, "tokenizer": trained, "model": str(model),
            "transplant": {"method": "tokenadapt", "seconds": summary["seconds"],
                           "peak_rss_mb": summary["peak_rss_mb"], "counts": summary["counts"]},
            "languages": languages}


def part_b_markdown(result: dict) -> list[str]:
    tokenizer, transplant = result["tokenizer"], result["transplant"]
    intro = (f"New tokenizer: byte-level BPE like SmolLM2's, {tokenizer['vocab_size']:,} asked, "
             f"{tokenizer['vocab_reached']:,} reached (merges need {result['min_frequency']} occurrence(s)), trained in {tokenizer['train_seconds']:.0f} s on the nine "
             f"debref files from byte {TRAIN_OFFSET:,} on ({result['train_bytes']:,} bytes in all). "
             f"Scored on {result['slice_bytes']:,} bytes of each language from byte {SLICE_OFFSET:,} (never "
             "trained on). Token premium = tokens(language) / tokens(en) on these parallel slices. "
             f"Bits per byte over windows of {result['window']:,} bytes; the transplant is SmolLM2-135M with "
             f"`--method tokenadapt` ({transplant['seconds']:.0f} s, peak {transplant['peak_rss_mb']:.0f} MB).")
    header = ("| language | SmolLM2 bytes/token | SmolLM2 premium | new bytes/token | new premium "
              "| SmolLM2 BPB | transplant BPB | BPB ratio |")
    lines = ["### Part B: one tokenizer for nine languages, and SmolLM2 transplanted onto it", "", intro, "",
             header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lang, row in result["languages"].items():
        old, new = row["SmolLM2"], row["new"]
        lines.append(f"| {lang} | {old['bytes_per_token']:.3f} | {old['token_premium']:.2f} "
                     f"| {new['bytes_per_token']:.3f} | {new['token_premium']:.2f} "
                     f"| {old['bits_per_byte']:.4f} | {new['bits_per_byte']:.4f} | {row['bpb_ratio']:.3f} |")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# Report


def notes(result: dict) -> list[str]:
    """Short factual observations computed from the numbers above."""
    lines = ["Notes:", ""]
    if "a" in result:
        a = result["a"]
        met = [f"{r['vocab_size']:,}" for r in a["rows"] if r["goal_met"]]
        missed = [f"{r['vocab_size']:,}" for r in a["rows"] if not r["goal_met"]]
        lines.append(f"- Part A: the {GOAL:.0%} supertoken goal is met at "
                     f"{', '.join(met) or 'no size'} and not met at {', '.join(missed) or 'no size'}; gains "
                     + ", ".join(f"{r['gain']:+.1%}" for r in a["rows"]) + ".")
        short = [f"{kind} {r['vocab_size']:,} reached {r[kind]['vocab_reached']:,}"
                 for r in a["rows"] for kind in KINDS if r[kind]["vocab_reached"] < r["vocab_size"]]
        lines.append("- Part A: every tokenizer reached its requested size." if not short else
                     "- Part A: tokenizers that stopped short of their size: " + "; ".join(short) + ".")
        for r in a["rows"]:
            plain, superb = r["plain"]["vocab_reached"], r["supertoken"]["vocab_reached"]
            if plain < superb:
                lines.append(f"- Part A: at {r['vocab_size']:,}, plain BPE ran out of pairs occurring at least "
                             f"{a['min_frequency']} times "
                             f"at {plain:,} tokens while supertoken BPE reached {superb:,}: the gain there compares "
                             "vocabularies of different sizes.")
        best = max(a["rows"], key=lambda r: r["vocab_size"])
        lines.append(f"- Part A: at {best['vocab_size']:,} tokens, supertoken BPE gives "
                     f"{best['supertoken']['bytes_per_token']:.3f} bytes/token on the held-out slice, against "
                     + ", ".join(f"{n} {r['bytes_per_token']:.3f} ({r['vocab_size']:,} tokens)"
                                 for n, r in a["references"].items()) + ".")
    if "b" in result:
        langs, trained = result["b"]["languages"], result["b"]["tokenizer"]
        if trained["vocab_reached"] < trained["vocab_size"]:
            lines.append(f"- Part B: the new tokenizer stopped at {trained['vocab_reached']:,} of "
                         f"{trained['vocab_size']:,} tokens (no pair left occurring at least "
                         f"{result['b']['min_frequency']} times in the training text); the transplant has that many vocabulary rows.")
        other = {k: v for k, v in langs.items() if k != "en"}
        for name, label in (("SmolLM2", "SmolLM2's tokenizer"), ("new", "the new tokenizer")):
            worst = max(other, key=lambda k: other[k][name]["token_premium"])
            lines.append(f"- Part B: {label}: token premium {min(v[name]['token_premium'] for v in other.values()):.2f}"
                         f"-{other[worst][name]['token_premium']:.2f} outside en (highest: {worst}).")
        better = [k for k, v in langs.items() if v["new"]["bytes_per_token"] > v["SmolLM2"]["bytes_per_token"]]
        lines.append(f"- Part B: the new tokenizer has more bytes per token than SmolLM2's on "
                     f"{len(better)} of {len(langs)} languages ({', '.join(better) or 'none'}).")
        ratios = [v["bpb_ratio"] for v in langs.values()]
        lines.append(f"- Part B: transplant BPB / original BPB ranges {min(ratios):.3f}-{max(ratios):.3f} "
                     "(zero-shot, no healing; above 1 means the transplant predicts the bytes worse).")
    lines.append("")
    return lines


def section(result: dict, command: str, started: str, seconds: float) -> str:
    lines = ["## Tokenizers: supertokens, multilingual training (issue 7)", "",
             f"Command: `{command}`  ", f"Date: {started}  ", f"Machine: {machine()}  ",
             f"Runtime: {seconds / 60:.1f} min", ""]
    if "a" in result:
        lines += part_a_markdown(result["a"])
    if "b" in result:
        lines += part_b_markdown(result["b"])
    lines += notes(result)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--sizes", default=SIZES, help="part A vocabulary sizes, comma-separated")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences a merge needs")
    parser.add_argument("--bytes", type=int, default=8000, help="part B: bytes of each language's slice")
    parser.add_argument("--window", type=int, default=2048, help="part B: bits-per-byte window, bytes")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-tokenizers"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path, help="write the Markdown section here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python bench/tokenizer_training.py " + " ".join(sys.argv[1:])
    clock = time.perf_counter()

    result = {}
    if args.part in ("a", "both"):
        result["a"] = part_a(args.workdir / "a", [int(s) for s in args.sizes.split(",")], args.min_frequency)
    if args.part in ("b", "both"):
        result["b"] = part_b(args.workdir / "b", args.bytes, args.window, args.min_frequency)
    seconds = time.perf_counter() - clock
    text = section(result, command, started, seconds)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": started, "machine": machine(),
                                         "runtime_s": round(seconds, 1), **result}, indent=2) + "\n")
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
