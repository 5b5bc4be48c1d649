"""Odds Ratio Preference Optimization (Hong et al. 2024, eqs. 6–7): no reference model.

With per-token AVERAGED log-probs lp = (1/|y|) Σ log π(y_t | x, y_<t) and odds(y) = p / (1 − p),
    log_odds = log odds(y_c) − log odds(y_r)
             = (lp_c − lp_r) − (log(1 − e^{lp_c}) − log(1 − e^{lp_r}))
    loss     = NLL(y_c) − λ · mean(log σ(log_odds))

log(1 − e^x) is computed as log(−expm1(x)) near 0 and log1p(−e^x) further away (Mächler 2012),
which stays accurate where the naive form rounds 1 − e^x to 0. Departure from the paper:
lp is clamped to at most −1e-7 (per-token probability 1 − 1e-7), where the odds would be
infinite and the gradient NaN; the clamp only touches sequences the model is already certain of.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MAX_AVG_LOGP = -1e-7


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate over the whole range and with finite gradients.

    Each branch is evaluated only on inputs in its own range (the other side clamped), so the
    branch torch.where discards cannot produce inf·0 = NaN in the backward pass.
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(
    chosen_avg_logps: torch.Tensor,  # (B,) per-token averaged policy log-probs of y_c
    rejected_avg_logps: torch.Tensor,  # (B,) same for y_r
    chosen_nll: torch.Tensor,  # () SFT NLL on the chosen completions, normalized by the caller
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss (β is the paper's λ) and detached batch-mean metrics.

    Metrics: `nll_loss`, `log_odds_ratio` (mean log σ(log_odds)), `log_odds_chosen` (mean
    log_odds), `rewards/chosen` = β·lp_c, `rewards/rejected` = β·lp_r, `rewards/margins`,
    `rewards/accuracies` (fraction with lp_c > lp_r).
    """
    lp_c = chosen_avg_logps.float().clamp(max=_MAX_AVG_LOGP)
    lp_r = rejected_avg_logps.float().clamp(max=_MAX_AVG_LOGP)
    log_odds = (lp_c - lp_r) - (log1mexp(lp_c) - log1mexp(lp_r))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    loss = chosen_nll.float() - beta * ratio.mean()
    with torch.no_grad():
        chosen_rewards = beta * chosen_avg_logps.float()
        rejected_rewards = beta * rejected_avg_logps.float()
        metrics = {
            "nll_loss": chosen_nll.detach().float(),
            "log_odds_ratio": ratio.mean(),
            "log_odds_chosen": log_odds.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        }
    return loss, metrics
