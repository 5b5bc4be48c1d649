"""REINFORCE Leave-One-Out loss (Ahmadian et al. 2024, "Back to Basics"), as TRL's
RLOOTrainer optimizes it: one action per completion.

Per completion i with summed completion log-probs s_i = Σ_t log π(y_t) and s_i^old under π_old,
and its advantage A_i (leave-one-out, posttrain/advantages.py):

    ρ_i    = exp(s_i − s_i^old)                                   sequence-level ratio
    loss_i = −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε_high)·A_i)  [+ β·Σ_t KL_t]
    loss   = mean_i loss_i

On-policy (one pass over a generation batch, ρ = 1) this is the paper's REINFORCE gradient
−A_i·∇ log π(y_i|x); the clip only acts on later passes (μ > 1), as in TRL. The KL usually
lives in the reward (r_i − β·Σ_t (log π_old − log π_ref), k1, the paper's and TRL's choice,
applied before the advantage); with the KL in the loss instead, the β-term above uses the k3
estimate KL_t = e^{ref−logπ} − (ref−logπ) − 1 (GRPO's), summed over the completion's tokens so
that it measures the same sequence-level KL as the reward penalty does.
"""

from __future__ import annotations

import torch

from posttrain.losses.grpo import k3_kl


def sequence_kl(
    logps: torch.Tensor,  # (B, T) log π (π_old when used in the reward)
    ref_logps: torch.Tensor,  # (B, T) log π_ref
    completion_mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:  # (B,)
    """Σ_t (log π − log π_ref) over each completion's tokens: the k1 estimate of the sequence
    KL(π‖π_ref) that RLOO subtracts (times β) from the reward. Can be negative per sample."""
    return ((logps.float() - ref_logps.float()) * completion_mask.float()).sum(-1)


def rloo_loss(
    logps: torch.Tensor,  # (B, T) log π of the completion tokens
    old_logps: torch.Tensor,  # (B, T) log π_old
    advantages: torch.Tensor,  # (B,)
    completion_mask: torch.Tensor,  # (B, T)
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,  # weight of the KL IN THE LOSS; 0 when the KL is in the reward
    ref_logps: torch.Tensor | None = None,  # (B, T)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped sequence-level REINFORCE loss (see the module docstring) and detached metrics.

    Metrics: `clip_ratio/low_mean` (fraction of completions with ρ < 1 − ε and A < 0, where the
    clip stops the gradient), `clip_ratio/high_mean` (ρ > 1 + ε_high with A > 0),
    `clip_ratio/region_mean` (either), and with β > 0 `kl` (mean k3 KL_t over active tokens).
    Masked positions may hold anything finite; they contribute nothing.
    """
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.float()  # (B, T)
    logps = logps.float()
    adv = advantages.float()  # (B,)
    log_ratio = ((logps - old_logps.float()) * mask).sum(-1)  # (B,)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_sequence = -torch.min(ratio * adv, clipped * adv)  # (B,)
    if beta > 0:
        kl = k3_kl(logps, ref_logps.float()) * mask  # (B, T)
        per_sequence = per_sequence + beta * kl.sum(-1)
    loss = per_sequence.mean()

    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        metrics = {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio/region_mean": torch.maximum(low, high).mean(),
        }
        if beta > 0:
            metrics["kl"] = kl.sum() / mask.sum().clamp(min=1.0)
    return loss, metrics
