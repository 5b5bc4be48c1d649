"""Bradley–Terry reward-model loss (Ouyang et al. 2022, InstructGPT, eq. 1).

loss = -log σ(r_c - r_r - m) + c·(r_c + r_r)²

- `margin` m (optional, per pair) asks the chosen score to win by at least that much, as in
  Llama 2 (Touvron et al. 2023, eq. 2).
- The centering term with coefficient c (Eisenstein et al. 2023) keeps scores near zero; the
  Bradley–Terry loss itself only sees differences, so without it the scores can drift freely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(
    chosen_rewards: torch.Tensor,  # (B,)
    rejected_rewards: torch.Tensor,  # (B,)
    margin: torch.Tensor | None = None,  # (B,)
    center_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean pairwise loss over the batch, plus the centering penalty when a coefficient is given.

    Metrics (detached batch means): `accuracy` (fraction with r_c > r_r), `margin` (mean r_c - r_r,
    without the `margin` argument subtracted), `mean_reward`, `min_reward`, `max_reward` (over
    chosen and rejected scores together).
    """
    chosen = chosen_rewards.float()
    rejected = rejected_rewards.float()
    diff = chosen - rejected  # (B,)
    logits = diff if margin is None else diff - margin.float()
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected).pow(2).mean()
    with torch.no_grad():
        both = torch.cat([chosen, rejected])  # (2B,)
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "mean_reward": both.mean(),
            "min_reward": both.min(),
            "max_reward": both.max(),
        }
    return loss, metrics
