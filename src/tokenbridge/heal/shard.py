"""FSDP2 for heal (``--fsdp``): the model, its gradients and the optimizer state sharded over processes.

Every decoder layer is one ``fully_shard`` unit and the rest of the student (embeddings, final norm, output
matrix) is the student's own unit, so tied embeddings stay one parameter.  Each process holds ``1/N`` of every
trained tensor and of AdamW's moments; a layer's weights are gathered only while it runs.

* Checkpoints are ``torch.distributed.checkpoint`` directories: every process writes its own shards into
  one staged directory, then the main process adds the run's state and a manifest and renames it into
  place, so a checkpoint is whole or absent.
* At the end the shards are gathered into one full state dict on the main process, loaded into a fresh,
  unsharded copy of the student and written as a normal model directory.
* ``new-rows``: FSDP replaces each parameter by its shard, so the gradient hooks of
  :func:`~.params.select_trainable` do not survive; :func:`mask_rows` zeroes the copied rows of each
  process's gradient shard after the backward pass instead.

Launch it with ``torchrun --nproc_per_node N -m tokenbridge heal ... --fsdp`` (gloo on CPUs, nccl on
GPUs) or ``accelerate launch`` with a multi-GPU or an FSDP (version 2) config.  One process without a
launcher works too (a process group of one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import TokenbridgeError
from ..write.manifest import write_manifest

SHARDS_DIR = "shards"
UNSUPPORTED = {"dskd": "DSKD reads the student's whole output matrix outside the forward pass"}


def is_sharded(module) -> bool:
    """Whether ``module`` or any module inside it is sharded by FSDP."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def ensure_process_group(accelerator) -> bool:
    """FSDP needs a process group; a single process without a launcher gets one of its own (True: it was
    made here, and :func:`release_process_group` ends it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    if accelerator.num_processes > 1:
        raise TokenbridgeError("--fsdp: the processes have no process group (launch with torchrun or accelerate)")
    backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def release_process_group(made: bool) -> None:
    import torch.distributed as dist

    if made and dist.is_initialized():
        dist.destroy_process_group()


def plugin_settings(accelerator) -> dict:
    """``fully_shard`` options from Accelerate's FSDP plugin, when ``accelerate launch`` configured one."""
    if accelerator.distributed_type.value != "FSDP":
        return {}
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise TokenbridgeError("accelerate is configured for FSDP version 1; heal --fsdp runs FSDP2 "
                               "(set fsdp_version: 2 in the accelerate config)")
    from torch.distributed.fsdp import OffloadPolicy

    settings = {"reshard_after_forward": plugin.reshard_after_forward}
    if isinstance(plugin.cpu_offload, OffloadPolicy):  # CPUOffloadPolicy, or OffloadPolicy(): none
        settings["offload_policy"] = plugin.cpu_offload
    if plugin.mixed_precision_policy is not None:
        settings["mp_policy"] = plugin.mixed_precision_policy
    return settings


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class transformers never splits across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise TokenbridgeError(f"--fsdp: cannot find the decoder layers of {type(base).__name__} "
                               "(its _no_split_modules names none)")
    return layers


def shard(module, device: torch.device, settings: dict):
    """``fully_shard`` every decoder layer of ``module.student``, then the student itself; in place.

    The student is the outermost unit (not ``module``), so calling it directly (held-out scoring) gathers
    its embeddings as a forward through ``module`` does.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(module.student):
        fully_shard(layer, mesh=mesh, **settings)
    fully_shard(module.student, mesh=mesh, **settings)
    return module


def spread(module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    """All processes, after :func:`shard`: each takes its shards of the main process's ``whole`` state (the
    others built ``module`` on the meta device and pass ``{}``), and every buffer is copied from it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()):
        module.to_empty(device=device)
    set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():  # rotary frequencies and the like are in no state dict
        dist.broadcast(buffer.data, src=0)


def mask_rows(module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient rows a mask has 0 for, on each process's shard (rows are sharded by ``torch.chunk``)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        pieces = torch.chunk(mask, world) if hasattr(grad, "to_local") else (mask,) * world
        piece = pieces[rank] if rank < len(pieces) else mask[:0]
        local.mul_(piece.to(device=local.device, dtype=local.dtype).view(-1, *[1] * (local.dim() - 1)))


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def save(final: Path, module, optimizer, state: dict, is_main: bool) -> None:
    """All processes: write ``final`` (DCP shards of the trained tensors and AdamW state, plus ``state``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    staging = final.parent / f".{final.name}.partial"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(staging / SHARDS_DIR))
    _barrier()
    if is_main:
        (staging / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    _barrier()


def load(path: Path, module, optimizer) -> None:
    """All processes: restore the trained tensors and AdamW state from ``path`` (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=str(path / SHARDS_DIR))
    # not strict: the frozen weights are not in a checkpoint (the caller has matched the trained names)
    set_state_dict(module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state(module) -> dict[str, torch.Tensor]:
    """All processes: every tensor of ``module`` gathered whole, on the CPU of the main process (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def held_bytes(module, optimizer) -> dict[str, int]:
    """Bytes this process holds of the module's parameters, of their gradients (one per trained element)
    and of the optimizer state: each process's share when sharded, everything otherwise."""
    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    params = list(module.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"parameters": sum(size(p) for p in params),
            "gradients": sum(size(p) for p in params if p.requires_grad),
            "optimizer": sum(size(v) for v in state)}
