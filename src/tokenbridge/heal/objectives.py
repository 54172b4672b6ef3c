"""Heal's objectives, registered by name: what ``--mode`` sums.

A mode is a ``+``-joined list of objective names (``alm+sft``); ``embeddings`` and ``alm+embeddings`` are
older names of ``sft`` and ``alm+sft`` that keep their own defaults for what trains.  Every objective is a
function of one :class:`StepView` (both models' outputs on a micro-batch, aligned) that returns the
micro-batch's share of the global batch's loss; the task sums them (or balances them, ``--balance
gradmag``) and the loop never looks at which they are.

* ``sft``: next-token cross-entropy of the student on its own tokens.
* ``alm``: approximate likelihood matching of chunk likelihoods (Minixhofer et al. 2025), with ``--chunks``
  and ``--distance``.
* ``latents``: the student's hidden states pulled towards the teacher's at chunk ends (``--latents W``).
* ``dskd``: dual-space knowledge distillation with a learned cross-model attention (Zhang et al. 2024).
* ``uld``: universal logit distillation, W1 between sorted next-token distributions (Boizard et al. 2024).
* ``mined``: KL to the teacher's next-token distribution carried into the student's vocabulary by a
  minimum-edit-distance token mapping (Wan et al. 2024), one-hot where the next chunk is not one token on
  both sides.

``uld`` and ``mined`` compare next-token distributions where both models predict what follows the same
bytes: after the prefix and after every common token boundary.  tokenkit's ULD compares positions by
their index in the two sequences; after the first differing token those predict different bytes, so
tokenbridge uses the aligned positions, as tokenkit's own MinED does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .losses import (
    alm_loss,
    chunk_logprobs,
    latent_loss,
    lm_loss_sum,
    space_logprobs,
)


@dataclass
class Outputs:
    """One model's forward pass on a micro-batch."""

    logits: torch.Tensor  # [B, T, V]
    logp: torch.Tensor  # [B, T]: log p(token t | tokens < t), 0 at position 0
    normaliser: torch.Tensor  # [B, T]: logsumexp of each position's logits
    hidden: tuple[torch.Tensor, ...] | None = None  # embeddings, then every layer's output (output_hidden_states)
    head: torch.Tensor | None = None  # [V, D]: the output embedding matrix


@dataclass
class StepView:
    """What an objective reads: the batch, both models' outputs, the global batch's counts, the run's settings."""

    batch: dict
    counts: dict
    config: object  # HealConfig
    student: Outputs
    teacher: Outputs | None
    student_side: object
    teacher_side: object | None
    extras: torch.nn.ModuleDict
    resources: dict = field(default_factory=dict)  # what an objective computes once per run (the MinED mapping)

    def to(self, name: str) -> torch.Tensor:
        return self.batch[name].to(self.student.logits.device)


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[[StepView], torch.Tensor]
    teacher: bool = False  # needs the teacher's forward pass
    hidden: bool = False  # needs hidden states
    pairs: bool = False  # needs the aligned next-token positions (alm_batch(pairs=True))
    extra: Callable[[object, object], torch.nn.Module] | None = None  # (student, teacher) -> trained module


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


# -- sft ------------------------------------------------------------------------------------------

def sft_loss(view: StepView) -> torch.Tensor:
    return lm_loss_sum(view.student.logp, view.to("loss_mask")) / view.counts["student_tokens"]


register(Objective("sft", sft_loss))


# -- alm and its latents --------------------------------------------------------------------------

def _chunk_likelihoods(outputs: Outputs, view: StepView, who: str, side) -> torch.Tensor:
    chunks = chunk_logprobs(outputs.logp, view.to(f"{who}_chunk"), view.batch["chunks"])
    if view.config.chunks == "word":  # "these bytes, then whitespace" on both sides
        chunks = chunks + space_logprobs(outputs.logits, outputs.normaliser, view.to(f"{who}_end"),
                                         side.space_mask.to(chunks.device))
    return chunks


def alm_objective(view: StepView) -> torch.Tensor:
    with torch.no_grad():
        teacher = _chunk_likelihoods(view.teacher, view, "teacher", view.teacher_side)
    student = _chunk_likelihoods(view.student, view, "student", view.student_side)
    weight = view.to("chunk_weight") / view.counts["teacher_tokens"]
    return alm_loss(teacher, student, weight, view.config.temperature, view.config.distance)


