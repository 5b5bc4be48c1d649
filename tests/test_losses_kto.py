"""KTO loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.kto import kl_estimate, kto_loss

LN3 = math.log(3.0)


def test_kto_by_hand():
    """β = 0.5, desirable_weight 2, undesirable_weight 1.5, three examples.
    KL pairs: kl_policy - kl_ref = (2 ln 3, 0, ln 3), mean ln 3 = 1.098612 = z_ref (> 0, kept).
    r = (3 ln 3, -ln 3, ln 3), labels (desirable, undesirable, desirable):
      1: 1 - σ(0.5 (3 ln 3 - ln 3)) = 1 - σ(ln 3) = 1/4
      2: 1 - σ(0.5 (ln 3 + ln 3)) = 1/4
      3: 1 - σ(0) = 1/2
    weighted (2 · 1/4, 1.5 · 1/4, 2 · 1/2) = (0.5, 0.375, 1.0), sum 1.875, / 3 = 0.625.
    rewards/chosen = 0.5 · (3 ln 3 + ln 3)/2 = ln 3 = 1.098612, rewards/rejected = -0.5 ln 3 =
    -0.549306, margins 1.647918.
    """
    policy = torch.tensor([3 * LN3, -LN3, LN3]) - 5.0
    ref = torch.full((3,), -5.0)
    labels = torch.tensor([True, False, True])
    kl_policy = torch.tensor([2 * LN3, 0.0, LN3]) - 7.0
    kl_ref = torch.full((3,), -7.0)
    loss, m = kto_loss(
        policy,
        ref,
        labels,
        kl_policy,
        kl_ref,
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    assert loss.item() == pytest.approx(0.625, abs=1e-6)
    assert m["kl"].item() == pytest.approx(1.098612, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(1.098612, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-0.549306, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(1.647918, abs=1e-6)
    assert set(m) == {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins"}


def test_kl_clamped_at_zero_and_detached():
    """KL pairs (-1, 0.5): mean -0.25 -> z_ref = 0. β = 0.5, r = 2 ln 3, desirable:
    1 - σ(ln 3) = 1/4; undesirable with the same r: 1 - σ(-ln 3) = 3/4; mean 1/2.
    No gradient reaches the KL log-probs."""
    policy = torch.tensor([2 * LN3, 2 * LN3], requires_grad=True)
    kl_policy = torch.tensor([-1.0, 0.5], requires_grad=True)
    loss, m = kto_loss(
        policy, torch.zeros(2), torch.tensor([True, False]), kl_policy, torch.zeros(2), beta=0.5
    )
    assert m["kl"].item() == 0.0
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    assert kl_policy.grad is None
    # desirable: dL/dr = -β σ'(ln 3) / B = -0.5 · 3/16 / 2 < 0 (pushed up); undesirable: > 0
    assert policy.grad[0].item() == pytest.approx(-0.5 * 3 / 16 / 2, abs=1e-7)
    assert policy.grad[1].item() == pytest.approx(0.5 * 3 / 16 / 2, abs=1e-7)


def test_z_ref_is_one_mean_over_every_shard_of_the_batch():
    """A batch of 4 split over two processes: shard A's KL pairs (2 ln 3, 0), shard B's
    (ln 3, -3 ln 3). The batch estimate is max(0, (2 ln 3 + 0 + ln 3 - 3 ln 3)/4) = 0, whereas
    the shards alone give ln 3 and 0 (clamped): a mean of per-shard estimates (ln 3 / 2) would be
    wrong. The all-reduce is simulated by summing both shards' (total, count) pairs."""
    a = torch.tensor([2 * LN3, 0.0]), torch.zeros(2)
    b = torch.tensor([LN3, -3 * LN3]), torch.zeros(2)
    other = {"a": b, "b": a}
    assert kl_estimate(*a).item() == pytest.approx(LN3, abs=1e-6)
    assert kl_estimate(*b).item() == 0.0

    def all_reduce_from(shard: str):
        return lambda sums: sums + torch.stack([
            (other[shard][0] - other[shard][1]).sum(), torch.tensor(2.0)])

    for shard, pairs in (("a", a), ("b", b)):
        assert kl_estimate(*pairs, all_reduce_from(shard)).item() == 0.0
    # Shifted up by 1 (no clamping): (3 ln 3 - 3 ln 3 + 4) / 4 = 1 on both shards.
    up = [(x + 1, r) for x, r in (a, b)]
    assert kl_estimate(*up[0], lambda s: s + torch.stack([(up[1][0]).sum(), torch.tensor(2.0)])
                       ).item() == pytest.approx(1.0, abs=1e-6)


def test_a_given_z_ref_replaces_the_local_estimate():
    """kto_loss(z_ref=...) uses it as is: z_ref = 0 with r = ln 3, β = 1 (desirable):
    1 - σ(ln 3) = 1/4, although the local KL pairs alone would give z_ref = 5."""
    loss, m = kto_loss(torch.tensor([LN3]), torch.zeros(1), torch.tensor([True]),
                       torch.tensor([5.0]), torch.zeros(1), beta=1.0, z_ref=torch.tensor(0.0))
    assert m["kl"].item() == 0.0
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


def test_rewards_nan_when_a_side_is_absent():
    """All desirable: rewards/rejected and rewards/margins are undefined (NaN), the loss is not."""
    loss, m = kto_loss(
        torch.zeros(2), torch.zeros(2), torch.tensor([1, 1]), torch.zeros(2), torch.zeros(2)
    )
    assert loss.item() == pytest.approx(0.5)  # 1 - σ(0)
    assert m["rewards/chosen"].item() == 0.0
    assert math.isnan(m["rewards/rejected"].item()) and math.isnan(m["rewards/margins"].item())


