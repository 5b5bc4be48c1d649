"""PPO for RLHF (Schulman et al. 2017, eq. 7 clipped surrogate; Ouyang et al. 2022, eq. 2 reward
with a per-token KL penalty), in the form of TRL's PPOTrainer / "The N+ Implementation Details of
RLHF with PPO" (Huang et al. 2024):

    policy loss  mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = exp(log π − log π_old)
    value loss   ½·mean_t max((V_t − R_t)², (clip(V_t, V_old,t ± ε_v) − R_t)²)
    reward       r_t = −kl_coef·(log π − log π_ref)_t, plus the score on the row's last token

Means are over the valid (completion) tokens of the batch. Departure from the paper: the value
prediction is clipped around the old values (as in OpenAI baselines), which the paper does not have.
"""

from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def ppo_policy_loss(
    logps: torch.Tensor,  # (B, T) log π
    old_logps: torch.Tensor,  # (B, T) log π_old, from the rollout
    advantages: torch.Tensor,  # (B, T) per-token advantages (GAE, whitened)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens
    *,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss (token mean) and detached metrics: `policy/clipfrac_avg`
    (share of tokens where the clipped term is the larger loss, so the gradient is cut),
    `policy/approxkl_avg` (½·mean (log π − log π_old)²), `loss/policy_avg`."""
    mask = mask.float()
    log_ratio = logps.float() - old_logps.float()  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = _masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac_avg": _masked_mean((clipped > unclipped).float(), mask),
            "policy/approxkl_avg": 0.5 * _masked_mean(log_ratio**2, mask),
            "loss/policy_avg": loss.detach(),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,  # (B, T) V from the value model being trained
    old_values: torch.Tensor,  # (B, T) V at rollout time
    returns: torch.Tensor,  # (B, T) targets R = A + V_old (from GAE)
    mask: torch.Tensor,  # (B, T)
    *,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·mean max((V − R)², (clip(V, V_old ± ε_v) − R)²) and detached metrics
    `val/clipfrac_avg` (share of tokens where the clipped error is the larger one) and
    `loss/value_avg` (the loss itself, ½ included, as TRL logs it)."""
    mask = mask.float()
    values = values.float()
    old_values = old_values.float()
    returns = returns.float()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * _masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        metrics = {
            "val/clipfrac_avg": _masked_mean((clipped_err > unclipped_err).float(), mask),
            "loss/value_avg": loss.detach(),
        }
    return loss, metrics


def kl_penalized_rewards(
    logps: torch.Tensor,  # (B, T) log π at rollout time
    ref_logps: torch.Tensor,  # (B, T) log π_ref
    scores: torch.Tensor,  # (B,) sequence scores (reward model, plus any no-EOS penalty)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens
    *,
    kl_coef: float = 0.05,
) -> torch.Tensor:  # (B, T) float32, 0 where masked
    """Per-token rewards: −kl_coef·(log π − log π_ref) on every valid token, plus the score on
    each row's last valid token. Every row needs at least one valid token (its score would
    otherwise have nowhere to go). The result carries no gradient: rewards are data."""
    mask = mask.float()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("every row needs at least one completion token to carry its score")
    rewards = -kl_coef * (logps.float() - ref_logps.float()) * mask  # (B, T)
    width = mask.shape[1]
    last = width - 1 - mask.flip(1).argmax(dim=1)  # (B,) last valid position
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float()
    return rewards.detach()
