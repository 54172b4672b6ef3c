"""The one training loop: Accelerate, the learning-rate schedule, checkpoints and exact resume.

``heal`` (a model on its new tokenizer) and ``hypernet train`` (a hypernetwork for a frozen model) both
run through :func:`run_steps`.  What differs between them is a :class:`Task`: it builds the micro-batches
of a step and computes their loss; the loop does everything else.

Every process builds the same global batch from (seed, step) and takes its share, so no data is
exchanged; a task normalises its losses by the global batch's token count, so the averaged gradient is
the gradient of the global batch's mean loss whatever the process count or gradient accumulation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import checks
from ..errors import TokenbridgeError
from ..write.manifest import MANIFEST_NAME, model_digest, verify_manifest
from ..write.output_dir import check_output, staged_output
from .params import trainable_state

CHECKPOINT_FORMAT = 2


class Task(Protocol):
    """What one kind of training adds to the loop."""

    def batches(self, step: int, world: int, rank: int) -> tuple[list[Any], dict]:
        """This process's micro-batches of ``step`` and the global batch's counts (the same on every process)."""

    def loss(self, module, batch, counts: dict) -> tuple[torch.Tensor, float]:
        """The micro-batch's share of the global batch's loss, and its value."""

    def count(self, report, counts: dict) -> None:
        """Add the step's token counts to ``report``."""


def fingerprint(config) -> str:
    """What a checkpoint's settings must match: a hash of every field of a run's config dataclass."""
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def check_loop_settings(config) -> None:
    """The settings every run of the loop has: steps, batch size, accumulation, window, warm-up, seed,
    gradient clipping and precision (a task checks its own)."""
    for name in ("steps", "batch_size", "grad_accum"):
        checks.number(flag(name), getattr(config, name), low=1, integer=True)
    checks.number("--window", config.window, low=16, integer=True)
    checks.number("--warmup", config.warmup, low=-1, integer=True)
    checks.number("--max-grad-norm", config.max_grad_norm, low=0)
    checks.seed(config.seed)
    if config.precision not in ("auto", "fp32", "bf16"):
        raise TokenbridgeError(f"unknown --precision {config.precision!r} (auto, fp32, bf16)")


