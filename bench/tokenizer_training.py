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

Part C (extend and prune): SmolLM2's own tokenizer is changed and SmolLM2-135M transplanted onto it (own
process).  C1 extends it (``tokenbridge tokenizer extend``: every old id kept, new ids from 49,152 on) by each
of ``--extend-sizes`` tokens learned on debref.de.txt from TRAIN_OFFSET on, and transplants with
``--extend-method`` (tokenadapt); on the de and en slices it reports bytes per token, the share of tokens
that are new and bits per byte of the original and the transplant.  C2 prunes it (``tokenbridge tokenizer
prune``) with debref.en.txt from TRAIN_OFFSET on, to exactly the tokens that text needs and to each of
``--prune-sizes``, and transplants with ``--method subword`` (every kept row is copied); on the de, en and
code.python.txt slices it reports bytes per token, whether the encoding is unchanged and bits per byte,
with the embedding rows and model file size.  Slices are those of part B (``--bytes`` from SLICE_OFFSET).

    python bench/tokenizer_training.py [--part a|b|c|both|all] [--sizes 2048,4096,8192,16384] [--min-frequency 2]
                                       [--bytes 8000] [--window 2048] [--extend-sizes 2048,8192]
                                       [--extend-method tokenadapt] [--prune-sizes 16384,8192]
                                       [--workdir /work/bench-tokenizers] [--json out.json] [--md out.md]

``--part both`` (the default) runs parts A and B; ``--part all`` runs A, B and C.

``--min-frequency`` is the fewest occurrences a merge needs, for every tokenizer trained here.  With 2
(the default) plain BPE runs out of merges on this small corpus before large sizes; with 1 every
tokenizer reaches its size, the extra merges being pairs seen once.

The results in bench/RESULTS.md (and bench/tokenizer-training-f{1,2}.{md,json}, bench/tokenizer-training-c.{md,json})
came from

    python bench/tokenizer_training.py --min-frequency 1 --md bench/tokenizer-training-f1.md --json bench/tokenizer-training-f1.json
    python bench/tokenizer_training.py --min-frequency 2 --md bench/tokenizer-training-f2.md --json bench/tokenizer-training-f2.json
    python bench/tokenizer_training.py --part c --md bench/tokenizer-training-c.md --json bench/tokenizer-training-c.json
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
# Part C


