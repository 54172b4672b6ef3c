"""Heal: embedding tuning, ALM distillation or plain fine-tuning, on one CPU or many GPUs.

``tokenbridge heal`` runs this directly; ``accelerate launch -m tokenbridge heal ...`` runs one copy
per GPU (DDP through Accelerate).  The loop, checkpoints and resume are :mod:`.loop`'s; this module is
heal's task (what a batch is, what the loss is) and its settings.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import checks
from ..errors import TokenbridgeError
from ..load.model import check_context, context_length, load_causal_lm, resolve_source
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
from .losses import (
    alm_loss,
    chunk_logprobs,
    lm_loss_sum,
    space_logprobs,
    token_logprobs,
)
from .params import (
    LoraSettings,
    embedding_parameters,
    finished_model,
    select_trainable,
)

MODES = ("embeddings", "alm", "alm+embeddings", "sft")
DEFAULT_TRAIN = {"embeddings": "embeddings", "alm": "lora", "alm+embeddings": "lora", "sft": "all"}
DEFAULT_LR = {"embeddings": 1e-3, "new-rows": 1e-3, "lora": 2e-4, "all": 3e-5}
HEAL_REPORT = "tokenbridge-heal.json"


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
      whitespace-initial next token appended; ``token``: every common token boundary). temperature:
      ALM binarisation temperature.
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
    lm_weight: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    precision: str = "auto"

    def resolved(self) -> HealConfig:
        if self.mode not in MODES:
            raise TokenbridgeError(f"unknown --mode {self.mode!r} ({', '.join(MODES)})")
        if self.chunks not in CHUNK_KINDS:
            raise TokenbridgeError(f"unknown --chunks {self.chunks!r} ({', '.join(CHUNK_KINDS)})")
        check_loop_settings(self)
        checks.number("--lora-rank", self.lora_rank, low=1, integer=True)
        for name in ("lr", "embedding_lr", "weight_decay", "lm_weight"):
            checks.number(flag(name), getattr(self, name), low=0)  # lr 0: the default for what trains
        for name in ("temperature", "lora_alpha"):
            checks.number(flag(name), getattr(self, name), low=0, low_open=True)
        config = HealConfig(**asdict(self))
        config.train = config.train or DEFAULT_TRAIN[config.mode]
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


@dataclass
class HealReport(Progress):
    student: str
    teacher: str | None
    texts: list[str]
    config: dict
    processes: int
    device: str
    student_tokens: int = 0
    teacher_tokens: int = 0
    COUNTERS = ("student_tokens", "teacher_tokens")


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


# -- the loop -------------------------------------------------------------------------------------

def _micro_loss(batch, model, teacher, student_side: Side, teacher_side: Side, config: HealConfig,
                norms: dict, device) -> tuple[torch.Tensor, float]:
    """The micro-batch's share of the global batch loss (already divided by the global token counts)."""
    logits = model(input_ids=batch["student_ids"].to(device), attention_mask=batch["student_mask"].to(device)).logits
    ids = batch["student_ids"].to(device)
    logp, normaliser = token_logprobs(logits, ids)
    total = torch.zeros((), device=device)
    if config.mode in ("embeddings", "sft", "alm+embeddings"):
        weight = config.lm_weight if config.mode == "alm+embeddings" else 1.0
        total = total + weight * lm_loss_sum(logp, batch["loss_mask"].to(device)) / norms["student_tokens"]
    if config.mode in ("alm", "alm+embeddings"):
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["teacher_ids"].to(device),
                               attention_mask=batch["teacher_mask"].to(device)).logits
            t_logp, t_norm = token_logprobs(t_logits, batch["teacher_ids"].to(device))
            t_chunks = chunk_logprobs(t_logp, batch["teacher_chunk"].to(device), batch["chunks"])
            if config.chunks == "word":
                t_chunks = t_chunks + space_logprobs(t_logits, t_norm, batch["teacher_end"].to(device),
                                                     teacher_side.space_mask.to(device))
            del t_logits
        s_chunks = chunk_logprobs(logp, batch["student_chunk"].to(device), batch["chunks"])
        if config.chunks == "word":
            s_chunks = s_chunks + space_logprobs(logits, normaliser, batch["student_end"].to(device),
                                                 student_side.space_mask.to(device))
        weight = batch["chunk_weight"].to(device) / norms["teacher_tokens"]
        total = total + alm_loss(t_chunks, s_chunks, weight, config.temperature)
    return total, float(total.detach())


