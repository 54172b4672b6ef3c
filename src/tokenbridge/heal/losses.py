"""Training losses as pure functions over tensors.

Shapes: ``B`` sequences, ``T`` token positions, ``V`` vocabulary, ``C`` chunks per sequence.
Token position ``t`` holds the log-probability of token ``t`` given tokens ``< t`` (position 0, the
prefix token, is never scored).
"""

from __future__ import annotations

import math

import torch

EPSILON = 1e-6


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted to float32; float32 and float64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each token given the previous ones.

    logits: [B, T, V] (position t predicts token t+1); ids: [B, T].
    Returns ``(logp, normaliser)``, both [B, T]: ``logp[:, t] = log p(ids[t] | ids[<t])`` with
    ``logp[:, 0] = 0``; ``normaliser`` is the logsumexp of each position's logits.
    """
    logits = _wide(logits)
    normaliser = torch.logsumexp(logits, dim=-1)
    picked = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) - normaliser[:, :-1]
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1), normaliser


def space_logprobs(logits: torch.Tensor, normaliser: torch.Tensor, positions: torch.Tensor,
                   space_mask: torch.Tensor) -> torch.Tensor:
    """log p(the next token starts with whitespace) at ``positions``.

    logits: [B, T, V]; normaliser: [B, T] from :func:`token_logprobs`; positions: [B, C] long;
    space_mask: [V] bool.  Returns [B, C].
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    picked = _wide(logits[rows, positions])  # [B, C, V]
    return torch.logsumexp(picked.masked_fill(~space_mask, -math.inf), dim=-1) - normaliser[rows, positions]


def chunk_logprobs(logp: torch.Tensor, chunk_of_token: torch.Tensor, chunks: int) -> torch.Tensor:
    """Sum of token log-probabilities per chunk.

    logp: [B, T]; chunk_of_token: [B, T] long, the chunk each token belongs to, -1 for tokens in no chunk.
    Returns [B, chunks].
    """
    index = chunk_of_token.clamp(min=0)
    values = logp * (chunk_of_token >= 0)
    return torch.zeros(logp.shape[0], chunks, dtype=logp.dtype, device=logp.device).scatter_add(1, index, values)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between Bernoulli(p_t) and Bernoulli(p_s) with p = exp(log p / temperature), elementwise.

    The binarised divergence of ALM: each chunk likelihood p is treated as the probability of a binary
    event, sharpened or flattened by ``temperature`` (large values keep p away from 0 so long chunks
    still give gradient).  Zero exactly when the two log-likelihoods are equal.
    """
    a = teacher_logp / temperature - EPSILON
    b = student_logp / temperature - EPSILON
    return torch.exp(a) * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))


def binary_cross_entropy(teacher_logp: torch.Tensor, student_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of Bernoulli(p_s) under Bernoulli(p_t) (p as in :func:`binary_kl`), elementwise.

    Its minimum over the student is at equality, where it is the teacher's binary entropy (not 0).
    """
    a = teacher_logp / temperature - EPSILON
    b = student_logp / temperature - EPSILON
    return -(torch.exp(a) * b + (-torch.expm1(a)) * log1mexp(b))


def reverse_binary_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between Bernoulli(p_s) and Bernoulli(p_t): :func:`binary_kl` with the two sides swapped."""
    return binary_kl(student_logp, teacher_logp, temperature)


def absolute_difference(teacher_logp: torch.Tensor, student_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """``|log p_t - log p_s|`` (tokenkit's ``abs``; the temperature does not enter)."""
    return (teacher_logp - student_logp).abs()


# ALM's distance between the teacher's and the student's chunk log-likelihoods (``--distance``).
ALM_DISTANCES = {
    "binary-kl": binary_kl,
    "binary-ce": binary_cross_entropy,
    "reverse-binary-kl": reverse_binary_kl,
    "abs": absolute_difference,
}


def alm_loss(teacher_chunk_logp: torch.Tensor, student_chunk_logp: torch.Tensor, chunk_weight: torch.Tensor,
             temperature: float = 100.0, distance: str = "binary-kl") -> torch.Tensor:
    """Approximate likelihood matching: the weighted sum of per-chunk distances (binarised KL by default).

    teacher_chunk_logp, student_chunk_logp: [B, C] chunk log-likelihoods (teacher detached);
    chunk_weight: [B, C], zero for padding chunks.  The caller normalises the weights (by the batch's
    teacher token count, so the loss is per teacher token).  ``distance``: a name in :data:`ALM_DISTANCES`.
    """
    divergence = ALM_DISTANCES[distance](teacher_chunk_logp.detach(), student_chunk_logp, temperature)
    return (divergence * chunk_weight).sum()


def latent_loss(teacher_hidden: list[torch.Tensor], student_hidden: list[torch.Tensor], teacher_end: torch.Tensor,
                student_end: torch.Tensor, chunk_weight: torch.Tensor) -> torch.Tensor:
    """Hidden-state alignment at chunk ends (tokenkit's ``alm_latents``, squared error, "l2" normalised).

    teacher_hidden, student_hidden: one [B, T, D] tensor per layer (the same number of layers, the same D);
    teacher_end, student_end: [B, C] positions of each chunk's last token; chunk_weight: [B, C], the
    caller's normalised weights (0 for padding chunks).  Per layer, the squared distance of the student's
    state to the teacher's at each chunk end is divided by the mean square of the teacher's states there;
    the result is the weighted sum over chunks, averaged over layers.
    """
    if len(teacher_hidden) != len(student_hidden):
        raise ValueError("latent_loss: teacher and student give different numbers of layers")
    rows = torch.arange(teacher_end.shape[0], device=teacher_end.device)[:, None]
    real = (chunk_weight > 0).to(chunk_weight.dtype)
    total = torch.zeros((), dtype=torch.float32, device=chunk_weight.device)
    for t_layer, s_layer in zip(teacher_hidden, student_hidden):
        t = _wide(t_layer[rows, teacher_end]).detach().float()  # [B, C, D]
        s = _wide(s_layer[rows, student_end]).float()
        scale = (t.square().mean(dim=-1) * real).sum() / real.sum().clamp(min=1)
        error = (s - t).square().mean(dim=-1) / (scale + 1e-8)
        total = total + (error * chunk_weight).sum()
    return total / max(1, len(teacher_hidden))


def lm_loss_sum(logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the tokens in ``loss_mask`` ([B, T] bool)."""
    return -(logp * loss_mask).sum()
