"""Heal: embedding tuning, cross-tokenizer distillation (ALM and its baselines) or fine-tuning, on one CPU
or many GPUs.

``tokenbridge heal`` runs this directly; ``accelerate launch -m tokenbridge heal ...`` runs one copy
per GPU (DDP through Accelerate).  The loop, checkpoints and resume are :mod:`.loop`'s; the objectives
are :mod:`.objectives`'; this module is heal's task (what a batch is, which objectives it sums), its
settings, and the held-out evaluation during training.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import checks
from ..errors import TokenbridgeError
from ..load.model import check_context, context_length, empty_causal_lm, load_causal_lm, resolve_source
from ..report import REPORT_NAME
from ..write.output_dir import check_output, staged_output
from .chunks import CHUNK_KINDS
from .data import Corpus, Side, alm_batch, lm_batch
from .loop import (
    Progress,
    check_loop_settings,
    default_warmup,
    fingerprint,
    flag,
    load_checkpoint,
    make_accelerator,
    model_input,
    run_steps,
    start_checkpoints,
    text_inputs,
)
from .losses import ALM_DISTANCES, token_logprobs
from .objectives import OBJECTIVES, RESOURCES, Outputs, StepView
from . import shard
from .params import (
    LoraSettings,
    embedding_parameters,
    finished_model,
    row_masks,
    select_trainable,
)

MODE_ALIASES = {"embeddings": ("sft",), "alm+embeddings": ("alm", "sft")}  # older names, their own defaults
MODES = ("embeddings", "sft", "alm", "alm+sft", "alm+embeddings", "dskd", "uld", "mined")  # the usual ones
BALANCES = ("sum", "gradmag")
DEFAULT_LR = {"embeddings": 1e-3, "new-rows": 1e-3, "lora": 2e-4, "all": 3e-5}
HEAL_REPORT = "tokenbridge-heal.json"
EVAL_REPORT = "tokenbridge-heal-eval.json"
EVAL_PLOT = "heal-eval.png"


def mode_objectives(mode: str) -> tuple[str, ...]:
    """The objectives a ``--mode`` sums: ``alm+sft`` -> ("alm", "sft"); checked, in the order given."""
    names = MODE_ALIASES.get(mode) or tuple(mode.split("+"))
    known = sorted(n for n in OBJECTIVES if n != "latents")
    for name in names:
        if name not in known:
            raise TokenbridgeError(f"unknown --mode {mode!r}: {name!r} is not an objective ({', '.join(known)}, "
                                   "joined by +; latents come with --latents W)")
    if len(set(names)) != len(names):
        raise TokenbridgeError(f"--mode {mode!r} names an objective twice")
    return names


def default_train(mode: str) -> str:
    if mode == "embeddings":
        return "embeddings"
    return "all" if mode_objectives(mode) == ("sft",) else "lora"


@dataclass
class HealConfig:
    """Everything that decides a heal run's result (a resumed run must match it exactly).

    mode: the loss. ``embeddings`` and ``sft``: next-token cross-entropy on the student's tokens;
      ``alm``: approximate likelihood matching against the teacher; ``alm+embeddings``: both, summed
      (the LM term weighted by ``lm_weight``).
    train: which parameters train (``embeddings``, ``new-rows``, ``all``, ``lora``); default by mode.
    steps: optimizer steps. batch_size: windows per micro-batch per process. grad_accum: micro-batches
      per step. window: bytes per training window.
    lr: peak learning rate (default by ``train``); embedding_lr: peak learning rate of the embedding
      matrices when the body trains too (``all``, ``lora``; default 1e-3: new rows need to move far);
      warmup: linear warm-up steps, then cosine decay to 10% of the peak. weight_decay: AdamW decay (0 keeps untrained rows of ``new-rows`` exact).
    chunks: ALM chunk kind (``word``: chunks end before whitespace, with each model's probability of a
      whitespace-initial next token appended; ``token``: every common token boundary; ``unbiased``: the
      common boundaries whose last-token pair is bias-free by tokenkit's test, for any tokenizer pair).
      temperature: ALM binarisation temperature. distance: ALM's distance between chunk likelihoods
      (:data:`~.losses.ALM_DISTANCES`). bias_threshold: ``unbiased`` chunks' bias threshold.
    lm_weight: weight of the ``sft`` term when the mode sums it with others. latents: weight of the
      hidden-state alignment at chunk ends (0: off). balance: ``sum`` (weighted sum of the terms) or
      ``gradmag`` (each term's gradient scaled to unit norm, then summed). kd_temperature: softmax
      temperature of the dskd, uld and mined distributions.
    mix: one sampling weight per training file (empty: every window equally often).
    eval_every: held-out evaluation every N steps (0: only when ``heal`` gets ``eval`` files: at the
      start and the end).
    """

    mode: str = "embeddings"
    train: str = ""
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    window: int = 1024
    lr: float = 0.0
    embedding_lr: float = 0.0
    warmup: int = -1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    chunks: str = "word"
    temperature: float = 100.0
    distance: str = "binary-kl"
    bias_threshold: float = 1e-4
    lm_weight: float = 1.0
    latents: float = 0.0
    balance: str = "sum"
    kd_temperature: float = 1.0
    mix: list[float] = field(default_factory=list)
    eval_every: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    precision: str = "auto"

    def resolved(self) -> HealConfig:
        objectives = mode_objectives(self.mode)
        if self.chunks not in CHUNK_KINDS:
            raise TokenbridgeError(f"unknown --chunks {self.chunks!r} ({', '.join(CHUNK_KINDS)})")
        if self.distance not in ALM_DISTANCES:
            raise TokenbridgeError(f"unknown --distance {self.distance!r} ({', '.join(ALM_DISTANCES)})")
        if self.balance not in BALANCES:
            raise TokenbridgeError(f"unknown --balance {self.balance!r} ({', '.join(BALANCES)})")
        check_loop_settings(self)
        checks.number("--lora-rank", self.lora_rank, low=1, integer=True)
        checks.number("--eval-every", self.eval_every, low=0, integer=True)
        for name in ("lr", "embedding_lr", "weight_decay", "lm_weight", "latents", "bias_threshold"):
            checks.number(flag(name), getattr(self, name), low=0)  # lr 0: the default for what trains
        for name in ("temperature", "lora_alpha", "kd_temperature"):
            checks.number(flag(name), getattr(self, name), low=0, low_open=True)
        if self.latents > 0 and not any(OBJECTIVES[n].teacher for n in objectives):
            raise TokenbridgeError(f"--latents aligns hidden states with the teacher's; --mode {self.mode} has no teacher")
        config = HealConfig(**asdict(self))
        config.mix = [float(w) for w in config.mix]
        config.train = config.train or default_train(config.mode)
        config.lr = config.lr or DEFAULT_LR[config.train]
        if config.train in ("embeddings", "new-rows"):
            config.embedding_lr = config.lr
        config.embedding_lr = config.embedding_lr or DEFAULT_LR["embeddings"]
        if config.warmup < 0:
            config.warmup = default_warmup(config.steps)
        if config.lr <= 0 or config.embedding_lr <= 0:
            raise TokenbridgeError("--lr and --embedding-lr must be positive")
        return config

    def fingerprint(self) -> str:
        return fingerprint(self)

    def terms(self) -> list[tuple[str, float]]:
        """(objective, weight) of every term the loss sums."""
        names = mode_objectives(self.mode)
        terms = [(n, self.lm_weight if n == "sft" and len(names) > 1 else 1.0) for n in names]
        return terms + ([("latents", self.latents)] if self.latents > 0 else [])

    def needs(self, what: str) -> bool:
        """Whether any term needs ``what`` (an :class:`~.objectives.Objective` flag: teacher, hidden, pairs)."""
        return any(getattr(OBJECTIVES[n], what) for n, _ in self.terms())


@dataclass
class HealReport(Progress):
    student: str
    teacher: str | None
    texts: list[str]
    config: dict
    processes: int
    device: str
    sharded: bool = False  # --fsdp: parameters, gradients and optimizer state split over the processes
    student_tokens: int = 0
    teacher_tokens: int = 0
    evals: list[dict] = field(default_factory=list)  # held-out bits per byte: {"step", "files": {path: bpb}, "all"}
    # bytes of parameters, gradients and optimizer state the largest process holds (after the first step)
    memory: dict = field(default_factory=dict)
    COUNTERS = ("student_tokens", "teacher_tokens")

    def restore(self, previous: dict, step: int) -> None:
        super().restore(previous, step)
        self.evals = list(previous.get("evals", []))
        self.memory = dict(previous.get("memory", {}))


def check_windows_fit(corpus: Corpus, side: Side, context: int | None, who: str) -> None:
    """Every training window, tokenized with the prefix token, must fit the model's context.

    A token spells at least one byte (a normaliser may add one), so windows of ``window + 2`` bytes or
    fewer always fit; longer windows are tokenized and measured before training starts.
    """
    if context is None or corpus.window + 2 <= context:
        return
    for begin in range(0, len(corpus.windows), 256):
        chosen = corpus.windows[begin:begin + 256]
        lengths = [len(ids) + 1 for ids in side.encode([corpus.text(w)[0] for w in chosen])]
        longest = max(lengths)
        check_context(longest, context, "--window", "a training window", who)


def check_latents_match(student, teacher) -> None:
    """``--latents`` compares hidden states layer by layer: both models need the same depth and width."""
    def shape(config):
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return config.num_hidden_layers, config.hidden_size

    if shape(student) != shape(teacher):
        (s_layers, s_width), (t_layers, t_width) = shape(student), shape(teacher)
        raise TokenbridgeError(f"--latents aligns hidden states layer by layer, but the student has {s_layers} layers "
                               f"of width {s_width} and the teacher {t_layers} of width {t_width}; distil a "
                               "different model without --latents")


class HealModule(torch.nn.Module):
    """What trains: the student, and the modules an objective adds (DSKD's projector) in ``extras``.

    Its forward is the student's, so DDP wraps one module and synchronises every trained parameter.
    """

    def __init__(self, student, extras: dict[str, torch.nn.Module]):
        super().__init__()
        self.student = student
        self.extras = torch.nn.ModuleDict(extras)

    def forward(self, **inputs):
        return self.student(**inputs)


def _outputs(model, ids, mask, hidden: bool, head) -> Outputs:
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
    logp, normaliser = token_logprobs(out.logits, ids)
    return Outputs(out.logits, logp, normaliser, out.hidden_states if hidden else None, head)


def output_matrix(model) -> torch.Tensor:
    """The output embedding matrix of a model, a PEFT-wrapped one or a :class:`HealModule` (not DDP-wrapped)."""
    model = model.student if isinstance(model, HealModule) else model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight


def step_terms(config: HealConfig, batch: dict, module, teacher, student_side: Side, teacher_side: Side | None,
               counts: dict, extras: torch.nn.ModuleDict | None = None, resources: dict | None = None,
               device="cpu", head: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The weighted terms of one micro-batch's loss, each its share of the global batch's mean.

    ``module`` may be DDP-wrapped; then ``head`` is the student's output matrix (:func:`output_matrix`).
    """
    hidden = config.needs("hidden")
    student = _outputs(module, batch["student_ids"].to(device), batch["student_mask"].to(device), hidden,
                       output_matrix(module) if head is None else head)
    teacher_out = None
    if config.needs("teacher"):
        with torch.no_grad():
            teacher_out = _outputs(teacher, batch["teacher_ids"].to(device), batch["teacher_mask"].to(device), hidden,
                                   teacher.get_output_embeddings().weight)
    view = StepView(batch, counts, config, student, teacher_out, student_side, teacher_side,
                    extras if extras is not None else torch.nn.ModuleDict(), resources or {})
    return [weight * OBJECTIVES[name].loss(view) for name, weight in config.terms()]


class HealTask:
    """Heal's side of the training loop: windows of the corpus, tokenized for the student (and teacher)."""

    def __init__(self, corpus: Corpus, config: HealConfig, student_side: Side, teacher_side: Side | None,
                 teacher, extras: torch.nn.ModuleDict, resources: dict, head: torch.Tensor, device):
        self.corpus, self.config, self.device = corpus, config, device
        self.student_side, self.teacher_side, self.teacher = student_side, teacher_side, teacher
        self.extras, self.resources, self.head = extras, resources, head

    def _batch(self, chosen):
        data = [p[0] for p in chosen]
        if self.teacher_side is not None:
            return alm_batch(data, [p[1] for p in chosen], self.teacher_side, self.student_side, self.config.chunks,
                             pairs=self.config.needs("pairs"), bias=self.resources.get("bias"))
        return lm_batch(data, self.student_side)

    def batches(self, step: int, world: int, rank: int):
        config = self.config
        per_step = config.batch_size * config.grad_accum * world
        windows = [self.corpus.example(config.seed, step * per_step + i) for i in range(per_step)]
        pieces = [self.corpus.text(w) for w in windows]
        own = []
        counts = {"student_tokens": 0, "teacher_tokens": 0, "teacher_positions": 0, "real_chunks": 0, "pairs": 0}
        for m in range(config.grad_accum):
            for r in range(world):  # every process counts the whole global batch's tokens
                chosen = pieces[(m * world + r) * config.batch_size:(m * world + r + 1) * config.batch_size]
                batch = self._batch(chosen)
                counts["student_tokens"] += batch["student_tokens"]
                if self.teacher_side is not None:
                    counts["teacher_tokens"] += batch["teacher_tokens"]
                    counts["teacher_positions"] += int(batch["teacher_mask"][:, 1:].sum())
                    counts["real_chunks"] += batch["real_chunks"]
                    counts["pairs"] += batch.get("pairs", 0)
                if r == rank:
                    own.append(batch)
        counts = {k: max(1, v) for k, v in counts.items()}
        counts["micro_batches"] = config.grad_accum * world
        return own, counts

    def loss(self, module, batch, counts):
        terms = step_terms(self.config, batch, module, self.teacher, self.student_side, self.teacher_side, counts,
                           self.extras, self.resources, self.device, self.head)
        value = float(sum(float(t.detach()) for t in terms))
        return (terms if self.config.balance == "gradmag" else sum(terms)), value

    def count(self, report, counts):
        report.student_tokens += counts["student_tokens"]
        report.teacher_tokens += counts["teacher_tokens"] if self.teacher_side is not None else 0


class HeldOut:
    """Bits per byte of the student on held-out files, every ``eval_every`` steps, into the report."""

    def __init__(self, paths: list[Path], window: int, tokenizer, report: HealReport):
        from ..measure.bpb import read_texts

        self.texts = read_texts(paths, None)
        self.window, self.tokenizer, self.report = window, tokenizer, report

    def __call__(self, step: int, model) -> None:
        from ..measure.bpb import Scorer

        was_training = model.training
        scorer = Scorer(model, self.tokenizer)
        files = {name: scorer.score_file(name, data, self.window) for name, data in self.texts.items()}
        model.train(was_training)
        bits, size = sum(f.bits for f in files.values()), sum(f.bytes for f in files.values())
        self.report.evals.append({"step": step, "files": {n: round(f.bits_per_byte, 6) for n, f in files.items()},
                                  "all": round(bits / size, 6)})


def heal(student: Path, texts: list[Path], out: Path, config: HealConfig, teacher: Path | None = None,
         resume: bool = False, force: bool = False, progress: bool = True, checkpoint_every: int = 0,
         stop_after: int | None = None, allow_pickle: bool = False,
         eval_texts: list[Path] = (), fsdp: bool = False) -> tuple[Path, HealReport]:
    """Train ``student`` on ``texts`` as ``config`` says and write the healed model to ``out``.

    Every ``checkpoint_every`` steps (and at the end) the trained tensors and optimizer state go to
    ``OUT.checkpoints/``; ``resume`` continues from there exactly.  ``stop_after`` ends the run after
    that many steps without writing ``out`` (as if it had been interrupted; for tests and time-boxed runs).
    A resumed run must have the same settings and the same inputs (student, teacher and texts, by content).
    ``eval_texts``: held-out files scored (bits per byte) before the first step, every
    ``config.eval_every`` steps and after the last; the curve goes into the report and into OUT as JSON
    and a plot.
    ``fsdp``: shard the student, its gradients and optimizer state over the processes (:mod:`.shard`).
    """
    config = config.resolved()
    checks.number("checkpoint_every", checkpoint_every, low=0, integer=True)
    if stop_after is not None:
        checks.number("stop_after", stop_after, low=1, integer=True)
    if config.eval_every and not eval_texts:
        raise TokenbridgeError("--eval-every needs --eval FILE... (the held-out text to score)")
    out = Path(out)
    student_dir = resolve_source(Path(student))
    teacher_dir = resolve_source(Path(teacher)) if teacher else None
    inputs = [student_dir] + ([teacher_dir] if teacher_dir else [])
    protected = inputs + [Path(t) for t in texts] + [Path(t) for t in eval_texts]
    check_output(out, force, protected=protected)
    if config.needs("teacher") and teacher is None:
        raise TokenbridgeError(f"--mode {config.mode} needs --teacher (the original model)")
    if fsdp:
        _check_shardable(config)
    checkpoints, found = start_checkpoints(out, resume, force, protected)

    corpus = Corpus([Path(t) for t in texts], config.window, config.mix or None)
    accelerator = make_accelerator(config.precision, fsdp=fsdp)
    device = accelerator.device
    own_group = shard.ensure_process_group(accelerator) if fsdp else False
    torch.manual_seed(config.seed)
    # sharded over several processes, only the main one reads the weights; the others build the model's
    # shapes and receive their shards from it
    empty = fsdp and not accelerator.is_main_process
    model, tokenizer = (empty_causal_lm(student_dir) if empty else
                        load_causal_lm(student_dir, allow_pickle=allow_pickle))
    student_side = Side(tokenizer, model.get_output_embeddings().weight.shape[0])
    check_windows_fit(corpus, student_side, context_length(model.config), "the student")
    teacher_model = teacher_side = None
    if config.needs("teacher"):
        teacher_model, teacher_tokenizer = load_causal_lm(teacher_dir, allow_pickle=allow_pickle)
        teacher_model.requires_grad_(False)
        teacher_model.to(device)
        teacher_side = Side(teacher_tokenizer, teacher_model.get_output_embeddings().weight.shape[0])
        check_windows_fit(corpus, teacher_side, context_length(teacher_model.config), "the teacher")
        if config.latents > 0:
            check_latents_match(model.config, teacher_model.config)
    resources = _resources(config, corpus, student_side, teacher_side, progress and accelerator.is_main_process)
    run = None  # hashing the models is needed only to write checkpoints or to check one
    if found or checkpoint_every > 0:
        with_teacher = teacher_model is not None
        run = {"student": model_input(student, student_dir),
               "teacher": model_input(teacher, teacher_dir) if with_teacher else None,
               "texts": text_inputs(corpus.paths, corpus.documents)}
    model = select_trainable(model, config.train, student_dir, LoraSettings(config.lora_rank, config.lora_alpha))
    model.train()
    extras = {name: OBJECTIVES[name].extra(model, teacher_model) for name, _ in config.terms()
              if OBJECTIVES[name].extra is not None}
    module = HealModule(model, extras)
    if not empty:
        module.to(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # new rows and objectives' own modules start far from their optimum: the embedding learning rate
    fast_ids = {id(p) for p in embedding_parameters(base)} | {id(p) for p in module.extras.parameters()}
    fast = {name for name, p in module.named_parameters() if id(p) in fast_ids}
    masks = None
    if fsdp:  # sharding replaces every parameter by its shard: groups and masks go by name
        if config.train == "new-rows":
            masks = {f"student.{name}": mask for name, mask in row_masks(base, student_dir).items()}
        whole = module.state_dict() if not empty else {}
        shard.shard(module, device, shard.plugin_settings(accelerator))
        shard.spread(module, whole, device)
        del whole
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in fast], "peak": config.embedding_lr},
              {"params": [p for n, p in trainable if n not in fast], "peak": config.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                  weight_decay=config.weight_decay, foreach=False)
    start = 0
    report = HealReport(str(student), str(teacher) if teacher else None, corpus.paths, asdict(config),
                        accelerator.num_processes, str(device), sharded=fsdp)
    if found:
        state = load_checkpoint(found, module, optimizer, config, run, "heal")
        start = state["step"]
        report.restore(state["report"], start)
    held_out = HeldOut([Path(p) for p in eval_texts], config.window, tokenizer, report) if eval_texts else None
    scores = accelerator.is_main_process or fsdp  # a sharded model runs on every process together
    if held_out is not None and start == 0 and scores:
        held_out(0, model)
    if not fsdp:
        module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    task = HealTask(corpus, config, student_side, teacher_side, teacher_model, unwrapped.extras, resources,
                    output_matrix(unwrapped), device)

    def after_step(step: int) -> None:
        if not report.memory:
            held = shard.held_bytes(module, optimizer)
            if accelerator.num_processes > 1:
                values = accelerator.gather(torch.tensor(list(held.values()), device=device))
                held = dict(zip(held, values.view(accelerator.num_processes, -1).max(0).values.tolist()))
            report.memory = held
        last = step == config.steps
        if held_out is not None and scores and (last or (config.eval_every and step % config.eval_every == 0)):
            held_out(step, accelerator.unwrap_model(module).student)

    finished = run_steps(accelerator, module, optimizer, config, task, report, start=start,
                         desc=f"heal ({config.mode}, {config.train})", kind="heal", checkpoints=checkpoints,
                         checkpoint_every=checkpoint_every, inputs=run, stop_after=stop_after, progress=progress,
                         after_step=after_step, row_masks=masks)
    if not finished:
        shard.release_process_group(own_group)
        return checkpoints, report

    written = out
    student_model = accelerator.unwrap_model(module).student
    if fsdp:  # every process sends its shards; the main process writes an unsharded copy
        student_model = _gathered(module, student_dir, config, accelerator.is_main_process)
    if accelerator.is_main_process:
        written = _write_model(finished_model(student_model), tokenizer, student_dir, out, force, report)
    accelerator.wait_for_everyone()
    shard.release_process_group(own_group)
    return written, report


def _check_shardable(config: HealConfig) -> None:
    for name, _ in config.terms():
        if name in shard.UNSUPPORTED:
            raise TokenbridgeError(f"--fsdp cannot run --mode {config.mode}: {shard.UNSUPPORTED[name]}")
    if config.balance == "gradmag":
        raise TokenbridgeError("--fsdp cannot run --balance gradmag (it takes each term's gradient apart)")


def _gathered(module, student_dir: Path, config: HealConfig, is_main: bool):
    """A sharded run's student, whole, on the main process (None elsewhere): the student's shapes with the
    same trainable structure (LoRA adapters included), built on the meta device and given the gathered
    tensors themselves, so the main process holds the model once."""
    state = shard.full_state(module)
    if not is_main:
        return None
    fresh, _ = empty_causal_lm(student_dir)
    fresh = select_trainable(fresh, config.train, student_dir, LoraSettings(config.lora_rank, config.lora_alpha))
    HealModule(fresh, {}).load_state_dict(state, strict=True, assign=True)
    base = fresh.get_base_model() if hasattr(fresh, "get_base_model") else fresh
    base.tie_weights()  # assigning gave tied matrices one tensor each: tie them again (as the config says)
    return fresh


def _resources(config: HealConfig, corpus: Corpus, student_side: Side, teacher_side: Side | None,
               progress: bool) -> dict:
    """What the run's objectives compute once: the MinED mapping, the pair biases of unbiased chunks."""
    found = {}
    for name, _ in config.terms():
        if name in RESOURCES:
            found[name] = RESOURCES[name](student_side, teacher_side, progress)
    if config.chunks == "unbiased" and teacher_side is not None:
        from .chunks import PairBias, unigram_probs

        sample = [corpus.text(w)[0] for w in corpus.windows[:: max(1, len(corpus.windows) // 512)]]
        found["bias"] = PairBias(teacher_side.vocab, student_side.vocab,
                                 unigram_probs(teacher_side.encode(sample), len(teacher_side.vocab)),
                                 unigram_probs(student_side.encode(sample), len(student_side.vocab)),
                                 threshold=config.bias_threshold)
    return found


def _write_model(model, tokenizer, student_dir: Path, out: Path, force: bool, report: HealReport) -> Path:
    config = json.loads((student_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    model = model.to(getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else torch.float32)
    with staged_output(out, force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if (student_dir / REPORT_NAME).is_file():
            shutil.copyfile(student_dir / REPORT_NAME, tmp / REPORT_NAME)
        (tmp / HEAL_REPORT).write_text(json.dumps(report.to_dict(timings=False), indent=1) + "\n")
        if report.evals:
            (tmp / EVAL_REPORT).write_text(json.dumps(report.evals, indent=1) + "\n")
            plot_evals(report.evals, tmp / EVAL_PLOT, f"heal --mode {report.config['mode']}")
    return out


def plot_evals(evals: list[dict], path: Path, title: str) -> None:
    """Held-out bits per byte against steps, one line per file and one for all of them, as a ratio to step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in evals]
    first = evals[0]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name in first["files"]:
        axes.plot(steps, [e["files"][name] / first["files"][name] for e in evals], marker="o", markersize=3,
                  label=Path(name).name)
    axes.plot(steps, [e["all"] / first["all"] for e in evals], color="black", linewidth=2.2, label="all files")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"held-out bits per byte / step {first['step']}")
    axes.set_title(f"{title}: held-out bits per byte during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
