"""DPO loss types against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.dpo import dpo_loss

LN3 = math.log(3.0)


def _batch():
    """Two pairs. Pair 1: chosen log-ratio -2 - (-2 - ln 3) = ln 3, rejected log-ratio
    -4 - (-4 + ln 3) = -ln 3, so Δ = 2 ln 3. Pair 2: policy = reference, Δ = 0."""
    policy_chosen = torch.tensor([-2.0, -3.0])
    policy_rejected = torch.tensor([-4.0, -5.0])
    ref_chosen = torch.tensor([-2.0 - LN3, -3.0])
    ref_rejected = torch.tensor([-4.0 + LN3, -5.0])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_sigmoid_by_hand():
    """β = 0.5: βΔ = (ln 3, 0). -log σ(ln 3) = -ln(3/4) = 0.287682, -log σ(0) = ln 2 = 0.693147,
    mean 0.490415.
    rewards/chosen = 0.5 · (ln 3 + 0)/2 = 0.274653, rewards/rejected = -0.274653,
    margins 0.549306, accuracies: pair 1 wins, pair 2 ties (not a win) -> 0.5.
    logps/chosen = (-2 - 3)/2 = -2.5, logps/rejected = (-4 - 5)/2 = -4.5.
    """
    loss, m = dpo_loss(*_batch(), beta=0.5)
    assert loss.item() == pytest.approx(0.490415, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.274653, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-0.274653, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.549306, abs=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-2.5)
    assert m["logps/rejected"].item() == pytest.approx(-4.5)
    assert not any(v.requires_grad for v in m.values())


def test_policy_equal_to_reference_gives_ln2():
    """Δ = 0 -> -log σ(0) = ln 2 = 0.693147 for every pair, whatever β."""
    logps = torch.tensor([-7.3, -12.1, -0.4])
    loss, _ = dpo_loss(logps, logps - 1.0, logps, logps - 1.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_hinge_by_hand():
    """β = 0.5: relu(1 - ln 3) = relu(-0.0986) = 0, relu(1 - 0) = 1 -> mean 0.5."""
    loss, _ = dpo_loss(*_batch(), beta=0.5, loss_type="hinge")
    assert loss.item() == pytest.approx(0.5, abs=1e-7)


def test_robust_by_hand():
    """β = 0.5, ε = 0.25, 1 - 2ε = 0.5.
    Pair 1: [-0.75 · ln(3/4) + 0.25 · ln(1/4)] / 0.5 = [0.215762 - 0.346574] / 0.5 = -0.261624.
    Pair 2: [0.75 · ln 2 - 0.25 · ln 2] / 0.5 = ln 2 = 0.693147. Mean 0.215762.
    """
    loss, _ = dpo_loss(*_batch(), beta=0.5, loss_type="robust", label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.215762, abs=1e-6)
    plain, _ = dpo_loss(*_batch(), beta=0.5, loss_type="robust")
    sigmoid, _ = dpo_loss(*_batch(), beta=0.5)
    assert plain.item() == pytest.approx(sigmoid.item(), abs=1e-7)  # ε = 0 is plain DPO


def test_ipo_by_hand_averaged_or_with_lengths():
    """β = 0.25 -> target 1/(2β) = 2. Averaged log-ratios: pair 1 chosen 1, rejected -1 (Δ = 2),
    pair 2 zero (Δ = 0): (2 - 2)² = 0, (0 - 2)² = 4, mean 2.
    The same pairs as SUMS over lengths (3, 2) / (1, 4): chosen ratios 3/3 = 1 and 0/2,
    rejected ratios -1/1 = -1 and 0/4 -> the same loss 2.
    """
    zero = torch.zeros(2)
    loss, m = dpo_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), zero, zero, beta=0.25, loss_type="ipo"
    )
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.25 * (2 + 0) / 2, abs=1e-7)
    loss, _ = dpo_loss(
        torch.tensor([3.0, 0.0]),
        torch.tensor([-1.0, 0.0]),
        zero,
        zero,
        beta=0.25,
        loss_type="ipo",
        chosen_lengths=torch.tensor([3, 2]),
        rejected_lengths=torch.tensor([1, 4]),
    )
    assert loss.item() == pytest.approx(2.0, abs=1e-6)


def test_length_normalized_sigmoid_by_hand():
    """Chosen log-ratio 2 ln 3 over 2 tokens -> ln 3; rejected -3 ln 3 over 3 tokens -> -ln 3.
    Δ = 2 ln 3, β = 0.5 -> -log σ(ln 3) = 0.287682; rewards/chosen = 0.5 ln 3 = 0.549306
    (from the normalized ratio), rewards/rejected = -0.549306.
    """
    zero = torch.zeros(1)
    loss, m = dpo_loss(
        torch.tensor([2 * LN3]),
        torch.tensor([-3 * LN3]),
        zero,
        zero,
        beta=0.5,
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([3]),
    )
    assert loss.item() == pytest.approx(0.287682, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.549306, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-0.549306, abs=1e-6)


def test_gradient_raises_chosen_and_lowers_rejected():
    """Sigmoid at Δ = 0, batch of 1: dL/d logπ(y_c) = -β σ(-βΔ) = -0.1 · 1/2 = -0.05,
    dL/d logπ(y_r) = +0.05; the reference gets no gradient (it is an input, detached upstream)."""
    chosen = torch.tensor([-3.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-4.0]))
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.05, abs=1e-7)
    assert rejected.grad.item() == pytest.approx(0.05, abs=1e-7)


def test_validation():
    batch = _batch()
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        dpo_loss(*batch, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*batch, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*batch, loss_type="robust", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*batch, loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="both"):
        dpo_loss(*batch, chosen_lengths=torch.tensor([1, 1]))
