"""Group-normalized and leave-one-out advantages, GAE and whitening against hand-computed
numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.advantages import gae, group_advantages, leave_one_out_advantages, whiten


def _close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def test_group_scale_by_hand():
    """Two groups of 3. Group 1 rewards (1, 0, 0): mean 1/3, deviations (2/3, -1/3, -1/3),
    unbiased var = (4/9 + 1/9 + 1/9)/2 = 1/3, std = 0.577350; A = dev / (0.577350 + 1e-4)
    = (1.154500, -0.577250, -0.577250). Group 2 rewards (2, 2, 2): std 0 -> all 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 3)
    std = math.sqrt(1 / 3)
    expected = [2 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[0].item() == pytest.approx(1.154500, abs=1e-6)


def test_batch_and_none_scales_by_hand():
    """Rewards (1, 0, 0, 2, 2, 2), groups of 3.
    none: centered per group -> (2/3, -1/3, -1/3, 0, 0, 0).
    batch: batch mean 7/6; squared deviations (1/36, 49/36, 49/36, 25/36 ×3) sum 174/36 = 29/6,
    unbiased var = 29/30 = 0.966667, std = 0.983192; A = centered / (0.983192 + 1e-4)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    centered = [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 3, scale="none").tolist() == pytest.approx(centered, abs=1e-6)
    std = math.sqrt(29 / 30)
    assert std == pytest.approx(0.983192, abs=1e-6)
    batch = group_advantages(rewards, 3, scale="batch")
    assert batch.tolist() == pytest.approx([c / (std + 1e-4) for c in centered], abs=1e-6)


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), 3, scale="token")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(6), 1)
    assert group_advantages(torch.tensor([1.0, 3.0]), 1, scale="none").tolist() == [0.0, 0.0]


def test_leave_one_out_by_hand():
    """Group 1 (k = 3) rewards (1, 0, 0.5): baselines are the means of the other two,
    (0 + 0.5)/2 = 0.25, (1 + 0.5)/2 = 0.75, (1 + 0)/2 = 0.5, so A = (0.75, -0.75, 0).
    Group 2 (2, 2, 2): every baseline is 2, A = 0 (no std division: nothing to divide by 0).
    Each group's advantages sum to 0, and A = k/(k-1)·(r − mean): 3/2·(1 − 0.5) = 0.75."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    adv = leave_one_out_advantages(rewards, 3)
    _close(adv, [0.75, -0.75, 0.0, 0.0, 0.0, 0.0])
    _close(adv.view(2, 3).sum(1), [0.0, 0.0])


def test_leave_one_out_pairs_and_normalization():
    """k = 2: each completion's baseline is its sibling's reward: (3, 1) -> (2, -2), (0, 1) ->
    (-1, 1). Normalized over the batch: mean 0, unbiased std of (2, -2, -1, 1) is
    sqrt((4 + 4 + 1 + 1)/3) = sqrt(10/3) = 1.825742, so A / (1.825742 + 1e-4) =
    (1.095385, -1.095385, -0.547693, 0.547693)."""
    rewards = torch.tensor([3.0, 1.0, 0.0, 1.0])
    _close(leave_one_out_advantages(rewards, 2), [2.0, -2.0, -1.0, 1.0])
    std = math.sqrt(10 / 3)
    assert std == pytest.approx(1.825742, abs=1e-6)
    want = [a / (std + 1e-4) for a in (2.0, -2.0, -1.0, 1.0)]
    assert want[0] == pytest.approx(1.095385, abs=1e-6)
    _close(leave_one_out_advantages(rewards, 2, normalize=True), want)


def test_leave_one_out_validation():
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="does not split into groups of 3"):
        leave_one_out_advantages(torch.zeros(4), 3)


def test_gae_by_hand():
    """Row 1, 3 valid tokens, γ = 0.5, λ = 0.5 (γλ = 0.25): r = (0, 0, 1), V = (0.5, 0.25, 0.5).
    δ_2 = 1 + 0.5·0 − 0.5 = 0.5 (V after the last token is 0);  A_2 = 0.5
    δ_1 = 0 + 0.5·0.5 − 0.25 = 0;  A_1 = 0 + 0.25·0.5 = 0.125
    δ_0 = 0 + 0.5·0.25 − 0.5 = −0.375;  A_0 = −0.375 + 0.25·0.125 = −0.34375
    returns = A + V = (0.15625, 0.375, 1.0).
    Row 2, 2 valid tokens then padding holding junk (which must not leak in): r = (0, 2),
    V = (1, 1): δ_1 = 2 − 1 = 1, A_1 = 1; δ_0 = 0 + 0.5·1 − 1 = −0.5, A_0 = −0.5 + 0.25 = −0.25;
    returns (0.75, 2.0, 0)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    _close(adv, [[-0.34375, 0.125, 0.5], [-0.25, 1.0, 0.0]])
    _close(ret, [[0.15625, 0.375, 1.0], [0.75, 2.0, 0.0]])


def test_gae_with_lambda_1_is_return_minus_value():
    """γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo), so returns are the reward-to-go."""
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, to_go, atol=1e-5)
    assert torch.allclose(adv, to_go - values, atol=1e-5)


def test_whiten_by_hand():
    """Valid entries (1, 2, 3, 6) (a fifth, masked, is junk): mean 3, squared deviations
    (4, 1, 0, 9) sum 14, unbiased var 14/3, std 2.160247 -> (−0.925820, −0.462910, 0, 1.388730).
    shift_mean=False adds the mean back: (2.074180, 2.537090, 3, 4.388730)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    _close(whiten(x, mask), [[-0.925820, -0.462910, 0.0], [1.388730, 0.0, 0.0]])
    _close(whiten(x, mask, shift_mean=False), [[2.074180, 2.537090, 3.0], [4.388730, 0.0, 0.0]])
    with pytest.raises(ValueError, match="two"):
        whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))
