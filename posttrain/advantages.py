"""Advantage estimators: group-normalized (GRPO), leave-one-out (RLOO), GAE (PPO), and masked
whitening.

- GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): Â_i = (r_i − mean(r)) /
  std(r) over the G completions of one prompt, plus ε = 1e-4 in the denominator (as TRL) so that a
  group whose rewards are all equal gets 0 instead of 0/0. The std is the UNBIASED one (divides by
  G − 1), as TRL's `torch.std`; Dr. GRPO (Liu et al. 2025) drops the division ("none").
- RLOO (Ahmadian et al. 2024; Kool et al. 2019): Â_i = r_i − (1/(k−1)) Σ_{j≠i} r_j over the
  k completions of one prompt, each one's baseline the mean of the OTHER rewards (unbiased: it
  does not depend on y_i). Equivalently k/(k−1)·(r_i − mean(r)); a group's advantages sum to 0.
  Optional whitening over the batch with the unbiased std + 1e-4, as TRL's
  `normalize_advantages`.
- GAE (Schulman et al. 2016, eq. 16): δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_l (γλ)^l δ_{t+l},
  computed backwards; returns R_t = A_t + V_t are the value targets.
- Whitening (TRL `masked_whiten`): masked mean and unbiased masked variance.
"""

from __future__ import annotations

from typing import Literal

import torch


def group_advantages(
    rewards: torch.Tensor,  # (B,) rows i·G .. i·G+G-1 belong to prompt i
    group_size: int,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:  # (B,) float32
    """(r − group mean) / (std + eps), std per group ("group"), of the whole batch ("batch"), or
    no division ("none": just centering per group). Stds are unbiased; a group of 1 has none, so
    it is refused with "group" scaling rather than silently dividing by NaN."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {rewards.shape[0]} rewards does not split into groups of {group_size}"
        )
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size >= 2 (the std of one reward is undefined)")
    grouped = rewards.float().view(-1, group_size)  # (B/G, G)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (B,)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # (B,)
        return centered / (std + eps)
    if scale == "batch":
        return centered / (rewards.float().std() + eps)
    return centered


def leave_one_out_advantages(
    rewards: torch.Tensor,  # (B,) rows i·k .. i·k+k-1 belong to prompt i
    group_size: int,
    *,
    normalize: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:  # (B,) float32
    """r_i minus the mean of the other k − 1 rewards of its group; with `normalize`, then
    (A − mean(A)) / (std(A) + eps) over the whole batch (unbiased std). A group of one has no
    other rewards, so k < 2 is refused."""
    if group_size < 2:
        raise ValueError("leave-one-out needs group_size >= 2 (a baseline from the others)")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {rewards.shape[0]} rewards does not split into groups of {group_size}"
        )
    grouped = rewards.float().view(-1, group_size)  # (B/k, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (B/k, k)
    advantages = (grouped - others).view(-1)  # (B,)
    if normalize:
        if advantages.numel() < 2:
            raise ValueError("normalizing advantages needs at least two of them")
        advantages = (advantages - advantages.mean()) / (advantages.std() + eps)
    return advantages


def gae(
    rewards: torch.Tensor,  # (B, T) per-token rewards
    values: torch.Tensor,  # (B, T) value estimates V_t
    mask: torch.Tensor,  # (B, T) 1 on valid tokens (a right-padded prefix of each row)
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages (B, T), returns (B, T), 0 where masked
    """Generalized advantage estimation along each row, backwards from its last valid token.

    The value after the last valid token is 0 (the episode ends there), and masked positions
    neither receive nor pass on anything. Inputs are treated as constants (no gradient).
    """
    mask = mask.float()
    rewards = rewards.detach().float() * mask
    values = values.detach().float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # A masked step passes on nothing: the next valid step sees V = 0 and A = 0 after it.
        next_value = values[:, t]
        next_advantage = advantage
    return advantages, (advantages + values) * mask


def whiten(
    x: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:  # (B, T)
    """(x − mean) / sqrt(var + eps) over the masked entries (unbiased var, as TRL's
    `masked_whiten`); with shift_mean=False the mean is added back (only the scale changes).
    Masked-out entries are returned as 0."""
    mask = mask.float()
    count = mask.sum()
    if count < 2:
        raise ValueError("whitening needs at least two valid entries")
    mean = (x * mask).sum() / count
    var = (((x - mean) ** 2) * mask).sum() / (count - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