def latents_objective(view: StepView) -> torch.Tensor:
    """Every layer's output (not the embeddings, which differ by design) at every chunk end."""
    weight = (view.to("chunk_weight") > 0).float() / view.counts["real_chunks"]
    return latent_loss(list(view.teacher.hidden[1:]), list(view.student.hidden[1:]), view.to("teacher_end"),
                       view.to("student_end"), weight)


register(Objective("alm", alm_objective, teacher=True))
register(Objective("latents", latents_objective, teacher=True, hidden=True))


# -- the baselines --------------------------------------------------------------------------------

def _paired(view: StepView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's and the teacher's logits at the aligned positions [N, V], and their rows in the batch."""
    real = view.to("pair_real")
    rows = torch.arange(real.shape[0], device=real.device)[:, None].expand_as(real)[real]
    student = view.student.logits[rows, view.to("pair_student")[real]]
    teacher = view.teacher.logits[rows, view.to("pair_teacher")[real]].detach()
    return student, teacher, real


def uld_objective(view: StepView) -> torch.Tensor:
    from .baselines import uld_distance

    student, teacher, _ = _paired(view)
    # embedding rows past a tokenizer's length (padding) are no tokens: probability 0
    valid_student = torch.arange(student.shape[-1], device=student.device) < len(view.student_side.vocab)
    valid_teacher = torch.arange(teacher.shape[-1], device=teacher.device) < len(view.teacher_side.vocab)
    return uld_distance(student, teacher, view.config.kd_temperature, valid_student,
                        valid_teacher).sum() / view.counts["pairs"]


def mined_objective(view: StepView) -> torch.Tensor:
    from .baselines import mined_loss

    student, teacher, real = _paired(view)
    mapping = view.resources["mined"].to(student.device)
    loss = mined_loss(student, teacher, mapping, view.to("pair_one_to_one")[real], view.to("pair_next")[real],
                      view.config.kd_temperature)
    return loss.sum() / view.counts["pairs"]


def _mined_resource(student_side, teacher_side, progress: bool) -> torch.Tensor:
    from .baselines import cached_mined_mapping

    return torch.as_tensor(cached_mined_mapping(student_side.vocab, teacher_side.vocab, progress), dtype=torch.long)


def dskd_objective(view: StepView) -> torch.Tensor:
    from .dskd import DSKDView, dskd_loss

    def side(outputs: Outputs, ids: torch.Tensor, mask: torch.Tensor) -> DSKDView:
        following = torch.zeros_like(mask, dtype=torch.bool)
        following[:, :-1] = mask[:, 1:].bool()  # position t carries loss when token t + 1 is real
        return DSKDView(outputs.hidden[0], outputs.hidden[-1], outputs.logits, outputs.head, ids, following)

    student = side(view.student, view.to("student_ids"), view.to("student_mask"))
    teacher = side(view.teacher, view.to("teacher_ids"), view.to("teacher_mask"))
    terms = dskd_loss(view.extras["dskd"], student, teacher, view.config.kd_temperature)
    shares = view.counts["micro_batches"]
    # t2s_ce per student token and s2t_kd per teacher token of the global batch; t2s_kd (over the positions the
    # projection predicts right, a count no other process knows) is the micro-batch's mean, 1/shares of the step
    return (terms.t2s_ce.sum / view.counts["student_tokens"] + terms.s2t_kd.sum / view.counts["teacher_positions"]
            + terms.t2s_kd.mean() / shares)


def _dskd_projector(student, teacher) -> torch.nn.Module:
    from .dskd import DSKDProjector

    return DSKDProjector(student.get_input_embeddings().weight.shape[1], teacher.get_input_embeddings().weight.shape[1])


register(Objective("uld", uld_objective, teacher=True, pairs=True))
register(Objective("mined", mined_objective, teacher=True, pairs=True))
register(Objective("dskd", dskd_objective, teacher=True, hidden=True, extra=_dskd_projector))

RESOURCES = {"mined": _mined_resource}  # objectives that compute something once per run
