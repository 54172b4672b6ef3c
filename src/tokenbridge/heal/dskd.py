"""DSKD: dual-space knowledge distillation with cross-model attention (Zhang et al. 2024, arXiv:2406.17328).

A baseline for distilling a teacher into a student with a different vocabulary.  A cross-model attention
aligns the two token sequences: each student position queries the teacher positions (and, through the
transposed scores, each teacher position the student positions).  Teacher hidden states are carried into
the student's space and scored by the student's head (``t2s``), student hidden states into the teacher's
space and scored by the teacher's head (``s2t``).  Three terms, as tokenkit's ``compute_baseline_dskd_loss``:

- ``t2s_ce``: cross-entropy of the projected ``t2s`` logits on the student's next tokens (trains the projector);
- ``t2s_kd``: KL(p_t2s || p_student), the projected teacher distribution detached, only over positions whose
  projected argmax is the student's next token;
- ``s2t_kd``: KL(p_teacher || p_s2t) over the teacher's positions.

Shapes: ``B`` sequences (the same texts on both sides), ``S``/``U`` student/teacher token positions,
``d_s``/``d_t`` hidden sizes, ``V_s``/``V_t`` vocabularies.  Position ``t`` of a view predicts token ``t+1``;
the projections and the loss live on the first ``T - 1`` positions of each side.

Where this follows tokenkit (and DSKD's own code):

- "index embeddings": position ``t`` is ``[embeds[t], embeds[t+1]]``, the input embedding of the current and
  of the next token.  The queries are ``query(student index embeddings)``; the keys are the teacher's index
  embeddings divided by their std, with no projection.  Scores are scaled by ``1 / sqrt(2 * d_t)``.
- values: ``s2t(student last hidden)`` and ``t2s(teacher last hidden / std + teacher next-token embedding / std)``.
- each std is one number over the whole tensor (all sequences, positions, padding included, and dimensions),
  population std (``ddof=0``, as ``jnp.std``; DSKD's torch code uses ``ddof=1``, a negligible difference).
  So the normalisation, and through it the loss, depends slightly on the batch's padding.
- the attention is **not causal**: the only mask is validity (``mask`` of both views), so a student position
  attends to later teacher positions and vice versa.  tokenkit and DSKD do the same.
- stop-gradients: the student head in the ``t2s`` logits, and every teacher tensor.
- the KL direction is tokenkit's ``compute_forward_kl_divergence``: ``sum_v p_target (log p_target - log q)``
  with ``p_target`` the (detached) teacher side; logits are divided by ``temperature`` on both sides, and the
  projected teacher logits of ``t2s_kd`` additionally by ``teacher_temperature``; no ``temperature**2`` factor.
  Vocabulary entries whose logit is infinite on either side contribute 0.

Where this chooses differently:

- the student's input embeddings are **detached** by default (``student_embeds_grad=False``), as in DSKD's
  own code (``stu_embed_tokens(...).detach()``).  tokenkit lets the alignment gradient reach the student's
  input embeddings through the query; in healing those embeddings are what is being trained, and the
  attention is the projector's job.  ``student_embeds_grad=True`` gives tokenkit's behaviour.
- the projector's Linear layers are initialised as flax's ``Dense`` (tokenkit's ``init_linear``): truncated
  normal kernel with variance ``1 / fan_in``, zero bias, each drawn from torch's generator in turn (tokenkit
  draws all three from the same key).
- tokenkit's default ``t2s`` divergence is the skewed reverse KL (``srkl``, lambda 0.1) with ``kd_temp = 2``;
  here the default is the forward KL and ``temperature = 1``; ``divergence="srkl"`` is available.
- terms are returned as (sum, count) so the caller normalises over its global batch; tokenkit normalises
  ``t2s_ce`` and ``s2t_kd`` by the global batch's positions and ``t2s_kd`` by the local batch's correct positions.

Memory: the scores and the two attention weights are ``[B, S-1, U-1]`` float32 each (kept for backward),
and the two projected logits ``[B, S-1, V_s]`` and ``[B, U-1, V_t]`` plus their float32 log-softmaxes: about
as much again as the two models' own logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokenbridge.errors import TokenbridgeError

DIVERGENCES = ("kl", "srkl")
SKEW_EPSILON = 1e-9


class DSKDProjector(nn.Module):
    """The three trainable projections of DSKD.

    ``query``: [2 d_s] -> [2 d_t] (student index embeddings to attention queries); ``s2t``: [d_s] -> [d_t]
    (student hidden to teacher space); ``t2s``: [d_t] -> [d_s] (teacher hidden to student space).
    Deterministic given torch's seed.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise TokenbridgeError(f"DSKD projector dimensions must be positive, got {student_dim}, {teacher_dim}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim)
        self.s2t = nn.Linear(student_dim, teacher_dim)
        self.t2s = nn.Linear(teacher_dim, student_dim)
        for layer in (self.query, self.s2t, self.t2s):
            lecun_normal_(layer)