class HealTask:
    """Heal's side of the training loop: windows of the corpus, tokenized for the student (and teacher)."""

    def __init__(self, corpus: Corpus, config: HealConfig, student_side: Side, teacher_side: Side | None,
                 teacher, device):
        self.corpus, self.config, self.device = corpus, config, device
        self.student_side, self.teacher_side, self.teacher = student_side, teacher_side, teacher

    def _batch(self, chosen):
        data = [p[0] for p in chosen]
        if self.teacher_side is not None:
            return alm_batch(data, [p[1] for p in chosen], self.teacher_side, self.student_side, self.config.chunks)
        return lm_batch(data, self.student_side)

    def batches(self, step: int, world: int, rank: int):
        config = self.config
        per_step = config.batch_size * config.grad_accum * world
        windows = [self.corpus.example(config.seed, step * per_step + i) for i in range(per_step)]
        pieces = [self.corpus.text(w) for w in windows]
        own, student_tokens, teacher_tokens = [], 0, 0
        for m in range(config.grad_accum):
            for r in range(world):  # every process counts the whole global batch's tokens
                chosen = pieces[(m * world + r) * config.batch_size:(m * world + r + 1) * config.batch_size]
                batch = self._batch(chosen)
                student_tokens += batch["student_tokens"]
                teacher_tokens += batch.get("teacher_tokens", 0)
                if r == rank:
                    own.append(batch)
        return own, {"student_tokens": max(1, student_tokens), "teacher_tokens": max(1, teacher_tokens)}

    def loss(self, module, batch, counts):
        return _micro_loss(batch, module, self.teacher, self.student_side, self.teacher_side, self.config, counts,
                           self.device)

    def count(self, report, counts):
        report.student_tokens += counts["student_tokens"]
        report.teacher_tokens += counts["teacher_tokens"] if self.teacher_side is not None else 0


def heal(student: Path, texts: list[Path], out: Path, config: HealConfig, teacher: Path | None = None,
         resume: bool = False, force: bool = False, progress: bool = True, checkpoint_every: int = 0,
         stop_after: int | None = None, allow_pickle: bool = False) -> tuple[Path, HealReport]:
    """Train ``student`` on ``texts`` as ``config`` says and write the healed model to ``out``.

    Every ``checkpoint_every`` steps (and at the end) the trained tensors and optimizer state go to
    ``OUT.checkpoints/``; ``resume`` continues from there exactly.  ``stop_after`` ends the run after
    that many steps without writing ``out`` (as if it had been interrupted; for tests and time-boxed runs).
    A resumed run must have the same settings and the same inputs (student, teacher and texts, by content).
    """
    config = config.resolved()
    checks.number("checkpoint_every", checkpoint_every, low=0, integer=True)
    if stop_after is not None:
        checks.number("stop_after", stop_after, low=1, integer=True)
    out = Path(out)
    student_dir = resolve_source(Path(student))
    teacher_dir = resolve_source(Path(teacher)) if teacher else None
    inputs = [student_dir] + ([teacher_dir] if teacher_dir else [])
    protected = inputs + [Path(t) for t in texts]
    check_output(out, force, protected=protected)
    if config.mode in ("alm", "alm+embeddings") and teacher is None:
        raise TokenbridgeError(f"--mode {config.mode} needs --teacher (the original model)")
    checkpoints, found = start_checkpoints(out, resume, force, protected)

    corpus = Corpus([Path(t) for t in texts], config.window)
    accelerator = make_accelerator(config.precision)
    device = accelerator.device
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(student_dir, allow_pickle=allow_pickle)
    student_side = Side(tokenizer, model.get_output_embeddings().weight.shape[0])
    check_windows_fit(corpus, student_side, context_length(model.config), "the student")
    teacher_model = teacher_side = None
    if config.mode in ("alm", "alm+embeddings"):
        teacher_model, teacher_tokenizer = load_causal_lm(teacher_dir, allow_pickle=allow_pickle)
        teacher_model.requires_grad_(False)
        teacher_model.to(device)
        teacher_side = Side(teacher_tokenizer, teacher_model.get_output_embeddings().weight.shape[0])
        check_windows_fit(corpus, teacher_side, context_length(teacher_model.config), "the teacher")
    run = None  # hashing the models is needed only to write checkpoints or to check one
    if found or checkpoint_every > 0:
        with_teacher = teacher_model is not None
        run = {"student": model_input(student, student_dir),
               "teacher": model_input(teacher, teacher_dir) if with_teacher else None,
               "texts": text_inputs(corpus.paths, corpus.documents)}
    model = select_trainable(model, config.train, student_dir, LoraSettings(config.lora_rank, config.lora_alpha))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding_ids = {id(p) for p in embedding_parameters(base)}
    groups = [{"params": [p for p in trainable if id(p) in embedding_ids], "peak": config.embedding_lr},
              {"params": [p for p in trainable if id(p) not in embedding_ids], "peak": config.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                  weight_decay=config.weight_decay, foreach=False)
    start = 0
    report = HealReport(str(student), str(teacher) if teacher else None, corpus.paths, asdict(config),
                        accelerator.num_processes, str(device))
    if found:
        state = load_checkpoint(found, model, optimizer, config, run, "heal")
        start = state["step"]
        report.restore(state["report"], start)
    model, optimizer = accelerator.prepare(model, optimizer)
    task = HealTask(corpus, config, student_side, teacher_side, teacher_model, device)
    finished = run_steps(accelerator, model, optimizer, config, task, report, start=start,
                         desc=f"heal ({config.mode}, {config.train})", kind="heal", checkpoints=checkpoints,
                         checkpoint_every=checkpoint_every, inputs=run, stop_after=stop_after, progress=progress)
    if not finished:
        return checkpoints, report

    written = out
    if accelerator.is_main_process:
        final = finished_model(accelerator.unwrap_model(model))
        written = _write_model(final, tokenizer, student_dir, out, force, report)
    accelerator.wait_for_everyone()
    return written, report


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
    return out
