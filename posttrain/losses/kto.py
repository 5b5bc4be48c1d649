"""Kahneman–Tversky Optimization (Ethayarajh et al. 2024, eq. 8) on unpaired, labelled examples.

r(y) = log π(y|x) − log π_ref(y|x). The reference point z_ref estimates KL(π ‖ π_ref) from
mismatched pairs (x_i, y_j), j ≠ i, in the same batch (the paper's biased estimator):
    z_ref = max(0, mean_i [log π(y_j|x_i) − log π_ref(y_j|x_i)]),  detached (no gradient).
    desirable:   1 − σ(β(r − z_ref))        weighted by desirable_weight
    undesirable: 1 − σ(β(z_ref − r))        weighted by undesirable_weight
The loss is the sum of the weighted per-example losses divided by the batch size.

z_ref is the estimate of one micro-batch. When that micro-batch is split across processes, the
recipe computes it with `kl_estimate(..., reduce_sum=all-reduce)` over every process's pairs and
passes it in, so that all processes use the same z_ref (as the paper's batch estimate, and TRL,
which gathers it across processes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kl_estimate(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor,
                reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z_ref: mean of log π(y_j|x_i) − log π_ref(y_j|x_i) over mismatched pairs, detached and
    clamped at 0. `reduce_sum` (e.g. an all-reduce) sums the (total, count) pair across
    processes, so the mean is over every process's pairs, not a mean of per-process means."""
    with torch.no_grad():
        diff = kl_policy_logps.float() - kl_ref_logps.float()
        sums = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])
        if reduce_sum is not None:
            sums = reduce_sum(sums)
        return (sums[0] / sums[1]).clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) log π(y_i|x_i)
    ref_logps: torch.Tensor,  # (B,) log π_ref(y_i|x_i)
    labels: torch.Tensor,  # (B,) bool, True = desirable
    kl_policy_logps: torch.Tensor,  # (B,) log π(y_j|x_i), y_j another example's completion
    kl_ref_logps: torch.Tensor,  # (B,) log π_ref(y_j|x_i)
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    z_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss and detached metrics.

    `z_ref`: the KL estimate, if already known; None computes it from this batch's mismatched
    pairs (the batch mean of log π − log π_ref, clamped at 0). A batch split across processes
    passes the mean over all of them (`kl_estimate` of every process's pairs, all-reduced), so
    that every process uses the one z_ref the whole batch defines.

    Metrics: `kl` (z_ref), `rewards/chosen` (mean β·r over desirable examples),
    `rewards/rejected` (same over undesirable ones), `rewards/margins` (their difference).
    A batch with no desirable (or no undesirable) example gives NaN for that mean and for the
    margin: the metric is undefined there, and NaN is what loggers skip or plot as a gap, where
    0 would be read as a real value.
    """
    labels = labels.bool()
    kl = kl_estimate(kl_policy_logps, kl_ref_logps) if z_ref is None else z_ref.detach()
    rewards = policy_logps.float() - ref_logps.float()  # (B,)
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (rewards - kl)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - rewards)))
    losses = torch.where(labels, desirable, undesirable)  # (B,)
    loss = losses.sum() / labels.numel()
    with torch.no_grad():
        scaled = beta * rewards
        chosen = scaled[labels].mean()  # NaN when empty
        rejected = scaled[~labels].mean()
        metrics = {
            "kl": kl,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
        }
    return loss, metrics