def lecun_normal_(layer: nn.Linear) -> None:
    """flax ``Dense``'s default init in place: kernel ~ N(0, 1/fan_in) truncated at 2 std, bias 0."""
    # flax's truncated_normal divides by the std of a standard normal truncated to [-2, 2] so the variance
    # after truncation is exactly the one asked for.
    std = math.sqrt(1.0 / layer.in_features) / 0.87962566103423978
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
        nn.init.zeros_(layer.bias)


@dataclass
class DSKDView:
    """One model's tensors for a batch.

    embeds: [B, T, d] input embeddings of ``ids`` (``hidden_states[0]`` of an HF forward);
    hidden: [B, T, d] last hidden state (``hidden_states[-1]``); logits: [B, T, V]; head: [V, d] output
    embedding matrix; ids: [B, T] long; mask: [B, T] bool, True at positions t whose next token t+1 is a real
    token (so ``mask[:, -1]`` is False).  The mask marks both the loss positions and the attention keys/queries.
    """

    embeds: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor
    head: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class DSKDProjections:
    """The cross-model attention's outputs; rows at positions whose mask is False are unspecified.

    t2s_hidden: [B, S-1, d_s] teacher values attended by each student position; t2s_logits: [B, S-1, V_s]
    (student head, detached); s2t_hidden: [B, U-1, d_t]; s2t_logits: [B, U-1, V_t] (teacher head, detached).
    """

    t2s_hidden: torch.Tensor
    t2s_logits: torch.Tensor
    s2t_hidden: torch.Tensor
    s2t_logits: torch.Tensor


@dataclass
class DSKDTerm:
    """A loss term as a sum over positions and the number of positions summed (both 0-dim float32)."""

    sum: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """sum / count, 0 when no position counted."""
        return self.sum / self.count.clamp(min=1.0)


@dataclass
class DSKDTerms:
    """The three DSKD terms.  ``t2s_kd.count / t2s_ce.count`` is the projection's next-token accuracy."""

    t2s_ce: DSKDTerm
    t2s_kd: DSKDTerm
    s2t_kd: DSKDTerm

    def mean_sum(self) -> torch.Tensor:
        """Each term normalised by its own count, then added: the single-batch DSKD loss."""
        return self.t2s_ce.mean() + self.t2s_kd.mean() + self.s2t_kd.mean()


