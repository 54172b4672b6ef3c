"""The stages of an ``adapt`` run, each a call of tokenbridge's API writing into ``OUT.work/``.

    split      the text's training part and held-out tail   (select.split_text)
    tokenizer  train:N / extend:N on the training part       (tokenizers.api.train / extend)
    select     --method auto: the best method by bits per byte on a slice of the training part
               (select.auto_transplant); or transplant: one named method (pipeline.transplant)
    heal       training against the original as teacher      (heal.train.heal, checkpoints and exact resume)
    measure    tokens and bits per byte per evaluation file  (measure.tokstats, measure.bpb)
    report     OUT: the healed model, report.md, report.json and plots (adapt.report)

Each stage function takes the run's :class:`Context` and its :class:`~.plan.StageSpec` and returns a
small JSON-able result, which the runner records with the stage's fingerprint, time and peak memory.
Every output is written staged (complete or absent); a stage whose record is missing is run again,
replacing whatever output a killed run left.

``TOKENBRIDGE_ADAPT_FAULT=STAGE`` raises :class:`InjectedFault` once the stage's output is written and
before its record is (``heal:K``: after heal step K, its checkpoint saved): how the tests kill a run
in the middle of each stage.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from .plan import Plan, StageSpec

FAULT_VARIABLE = "TOKENBRIDGE_ADAPT_FAULT"
CALIBRATION_STEPS = 3  # heal steps timed to turn --heal-minutes into a step count


class InjectedFault(RuntimeError):
    """Raised where ``TOKENBRIDGE_ADAPT_FAULT`` says, to simulate a run killed there."""


def fault_step(stage: str) -> int | None:
    """``heal:K`` -> K for stage ``heal``; None when no fault is asked for inside this stage."""
    value = os.environ.get(FAULT_VARIABLE, "")
    name, _, step = value.partition(":")
    return int(step) if name == stage and step.isdigit() else None


def fault(stage: str) -> None:
    if os.environ.get(FAULT_VARIABLE, "") == stage:
        raise InjectedFault(f"{FAULT_VARIABLE}: run stopped in stage {stage}")


@dataclass
class Context:
    plan: Plan
    progress: bool
    allow_pickle: bool
    say: Callable[[str], None]
    results: dict = field(default_factory=dict)  # stage -> its recorded result
    log: list[dict] = field(default_factory=list)  # stage -> time, peak memory, run or skipped, in order
    fingerprint: str = ""  # of the stage being run

    @property
    def work(self) -> Path:
        return Path(self.plan.work)

    @property
    def train_files(self) -> list[Path]:
        return [Path(s.train) for s in self.plan.split]


# -- split ------------------------------------------------------------------------------------------

def run_split(ctx: Context, spec: StageSpec) -> dict:
    """The training part of each text and, without --eval, its held-out tail, as files in ``split/``."""
    from ..measure.texts import read_text
    from ..write.output_dir import staged_output
    from .select import split_text

    files = []
    with staged_output(Path(spec.output), force=True) as tmp:
        (tmp / "train").mkdir()
        for item in ctx.plan.split:
            if item.heldout is None:
                train, held = read_text(Path(item.text)).encode("utf-8"), b""
            else:
                (tmp / "heldout").mkdir(exist_ok=True)
                train, held = split_text([Path(item.text)], item.holdout_bytes)
                (tmp / "heldout" / Path(item.heldout).name).write_bytes(held)
            (tmp / "train" / Path(item.train).name).write_bytes(train)
            files.append({"text": item.text, "train_bytes": len(train), "heldout_bytes": len(held)})
    fault("split")
    return {"files": files}


# -- tokenizer --------------------------------------------------------------------------------------

def run_tokenizer(ctx: Context, spec: StageSpec) -> dict:
    from ..tokenizers.api import extend, train
    from ..tokenizers.train import TrainConfig

    step = ctx.plan.tokenizer
    model_dir = Path(ctx.plan.model_dir)
    if step.kind == "train":
        report = train(ctx.train_files, Path(spec.output), TrainConfig(vocab_size=step.size), like=model_dir,
                       force=True, progress=ctx.progress)
    else:
        report = extend(model_dir, ctx.train_files, Path(spec.output), step.size, force=True, progress=ctx.progress)
    fault("tokenizer")
    details = {k: v for k, v in report.details.items() if k not in ("new_tokens",)}
    return {"command": report.command, "vocab_before": report.vocab_before, "vocab_after": report.vocab_after,
            "details": details}


# -- select / transplant ----------------------------------------------------------------------------

def run_select(ctx: Context, spec: StageSpec) -> dict:
    """``--method auto``: every candidate transplanted, scored on a slice of the training part, the best kept."""
    from .select import auto_transplant

    options = dict(ctx.plan.config["options"])
    options["text"] = ",".join(str(p) for p in ctx.train_files)
    _, report = auto_transplant(Path(ctx.plan.model_dir), Path(ctx.plan.target), Path(spec.output), options,
                                ctx.plan.config["seed"], True, ctx.allow_pickle, ctx.progress)
    fault("select")
    selection = report.selection
    return {"method": selection["chosen"], "scores": selection["scores"], "skipped": selection["skipped"],
            "counts": report.counts, "source_vocab": report.source_vocab_size,
            "target_vocab": report.target_vocab_size}


def run_transplant(ctx: Context, spec: StageSpec) -> dict:
    from ..pipeline import transplant

    config = ctx.plan.config
    _, report = transplant(Path(ctx.plan.model_dir), Path(ctx.plan.target), Path(spec.output),
                           method=config["method"], options=config["options"], seed=config["seed"], force=True,
                           allow_pickle=ctx.allow_pickle, progress=ctx.progress)
    fault("transplant")
    return {"method": report.method, "counts": report.counts, "source_vocab": report.source_vocab_size,
            "target_vocab": report.target_vocab_size}


# -- heal -------------------------------------------------------------------------------------------

def _heal_config(settings: dict, steps: int):
    from ..heal.train import HealConfig

    values = dict(settings, steps=steps)
    return HealConfig(**values)


def budget_steps(ctx: Context, spec: StageSpec, fingerprint: str) -> dict:
    """``--heal-minutes`` as a step count: the first time, a few steps are timed; the count is kept in
    ``heal/budget.json`` (with the stage's fingerprint) so that a resumed run trains the same steps."""
    from ..heal.train import heal

    path = Path(ctx.plan.work) / "heal" / "budget.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            return saved
    minutes = spec.settings["minutes"]
    settings = dict(spec.settings["config"], warmup=-1)
    calibration = path.parent / "calibration"
    ctx.say(f"adapt: heal: timing {CALIBRATION_STEPS} steps to fit --heal-minutes {minutes:g}")
    try:
        _, report = heal(Path(ctx.plan.stage("heal").reads["student"]), ctx.train_files, calibration,
                         _heal_config(settings, 1000), teacher=Path(ctx.plan.model_dir), force=True,
                         progress=False, checkpoint_every=0, stop_after=CALIBRATION_STEPS,
                         allow_pickle=ctx.allow_pickle)
    finally:
        shutil.rmtree(calibration, ignore_errors=True)
        shutil.rmtree(Path(f"{calibration}.checkpoints"), ignore_errors=True)
    per_step = report.seconds / max(1, report.steps_done)
    budget = {"fingerprint": fingerprint, "minutes": minutes, "seconds_per_step": round(per_step, 4),
              "steps": max(1, int(minutes * 60 / per_step))}
    _write_json(path, budget)
    return budget


def run_heal(ctx: Context, spec: StageSpec) -> dict:
    """Heal the transplant against the original; a stopped heal of the same inputs resumes from its checkpoint."""
    from ..heal.loop import checkpoint_dir, latest_checkpoint
    from ..heal.train import heal

    fingerprint = ctx.fingerprint
    settings = dict(spec.settings["config"])
    budget = None
    if settings["steps"] is None:
        budget = budget_steps(ctx, spec, fingerprint)
        settings["steps"] = budget["steps"]
    steps = settings["steps"]
    settings["eval_every"] = max(1, steps // 8)
    config = _heal_config(settings, steps)
    every = spec.settings["checkpoint_every"] or max(1, steps // 10)
    out = Path(spec.output)
    started = out.parent / "started.json"
    found = latest_checkpoint(checkpoint_dir(out))
    resume = found is not None and started.is_file() and \
        json.loads(started.read_text()).get("fingerprint") == fingerprint
    if resume:
        ctx.say(f"adapt: heal: resuming from {found.name}")
    else:
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
        _write_json(started, {"fingerprint": fingerprint})
    stop = fault_step("heal")
    _, report = heal(Path(spec.reads["student"]), ctx.train_files, out, config, teacher=Path(ctx.plan.model_dir),
                     resume=resume, force=True, progress=ctx.progress, checkpoint_every=every, stop_after=stop,
                     allow_pickle=ctx.allow_pickle, eval_texts=[Path(p) for p in ctx.plan.eval_files])
    if stop is not None and report.steps_done < steps:
        raise InjectedFault(f"{FAULT_VARIABLE}: run stopped in stage heal after step {report.steps_done}")
    fault("heal")
    return {"steps": steps, "budget": budget, "mode": report.config["mode"], "train": report.config["train"],
            "checkpoint_every": every, "evals": report.evals, "losses": report.losses,
            "student_tokens": report.student_tokens, "texts": report.texts,
            "heal_seconds": round(report.seconds, 3), "device": report.device}


# -- measure ----------------------------------------------------------------------------------------

def eval_labels(plan: Plan) -> dict[str, str]:
    """Evaluation file -> how the report names it (a held-out tail by its text's name)."""
    if plan.config["eval"]:
        given = {path: path for path in plan.eval_files}
    else:
        given = {item.heldout: item.text for item in plan.split}
    names = [Path(text).name for text in given.values()]
    labels = {path: Path(text).name if names.count(Path(text).name) == 1 else text for path, text in given.items()}
    return labels if plan.config["eval"] else {path: f"{label} (held out)" for path, label in labels.items()}


def run_measure(ctx: Context, spec: StageSpec) -> dict:
    """Tokens of each evaluation file with the model's tokenizer and the new one; bits per byte of the
    original, the zero-shot transplant and the healed model."""
    from ..align.token_bytes import vocabulary
    from ..load.tokenizer import load_tokenizer
    from ..measure.bpb import evaluate
    from ..measure.texts import text_blocks
    from ..measure.tokstats import count_text
    from ..write.output_dir import staged_file

    window = spec.settings["window"]
    files = [Path(p) for p in ctx.plan.eval_files]
    labels = eval_labels(ctx.plan)
    scores = {}
    for name in ("original", "transplant", "healed"):
        ctx.say(f"adapt: measure: bits per byte of the {name} model")
        result = evaluate(Path(spec.reads[name]), files, window=window, progress=ctx.progress,
                          allow_pickle=ctx.allow_pickle and name == "original")
        scores[name] = {f.file: f for f in result.files}
    heal_window = spec.settings["heal_window"]
    if heal_window != window:  # the heal curve is scored in heal's windows: the original too, to compare
        result = evaluate(Path(spec.reads["original"]), files, window=heal_window, progress=ctx.progress,
                          allow_pickle=ctx.allow_pickle)
        scores["original_heal_window"] = {f.file: f for f in result.files}
    tokens = {}
    for name, path in (("before", ctx.plan.model_dir), ("after", spec.reads["target"])):
        tokenizer = load_tokenizer(Path(path))
        vocab = vocabulary(tokenizer)
        tokens[name] = {str(f): count_text(tokenizer, text_blocks(f), vocab).tokens for f in files}
    rows = []
    for path in files:
        key = str(path)
        original = scores["original"][key]
        rows.append({"file": key, "label": labels.get(key, path.name), "bytes": original.bytes,
                     "tokens_before": tokens["before"][key], "tokens_after": tokens["after"][key],
                     "bpb_original": round(original.bits_per_byte, 6),
                     "bpb_transplant": round(scores["transplant"][key].bits_per_byte, 6),
                     "bpb_healed": round(scores["healed"][key].bits_per_byte, 6),
                     "bpb_original_heal_window": round(scores.get("original_heal_window", scores["original"])[key]
                                                       .bits_per_byte, 6)})
    result = {"window": window, "heal_window": heal_window, "files": rows}
    with staged_file(Path(spec.output)) as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    fault("measure")
    return result


# -- report -----------------------------------------------------------------------------------------

def run_report(ctx: Context, spec: StageSpec) -> dict:
    """OUT: the healed model's files, report.json, report.md and the plots, published in one step."""
    from ..write.output_dir import staged_output
    from .report import build_report, write_report

    report = build_report(ctx.plan, ctx.results, ctx.log)
    healed = Path(spec.reads["healed"])
    with staged_output(Path(spec.output), force=True) as tmp:
        for item in sorted(healed.iterdir()):
            if item.is_file():
                _link_or_copy(item, tmp / item.name)
        write_report(tmp, report)
    fault("report")
    return {"verdict": report["verdict"]}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (a model's weights are not copied twice), else a copy;
    a rerun of a stage replaces its files by rename, so OUT's links keep their content."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_json(path: Path, data: dict) -> None:
    from ..write.output_dir import staged_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


STAGES: dict[str, Callable] = {"split": run_split, "tokenizer": run_tokenizer, "select": run_select,
                               "transplant": run_transplant, "heal": run_heal, "measure": run_measure,
                               "report": run_report}

