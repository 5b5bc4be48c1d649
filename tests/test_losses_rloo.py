"""RLOO's sequence-level loss and KL-in-reward estimate against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.rloo import rloo_loss, sequence_kl

MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def _batch():
    """Row 1: log π (-1, -2), log π_old (-1.1, -2.1): log-ratio summed 0.2, ρ = e^0.2 =
    1.221403. Row 2: one token, log π = log π_old = -0.5: ρ = 1 (its padding holds 9 and 0,
    which must not count). Advantages (1, -1)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.1], [-0.5, 0.0]])
    return logps, old, torch.tensor([1.0, -1.0])


def test_rloo_loss_by_hand():
    """ε = 0.2: row 1 ρ = 1.221403 > 1.2 with A > 0, so min(ρA, 1.2A) = 1.2 and its loss is -1.2
    (clipped: no gradient); row 2 loss = -(1 · -1) = 1. Mean (-1.2 + 1)/2 = -0.1.
    clip_ratio/high_mean = 1/2 completions, low 0, region 1/2. Gradient: row 2 only,
    d/d log π of -ρA/2 = -A·ρ/2 = 0.5 at its one token; nothing reaches the padding."""
    logps, old, adv = _batch()
    loss, m = rloo_loss(logps, old, adv, MASK)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert m["clip_ratio/low_mean"].item() == 0.0
    assert m["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    assert "kl" not in m
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0], [0.5, 0.0]]))


def test_rloo_loss_clip_high_and_on_policy_gradient():
    """ε_high = 0.3: row 1's ρ = 1.221403 is inside 1.3, so the loss is
    (-1.221403 + 1)/2 = -0.110701. On-policy (π_old = π, ρ = 1) the gradient is REINFORCE's,
    -A_i/B on every token of completion i: row 1 (-0.5, -0.5), row 2 (0.5, 0)."""
    logps, old, adv = _batch()
    loss, _ = rloo_loss(logps, old, adv, MASK, epsilon_high=0.3)
    assert loss.item() == pytest.approx((-math.exp(0.2) + 1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(-0.110701, abs=1e-6)
    logps, _, adv = _batch()
    loss, _ = rloo_loss(logps, logps.detach(), adv, MASK)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # -mean(A) with A = (1, -1)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))


def test_rloo_loss_with_the_kl_in_the_loss():
    """β = 0.1, log π_ref (-1, -1 | -1.5): ref − logπ = (0, 1 | -1). k3 = e^d − d − 1:
    0, e − 2 = 0.718282 | e^-1 = 0.367879. Per completion Σ_t: 0.718282 and 0.367879; the loss
    gains 0.1 · (0.718282 + 0.367879)/2 = 0.054308: -0.1 + 0.054308 = -0.045692.
    kl = mean over the 3 active tokens: (0 + 0.718282 + 0.367879)/3 = 0.362054."""
    logps, old, adv = _batch()
    ref = torch.tensor([[-1.0, -1.0], [-1.5, 0.0]])
    loss, m = rloo_loss(logps, old, adv, MASK, beta=0.1, ref_logps=ref)
    k3 = [0.0, math.e - 2, math.exp(-1)]
    assert loss.item() == pytest.approx(-0.1 + 0.1 * (k3[0] + k3[1] + k3[2]) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(-0.045692, abs=1e-6)
    assert m["kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.362054, abs=1e-6)
    with pytest.raises(ValueError, match="needs ref_logps"):
        rloo_loss(logps, old, adv, MASK, beta=0.1)


def test_sequence_kl_by_hand():
    """Σ_t (log π − log π_ref): row 1 (-1 − -1) + (-2 − -1) = -1; row 2 -0.5 − -1.5 = 1 (the
    padded position's 9 − 0 is masked out). A k1 estimate: negative samples are normal."""
    logps, _, _ = _batch()
    ref = torch.tensor([[-1.0, -1.0], [-1.5, 0.0]])
    torch.testing.assert_close(sequence_kl(logps.detach(), ref, MASK), torch.tensor([-1.0, 1.0]))
