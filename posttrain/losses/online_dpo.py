"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each
prompt gets two fresh completions from the current policy, a scorer (there an LLM annotator;
here a reward model or reward functions) picks the preferred one, and the DPO loss is taken on
that pair against the frozen reference.

Completions come in consecutive pairs (row 2i and 2i+1 answer prompt i). With rewards r, the
chosen one is row 2i when r_2i >= r_2i+1 (a tie keeps the first, as TRL's OnlineDPOTrainer),
else row 2i+1. Then, with summed completion log-probs,

    Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
    sigmoid  −log σ(βΔ)            ipo  (Δ̄ − 1/(2β))², Δ̄ from per-token averaged log-ratios

(IPO averaged per token as our offline DPO's IPO; TRL's online IPO uses summed log-ratios).
Metrics are TRL's OnlineDPOTrainer's names and definitions, with kl_t = log π − log π_ref per
token of the sampled completions (all 2P rows):

    objective/scores          mean reward              objective/scores_margin  mean r_c − r_r
    objective/kl              mean Σ_t kl_t            objective/non_score_reward  −β·objective/kl
    objective/rlhf_reward     mean (r − β Σ_t kl_t)    objective/entropy        mean −Σ_t log π
    logps/chosen, logps/rejected   summed log π        val/contain_eos_token   (the recipe's)
    rewards/chosen, rewards/rejected  β·(log π − log π_ref) summed, rewards/margins,
    rewards/accuracies (chosen reward > rejected reward), beta
"""

from __future__ import annotations

import torch

from posttrain.losses.dpo import dpo_loss

LOSS_TYPES = ("sigmoid", "ipo")


def rank_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (P,), (P,) of the chosen and rejected completion of each consecutive pair of
    `rewards` (2P,): the higher reward is chosen, a tie keeps the first."""
    if rewards.dim() != 1 or rewards.shape[0] % 2:
        raise ValueError(f"rewards must be (2P,) consecutive pairs, got {tuple(rewards.shape)}")
    pairs = rewards.view(-1, 2)
    first_wins = pairs[:, 0] >= pairs[:, 1]
    base = torch.arange(pairs.shape[0], device=rewards.device) * 2
    return base + (~first_wins).long(), base + first_wins.long()


def online_dpo_loss(
    logps: torch.Tensor,  # (2P, C) per-token log π of the sampled completions
    ref_logps: torch.Tensor,  # (2P, C) per-token log π_ref
    completion_mask: torch.Tensor,  # (2P, C)
    rewards: torch.Tensor,  # (2P,) scores of the completions (after any EOS penalty)
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over the P ranked pairs and TRL-named detached metrics (see the module
    docstring; `val/contain_eos_token` is the recipe's, it knows which rows stopped)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown online DPO loss_type {loss_type!r}; valid: "
                         f"{', '.join(LOSS_TYPES)}")
    mask = completion_mask.float()
    sums = (logps.float() * mask).sum(-1)  # (2P,)
    ref_sums = (ref_logps.float() * mask).sum(-1)
    lengths = mask.sum(-1).clamp(min=1.0)
    chosen, rejected = rank_pairs(rewards)
    kw = {}
    if loss_type == "ipo":
        kw = {"chosen_lengths": lengths[chosen], "rejected_lengths": lengths[rejected],
              "summed_rewards": True}
    loss, m = dpo_loss(sums[chosen], sums[rejected], ref_sums[chosen], ref_sums[rejected],
                       beta=beta, loss_type=loss_type, **kw)
    with torch.no_grad():
        r = rewards.float()
        kl = ((logps.float() - ref_logps.float()) * mask).sum(-1)  # (2P,)
        metrics = {
            **m,
            "objective/scores": r.mean(),
            "objective/scores_margin": (r[chosen] - r[rejected]).mean(),
            "objective/kl": kl.mean(),
            "objective/non_score_reward": (-beta * kl).mean(),
            "objective/rlhf_reward": (r - beta * kl).mean(),
            "objective/entropy": (-sums).mean().detach(),
            "beta": torch.tensor(float(beta)),
        }
    return loss, metrics
