"""Simple Preference Optimization (Meng et al. 2024, eq. 6): no reference model.

The implicit reward is the policy's length-normalized log-likelihood scaled by β,
    r(x, y) = (β / |y|) · log π(y|x) = β · lp(y)        (lp: per-token AVERAGED log-prob)
and the loss asks the chosen reward to beat the rejected one by a target margin γ:
    loss = −mean(log σ(β · (lp_c − lp_r) − γ))  [+ α · NLL(y_c)]

The optional NLL term on the chosen responses (weight α, TRL's `cpo_alpha`) is CPO-SimPO
(Xu et al.'s behaviour-cloning regularizer on SimPO's reward); α = 0 is the paper's SimPO.
Defaults: β = 2.0 and γ = 1.0 (γ/β = 0.5), the paper's base setting and the ratio its authors
recommend. TRL runs SimPO inside its CPO trainer, whose defaults are CPO's (β = 0.1,
simpo_gamma = 0.5, cpo_alpha = 1.0, i.e. CPO-SimPO), not the paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(
    chosen_avg_logps: torch.Tensor,  # (B,) per-token averaged policy log-probs of y_c
    rejected_avg_logps: torch.Tensor,  # (B,) same for y_r
    chosen_nll: torch.Tensor,  # () SFT NLL on the chosen completions, normalized by the caller
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean SimPO loss over the batch plus α·NLL, and detached batch-mean metrics.

    Metrics (TRL's names): `rewards/chosen` = β·lp_c, `rewards/rejected` = β·lp_r,
    `rewards/margins` (chosen − rejected, before γ), `rewards/accuracies` (fraction with
    lp_c > lp_r), `logps/chosen`, `logps/rejected` (the averaged log-probs), `nll_loss` (the
    NLL as passed in, logged whatever α is).
    """
    lp_c, lp_r = chosen_avg_logps.float(), rejected_avg_logps.float()
    losses = -F.logsigmoid(beta * (lp_c - lp_r) - gamma)  # (B,)
    loss = losses.mean() + alpha * chosen_nll.float() if alpha else losses.mean()
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * lp_c, beta * lp_r
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": lp_c.mean(),
            "logps/rejected": lp_r.mean(),
            "nll_loss": chosen_nll.detach().float(),
        }
    return loss, metrics
