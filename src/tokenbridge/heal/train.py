"""The heal loop: embedding tuning, ALM distillation or plain fine-tuning, on one CPU or many GPUs.

``tokenbridge heal`` runs this directly; ``accelerate launch -m tokenbridge heal ...`` runs one copy
per GPU (DDP through Accelerate).  Every process builds the same global batch from (seed, step) and
takes its share, so no data is exchanged; losses are normalised by the global batch's token count,
so the averaged gradient is the gradient of the global batch's mean loss whatever the process count
or gradient accumulation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import checks
from ..errors import TokenbridgeError
from ..load.model import check_context, context_length, load_causal_lm, resolve_source
from ..report import REPORT_NAME
from ..write.manifest import MANIFEST_NAME, model_digest, verify_manifest
from ..write.output_dir import check_output, staged_output
from .chunks import CHUNK_KINDS
from .data import Corpus, Side, alm_batch, lm_batch
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
    trainable_state,
)

MODES = ("embeddings", "alm", "alm+embeddings", "sft")
DEFAULT_TRAIN = {"embeddings": "embeddings", "alm": "lora", "alm+embeddings": "lora", "sft": "all"}
DEFAULT_LR = {"embeddings": 1e-3, "new-rows": 1e-3, "lora": 2e-4, "all": 3e-5}
HEAL_REPORT = "tokenbridge-heal.json"
CHECKPOINT_FORMAT = 2


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
        for name in ("steps", "batch_size", "grad_accum", "lora_rank"):
            checks.number(_flag(name), getattr(self, name), low=1, integer=True)
        checks.number("--window", self.window, low=16, integer=True)
        checks.number("--warmup", self.warmup, low=-1, integer=True)
        checks.seed(self.seed)
        for name in ("lr", "embedding_lr", "weight_decay", "max_grad_norm", "lm_weight"):
            checks.number(_flag(name), getattr(self, name), low=0)  # lr 0: the default for what trains
        for name in ("temperature", "lora_alpha"):
            checks.number(_flag(name), getattr(self, name), low=0, low_open=True)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TokenbridgeError(f"unknown --precision {self.precision!r} (auto, fp32, bf16)")
        config = HealConfig(**asdict(self))
        config.train = config.train or DEFAULT_TRAIN[config.mode]
        config.lr = config.lr or DEFAULT_LR[config.train]
        if config.train in ("embeddings", "new-rows"):
            config.embedding_lr = config.lr
        config.embedding_lr = config.embedding_lr or DEFAULT_LR["embeddings"]
        if config.warmup < 0:
            config.warmup = max(1, config.steps // 20)
        if config.lr <= 0 or config.embedding_lr <= 0:
            raise TokenbridgeError("--lr and --embedding-lr must be positive")
        return config

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class HealReport:
    student: str
    teacher: str | None
    texts: list[str]
    config: dict
    processes: int
    device: str
    steps_done: int = 0
    resumed_from: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.student_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self, timings: bool = True) -> dict:
        """The report; without ``timings`` (what OUT's file holds) it is the same for the same run, every time:
        no seconds, no tokens per second, and not where a resumed run was resumed."""
        data = asdict(self)
        data["tokens_per_second"] = round(self.tokens_per_second, 2)
        if not timings:
            for key in ("seconds", "tokens_per_second", "resumed_from"):
                del data[key]
        return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def lr_factor(step: int, config: HealConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to 10% of it at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# -- checkpoints ------------------------------------------------------------------------------------

def checkpoint_dir(out: Path) -> Path:
    return Path(str(Path(out)) + ".checkpoints")


def latest_checkpoint(directory: Path) -> Path | None:
    steps = sorted(directory.glob("step-*")) if directory.is_dir() else []
    return steps[-1] if steps else None


def save_checkpoint(directory: Path, step: int, model, optimizer, config: HealConfig, report: HealReport,
                    inputs: dict) -> Path:
    """``step-N/``: trained tensors and AdamW state as safetensors, the rest as JSON, every file's checksum
    in a manifest; staged like every output, then older steps are removed."""
    final = directory / f"step-{step:08d}"
    with staged_output(final, force=True, manifest=True) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in trainable_state(model).items()},
                  str(tmp / "trainable.safetensors"))
        state = optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, values in state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.contiguous().cpu()
                else:
                    scalars[f"{index}.{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "format": CHECKPOINT_FORMAT, "step": step, "fingerprint": config.fingerprint(), "config": asdict(config),
            "inputs": inputs, "param_groups": state["param_groups"], "optimizer_scalars": scalars,
            "param_names": _optimizer_param_names(model, optimizer),
            "report": report.to_dict()}, indent=1))
    for old in directory.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _optimizer_param_names(model, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (what its state indices refer to)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def run_inputs(student: Path, student_dir: Path, teacher: Path | None, teacher_dir: Path | None,
               corpus: Corpus) -> dict:
    """What a run trains on, by content: a resumed run must have the same student, teacher and texts."""
    def model(given, directory):
        return None if directory is None else {"path": str(given), "sha256": model_digest(directory)}

    return {"student": model(student, student_dir), "teacher": model(teacher, teacher_dir),
            "texts": [{"path": path, "sha256": hashlib.sha256(data).hexdigest()}
                      for path, data in zip(corpus.paths, corpus.documents)]}


def _input_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the inputs a checkpoint was made with and today's, in words."""
    changes = []
    for role in ("student", "teacher"):
        before, after = saved.get(role), now.get(role)
        if (before or {}).get("sha256") != (after or {}).get("sha256"):
            was = before["path"] if before else "none"
            changes.append(f"the {role} ({after['path'] if after else 'none'}) is not the one the checkpoint was "
                           f"made with ({was})")
    old_texts, new_texts = saved.get("texts") or [], now["texts"]
    if [t["path"] for t in old_texts] != [t["path"] for t in new_texts]:
        changes.append(f"--text is {' '.join(t['path'] for t in new_texts)}; the checkpoint was made with "
                       f"{' '.join(t['path'] for t in old_texts)}")
    else:
        changes += [f"--text {new['path']} has changed since the checkpoint was made"
                    for old, new in zip(old_texts, new_texts) if old["sha256"] != new["sha256"]]
    return changes


def _corrupt(path: Path, why: str) -> TokenbridgeError:
    return TokenbridgeError(f"{path}: the checkpoint is corrupt ({why}); it cannot be resumed: start over with --force")


def load_checkpoint(path: Path, model, optimizer, config: HealConfig, inputs: dict) -> dict:
    problem = verify_manifest(path)
    if problem == f"no {MANIFEST_NAME}":
        raise TokenbridgeError(f"{path}: not a checkpoint of this tokenbridge version (it has no checksums); "
                               "start over with --force")
    if problem:
        raise _corrupt(path, problem)
    try:
        state = json.loads((path / "state.json").read_text())
        trained = load_file(str(path / "trainable.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as error:  # noqa: BLE001 - checksums matched, so the writer was at fault
        raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TokenbridgeError(f"{path}: not a tokenbridge heal checkpoint of this version")
    if state["fingerprint"] != config.fingerprint():
        changed = sorted(k for k, v in asdict(config).items() if state["config"].get(k) != v)
        raise TokenbridgeError(f"{path}: the checkpoint was made with other settings ({', '.join(changed)} differ); "
                               "resume with the same options")
    changes = _input_changes(state.get("inputs") or {}, inputs)
    if changes:
        raise TokenbridgeError(f"{path}: cannot resume: {'; '.join(changes)} (resume with the same inputs, "
                               "or start over with --force)")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trained]
    if missing or any(n not in params for n in trained):
        raise TokenbridgeError(f"{path}: the checkpoint's tensors do not match the model's trainable parameters")
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor)
    if _optimizer_param_names(model, optimizer) != state["param_names"]:
        raise TokenbridgeError(f"{path}: the checkpoint's optimizer covers other parameters")
    restored: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        restored.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        restored.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": restored, "param_groups": state["param_groups"]})
    return state


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

def make_accelerator(precision: str):
    """An Accelerate ``Accelerator``: one process per GPU under ``accelerate launch`` (or ``torchrun``).

    Without CUDA the processes run on CPUs and synchronise through gloo (``torchrun --nproc_per_node N``).
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not cuda)


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
    check_output(out, force, protected=inputs + [Path(t) for t in texts])
    check_output(checkpoint_dir(out), True, protected=inputs + [Path(t) for t in texts])
    if config.mode in ("alm", "alm+embeddings") and teacher is None:
        raise TokenbridgeError(f"--mode {config.mode} needs --teacher (the original model)")
    checkpoints = checkpoint_dir(out)
    found = latest_checkpoint(checkpoints)
    if found and not resume and not force:
        raise TokenbridgeError(f"{checkpoints}: holds a checkpoint of an earlier run; pass --resume to continue it "
                               "or --force to start over")
    if resume and not found:
        raise TokenbridgeError(f"--resume: no checkpoint in {checkpoints}")
    if found and not resume:
        shutil.rmtree(checkpoints)
        found = None

    corpus = Corpus([Path(t) for t in texts], config.window)
    accelerator = make_accelerator(config.precision)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TokenbridgeError(f"accelerate is configured for {accelerator.distributed_type.value}; heal runs on one "
                               "process or with DDP (accelerate launch --multi_gpu), which copies the model per GPU")
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
        run = run_inputs(student, student_dir, teacher if teacher_model is not None else None,
                         teacher_dir if teacher_model is not None else None, corpus)
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
        state = load_checkpoint(found, model, optimizer, config, run)
        start = state["step"]
        previous = state["report"]
        report.losses = [tuple(x) for x in previous["losses"]]
        report.student_tokens, report.teacher_tokens = previous["student_tokens"], previous["teacher_tokens"]
        report.seconds, report.resumed_from, report.steps_done = previous["seconds"], start, start
    model, optimizer = accelerator.prepare(model, optimizer)

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.batch_size * config.grad_accum * world
    bar = tqdm(total=config.steps, initial=start, desc=f"heal ({config.mode}, {config.train})", unit="step",
               disable=not progress or not accelerator.is_main_process)
    for step in range(start, config.steps):
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * lr_factor(step, config)
        windows = [corpus.example(config.seed, step * per_step + i) for i in range(per_step)]
        pieces = [corpus.text(w) for w in windows]
        micro = []
        for m in range(config.grad_accum):
            for r in range(world):
                chosen = pieces[(m * world + r) * config.batch_size:(m * world + r + 1) * config.batch_size]
                if r != rank:
                    micro.append((r, None, chosen))
                    continue
                data = [p[0] for p in chosen]
                if teacher_side is not None:
                    batch = alm_batch(data, [p[1] for p in chosen], teacher_side, student_side, config.chunks)
                else:
                    batch = lm_batch(data, student_side)
                micro.append((r, batch, chosen))
        norms = _global_norms(micro, student_side, teacher_side, config)
        step_loss = 0.0
        own = [b for r, b, _ in micro if r == rank]
        for index, batch in enumerate(own):
            sync = index == len(own) - 1
            context = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with context, accelerator.autocast():
                loss, value = _micro_loss(batch, model, teacher_model, student_side, teacher_side, config, norms,
                                          device)
                accelerator.backward(loss * world)
            step_loss += value
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = _sum_across(accelerator, step_loss)
        report.steps_done = step + 1
        report.student_tokens += norms["student_tokens"]
        report.teacher_tokens += norms["teacher_tokens"] if teacher_side is not None else 0
        report.seconds += time.perf_counter() - started
        report.losses.append((step + 1, round(step_loss, 6)))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{report.tokens_per_second:.0f}")
        due = checkpoint_every > 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps)
        if due and accelerator.is_main_process:
            save_checkpoint(checkpoints, step + 1, accelerator.unwrap_model(model), optimizer, config, report, run)
        accelerator.wait_for_everyone()
        if stop_after is not None and step + 1 >= stop_after:
            bar.close()
            return checkpoints, report
    bar.close()

    written = out
    if accelerator.is_main_process:
        final = finished_model(accelerator.unwrap_model(model))
        written = _write_model(final, tokenizer, student_dir, out, force, report)
    accelerator.wait_for_everyone()
    return written, report


def _sum_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))


def _global_norms(micro, student_side: Side, teacher_side: Side | None, config: HealConfig) -> dict:
    """Token counts over the whole global batch (every process computes the same numbers)."""
    student_tokens = teacher_tokens = 0
    for _, batch, chosen in micro:
        data = [p[0] for p in chosen]
        if batch is None:
            if teacher_side is not None:
                batch = alm_batch(data, [p[1] for p in chosen], teacher_side, student_side, config.chunks)
            else:
                batch = lm_batch(data, student_side)
        student_tokens += batch["student_tokens"]
        teacher_tokens += batch.get("teacher_tokens", 0)
    return {"student_tokens": max(1, student_tokens), "teacher_tokens": max(1, teacher_tokens)}


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
