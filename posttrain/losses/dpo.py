"""Direct Preference Optimization (Rafailov et al. 2023, eq. 7) and its common variants.

With the log-ratio difference
    Δ = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)),
the per-pair losses are
    sigmoid  −log σ(βΔ)                                       DPO, eq. 7
    hinge    relu(1 − βΔ)                                     SLiC (Zhao et al. 2023)
    ipo      (Δ − 1/(2β))²                                    IPO (Azar et al. 2023, eq. 17)
    robust   [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)     rDPO (Chowdhury et al. 2024, eq. 6)

Length normalization: when `chosen_lengths` / `rejected_lengths` (completion token counts) are
given, each log-ratio is divided by its length before Δ is formed (SimPO-style averaging, Meng et
al. 2024; unlike SimPO the reference model stays in and there is no target margin γ).

IPO is defined on per-token AVERAGED log-probs. Either pass averaged log-probs (e.g. from
`sequence_logps(..., average=True)`) and no lengths, or pass summed log-probs with the lengths:
the division makes the two identical.

Metrics with lengths: by default the rewards are β times the length-normalized log-ratios (their
margin is β·Δ of the loss); `summed_rewards=True` logs β times the summed log-ratios instead,
as TRL logs IPO's (its loss averages per token, its metrics do not).

Label smoothing ε belongs to `robust` only (it models the fraction of flipped labels); with any
other loss type a non-zero ε is refused rather than silently ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,)
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,  # (B,)
    ref_rejected_logps: torch.Tensor,  # (B,)
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,  # (B,)
    rejected_lengths: torch.Tensor | None = None,  # (B,)
    summed_rewards: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO-family loss over the batch and detached batch-mean metrics.

    Metrics: `rewards/chosen` = β·(log π − log π_ref)(y_c), `rewards/rejected`, `rewards/margins`
    (chosen − rejected), `rewards/accuracies` (fraction with chosen reward > rejected reward),
    `logps/chosen`, `logps/rejected` (policy log-probs as passed in). With lengths, the rewards
    use the length-normalized log-ratios, so their margin is exactly β·Δ of the loss, unless
    `summed_rewards` (then β times the summed log-ratios, TRL's IPO metrics).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if loss_type != "robust" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type='robust' only, not {loss_type!r}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")

    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    summed = (chosen_logratios, rejected_logratios)
    if chosen_lengths is not None:
        chosen_logratios = chosen_logratios / chosen_lengths.float()
        rejected_logratios = rejected_logratios / rejected_lengths.float()
    delta = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)).pow(2)
    else:  # robust
        eps = label_smoothing
        right, flipped = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
        losses = (-(1.0 - eps) * right + eps * flipped) / (1.0 - 2.0 * eps)

    with torch.no_grad():
        shown = summed if summed_rewards else (chosen_logratios, rejected_logratios)
        chosen_rewards = beta * shown[0]
        rejected_rewards = beta * shown[1]
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen_logps.float().mean(),
            "logps/rejected": policy_rejected_logps.float().mean(),
        }
    return losses.mean(), metrics