def _check_view(view: DSKDView, dim: int, side: str) -> None:
    if view.ids.ndim != 2 or view.ids.shape[1] < 2:
        raise TokenbridgeError(f"DSKD {side} ids must be [B, T] with T >= 2, got {tuple(view.ids.shape)}")
    batch, length = view.ids.shape
    if view.mask.shape != view.ids.shape or view.mask.dtype != torch.bool:
        raise TokenbridgeError(f"DSKD {side} mask must be bool [B, T] like its ids, got {view.mask.dtype} "
                               f"{tuple(view.mask.shape)}")
    if bool(view.mask[:, -1].any()):
        raise TokenbridgeError(f"DSKD {side} mask is True at the last position, which has no next token: "
                               "mask[:, t] must mark positions whose next token is real")
    for name in ("embeds", "hidden"):
        shape = tuple(getattr(view, name).shape)
        if shape != (batch, length, dim):
            raise TokenbridgeError(f"DSKD {side} {name} must be {(batch, length, dim)}, got {shape}")
    if view.head.ndim != 2 or view.head.shape[1] != dim:
        raise TokenbridgeError(f"DSKD {side} head must be [V, {dim}], got {tuple(view.head.shape)}")
    if tuple(view.logits.shape) != (batch, length, view.head.shape[0]):
        raise TokenbridgeError(f"DSKD {side} logits must be {(batch, length, view.head.shape[0])} "
                               f"(the head's vocabulary), got {tuple(view.logits.shape)}")


def _check(projector: DSKDProjector, student: DSKDView, teacher: DSKDView) -> None:
    _check_view(student, projector.student_dim, "student")
    _check_view(teacher, projector.teacher_dim, "teacher")
    if student.ids.shape[0] != teacher.ids.shape[0]:
        raise TokenbridgeError(f"DSKD student and teacher batches differ: {student.ids.shape[0]} and "
                               f"{teacher.ids.shape[0]} sequences")


def _index_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """[B, T, d] -> [B, T-1, 2d]: each position's embedding followed by the next position's."""
    return torch.cat([embeds[:, :-1], embeds[:, 1:]], dim=-1)


