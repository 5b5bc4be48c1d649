"""SFT loss against hand-computed numbers, and gradient-accumulation normalization."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.logprobs import shift_targets, token_logps
from posttrain.losses.sft import sft_loss


def test_sft_loss_by_hand():
    """Two tokens, vocabulary of 2; the loss takes each target's log-prob.

    row 1: logits (0, 0), target 0 -> p = 1/2, log p = -ln 2, CE = 0.693147
    row 2: logits (ln 3, 0), target 1 -> p = 1/(3+1), log p = -ln 4, CE = 1.386294
    sum = 2.079442; divided by num_items = 4 (tokens of the whole accumulated batch) -> 0.519860.
    """
    logps = torch.tensor([-math.log(2.0), -math.log(4.0)])
    loss, m = sft_loss(logps, 4)
    assert loss.item() == pytest.approx(0.519860, abs=1e-6)
    assert m["loss_sum"].item() == pytest.approx(2.079442, abs=1e-6)
    assert int(m["num_tokens"]) == 2


def test_shift_targets_selects_positions_before_loss_tokens():
    """labels (-100 = no loss) [[-100, -100, 5, 6], [-100, 7, -100, -100]]:
    position t predicts label t+1, so selected = [[F, T, T, F], [T, F, F, F]], targets 5, 6, 7."""
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    select, targets = shift_targets(labels)
    assert select.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


def test_accumulated_gradient_equals_one_big_batch():
    """Micro-batches of 1 and 3 loss tokens: dividing each token SUM by the global count (4)
    gives the big-batch token mean's gradient; a mean of per-micro-batch means would not."""
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 3])
    micro = [(x[:1], y[:1]), (x[1:], y[1:])]

    big, _ = sft_loss(token_logps(x @ w, y), 4)
    (g_big,) = torch.autograd.grad(big, w)

    g_acc = torch.zeros_like(w)
    g_mean_of_means = torch.zeros_like(w)
    for xb, yb in micro:
        loss, _ = sft_loss(token_logps(xb @ w, yb), 4)
        g_acc += torch.autograd.grad(loss, w)[0]
        mean_loss, _ = sft_loss(token_logps(xb @ w, yb), len(yb))
        g_mean_of_means += torch.autograd.grad(mean_loss, w)[0] / len(micro)
    assert torch.allclose(g_acc, g_big, atol=1e-6)
    assert not torch.allclose(g_mean_of_means, g_big, atol=1e-3)