def bits_per_byte(directory: Path, slices: list[Path], size: int, window: int) -> dict[str, float]:
    """Bits per byte of the model in ``directory`` on each slice, by the slice's stem."""
    from tokenbridge.measure.bpb import evaluate

    result = evaluate(directory, slices, size, window, progress=False)
    return {Path(score.file).stem: score.bits_per_byte for score in result.files}


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def part_c(workdir: Path, size: int, window: int, min_frequency: int, extend_sizes: list[int],
           extend_method: str, prune_sizes: list[int]) -> dict:
    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer
    from tokenbridge.measure.compare import run_transplant
    from tokenbridge.measure.tokstats import encode
    from tokenbridge.pipeline import resolve_source
    from tokenbridge.tokenizers.api import extend, prune

    train_de = write(workdir / "train" / "de.txt", corpus_bytes("debref.de.txt", TRAIN_OFFSET))
    train_en = write(workdir / "train" / "en.txt", corpus_bytes("debref.en.txt", TRAIN_OFFSET))
    slices = {lang: write(workdir / "slices" / f"{lang}.txt", corpus_bytes(f"debref.{lang}.txt", SLICE_OFFSET, size))
              for lang in ("de", "en")}
    slices["code"] = write(workdir / "slices" / "code.txt", corpus_bytes("code.python.txt", SLICE_OFFSET, size))
    like = resolve("packaged:smollm2")
    source = resolve_source(like)
    smollm2 = load_tokenizer(source)
    original = {name: stats(smollm2, path, "SmolLM2") for name, path in slices.items()}
    smollm2_ids = {name: encode(smollm2, path.read_text(encoding="utf-8"))[0] for name, path in slices.items()}
    print("part C: scoring SmolLM2", file=sys.stderr, flush=True)
    original_bpb = bits_per_byte(source, list(slices.values()), size, window)

    def transplanted(model: Path, summary: dict) -> dict:
        rows = json.loads((model / "config.json").read_text())["vocab_size"]
        return {"seconds": summary["seconds"], "peak_rss_mb": summary["peak_rss_mb"], "counts": summary["counts"],
                "embedding_rows": rows, "model_bytes": model_bytes(model)}

    extended = []
    names = ("de", "en")
    for add in extend_sizes:
        print(f"part C: extending SmolLM2's tokenizer by {add:,} tokens on German", file=sys.stderr, flush=True)
        out = workdir / f"extend-de-{add}-f{min_frequency}"
        report = extend(source, [train_de], out, add, min_frequency=min_frequency, force=True, progress=False)
        first = report.details["first_ids"]
        tokenizer = load_tokenizer(out)
        model = workdir / f"smollm2-extend-de-{add}-f{min_frequency}-{extend_method}"
        print(f"part C: transplanting SmolLM2 onto it ({extend_method})", file=sys.stderr, flush=True)
        summary = run_transplant(source, out, model, extend_method, 0)
        scores = bits_per_byte(model, [slices[n] for n in names], size, window)
        rows = {}
        for name in names:
            held = stats(tokenizer, slices[name], "extended")
            ids = encode(tokenizer, slices[name].read_text(encoding="utf-8"))[0]
            rows[name] = {"SmolLM2": {"tokens": original[name].tokens,
                                      "bytes_per_token": original[name].bytes_per_token,
                                      "bits_per_byte": original_bpb[name]},
                          "extended": {"tokens": held.tokens, "bytes_per_token": held.bytes_per_token,
                                       "new_tokens": sum(i >= first for i in ids),
                                       "new_token_share": sum(i >= first for i in ids) / len(ids),
                                       "bits_per_byte": scores[name]},
                          "bpb_ratio": scores[name] / original_bpb[name]}
        extended.append({"add": add, "dir": str(out), "added": report.details["added"], "first_ids": first,
                         "vocab_after": report.vocab_after, "extend_seconds": report.seconds,
                         "new_tokens_sample": report.details["new_tokens"][:10],
                         "train_bytes_per_token": {"SmolLM2": report.compression[0].before,
                                                   "extended": report.compression[0].after},
                         "model": str(model), "transplant": dict(transplanted(model, summary), method=extend_method),
                         "slices": rows})

    print("part C: pruning SmolLM2's tokenizer to what the English text needs", file=sys.stderr, flush=True)
    probe = prune(source, [train_en], workdir / "prune-en-all", len(smollm2), force=True)
    needed, required = probe.details["needed_by_texts"], probe.details["required"]
    pruned = []
    for keep in dict.fromkeys([needed, *prune_sizes]):
        print(f"part C: pruning to {keep:,} tokens", file=sys.stderr, flush=True)
        out = workdir / f"prune-en-{keep}"
        report = prune(source, [train_en], out, keep, force=True)
        old_ids = report.details["old_ids"]
        tokenizer = load_tokenizer(out)
        model = workdir / f"smollm2-prune-en-{keep}-subword"
        print("part C: transplanting SmolLM2 onto it (subword)", file=sys.stderr, flush=True)
        summary = run_transplant(source, out, model, "subword", 0)
        scores = bits_per_byte(model, list(slices.values()), size, window)
        rows = {}
        for name, path in slices.items():
            held = stats(tokenizer, path, "pruned")
            ids = encode(tokenizer, path.read_text(encoding="utf-8"))[0]
            rows[name] = {"SmolLM2": {"tokens": original[name].tokens,
                                      "bytes_per_token": original[name].bytes_per_token,
                                      "bits_per_byte": original_bpb[name]},
                          "pruned": {"tokens": held.tokens, "bytes_per_token": held.bytes_per_token,
                                     "same_tokens": [old_ids[i] for i in ids] == smollm2_ids[name],
                                     "bits_per_byte": scores[name]},
                          "bpb_ratio": scores[name] / original_bpb[name]}
        pruned.append({"keep": keep, "is_needed": keep == needed, "dir": str(out), "vocab_after": report.vocab_after,
                       "kept": report.details["kept"], "prune_seconds": report.seconds,
                       "train_bytes_per_token": {"SmolLM2": report.compression[0].before,
                                                 "pruned": report.compression[0].after},
                       "model": str(model), "transplant": dict(transplanted(model, summary), method="subword"),
                       "slices": rows})
    return {"source": str(source), "vocab_size": len(smollm2), "model_bytes": model_bytes(source),
            "train_texts": {"de": str(train_de), "en": str(train_en)},
            "train_bytes": {"de": train_de.stat().st_size, "en": train_en.stat().st_size},
            "slices": {name: str(path) for name, path in slices.items()}, "slice_bytes": size, "window": window,
            "min_frequency": min_frequency, "extend_method": extend_method,
            "required": required, "needed_by_texts": needed, "extend": extended, "prune": pruned}