def _unit_std(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor divided by its population std over all elements, in float32."""
    tensor = tensor.float()
    return tensor / tensor.std(correction=0)


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of float32 ``scores`` where ``valid``; fully invalid rows come out uniform."""
    return scores.masked_fill(~valid, -0.7 * torch.finfo(scores.dtype).max).softmax(dim=-1)


def dskd_projections(projector: DSKDProjector, student: DSKDView, teacher: DSKDView, *,
                     student_embeds_grad: bool = False) -> DSKDProjections:
    """The cross-model attention of DSKD in both directions.

    Inputs are cast to the projector's dtype for its Linear layers; the attention runs in float32; the
    attended hidden states are cast to each head's dtype for the logits.  See the module docstring for
    the construction, the stop-gradients and ``student_embeds_grad``.
    """
    _check(projector, student, teacher)
    dtype = projector.query.weight.dtype
    student_embeds = student.embeds if student_embeds_grad else student.embeds.detach()
    teacher_embeds = teacher.embeds.detach()

    query = projector.query(_index_embeds(student_embeds).to(dtype)).float()  # [B, S-1, 2 d_t]
    key = _unit_std(_index_embeds(teacher_embeds))  # [B, U-1, 2 d_t]
    student_value = projector.s2t(student.hidden[:, :-1].to(dtype)).float()  # [B, S-1, d_t]
    teacher_value_in = _unit_std(teacher.hidden.detach()[:, :-1]) + _unit_std(teacher_embeds[:, 1:])
    teacher_value = projector.t2s(teacher_value_in.to(dtype)).float()  # [B, U-1, d_s]

    scores = query @ key.transpose(1, 2) / math.sqrt(2 * projector.teacher_dim)  # [B, S-1, U-1]
    pairs = student.mask[:, :-1, None] & teacher.mask[:, None, :-1]
    t2s_weight = _masked_softmax(scores, pairs)  # each student position over teacher positions
    s2t_weight = _masked_softmax(scores.transpose(1, 2), pairs.transpose(1, 2))  # [B, U-1, S-1]

    t2s_hidden = t2s_weight @ teacher_value
    s2t_hidden = s2t_weight @ student_value
    student_head = student.head.detach()
    teacher_head = teacher.head.detach()
    return DSKDProjections(
        t2s_hidden=t2s_hidden,
        t2s_logits=t2s_hidden.to(student_head.dtype) @ student_head.T,
        s2t_hidden=s2t_hidden,
        s2t_logits=s2t_hidden.to(teacher_head.dtype) @ teacher_head.T,
    )


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
               target_temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per position, p = softmax(target_logits / (temperature * target_temperature)) and
    q = softmax(logits / temperature), computed in float32.

    logits, target_logits: [..., V].  Returns [...].  Entries with an infinite logit on either side add 0.
    """
    scaled = logits.float() / temperature
    target_scaled = target_logits.float() / (temperature * target_temperature)
    logq = scaled.log_softmax(dim=-1)
    logp = target_scaled.log_softmax(dim=-1)
    terms = logp.exp() * (logp - logq)
    return torch.where(scaled.isinf() | target_scaled.isinf(), 0.0, terms).sum(dim=-1)


def skewed_reverse_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                      target_temperature: float = 1.0, skew_lambda: float = 0.1) -> torch.Tensor:
    """KL(q || (1 - lambda) p + lambda q) per position (tokenkit's ``srkl``), p and q as in :func:`forward_kl`.

    logits, target_logits: [..., V].  Returns [...].  The mixture's log adds 1e-9 as tokenkit does.
    """
    scaled = logits.float() / temperature
    target_scaled = target_logits.float() / (temperature * target_temperature)
    logq = scaled.log_softmax(dim=-1)
    q = logq.exp()
    mixed = (1.0 - skew_lambda) * target_scaled.softmax(dim=-1) + skew_lambda * q
    terms = q * (logq - torch.log(mixed + SKEW_EPSILON))
    return torch.where(scaled.isinf() | target_scaled.isinf(), 0.0, terms).sum(dim=-1)


def dskd_loss(projector: DSKDProjector, student: DSKDView, teacher: DSKDView, temperature: float = 1.0, *,
              teacher_temperature: float = 1.0, divergence: str = "kl", skew_lambda: float = 0.1,
              student_embeds_grad: bool = False) -> DSKDTerms:
    """The three DSKD terms as sums and counts over the batch's positions.

    ``t2s_ce`` and ``t2s_kd`` sum over student positions ``t < S-1`` with ``student.mask``, predicting
    ``student.ids[:, t+1]``; ``t2s_kd`` further only where ``argmax t2s_logits`` is that token.  ``s2t_kd`` sums
    over teacher positions with ``teacher.mask``.  ``divergence`` ("kl" or "srkl") chooses t2s_kd's divergence;
    s2t_kd is always the forward KL.  Gradient reaches the projector and the student's ``logits`` and
    ``hidden`` (and ``embeds`` with ``student_embeds_grad``), never the student head or any teacher tensor.
    """
    if divergence not in DIVERGENCES:
        raise TokenbridgeError(f"unknown DSKD divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if temperature <= 0 or teacher_temperature <= 0:
        raise TokenbridgeError(f"DSKD temperatures must be positive, got {temperature}, {teacher_temperature}")
    projections = dskd_projections(projector, student, teacher, student_embeds_grad=student_embeds_grad)
    student_mask = student.mask[:, :-1]
    teacher_mask = teacher.mask[:, :-1]
    targets = student.ids[:, 1:]

    t2s_logits = projections.t2s_logits.float()
    t2s_nll = -t2s_logits.log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    correct = student_mask & (t2s_logits.argmax(dim=-1) == targets)
    if divergence == "kl":
        t2s_div = forward_kl(student.logits[:, :-1], t2s_logits.detach(), temperature, teacher_temperature)
    else:
        t2s_div = skewed_reverse_kl(student.logits[:, :-1], t2s_logits.detach(), temperature, teacher_temperature,
                                    skew_lambda)
    s2t_div = forward_kl(projections.s2t_logits, teacher.logits.detach()[:, :-1], temperature)

    def term(values: torch.Tensor, where: torch.Tensor) -> DSKDTerm:
        return DSKDTerm(sum=torch.where(where, values, 0.0).sum(), count=where.sum().float())

    return DSKDTerms(t2s_ce=term(t2s_nll, student_mask), t2s_kd=term(t2s_div, correct),
                     s2t_kd=term(s2t_div, teacher_mask))
