"""Contrastive Preference Optimization (Xu et al. 2024): no reference model.

CPO is DPO's loss with the reference dropped (a uniform reference, the paper's upper bound of
the DPO objective) plus a behaviour-cloning NLL on the chosen responses:
    loss = −mean(log σ(β · (log π(y_c|x) − log π(y_r|x))))  +  α · NLL(y_c)
with SUMMED completion log-probs. Defaults: β = 0.1 (the paper's) and α = 1 (the paper adds
the two terms unweighted; TRL's `cpo_alpha` defaults to 1 too). The NLL is a mean over the
chosen completion tokens, normalized by the caller, as TRL's cross-entropy over the chosen
labels (prompt tokens masked) is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) summed policy log-probs of y_c
    policy_rejected_logps: torch.Tensor,  # (B,) same for y_r
    chosen_nll: torch.Tensor,  # () SFT NLL on the chosen completions, normalized by the caller
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CPO preference loss over the batch plus α·NLL, and detached batch-mean metrics.

    Metrics (TRL's names): `rewards/chosen` = β·log π(y_c|x), `rewards/rejected`,
    `rewards/margins`, `rewards/accuracies` (fraction with chosen reward > rejected reward),
    `logps/chosen`, `logps/rejected` (the summed log-probs), `nll_loss`.
    """
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    losses = -F.logsigmoid(beta * (chosen - rejected))  # (B,)
    loss = losses.mean() + alpha * chosen_nll.float() if alpha else losses.mean()
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            "nll_loss": chosen_nll.detach().float(),
        }
    return loss, metrics
