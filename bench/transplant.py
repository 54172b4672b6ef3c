"""Transplant quality and cost on real models: every tokenbridge method against mergekit-tokensurgeon.

Pairs (source model -> target tokenizer; donor = a model that already uses the target tokenizer):

1. Gemma-3-270M -> SmolLM2 tokenizer (donor SmolLM2-135M)
2. SmolLM2-135M -> Gemma-3 tokenizer (donor Gemma-3-270M)
3. SmolLM2-135M -> a 32k byte-level BPE tokenizer trained here on debref.de.txt (no donor)
4. SmolLM2-135M -> the 49k nine-language tokenizer of the tokenizer benchmark (byte-level BPE like SmolLM2's,
   trained here on the nine debref files from TRAIN_OFFSET on; no donor)

``--hypernet HN_DIR`` gives the ``hypernet`` method a hypernetwork trained for SmolLM2 (bench/hypernet.py),
on the pairs whose source is SmolLM2.

For each pair, the original model and every transplanted one are scored in bits per byte on the same
byte windows of four slices: en, de, ja (Debian Reference) and Python code. tokenbridge's transplants run
through `tokenbridge.measure.compare.run_methods`, each in its own process. mergekit-tokensurgeon (PyPI
`mergekit`) lives in its own virtual environment (see --mergekit). It runs offline on the same local
directories with its `omp` method (k=64, the default) and its `subword` method, under a wall-time cap.
A run that hits the cap is recorded with the progress it reached and its rate.

    python bench/transplant.py [--pairs 1,2,3] [--bytes 8000] [--cap 900] [--mergekit /work/mergekit-venv]
                               [--workdir /work/bench-transplant] [--reuse] [--json out.json] [--md out.md]
                               [--hypernet HN_DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
SLICES = {"en": "debref.en.txt", "de": "debref.de.txt", "ja": "debref.ja.txt", "code": "code.python.txt"}
SLICE_OFFSET = 20000  # bytes into each file; the de tokenizer of pair 3 trains on bytes from TRAIN_OFFSET on
TRAIN_OFFSET = 60000


@dataclass
class Pair:
    number: int
    name: str
    source: str  # packaged model name
    target: str  # packaged model name, or "de32k"
    donor: str | None


PAIRS = {
    1: Pair(1, "Gemma-3-270M -> SmolLM2 tokenizer", "gemma3", "smollm2", "smollm2"),
    2: Pair(2, "SmolLM2-135M -> Gemma-3 tokenizer", "smollm2", "gemma3", "gemma3"),
    3: Pair(3, "SmolLM2-135M -> 32k debref.de tokenizer", "smollm2", "de32k", None),
    4: Pair(4, "SmolLM2-135M -> 49k nine-language tokenizer", "smollm2", "multi49k", None),
}
LANGUAGES = ("de", "en", "es", "fr", "id", "it", "ja", "pt", "zh-cn")


def write_slices(directory: Path, size: int) -> list[Path]:
    """The first ``size`` bytes after SLICE_OFFSET of each corpus, cut on character boundaries."""
    from tokenbridge.measure.bpb import cut_text

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, file in SLICES.items():
        data = (CORPORA / file).read_bytes()
        start = SLICE_OFFSET
        while (data[start] & 0xC0) == 0x80:
            start += 1
        path = directory / f"{name}.txt"
        path.write_bytes(cut_text(data[start:], size))
        paths.append(path)
    return paths


def train_de_tokenizer(directory: Path, like: Path, vocab_size: int = 32000) -> Path:
    """A byte-level BPE tokenizer trained on debref.de.txt (past TRAIN_OFFSET), with SmolLM2's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    reference = AutoTokenizer.from_pretrained(str(like))
    specials = [t for t in reference.all_special_tokens]
    text = (CORPORA / "debref.de.txt").read_bytes()[TRAIN_OFFSET:].decode("utf-8", "ignore")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=reference.bos_token,
                                   eos_token=reference.eos_token, pad_token=reference.pad_token,
                                   unk_token=reference.unk_token)
    fast.chat_template = reference.chat_template
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def train_multilingual_tokenizer(directory: Path, like: Path, vocab_size: int = 49152) -> Path:
    """The tokenizer benchmark's part B tokenizer: byte-level BPE like SmolLM2's on the nine debref files
    (from TRAIN_OFFSET on), merges needing one occurrence."""
    from tokenbridge.tokenizers.api import train
    from tokenbridge.tokenizers.train import TrainConfig

    texts = []
    for lang in LANGUAGES:
        data = (CORPORA / f"debref.{lang}.txt").read_bytes()[TRAIN_OFFSET:]
        start = 0
        while (data[start] & 0xC0) == 0x80:
            start += 1
        path = directory.parent / "multi49k-train" / f"{lang}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[start:])
        texts.append(path)
    train(texts, directory, TrainConfig(vocab_size, min_frequency=1), like=like, force=True, progress=False)
    return directory