def default_warmup(steps: int) -> int:
    """Warm-up steps when none are given: 5% of the run."""
    return max(1, steps // 20)


def flag(name: str) -> str:
    """A config field's command-line flag (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


@dataclass
class Progress:
    """What every run report has (its own fields come first; these are keyword-only), and the token
    counters a report names in ``COUNTERS`` (the first one is what tokens per second counts)."""

    _: KW_ONLY
    steps_done: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    COUNTERS: ClassVar[tuple[str, ...]] = ()

    @property
    def tokens_per_second(self) -> float:
        return getattr(self, self.COUNTERS[0]) / self.seconds if self.seconds else 0.0

    def to_dict(self, timings: bool = True) -> dict:
        """The report; without ``timings`` (what an output's file holds) it is the same for the same run,
        every time: no seconds, no tokens per second, and not where a resumed run was resumed."""
        data = asdict(self)
        data["tokens_per_second"] = round(self.tokens_per_second, 2)
        if not timings:
            for key in ("seconds", "tokens_per_second", "resumed_from"):
                del data[key]
        return data

    def restore(self, previous: dict, step: int) -> None:
        self.losses = [tuple(x) for x in previous["losses"]]
        for name in self.COUNTERS:
            setattr(self, name, previous[name])
        self.seconds, self.resumed_from, self.steps_done = previous["seconds"], step, step


def lr_factor(step: int, config) -> float:
    """Linear warm-up to the peak, then cosine decay to 10% of it at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_accelerator(precision: str, fsdp: bool = False):
    """An Accelerate ``Accelerator``: one process per GPU under ``accelerate launch`` (or ``torchrun``).

    Without CUDA the processes run on CPUs and synchronise through gloo (``torchrun --nproc_per_node N``).
    Without ``fsdp`` every process holds the whole model (DDP); with it the caller shards the model
    (:mod:`.shard`), and an Accelerate FSDP config is accepted for its settings.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not cuda)
    kind = accelerator.distributed_type.value
    if kind == "FSDP" and not fsdp:
        raise TokenbridgeError("accelerate is configured for FSDP; pass --fsdp to shard the model")
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise TokenbridgeError(f"accelerate is configured for {kind}; training runs on one process, with DDP "
                               "(accelerate launch --multi_gpu) or with FSDP (--fsdp)")
    return accelerator


# -- checkpoints ------------------------------------------------------------------------------------

def checkpoint_dir(out: Path) -> Path:
    return Path(str(Path(out)) + ".checkpoints")


def latest_checkpoint(directory: Path) -> Path | None:
    steps = sorted(directory.glob("step-*")) if directory.is_dir() else []
    return steps[-1] if steps else None


def start_checkpoints(out: Path, resume: bool, force: bool, protected: list[Path]) -> tuple[Path, Path | None]:
    """``OUT.checkpoints`` and the checkpoint to resume from (None: start afresh).

    An earlier run's checkpoint is never dropped silently: it needs ``--resume`` or ``--force``.
    """
    checkpoints = checkpoint_dir(out)
    check_output(checkpoints, True, protected=protected)
    found = latest_checkpoint(checkpoints)
    if found and not resume and not force:
        raise TokenbridgeError(f"{checkpoints}: holds a checkpoint of an earlier run; pass --resume to continue it "
                               "or --force to start over")
    if resume and not found:
        raise TokenbridgeError(f"--resume: no checkpoint in {checkpoints}")
    if found and not resume:
        shutil.rmtree(checkpoints)
        found = None
    return checkpoints, found


def text_inputs(paths: list[str], documents: list[bytes]) -> list[dict]:
    return [{"path": path, "sha256": hashlib.sha256(data).hexdigest()} for path, data in zip(paths, documents)]


def model_input(given, directory) -> dict | None:
    return None if directory is None else {"path": str(given), "sha256": model_digest(directory)}


def save_checkpoint(directory: Path, step: int, module, optimizer, config, report, inputs: dict, kind: str,
                    is_main: bool = True) -> Path:
    """``step-N/``: trained tensors and AdamW state as safetensors, the rest as JSON, every file's checksum
    in a manifest; staged like every output, then older steps are removed.

    A sharded ``module`` (FSDP) is saved by every process together (:func:`.shard.save`); otherwise only
    the main process calls this.
    """
    final = directory / f"step-{step:08d}"
    run = {"format": CHECKPOINT_FORMAT, "kind": kind, "step": step, "fingerprint": config.fingerprint(),
           "config": asdict(config), "inputs": inputs, "report": report.to_dict()}
    if _sharded(module):
        from . import shard

        shard.save(final, module, optimizer, dict(run, sharded=_world(), param_names=_trained_names(module)),
                   is_main)
        if is_main:
            _drop_older(directory, final)
        return final
    with staged_output(final, force=True, manifest=True) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in trainable_state(module).items()},
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
        (tmp / "state.json").write_text(json.dumps(dict(
            run, param_groups=state["param_groups"], optimizer_scalars=scalars,
            param_names=_optimizer_param_names(module, optimizer)), indent=1))
    _drop_older(directory, final)
    return final


def _drop_older(directory: Path, final: Path) -> None:
    for old in directory.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _sharded(module) -> bool:
    from .shard import is_sharded

    return is_sharded(module)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _trained_names(module) -> list[str]:
    return [name for name, param in module.named_parameters() if param.requires_grad]


def _optimizer_param_names(module, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (what its state indices refer to)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _input_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the inputs a checkpoint was made with and today's, in words."""
    changes = []
    for role in ("student", "teacher", "model"):
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


def load_checkpoint(path: Path, module, optimizer, config, inputs: dict, kind: str) -> dict:
    """Restore ``module``'s trained tensors and the optimizer from ``path``; returns the saved state.

    The checkpoint must be of this ``kind`` and version, unchanged (checksums), made with the same
    settings (``config.fingerprint()``) and the same inputs.
    """
    problem = verify_manifest(path)
    if problem == f"no {MANIFEST_NAME}":
        raise TokenbridgeError(f"{path}: not a checkpoint of this tokenbridge version (it has no checksums); "
                               "start over with --force")
    if problem:
        raise _corrupt(path, problem)
    try:
        state = json.loads((path / "state.json").read_text())
    except Exception as error:  # noqa: BLE001 - checksums matched, so the writer was at fault
        raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("kind", "heal") != kind:
        raise TokenbridgeError(f"{path}: not a tokenbridge {kind} checkpoint of this version")
    if state["fingerprint"] != config.fingerprint():
        changed = sorted(k for k, v in asdict(config).items() if state["config"].get(k) != v)
        raise TokenbridgeError(f"{path}: the checkpoint was made with other settings ({', '.join(changed)} differ); "
                               "resume with the same options")
    changes = _input_changes(state.get("inputs") or {}, inputs)
    if changes:
        raise TokenbridgeError(f"{path}: cannot resume: {'; '.join(changes)} (resume with the same inputs, "
                               "or start over with --force)")
    sharded = state.get("sharded")
    if bool(sharded) != _sharded(module):
        raise TokenbridgeError(f"{path}: the checkpoint was made with --fsdp over {sharded} processes; resume with --fsdp"
                               if sharded else f"{path}: the checkpoint was made without --fsdp; resume without it")
    if sharded:
        from . import shard

        if _trained_names(module) != state["param_names"]:
            raise TokenbridgeError(f"{path}: the checkpoint's tensors do not match the trainable parameters")
        try:
            shard.load(path, module, optimizer)
        except Exception as error:  # noqa: BLE001 - checksums matched, so the writer was at fault
            raise _corrupt(path, f"{type(error).__name__}: {error}") from None
        return state
    try:
        trained = load_file(str(path / "trainable.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as error:  # noqa: BLE001 - checksums matched, so the writer was at fault
        raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trained]
    if missing or any(n not in params for n in trained):
        raise TokenbridgeError(f"{path}: the checkpoint's tensors do not match the trainable parameters")
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor)
    if _optimizer_param_names(module, optimizer) != state["param_names"]:
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


# -- the loop -------------------------------------------------------------------------------------

def run_steps(accelerator, module, optimizer, config, task: Task, report, *, start: int, desc: str, kind: str,
              checkpoints: Path, checkpoint_every: int, inputs: dict | None, stop_after: int | None,
              progress: bool, after_step: Callable[[int], None] | None = None,
              row_masks: dict[str, torch.Tensor] | None = None) -> bool:
    """Steps ``start .. config.steps`` of one run; True when the last one is done (False: ``stop_after``).

    ``module`` and ``optimizer`` have been through ``accelerator.prepare``; every optimizer group carries
    its peak learning rate as ``peak``.  ``config`` has ``steps``, ``warmup``, ``seed`` and
    ``max_grad_norm`` and a ``fingerprint()``.  Every ``checkpoint_every`` steps (and at the last) the
    trained tensors and optimizer state go to ``checkpoints``.  ``after_step(n)`` runs after step ``n``
    (counted from 1), before its checkpoint.

    A task's loss is one tensor, or a list of terms when ``config.balance`` is ``gradmag``: then each
    term's gradient over the global batch is scaled to unit norm before they are summed (tokenkit's
    GradMag), so no term drowns the others whatever its scale.

    A sharded ``module`` (FSDP, :mod:`.shard`) is not prepared by Accelerate: its gradients are
    reduce-scattered on every backward, ``row_masks`` (parameter name -> 0/1 per row) zero the rows that
    must not train, and every process writes its shards of each checkpoint.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    balanced = getattr(config, "balance", "sum") == "gradmag"
    sharded = _sharded(module)  # heal refuses --balance gradmag with --fsdp before it loads anything
    bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step",
               disable=not progress or not accelerator.is_main_process)
    for step in range(start, config.steps):
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * lr_factor(step, config)
        own, counts = task.batches(step, world, rank)
        step_loss = 0.0
        term_grads: list[list[torch.Tensor]] = []
        for index, batch in enumerate(own):
            sync = index == len(own) - 1 and not balanced
            skip_sync = not sync and world > 1 and not sharded  # FSDP reduce-scatters every backward
            context = accelerator.no_sync(module) if skip_sync else contextlib.nullcontext()
            with context, accelerator.autocast():
                loss, value = task.loss(module, batch, counts)
                if balanced:
                    _accumulate_terms(term_grads, loss, trainable, world)
                else:
                    accelerator.backward(loss * world)
            step_loss += value
        if balanced:
            _set_balanced_grads(accelerator, term_grads, trainable)
        if sharded and row_masks:
            from .shard import mask_rows

            mask_rows(module, row_masks)
        if config.max_grad_norm > 0 and sharded:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        elif config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = _sum_across(accelerator, step_loss)
        report.steps_done = step + 1
        task.count(report, counts)
        report.seconds += time.perf_counter() - started
        report.losses.append((step + 1, round(step_loss, 6)))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{report.tokens_per_second:.0f}")
        if after_step is not None:
            after_step(step + 1)
        due = checkpoint_every > 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps)
        if due and sharded:
            save_checkpoint(checkpoints, step + 1, module, optimizer, config, report, inputs, kind,
                            is_main=accelerator.is_main_process)
        elif due and accelerator.is_main_process:
            save_checkpoint(checkpoints, step + 1, accelerator.unwrap_model(module), optimizer, config, report,
                            inputs, kind)
        accelerator.wait_for_everyone()
        if stop_after is not None and step + 1 >= stop_after:
            bar.close()
            return False
    bar.close()
    return True


def _accumulate_terms(term_grads: list[list[torch.Tensor]], terms, trainable: list, world: int) -> None:
    """Add each term's gradient (of ``term * world``, as the loop's backward would) to its own buffers."""
    terms = list(terms) if isinstance(terms, (list, tuple)) else [terms]
    while len(term_grads) < len(terms):
        term_grads.append([torch.zeros_like(p) for p in trainable])
    for k, term in enumerate(terms):
        grads = torch.autograd.grad(term * world, trainable, retain_graph=k < len(terms) - 1, allow_unused=True)
        for buffer, grad in zip(term_grads[k], grads):
            if grad is not None:
                buffer.add_(grad)


def _set_balanced_grads(accelerator, term_grads: list[list[torch.Tensor]], trainable: list) -> None:
    """``.grad`` = the sum over terms of each term's global-batch gradient divided by its norm."""
    total = [torch.zeros_like(p) for p in trainable]
    for buffers in term_grads:
        if accelerator.num_processes > 1:  # the processes' mean, as DDP's all-reduce would give
            buffers = [accelerator.reduce(b, reduction="mean") for b in buffers]
        norm = torch.sqrt(sum(b.float().square().sum() for b in buffers))
        for t, b in zip(total, buffers):
            t.add_(b / (norm + 1e-8))
    for p, t in zip(trainable, total):
        p.grad = t


def _sum_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))
