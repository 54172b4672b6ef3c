"""Method selection (``--method auto``, and ``tokenbridge adapt``'s ``select`` stage): try every method the
given resources allow, keep the best by bits per byte.

Choosing a method is planning, not initialisation: this module sits above the pipeline and calls it;
the pipeline never imports it (``tokenbridge.transplant`` -- :mod:`tokenbridge.api` -- routes ``auto`` here).

The user's text (``-o text=FILE[,FILE...]``) is split: its last ``holdout_bytes`` bytes
score the candidates, the rest is what methods that train on text (``focus``) read when
no ``corpus`` is given.  Every candidate is a complete transplant; the one with the
lowest bits per byte on the held-out slice is published to OUT, and its
``tokenbridge.json`` records what every candidate scored (``selection``).

Options are passed on to the candidates that have a field of that name (``donor=``,
``aux_model=``, ...); ``METHOD.KEY=VALUE`` (``omp.k=32``) reaches one method only.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import TokenbridgeError
from ..init.registry import available_methods, make_config, required_resources
from ..init.resources import read_text_files
from ..measure.texts import read_text

MIN_HOLDOUT = 1024


@dataclass
class AutoMethodConfig:
    text: str = ""  # the user's text, comma-separated files (required)
    candidates: str = ""  # comma-separated methods to try; default: every method the resources allow
    holdout_bytes: int = 16384  # bytes at the end of the text that score the candidates
    window: int = 2048  # scoring window in bytes


def split_text(paths: list[Path], holdout: int) -> tuple[bytes, bytes]:
    """(training part, held-out part) of the files' concatenation; the cut falls on a character boundary."""
    data = "\n".join(read_text(path) for path in paths).encode("utf-8")
    if len(data) < 2 * MIN_HOLDOUT:
        raise TokenbridgeError(f"text: {len(data)} bytes is too little to hold out a scoring slice "
                               f"(need at least {2 * MIN_HOLDOUT})")
    start = len(data) - min(holdout, len(data) // 2)
    while start < len(data) and (data[start] & 0xC0) == 0x80:
        start += 1
    return data[:start], data[start:]


def _split_options(options: dict) -> tuple[dict, dict]:
    """(auto's own options, options for the candidates)."""
    own_names = {f.name for f in dataclasses.fields(AutoMethodConfig)}
    own = {k: v for k, v in options.items() if k in own_names}
    rest = {k: v for k, v in options.items() if k not in own_names}
    return own, rest


def candidate_options(method, passed: dict) -> dict:
    """The options of ``passed`` that ``method`` takes: plain names it has, and ``method.key``."""
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    chosen = {k: v for k, v in passed.items() if "." not in k and k in names}
    for key, value in passed.items():
        if "." in key:
            prefix, name = key.split(".", 1)
            if prefix == method.name:
                if name not in names:
                    raise TokenbridgeError(f"method {method.name!r} has no option {name!r}")
                chosen[name] = value
    return chosen


def plan_candidates(passed: dict, wanted: list[str], train_file: Path | None) -> tuple[dict, dict]:
    """({method: options} to try, {method: why skipped})."""
    methods = available_methods()
    for key in passed:
        prefix = key.split(".", 1)[0] if "." in key else None
        if prefix is not None and prefix not in methods:
            raise TokenbridgeError(f"option {key!r}: no method {prefix!r}")
        if prefix is None and not any(key in {f.name for f in dataclasses.fields(m.config_cls)}
                                      for m in methods.values()):
            raise TokenbridgeError(f"option {key!r}: no method takes it")
    for name in wanted:
        if name not in methods:
            raise TokenbridgeError(f"candidates: unknown method {name!r}")
    plan, skipped = {}, {}
    for name, method in methods.items():
        if wanted and name not in wanted:
            continue
        options = candidate_options(method, passed)
        fields = {f.name for f in dataclasses.fields(method.config_cls)}
        if "corpus" in fields and "corpus" not in options and train_file is not None:
            options["corpus"] = str(train_file)
        missing = [r for r in required_resources(method) if not options.get(r)]
        if missing:
            skipped[name] = "needs " + ", ".join(f"-o {m}=" for m in missing)
            continue
        make_config(method, options)  # bad values fail before any work
        plan[name] = options
    if not plan:
        raise TokenbridgeError("auto: no method can run with the given options" +
                               "".join(f"; {n} {why}" for n, why in skipped.items()))
    return plan, skipped


def auto_transplant(source, target_tokenizer, out, options: dict | None, seed: int, force: bool,
                    allow_pickle: bool, progress: bool):
    from ..load.model import resolve_source
    from ..measure.bpb import evaluate
    from ..pipeline import transplant
    from ..report import peak_rss_mb
    from ..write.output_dir import check_output, scratch_dir, staged_output

    started = time.perf_counter()
    source, target_tokenizer, out = Path(source), Path(target_tokenizer), Path(out)
    own, passed = _split_options(dict(options or {}))
    config = make_config_auto(own)
    if not config.text:
        raise TokenbridgeError("method 'auto' needs -o text=FILE[,FILE...] (the text the model is for; "
                               "a held-out slice of it scores the candidates)")
    for path in (source, target_tokenizer):
        if not path.exists():
            raise TokenbridgeError(f"{path}: no such file or directory")
    check_output(out, force, protected=[source, target_tokenizer])
    if _is_masked_lm(resolve_source(source)):
        raise TokenbridgeError(f"{source}: auto scores candidates by bits per byte, which needs a causal LM; "
                               "choose a method with --method")
    paths = read_text_files(config.text, "text")
    train, held_out = split_text(paths, config.holdout_bytes)
    wanted = [m.strip() for m in config.candidates.split(",") if m.strip()]

    with staged_output(out, force) as staged, scratch_dir(staged.parent, f"{out.name}.auto") as work:
        heldout_file = work / "heldout.txt"
        heldout_file.write_bytes(held_out)
        train_file = None
        if len(train) >= MIN_HOLDOUT:
            train_file = work / "train.txt"
            train_file.write_bytes(train)
        plan, skipped = plan_candidates(passed, wanted, train_file)
        scores, best = {}, None
        for name, method_options in plan.items():
            if progress:
                print(f"auto: trying {name}", flush=True)
            candidate_dir = work / name
            try:
                _, report = transplant(source, target_tokenizer, candidate_dir, method=name,
                                       options=method_options, seed=seed, force=True,
                                       allow_pickle=allow_pickle, progress=progress)
            except TokenbridgeError as error:
                scores[name] = {"error": str(error)}
                continue
            bpb = evaluate(candidate_dir, [heldout_file], window=config.window, progress=False).bits_per_byte
            scores[name] = {"bits_per_byte": round(bpb, 6), "transplant_s": report.seconds}
            if best is None or bpb < best[1]:
                if best is not None:
                    shutil.rmtree(work / best[0], ignore_errors=True)
                best = (name, bpb, report)
            else:
                shutil.rmtree(candidate_dir, ignore_errors=True)
        if best is None:
            raise TokenbridgeError("auto: every candidate failed: " +
                                   "; ".join(f"{n}: {s['error']}" for n, s in scores.items()))
        name, bpb, report = best
        report.selection = {
            "chosen": name, "scores": scores, "skipped": skipped,
            "held_out_bytes": len(held_out), "training_bytes": len(train), "window": config.window,
            "text": [str(p) for p in paths], "criterion": "bits per byte on the held-out slice",
        }
        report.write(work / name)
        for item in (work / name).iterdir():
            item.rename(staged / item.name)
    report.seconds = round(time.perf_counter() - started, 3)
    report.peak_rss_mb = peak_rss_mb()
    return out, report


def make_config_auto(options: dict) -> AutoMethodConfig:
    from ..init.registry import Method

    return make_config(Method("auto", None, AutoMethodConfig, ""), options)


def _is_masked_lm(directory: Path) -> bool:
    import json

    path = directory / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    architectures = config.get("architectures") or []
    return config.get("model_type") == "bert" or any(a.endswith("ForMaskedLM") for a in architectures)
