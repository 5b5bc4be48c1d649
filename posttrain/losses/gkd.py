"""Generalized Jensen-Shannon divergence for on-policy distillation (GKD: Agarwal et al. 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes").

Per completion position, with S = softmax(student / τ) and T = softmax(teacher / τ) over the
vocabulary and the mixture M = β·T + (1 − β)·S,

    JSD_β(T ‖ S) = β · KL(T ‖ M) + (1 − β) · KL(S ‖ M)

At β = 0 and β = 1 the mixture equals one of the two and the formula is 0, so these two ends
are defined as the divergences it tends to (after dividing by β or 1 − β): β = 0 is the forward
KL(T ‖ S) (the student covers the teacher, as supervised distillation), β = 1 the reverse
KL(S ‖ T) (mode seeking). That is the paper's reading and what TRL's GKDTrainer computes.
The loss is a token mean over completion positions (the caller passes only those), as TRL's
`batchmean` over its label mask. Symmetry: JSD_β(T ‖ S) = JSD_{1−β}(S ‖ T); JSD_½ is the
ordinary Jensen-Shannon divergence, at most ln 2.
"""

from __future__ import annotations

import math

import torch


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of (N, V) log-distributions, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,  # (N, V) at the N completion positions
    teacher_logits: torch.Tensor,  # (N, V) same positions
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:  # (N,) per-position divergence
    """The generalized JSD of every position (see the module docstring), in float32."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: tokenizers must match")
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(
        torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def gkd_loss(
    student_logits: torch.Tensor,  # (N, V) completion positions only
    teacher_logits: torch.Tensor,  # (N, V)
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The divergence SUMMED over the N positions (the shared loop divides by the completion
    tokens of the whole accumulated batch), and detached metrics: `jsd_sum`, `num_tokens`."""
    per_token = generalized_jsd(student_logits, teacher_logits, beta=beta,
                                temperature=temperature)
    total = per_token.sum()
    return total, {"jsd_sum": total.detach(), "num_tokens": torch.tensor(per_token.numel())}
