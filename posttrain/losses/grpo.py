"""Group Relative Policy Optimization loss (Shao et al. 2024, DeepSeekMath, eq. 3) and the
normalizations of its successors.

Per completion token t of row i, with ratio ρ = exp(log π − log π_old) and the row's advantage A_i:

    loss_t = −min(ρ·A_i, clip(ρ, 1 − ε, 1 + ε_high)·A_i) + β·KL_t
    KL_t   = exp(ref − log π) − (ref − log π) − 1              (k3 estimator, Schulman 2020)

Departures from eq. 3, as in TRL: ε_high may differ from ε (DAPO's clip-higher, Yu et al. 2025),
and the per-token losses are normalized by `loss_type`:

    grpo     mean over rows of the row's token mean                      eq. 3 as written
    bnpo     sum over tokens / active tokens of this batch
    dr_grpo  sum over tokens / (B · max_completion_length)               Liu et al. 2025
    dapo     sum over tokens / num_items_in_batch                        Yu et al. 2025

With `use_bias_correction_kl` the KL term is ρ·KL_t (ρ with its gradient): the k3 estimate of
KL(π‖π_ref) from samples of π_old, importance-weighted so that it stays unbiased once π has moved
away from π_old (DeepSeek-V3.2; TRL's `use_bias_correction_kl`). On-policy ρ = 1, but its
gradient still adds KL_t·∇log π to the term's gradient.

`grpo` weights each row equally, so tokens of long completions count less (the length bias Dr.
GRPO removes); `dapo` weights every token equally across all the micro-batches of one optimizer
step: `num_items_in_batch` is their total active-token count, and the losses of those micro-batches
are then summed (not averaged). Under DDP, which averages gradients over W processes, pass the
global count divided by W (as TRL does).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): e^{ref−logp} − (ref−logp) − 1 (≥ 0, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _normalize(
    per_token: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) float
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: float | torch.Tensor | None,
) -> torch.Tensor:
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length)
    return total / num_items_in_batch  # dapo


def grpo_loss(
    logps: torch.Tensor,  # (B, T) log π of the completion tokens
    old_logps: torch.Tensor,  # (B, T) log π_old, recorded at sampling time
    advantages: torch.Tensor,  # (B,)
    completion_mask: torch.Tensor,  # (B, T)
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,  # (B, T)
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss (see the module docstring) and detached token-mean metrics.

    Metrics (means over active tokens): `clip_ratio/low_mean` (ρ < 1 − ε with A < 0, where the
    clip stops the gradient), `clip_ratio/high_mean` (ρ > 1 + ε_high with A > 0),
    `clip_ratio/region_mean` (either), and `kl` (masked mean of KL_t, ρ·KL_t with
    `use_bias_correction_kl`, as TRL logs it) when β > 0.
    Masked positions may hold anything finite; they contribute nothing.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError("loss_type='dapo' needs num_items_in_batch (active tokens per step)")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    mask = completion_mask.float()  # (B, T)
    logps = logps.float()
    adv = advantages.float()[:, None]  # (B, 1)
    ratio = torch.exp(logps - old_logps.float())  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if beta > 0:
        kl = k3_kl(logps, ref_logps.float())  # (B, T)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
    loss = _normalize(per_token, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        metrics = {
            "clip_ratio/low_mean": _masked_mean(low, mask),
            "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
        }
        if beta > 0:
            metrics["kl"] = _masked_mean(kl, mask)
    return loss, metrics