def run_mergekit(venv: Path, model: Path, donor: Path, out: Path, method: str, cap: float) -> dict:
    """mergekit-tokensurgeon under GNU time with a wall-time cap; parses its progress bar if capped."""
    executable = venv / "bin" / "mergekit-tokensurgeon"
    peak_file = out.parent / f"{out.name}.peak"
    log_file = out.parent / f"{out.name}.log"
    command = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), str(executable), str(model), str(donor), str(out),
               "-a", method]
    if method == "omp":
        command += ["-k", "64"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    started = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            import psutil

            # Kill mergekit but not GNU time, which then still writes the peak memory it saw.
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.wait()
            code = None
    wall = time.perf_counter() - started
    text = log_file.read_text(errors="replace")
    row = {"command": " ".join(command[5:]), "wall_s": round(wall, 1), "finished": code == 0, "cap_s": cap}
    peak = peak_file.read_text().split() if peak_file.is_file() else []
    if peak and peak[-1].isdigit():
        row["peak_rss_mb"] = round(int(peak[-1]) / 1024, 1)
    bars = re.findall(r"Approximating tokens:\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+) \[([0-9:]+)<", text)
    if bars:
        percent, done, total, elapsed = bars[-1]
        row["progress"] = f"{done}/{total} batches of 512 tokens after {elapsed}"
        seconds = sum(int(x) * 60 ** i for i, x in enumerate(reversed(elapsed.split(":"))))
        if int(done):
            row["seconds_per_batch"] = round(seconds / int(done), 1)
            row["projected_total_s"] = round(seconds / int(done) * int(total))
    if code not in (0, None):
        row["error"] = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
    return row


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def vocab_matrix_mb(model_dir: Path) -> tuple[float, int, int]:
    """(float32 MB of the model's vocabulary-sized matrices, rows, hidden size), from the headers."""
    from tokenbridge.arch import arch_spec
    from tokenbridge.load.checkpoint import open_checkpoint
    from tokenbridge.pipeline import is_tied, locate_vocab_tensors

    checkpoint = open_checkpoint(model_dir)
    names = locate_vocab_tensors(checkpoint, arch_spec(checkpoint.config["model_type"]), is_tied(checkpoint))
    rows, hidden = checkpoint.tensors[names.input[0]].shape
    matrices = 1 if is_tied(checkpoint) else 2
    return matrices * rows * hidden * 4 / 2**20, rows, hidden


def largest_shard_mb(model_dir: Path) -> float:
    return max(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


def memory_budget(source_dir: Path, target_dir: Path, donor_dir: Path | None) -> float:
    """1.5 x float32 size of the vocabulary matrices involved (source, donor, target) plus one shard."""
    from transformers import AutoTokenizer

    source_mb, source_rows, _ = vocab_matrix_mb(source_dir)
    target_rows = len(AutoTokenizer.from_pretrained(str(target_dir)))
    target_mb = source_mb / source_rows * target_rows
    donor_mb = vocab_matrix_mb(donor_dir)[0] if donor_dir else 0.0
    return 1.5 * (source_mb + donor_mb + target_mb) + largest_shard_mb(source_dir)


def training_text(workdir: Path, names: list[str], size: int) -> Path:
    """``size`` bytes from TRAIN_OFFSET of each named corpus (never the scored slices), one file."""
    from tokenbridge.measure.bpb import cut_text

    parts = []
    for name in names:
        data = (CORPORA / SLICES[name]).read_bytes()[TRAIN_OFFSET:]
        start = 0
        while (data[start] & 0xC0) == 0x80:
            start += 1
        parts.append(cut_text(data[start:], size).decode("utf-8"))
    path = workdir / f"train-{'-'.join(names)}-{size}.txt"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def method_resources(pair: Pair, dirs: dict, workdir: Path, hypernet: Path | None = None) -> dict[str, dict]:
    """Options that give each method its resources on this pair; methods missing here run without."""
    options: dict[str, dict] = {}
    if pair.donor:
        donor = str(dirs[pair.donor])
        options["omp"] = {"donor": donor, "k": "64"}
        options["clp"] = {"donor": donor}
        mixed = training_text(workdir, ["en", "de", "ja", "code"], 100_000)
        options["focus"] = {"corpus": str(mixed)}
        # Same text on both sides: the aligner links the two tokenizations of each line.
        options["transtok"] = {"parallel_source": str(mixed), "parallel_target": str(mixed)}
    elif pair.target == "multi49k":  # one tokenizer for nine languages: monolingual resources per language
        mixed = workdir / "train-nine-languages.txt"
        parts = []
        for lang in LANGUAGES:
            data = (CORPORA / f"debref.{lang}.txt").read_bytes()[TRAIN_OFFSET:TRAIN_OFFSET + 40_000]
            parts.append(data.decode("utf-8", "ignore"))
        mixed.write_text("\n".join(parts), encoding="utf-8")
        options["focus"] = {"corpus": str(mixed)}
        options["transtok"] = {"parallel_source": str(mixed), "parallel_target": str(mixed)}
    else:  # pair 3: English model onto a German tokenizer
        from tokenbridge.init.parallel_corpus import parallel_from_documents

        from tokenbridge.init.static_vectors import train_vectors, write_vectors

        german = training_text(workdir, ["de"], 300_000)
        options["focus"] = {"corpus": str(german)}
        english = (CORPORA / "debref.en.txt").read_text(encoding="utf-8")
        deutsch = (CORPORA / "debref.de.txt").read_text(encoding="utf-8")
        en_lines, de_lines = parallel_from_documents(english, deutsch)
        (workdir / "parallel.en.txt").write_text("\n".join(en_lines) + "\n", encoding="utf-8")
        (workdir / "parallel.de.txt").write_text("\n".join(de_lines) + "\n", encoding="utf-8")
        options["transtok"] = {"parallel_source": str(workdir / "parallel.en.txt"),
                               "parallel_target": str(workdir / "parallel.de.txt")}
        vectors = {}
        for lang, text in (("en", english), ("de", deutsch)):
            words = [line.split() for line in text.splitlines() if line.strip()]
            vectors[lang] = workdir / f"vectors.{lang}.vec"
            write_vectors(vectors[lang], train_vectors(words, dim=100, epochs=5, min_count=2, seed=0))
        options["wechsel"] = {"source_vectors": str(vectors["en"]), "target_vectors": str(vectors["de"]),
                              "dictionary": str(REPO / "tests" / "data" / "en-de.dict.txt")}
    if hypernet and pair.source == "smollm2":
        options["hypernet"] = {"hypernet": str(hypernet)}
    return options


def bench_pair(pair: Pair, dirs: dict, slices: list[Path], workdir: Path, args) -> dict:
    from tokenbridge.errors import TokenbridgeError
    from tokenbridge.init import available_methods
    from tokenbridge.init.registry import required_resources
    from tokenbridge.measure.bpb import evaluate
    from tokenbridge.measure.compare import (
        MethodRun,
        report_dict,
        report_markdown,
        run_methods,
        run_transplant,
        write_report,
    )

    source_dir, target_dir = dirs[pair.source], dirs[pair.target]
    pair_dir = workdir / f"pair{pair.number}"
    if args.reuse and (pair_dir / "report.json").is_file():
        print(f"pair {pair.number}: reusing {pair_dir / 'report.json'}", file=sys.stderr, flush=True)
        return json.loads((pair_dir / "report.json").read_text())
    if pair_dir.exists():
        shutil.rmtree(pair_dir)
    pair_dir.mkdir(parents=True)
    resources = method_resources(pair, dirs, pair_dir, args.hypernet)
    registered = available_methods()
    wanted = args.methods or list(registered)
    methods = [m for m in wanted if m in registered and
               all(r in resources.get(m, {}) for r in required_resources(registered[m]))]
    skipped = {m: "no resources for this pair" for m in wanted if m not in methods}
    print(f"pair {pair.number}: {pair.name}: tokenbridge {', '.join(methods)}", file=sys.stderr, flush=True)
    runs = run_methods(source_dir, target_dir, [], slices, pair_dir / "models", args.bytes, args.window,
                       progress=False)
    budgets, failures = {}, {}
    for method in methods:
        options = resources.get(method, {})
        donor = options.get("donor")
        budgets[f"tokenbridge {method}"] = round(memory_budget(source_dir, target_dir, Path(donor) if donor else None))
        model_dir = pair_dir / "models" / method
        print(f"pair {pair.number}: tokenbridge {method}", file=sys.stderr, flush=True)
        try:
            summary = run_transplant(source_dir, target_dir, model_dir, method, 0, options)
        except TokenbridgeError as error:
            failures[method] = str(error)
            continue
        result = evaluate(model_dir, slices, args.bytes, args.window, progress=False)
        runs.append(MethodRun(f"tokenbridge {method}", summary["seconds"], summary["peak_rss_mb"], result,
                              summary["counts"]))
        shutil.rmtree(model_dir)
    peers = {}
    if pair.donor and args.mergekit:
        for method in ("omp", "subword"):
            out = pair_dir / f"mergekit-{method}"
            print(f"pair {pair.number}: mergekit {method} (cap {args.cap:.0f} s)", file=sys.stderr, flush=True)
            row = run_mergekit(Path(args.mergekit), source_dir, dirs[pair.donor], out, method, args.cap)
            peers[method] = row
            if row["finished"]:
                result = evaluate(out, slices, args.bytes, args.window, progress=False)
                runs.append(MethodRun(f"mergekit {method}", row["wall_s"], row.get("peak_rss_mb"), result))
            shutil.rmtree(out, ignore_errors=True)
    report = report_dict(str(source_dir), str(target_dir), runs, args.window, args.bytes, 0)
    report["pair"] = {"number": pair.number, "name": pair.name}
    report["mergekit"] = peers
    report["memory_budget_mb"] = budgets
    report["failures"] = failures
    report["skipped"] = skipped
    report["resources"] = {m: {k: (Path(v).name if "/" in v else v) for k, v in o.items()}
                           for m, o in resources.items() if m in methods}
    write_report(pair_dir, report)
    print(report_markdown(report), file=sys.stderr, flush=True)
    return report


def section(reports: list[dict], command: str, started: str) -> str:
    from tokenbridge.measure.compare import report_markdown

    lines = ["## Transplant quality and cost against mergekit-tokensurgeon (issues 3 and 4)", "",
             f"Command: `{command}`  ", f"Date: {started}  ", f"Machine: {machine()}", ""]
    for report in reports:
        body = report_markdown(report).split("\n", 2)[2]  # drop the report's own title
        lines += [f"### Pair {report['pair']['number']}: {report['pair']['name']}", "", body]
        for method, row in report["mergekit"].items():
            if not row["finished"]:
                detail = row.get("error") or (f"stopped at the {row['cap_s']:.0f} s cap; {row.get('progress', '?')}"
                                              + (f", {row['seconds_per_batch']} s per batch, projected "
                                                 f"{row['projected_total_s'] / 3600:.1f} h in all"
                                                 if "projected_total_s" in row else ""))
                lines.append(f"- mergekit {method}: did not finish: {detail}.")
        for method, error in report.get("failures", {}).items():
            lines.append(f"- tokenbridge {method}: failed: {error}")
        if report.get("skipped"):
            lines.append("- not run on this pair (no resources): " + ", ".join(report["skipped"]))
        budgets = report.get("memory_budget_mb", {})
        peaks = {row["method"]: row["peak_rss_mb"] for row in report["rows"]}
        if budgets:
            lines.append("- peak memory against the budget (1.5 x float32 vocabulary matrices of source, donor and "
                         "target, plus one shard): " + ", ".join(
                             f"{m.split()[-1]} {peaks.get(m, 0):.0f}/{b} MB" for m, b in budgets.items()
                             if m in peaks))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="1,2,3")
    parser.add_argument("--methods", default="", help="tokenbridge methods (default: all registered)")
    parser.add_argument("--bytes", type=int, default=8000, help="bytes of each slice to score")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--cap", type=float, default=900, help="wall-time cap for each mergekit run, seconds")
    parser.add_argument("--mergekit", default="/work/mergekit-venv", help="venv with mergekit; '' to skip the peer")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-transplant"))
    parser.add_argument("--reuse", action="store_true", help="keep pairs whose report.json is already in --workdir")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path, help="write the Markdown section here")
    parser.add_argument("--hypernet", type=Path, help="a hypernetwork for SmolLM2 (the hypernet method's resource)")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python bench/transplant.py " + " ".join(sys.argv[1:])

    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import tokenizer_dir
    from tokenbridge.pipeline import resolve_source

    dirs = {}
    for name in ("smollm2", "gemma3"):
        dirs[name] = resolve_source(resolve(f"packaged:{name}"))
        tokenizer_dir(resolve(f"packaged:{name}"))
    pairs = [PAIRS[int(p)] for p in args.pairs.split(",")]
    if any(p.target == "de32k" for p in pairs):
        dirs["de32k"] = train_de_tokenizer(args.workdir / "de32k-tokenizer", dirs["smollm2"])
    if any(p.target == "multi49k" for p in pairs):
        dirs["multi49k"] = train_multilingual_tokenizer(args.workdir / "multi49k-tokenizer", dirs["smollm2"])
    slices = write_slices(args.workdir / "slices", args.bytes)
    reports = [bench_pair(pair, dirs, slices, args.workdir, args) for pair in pairs]
    text = section(reports, command, started)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": started, "machine": machine(),
                                         "reports": reports}, indent=2) + "\n")
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
