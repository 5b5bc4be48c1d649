"""Supervised fine-tuning loss: token cross-entropy normalized over the accumulated batch.

With gradient accumulation, a mean of per-micro-batch means weighs a token of a short micro-batch
more than a token of a long one. Dividing each micro-batch's token-loss SUM by the number of loss
tokens of the whole accumulated (and, under data parallelism, global) batch makes the accumulated
gradient equal to that of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token cross-entropy summed over the given tokens and divided by `num_items`.

    logits:  (N, V) logits at the N positions that carry a loss
    targets: (N,)   the next-token ids at those positions
    num_items: loss tokens in the whole accumulated batch (across processes)

    Returns the loss and summable metrics: `loss_sum`, `num_correct`, `num_tokens`, so that the
    caller can aggregate `loss` and `mean_token_accuracy` over micro-batches exactly.
    """
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    loss_sum = token_loss.sum()
    loss = loss_sum / num_items
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).sum()
    metrics = {
        "loss_sum": loss_sum.detach(),
        "num_correct": correct,
        "num_tokens": torch.tensor(targets.numel(), device=targets.device),
    }
    return loss, metrics
