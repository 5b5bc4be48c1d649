"""Supervised fine-tuning loss: token cross-entropy normalized over the accumulated batch.

With gradient accumulation, a mean of per-micro-batch means weighs a token of a short micro-batch
more than a token of a long one. Dividing each micro-batch's token-loss SUM by the number of loss
tokens of the whole accumulated (and, under data parallelism, global) batch makes the accumulated
gradient equal to that of one big batch.

The loss takes per-token log-probs, not logits: the recipe computes them with the LM head run in
row chunks (posttrain/logprobs.py, `SelectedLogits(..., targets=...)`), so no (N, V) logits exist
at long sequence lengths and large vocabularies. Cross-entropy of a token is -log p(target).
"""

from __future__ import annotations

import torch


def sft_loss(
    token_logps: torch.Tensor, num_items: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token cross-entropy summed over the given tokens and divided by `num_items`.

    token_logps: (N,) float32 log-probability of the next token at the N positions with a loss
    num_items: loss tokens in the whole accumulated batch (across processes)

    Returns the loss and summable metrics `loss_sum` and `num_tokens`, so that the caller can
    aggregate `loss` over micro-batches exactly.
    """
    loss_sum = -token_logps.sum()
    loss = loss_sum / num_items
    metrics = {
        "loss_sum": loss_sum.detach(),
        "num_tokens": torch.tensor(token_logps.numel(), device=token_logps.device),
    }
    return loss, metrics
