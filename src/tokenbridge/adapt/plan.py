"""The plan of an ``adapt`` run: what the user asked for, checked, and the stages that will do it.

:func:`make_plan` checks every input before anything is written (a bad one is a one-line
:class:`TokenbridgeError`) and returns a :class:`Plan`: the tokenizer step, the transplant candidates
the given resources allow, the heal settings, the evaluation files, and one :class:`StageSpec` per
stage.  A stage's spec names its settings and the files and directories it reads; its fingerprint is
a hash of those settings and of the content of what it reads, taken when the stage is about to run
(the outputs of earlier stages exist only by then).  ``--resume`` skips a stage whose fingerprint is the
one recorded when it last finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TokenbridgeError

PLAN_FORMAT = "tokenbridge-adapt-plan/1"
HOLDOUT_SHARE = 0.1  # without --eval: the last 10% of each text is held out ...
HOLDOUT_MAX = 1 << 20  # ... at most 1 MiB of it
VERDICT_THRESHOLD = 0.02  # healed bits per byte within 2% of the original's: "same quality"


@dataclass
class AdaptConfig:
    """What ``tokenbridge adapt`` is asked to do (every field is a command-line flag).

    tokenizer: ``train:N`` (a tokenizer of N tokens trained on the text, in the model tokenizer's style),
      ``extend:N`` (the model's tokenizer with up to N tokens added), or a tokenizer PATH; empty:
      ``train:`` the model tokenizer's own size.
    method: initialisation method of the new rows; ``auto`` (default) tries every method the options
      allow and keeps the best on a held-out slice of the training text. options: ``-o KEY=VALUE``.
    heal_minutes: time budget of the heal, turned into a step count once by timing a few steps;
      heal_steps (when set) fixes the step count instead (reproducible). heal_mode: the heal loss.
    eval: held-out files; none: the last part of each text is held out (never trained on).
    """

    tokenizer: str = ""
    method: str = "auto"
    options: dict = field(default_factory=dict)
    heal_minutes: float = 30.0
    heal_steps: int | None = None
    heal_mode: str = "alm"
    heal_batch_size: int = 4
    heal_window: int = 1024
    heal_lr: float = 0.0
    checkpoint_every: int = 0  # 0: a tenth of the steps
    eval: list[str] = field(default_factory=list)
    eval_window: int = 2048
    seed: int = 0


@dataclass
class TokenizerStep:
    """How the target tokenizer is made: ``train`` or ``extend`` with ``size``, or ``given`` at ``path``."""

    kind: str
    size: int | None = None
    path: str | None = None


@dataclass
class StageSpec:
    """One stage: its settings and what it reads (label -> path), and where its result goes."""

    name: str
    settings: dict
    reads: dict[str, str]
    output: str
    trains_on: list[str] = field(default_factory=list)  # the text files its training (or choosing) reads

    def inputs(self, digest) -> dict:
        """Settings and the content digest of everything read: what the fingerprint hashes."""
        return {"settings": self.settings, "reads": {label: digest(Path(path)) for label, path in self.reads.items()}}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


@dataclass
class SplitFile:
    text: str  # the user's file
    train: str  # what training reads (OUT.work/split/train/...)
    heldout: str | None  # its held-out tail (OUT.work/split/heldout/...), None with --eval
    holdout_bytes: int


@dataclass
class Plan:
    model: str  # as given
    model_dir: str  # the model directory it resolves to
    out: str
    work: str
    config: dict
    split: list[SplitFile]
    eval_files: list[str]
    tokenizer: TokenizerStep
    target: str  # the target tokenizer's path (the tokenizer stage's output, or the given PATH)
    candidates: dict  # method -> options tried (auto), or {method: options}
    skipped: dict  # method -> why it cannot run with the given resources (auto)
    heal: dict  # HealConfig fields, steps None while the time budget decides them
    stages: list[StageSpec]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        data = asdict(self)
        data = {"format": PLAN_FORMAT, **data}
        data["verdict_threshold"] = VERDICT_THRESHOLD
        return data


def work_dir(out: Path) -> Path:
    """``OUT.work``: the plan, every stage's output and record, heal's checkpoints."""
    return Path(str(Path(out)) + ".work")


def parse_tokenizer(spec: str, model_vocab: int) -> TokenizerStep:
    """``train:N``, ``extend:N``, a PATH, or empty (``train:`` the model's own size)."""
    if not spec:
        return TokenizerStep("train", model_vocab)
    for kind in ("train", "extend"):
        if spec.startswith(kind + ":"):
            value = spec[len(kind) + 1:]
            if not value.isdigit() or int(value) < 1:
                raise TokenbridgeError(f"--tokenizer {spec}: {kind}:N needs N, a whole number of tokens of at least 1")
            return TokenizerStep(kind, int(value))
    from ..load.packaged import resolve

    path = resolve(spec)
    if not path.exists():
        raise TokenbridgeError(f"--tokenizer {spec}: no such file or directory (give train:N, extend:N or a "
                               "tokenizer path)")
    return TokenizerStep("given", path=str(path))


def holdout_size(size: int) -> int:
    return min(HOLDOUT_MAX, max(1024, int(size * HOLDOUT_SHARE)))


def make_plan(model: str, texts: list[Path], out: Path, config: AdaptConfig, force: bool = False,
              resume: bool = False, allow_pickle: bool = False) -> Plan:
    """Check every input and plan the run; nothing is written."""
    from .. import checks
    from ..arch import arch_spec
    from ..heal.train import HealConfig
    from ..load.checkpoint import open_checkpoint
    from ..load.model import resolve_source
    from ..load.packaged import resolve
    from ..load.tokenizer import load_tokenizer
    from ..measure.texts import check_text
    from ..write.output_dir import check_output
    from .select import _is_masked_lm, _split_options, make_config_auto, plan_candidates

    out = Path(out)
    work = work_dir(out)
    checks.seed(config.seed)
    checks.number("--heal-minutes", config.heal_minutes, low=0, low_open=True)
    if config.heal_steps is not None:
        checks.number("--heal-steps", config.heal_steps, low=1, integer=True)
    checks.number("--eval-window", config.eval_window, low=4, integer=True)
    if not texts:
        raise TokenbridgeError("give at least one --text file")
    source = resolve(str(model))
    if not source.exists():
        raise TokenbridgeError(f"{model}: no such file or directory")
    sizes = {str(path): check_text(Path(path)) for path in [*texts, *map(Path, config.eval)]}
    model_dir = resolve_source(source)
    arch_spec(open_checkpoint(model_dir, allow_pickle=allow_pickle).config["model_type"])  # headers only
    if _is_masked_lm(model_dir):
        raise TokenbridgeError(f"{model}: adapt measures and heals by bits per byte, which needs a causal LM")
    tokenizer = parse_tokenizer(config.tokenizer, len(load_tokenizer(model_dir)))
    protected = [source, model_dir, *map(Path, texts), *map(Path, config.eval)]
    if tokenizer.path:
        protected.append(Path(tokenizer.path))
    check_output(out, force or resume, protected=protected)
    check_output(work, True, protected=protected)

    split = []
    for index, text in enumerate(texts):
        text = Path(text)
        size = sizes[str(text)]
        name = f"{index}-{text.name}"
        held = None if config.eval else holdout_size(size)
        if held is not None and size < 2 * held:
            raise TokenbridgeError(f"{text}: {size} bytes is too little to hold out the last part for evaluation "
                                   f"(need at least {2 * held}); give more text or --eval FILE")
        split.append(SplitFile(str(text), str(work / "split" / "train" / name),
                               None if held is None else str(work / "split" / "heldout" / name), held or 0))
    eval_files = [str(Path(p)) for p in config.eval] or [s.heldout for s in split]
    train_files = [s.train for s in split]

    target = tokenizer.path or str(work / "tokenizer")
    options = dict(config.options)
    if config.method == "auto":
        own, passed = _split_options(options)
        if "text" in own:
            raise TokenbridgeError("-o text=: adapt chooses the method on its own training text (--text)")
        wanted = [m.strip() for m in own.get("candidates", "").split(",") if m.strip()]
        make_config_auto(own)
        candidates, skipped = plan_candidates(passed, wanted, work / "split" / "train")
    else:
        from ..init.registry import check_resources, get_method, make_config

        chosen = get_method(config.method)
        check_resources(chosen, make_config(chosen, options))
        candidates, skipped = {config.method: options}, {}

    heal = HealConfig(mode=config.heal_mode, steps=config.heal_steps or 1, batch_size=config.heal_batch_size,
                      window=config.heal_window, lr=config.heal_lr, seed=config.seed).resolved()
    heal_settings = asdict(heal)
    heal_settings["steps"] = config.heal_steps  # None: decided by the time budget
    if config.heal_steps is None:
        heal_settings["warmup"] = -1

    stages = [StageSpec("split", {"holdout_bytes": [s.holdout_bytes for s in split], "eval_given": bool(config.eval)},
                        {f"text/{i}": s.text for i, s in enumerate(split)}, str(work / "split"))]
    if tokenizer.kind != "given":
        stages.append(StageSpec("tokenizer", asdict(tokenizer),
                                {"model": str(model_dir), **{f"train/{i}": t for i, t in enumerate(train_files)}},
                                target, trains_on=train_files))
    select = config.method == "auto"
    stages.append(StageSpec("select" if select else "transplant",
                            {"method": config.method, "options": options, "seed": config.seed},
                            {"model": str(model_dir), "target": target,
                             **({f"train/{i}": t for i, t in enumerate(train_files)} if select else {})},
                            str(work / "transplant"), trains_on=train_files if select else []))
    stages.append(StageSpec("heal", {"config": heal_settings, "minutes": None if config.heal_steps else
                                     config.heal_minutes, "checkpoint_every": config.checkpoint_every},
                            {"student": str(work / "transplant"), "teacher": str(model_dir),
                             **{f"train/{i}": t for i, t in enumerate(train_files)},
                             **{f"eval/{i}": e for i, e in enumerate(eval_files)}},
                            str(work / "heal" / "model"), trains_on=train_files))
    stages.append(StageSpec("measure", {"window": config.eval_window, "heal_window": config.heal_window},
                            {"original": str(model_dir), "transplant": str(work / "transplant"),
                             "healed": str(work / "heal" / "model"), "target": target,
                             **{f"eval/{i}": e for i, e in enumerate(eval_files)}},
                            str(work / "measure.json")))
    stages.append(StageSpec("report", {"threshold": VERDICT_THRESHOLD, "out": str(out)},
                            {"healed": str(work / "heal" / "model"), "measure": str(work / "measure.json")},
                            str(out)))
    return Plan(str(model), str(model_dir), str(out), str(work), asdict(config), split, eval_files, tokenizer,
                target, candidates, skipped, heal_settings, stages)
