"""PPO policy loss, clipped value loss and KL-penalized rewards against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.ppo import kl_penalized_rewards, ppo_policy_loss, ppo_value_loss

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _policy_batch():
    """ε = 0.2 (clip to [0.8, 1.2]); old log-probs 0, so ρ = e^{logp}. Per token
    max(−Aρ, −A·clip(ρ)):
      row 1: ρ = 1.5, A = 2:  max(−3, −2.4) = −2.4   clipped term larger (gradient cut)
             ρ = 0.5, A = 1:  max(−0.5, −0.8) = −0.5
             ρ = 1,   A = −1: max(1, 1) = 1          tie: not counted as clipped
      row 2: ρ = 0.5, A = −1: max(0.5, 0.8) = 0.8    clipped term larger
             ρ = 1.5, A = −2: max(3, 2.4) = 3
             (masked: ρ = 2, A = 3)
    """
    logps = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 2.0]]).log().requires_grad_()
    advantages = torch.tensor([[2.0, 1.0, -1.0], [-1.0, -2.0, 3.0]])
    return logps, torch.zeros(2, 3), advantages, MASK


def test_policy_loss_by_hand():
    """Loss = (−2.4 − 0.5 + 1 + 0.8 + 3)/5 = 1.9/5 = 0.38; clipfrac 2/5 = 0.4.
    approxkl: log ρ = (ln 1.5, ln 0.5, 0, ln 0.5, ln 1.5), squares (0.164402, 0.480453, 0,
    0.480453, 0.164402) sum 1.289710, ½ · 1.289710/5 = 0.128971."""
    loss, m = ppo_policy_loss(*_policy_batch())
    assert loss.item() == pytest.approx(0.38, abs=1e-6)
    assert m["policy/clipfrac_avg"].item() == pytest.approx(0.4)
    assert m["policy/approxkl_avg"].item() == pytest.approx(0.128971, abs=1e-6)
    assert m["loss/policy_avg"].item() == pytest.approx(0.38, abs=1e-6)
    assert not any(v.requires_grad for v in m.values())


def test_policy_gradient_is_cut_on_clipped_tokens():
    """d/dlogp = −Aρ/5 where the unclipped term wins, 0 where the clipped one does:
    row 1: 0, −1·0.5/5 = −0.1, 1·1/5 = 0.2; row 2: 0, 2·1.5/5 = 0.6, masked 0."""
    logps, old, advantages, mask = _policy_batch()
    loss, _ = ppo_policy_loss(logps, old, advantages, mask)
    loss.backward()
    expected = torch.tensor([[0.0, -0.1, 0.2], [0.0, 0.6, 0.0]])
    torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)


def test_value_loss_by_hand():
    """ε_v = 0.2, mask (1, 1 | 1, 0).
      V = 1,  V_old = 0.5, R = 1: clip(V) = 0.7; (0)² vs (−0.3)² = 0.09 -> 0.09 (clipped larger)
      V = 0,  V_old = 0.1, R = 2: clip(V) = 0;   4 vs 4 -> 4 (tie, not counted)
      V = 2,  V_old = 1,   R = 0: clip(V) = 1.2; 4 vs 1.44 -> 4
    loss = ½ · (0.09 + 4 + 4)/3 = ½ · 2.696667 = 1.348333; clipfrac 1/3.
    Gradient ½ · 2(V − R)/3 where V is not clipped: (0, −0.666667 | 0.666667, 0) (at the tie
    both branches have the same gradient −4)."""
    values = torch.tensor([[1.0, 0.0], [2.0, 100.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.1], [1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = ppo_value_loss(values, old_values, returns, mask)
    assert loss.item() == pytest.approx(1.348333, abs=1e-6)
    assert m["val/clipfrac_avg"].item() == pytest.approx(1 / 3)
    assert m["loss/value_avg"].item() == pytest.approx(1.348333, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[0.0, -2 / 3], [2 / 3, 0.0]])
    torch.testing.assert_close(values.grad, expected, atol=1e-6, rtol=0)


def test_kl_penalized_rewards_by_hand():
    """kl_coef = 0.1, log π − log π_ref = (0.5, −1, 2 | 1, [7], [7] masked), scores (3, −1):
    row 1: (−0.05, 0.1, −0.2 + 3) = (−0.05, 0.1, 2.8); row 2: (−0.1 − 1, 0, 0) = (−1.1, 0, 0)."""
    logps = torch.tensor([[0.5, -1.0, 2.0], [1.0, 7.0, 7.0]]) - 3.0
    ref = torch.full((2, 3), -3.0)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = kl_penalized_rewards(logps, ref, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 2.8], [-1.1, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0)
    # Summed over a row: score − kl_coef · Σ(log π − log π_ref).
    assert rewards[0].sum().item() == pytest.approx(3 - 0.1 * 1.5, abs=1e-6)
    assert math.isclose(rewards[1].sum().item(), -1.1, abs_tol=1e-6)


def test_kl_penalized_rewards_needs_a_token_per_row():
    with pytest.raises(ValueError, match="at least one"):
        kl_penalized_rewards(
            torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2), torch.tensor([[1, 0], [0, 0]])
        )