def part_c_markdown(result: dict) -> list[str]:
    intro = (f"SmolLM2's own tokenizer ({result['vocab_size']:,} tokens) extended with German and pruned to "
             f"English; SmolLM2-135M transplanted onto each result (own process). Training text: debref.de.txt "
             f"({result['train_bytes']['de']:,} bytes) and debref.en.txt ({result['train_bytes']['en']:,} bytes) "
             f"from byte {TRAIN_OFFSET:,} on. Held-out slices: {result['slice_bytes']:,} bytes from byte "
             f"{SLICE_OFFSET:,} of debref.de.txt, debref.en.txt and code.python.txt (never trained on). Bits per "
             f"byte over windows of {result['window']:,} bytes.")
    extend_intro = (f"C1: extended on German (new merges need {result['min_frequency']} occurrence(s)), transplanted "
                    f"with `--method {result['extend_method']}`. New tokens are ids >= {result['vocab_size']:,}; the "
                    "new-token share is the share of the held-out slice's tokens that are new.")
    extend_header = ("| added (asked) | added | vocab | transplant s | slice | SmolLM2 bytes/token "
                     "| extended bytes/token | new-token share | SmolLM2 BPB | transplant BPB | BPB ratio |")
    lines = ["### Part C: SmolLM2's tokenizer extended and pruned, SmolLM2 transplanted onto it", "", intro, "",
             extend_intro, "", extend_header, "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["extend"]:
        for name, s in row["slices"].items():
            old, new = s["SmolLM2"], s["extended"]
            lines.append(f"| {row['add']:,} | {row['added']:,} | {row['vocab_after']:,} "
                         f"| {row['transplant']['seconds']:.0f} | {name} | {old['bytes_per_token']:.3f} "
                         f"| {new['bytes_per_token']:.3f} | {new['new_token_share']:.1%} | {old['bits_per_byte']:.4f} "
                         f"| {new['bits_per_byte']:.4f} | {s['bpb_ratio']:.4f} |")
    prune_intro = (f"C2: pruned to English. The training text needs {result['needed_by_texts']:,} tokens "
                   f"({result['required']:,} of them kept whatever the text: special tokens and the byte alphabet). "
                   f"Transplanted with `--method subword`; original model file {result['model_bytes'] / 1e6:.1f} MB.")
    lines += ["", prune_intro, "",
              "| keep | vocab | embedding rows | copied | initialised | model file MB | vs original |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["prune"]:
        t = row["transplant"]
        keep = f"{row['keep']:,} (needed)" if row["is_needed"] else f"{row['keep']:,}"
        lines.append(f"| {keep} | {row['vocab_after']:,} | {t['embedding_rows']:,} "
                     f"| {t['counts']['copied'] + t['counts']['copied_special']:,} | {t['counts']['initialised']:,} "
                     f"| {t['model_bytes'] / 1e6:.1f} | {t['model_bytes'] / result['model_bytes']:.3f} |")
    prune_header = ("| keep | slice | SmolLM2 bytes/token | pruned bytes/token | same tokens | SmolLM2 BPB "
                    "| transplant BPB | BPB ratio |")
    lines += ["", "Same tokens: the pruned tokenizer encodes the slice to the same token strings as SmolLM2's.", "",
              prune_header, "|---:|---|---:|---:|---|---:|---:|---:|"]
    for row in result["prune"]:
        for name, s in row["slices"].items():
            old, new = s["SmolLM2"], s["pruned"]
            lines.append(f"| {row['keep']:,} | {name} | {old['bytes_per_token']:.3f} | {new['bytes_per_token']:.3f} "
                         f"| {'yes' if new['same_tokens'] else 'no'} | {old['bits_per_byte']:.4f} "
                         f"| {new['bits_per_byte']:.4f} | {s['bpb_ratio']:.4f} |")
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
    if "c" in result:
        c = result["c"]
        for row in c["extend"]:
            s = row["slices"]
            change = ", ".join(f"{n} {v['SmolLM2']['bytes_per_token']:.3f} -> {v['extended']['bytes_per_token']:.3f} "
                               f"({v['extended']['bytes_per_token'] / v['SmolLM2']['bytes_per_token'] - 1:+.1%})"
                               for n, v in s.items())
            lines.append(f"- Part C1: {row['added']:,} tokens added (of {row['add']:,} asked): bytes/token {change}; "
                         + ", ".join(f"{v['extended']['new_token_share']:.1%} of {n} tokens are new" for n, v in s.items())
                         + "; transplant BPB / original BPB "
                         + ", ".join(f"{n} {v['bpb_ratio']:.4f}" for n, v in s.items()) + ".")
            if row["added"] < row["add"]:
                lines.append(f"- Part C1: asked for {row['add']:,} tokens, the extension stopped at {row['added']:,} "
                             f"(new merges need {c['min_frequency']} occurrence(s) in the training text).")
            for n, v in s.items():
                if v["extended"]["new_tokens"] == 0:
                    lines.append(f"- Part C1: at {row['add']:,}, held-out {n} uses no new token; its BPB is "
                                 + ("identical to the original's." if v["bpb_ratio"] == 1 else
                                    f"{v['extended']['bits_per_byte']:.6f} against {v['SmolLM2']['bits_per_byte']:.6f}."))
        lines.append(f"- Part C2: the English training text needs {c['needed_by_texts']:,} of SmolLM2's "
                     f"{c['vocab_size']:,} tokens ({c['required']:,} kept whatever the text).")
        train = {r["keep"]: r["train_bytes_per_token"] for r in c["prune"]}
        unchanged = [f"{k:,}" for k, v in train.items() if v["pruned"] == v["SmolLM2"]]
        lines.append(f"- Part C2: on the English training text itself SmolLM2 gives "
                     f"{c['prune'][0]['train_bytes_per_token']['SmolLM2']:.3f} bytes/token; the pruned tokenizers give "
                     + ", ".join(f"{v['pruned']:.3f} (keep {k:,})" for k, v in train.items())
                     + f"; unchanged at keep {', '.join(unchanged) or 'no size'}.")
        for row in c["prune"]:
            t, s = row["transplant"], row["slices"]
            same = [n for n, v in s.items() if v["pruned"]["same_tokens"]]
            differ = [n for n, v in s.items() if not v["pruned"]["same_tokens"]]
            lines.append(f"- Part C2: keep {row['keep']:,}: {t['embedding_rows']:,} embedding rows, "
                         f"{t['counts']['initialised']:,} initialised; model file "
                         f"{t['model_bytes'] / c['model_bytes']:.1%} of the original's; held-out encoding the same "
                         f"as SmolLM2's on {', '.join(same) or 'no slice'}, different on {', '.join(differ) or 'no slice'}; "
                         "transplant BPB / original BPB " + ", ".join(f"{n} {v['bpb_ratio']:.4f}" for n, v in s.items())
                         + ".")
    lines.append("")
    return lines


def section(result: dict, command: str, started: str, seconds: float) -> str:
    title = "## Tokenizers: supertokens, multilingual training (issue 7)"
    if "c" in result:
        title = title.replace(" (issue 7)", ", extending and pruning (issue 7)")
    lines = [title, "",
             f"Command: `{command}`  ", f"Date: {started}  ", f"Machine: {machine()}  ",
             f"Runtime: {seconds / 60:.1f} min", ""]
    if "a" in result:
        lines += part_a_markdown(result["a"])
    if "b" in result:
        lines += part_b_markdown(result["b"])
    if "c" in result:
        lines += part_c_markdown(result["c"])
    lines += notes(result)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "c", "both", "all"), default="both",
                        help="both: parts A and B; all: A, B and C")
    parser.add_argument("--sizes", default=SIZES, help="part A vocabulary sizes, comma-separated")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences a merge needs")
    parser.add_argument("--bytes", type=int, default=8000, help="parts B and C: bytes of each slice")
    parser.add_argument("--window", type=int, default=2048, help="parts B and C: bits-per-byte window, bytes")
    parser.add_argument("--extend-sizes", default="2048,8192", help="part C: tokens to add, comma-separated")
    parser.add_argument("--extend-method", default="tokenadapt", help="part C: transplant method after extending")
    parser.add_argument("--prune-sizes", default="16384,8192",
                        help="part C: vocabulary sizes to prune to, besides what the text needs, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-tokenizers"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path, help="write the Markdown section here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python bench/tokenizer_training.py " + " ".join(sys.argv[1:])
    clock = time.perf_counter()

    result = {}
    if args.part in ("a", "both", "all"):
        result["a"] = part_a(args.workdir / "a", [int(s) for s in args.sizes.split(",")], args.min_frequency)
    if args.part in ("b", "both", "all"):
        result["b"] = part_b(args.workdir / "b", args.bytes, args.window, args.min_frequency)
    if args.part in ("c", "all"):
        result["c"] = part_c(args.workdir / "c", args.bytes, args.window, args.min_frequency,
                             [int(s) for s in args.extend_sizes.split(",")], args.extend_method,
                             [int(s) for s in args.prune_sizes.split(",")])
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
