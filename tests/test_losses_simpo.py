"""SimPO loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.dpo import dpo_loss
from posttrain.losses.simpo import simpo_loss

LN2 = math.log(2.0)


def _softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_simpo_by_hand():
    """β = 2, γ = 1 (the defaults). Pair 1: lp_c = -0.5, lp_r = -1.0: β(lp_c - lp_r) - γ =
    2·0.5 - 1 = 0, -log σ(0) = ln 2 = 0.693147. Pair 2 swapped: 2·(-0.5) - 1 = -2,
    -log σ(-2) = log(1 + e²) = 2.126928. Mean 1.410038; α = 0 adds nothing.
    rewards/chosen = 2·(-0.5 - 1.0)/2 = -1.5 = rewards/rejected, margins 0, accuracies 1/2.
    logps/* are the averaged log-probs: (-0.5 - 1.0)/2 = -0.75 each. nll_loss as passed."""
    lp_c = torch.tensor([-0.5, -1.0])
    lp_r = torch.tensor([-1.0, -0.5])
    loss, m = simpo_loss(lp_c, lp_r, torch.tensor(1.2))
    want = (LN2 + _softplus(2.0)) / 2
    assert want == pytest.approx(1.410038, abs=1e-6)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-1.5)
    assert m["rewards/rejected"].item() == pytest.approx(-1.5)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-0.75)
    assert m["logps/rejected"].item() == pytest.approx(-0.75)
    assert m["nll_loss"].item() == pytest.approx(1.2)
    assert not any(v.requires_grad for v in m.values())


def test_simpo_margin_and_nll_weight():
    """One pair lp_c = -0.5, lp_r = -1.0, β = 2. γ = 0: -log σ(1) = log(1 + e^-1) = 0.313262;
    γ = 1: ln 2; γ = 3: -log σ(-2) = 2.126928 (a larger target margin, a larger loss).
    α = 0.5 with NLL 1.2 (CPO-SimPO) adds 0.6: ln 2 + 0.6 = 1.293147."""
    lp_c, lp_r, nll = torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor(1.2)
    losses = [simpo_loss(lp_c, lp_r, nll, gamma=g)[0].item() for g in (0.0, 1.0, 3.0)]
    assert losses == pytest.approx([_softplus(-1.0), LN2, _softplus(2.0)], abs=1e-6)
    assert losses[0] == pytest.approx(0.313262, abs=1e-6)
    loss, _ = simpo_loss(lp_c, lp_r, nll, alpha=0.5)
    assert loss.item() == pytest.approx(LN2 + 0.6, abs=1e-6)


def test_simpo_gradient_signs():
    """Raising lp_c lowers the loss and raising lp_r raises it, by β·σ(-z) with z = 0: ∓1;
    the NLL gets gradient α."""
    lp_c = torch.tensor([-0.5], requires_grad=True)
    lp_r = torch.tensor([-1.0], requires_grad=True)
    nll = torch.tensor(1.2, requires_grad=True)
    loss, _ = simpo_loss(lp_c, lp_r, nll, alpha=0.25)
    loss.backward()
    assert lp_c.grad.item() == pytest.approx(-1.0, abs=1e-6)  # -β·σ(-0) = -2·0.5
    assert lp_r.grad.item() == pytest.approx(1.0, abs=1e-6)
    assert nll.grad.item() == pytest.approx(0.25)


def test_simpo_is_length_normalized_dpo_without_reference_at_zero_margin():
    """With γ = 0, SimPO on averaged log-probs is DPO's length-normalized sigmoid loss with a
    reference whose log-probs are 0 (summed log-probs -3, -8 over 3 and 4 tokens: lp -1, -2)."""
    summed_c, summed_r = torch.tensor([-3.0, -6.0]), torch.tensor([-8.0, -2.0])
    n_c, n_r = torch.tensor([3, 2]), torch.tensor([4, 4])
    zeros = torch.zeros(2)
    want, _ = dpo_loss(summed_c, summed_r, zeros, zeros, beta=2.0, chosen_lengths=n_c,
                       rejected_lengths=n_r)
    got, _ = simpo_loss(summed_c / n_c, summed_r / n_r, torch.tensor(0.0), beta=2.0, gamma=0.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
