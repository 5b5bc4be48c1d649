"""CPO loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.cpo import cpo_loss
from posttrain.losses.dpo import dpo_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


def _batch():
    """Summed log-probs. Pair 1: chosen -10, rejected -10 - 10 ln 3, so β·Δ = 0.1 · 10 ln 3 =
    ln 3 at β = 0.1. Pair 2: chosen = rejected = -20, Δ = 0."""
    return torch.tensor([-10.0, -20.0]), torch.tensor([-10.0 - 10 * LN3, -20.0])


def test_cpo_by_hand():
    """β = 0.1, α = 1 (the defaults), NLL 2.0. -log σ(ln 3) = ln(4/3) = 0.287682, -log σ(0) =
    ln 2 = 0.693147; mean 0.490415; plus 1 · 2.0 = 2.490415.
    rewards/chosen = 0.1 · (-10 - 20)/2 = -1.5; rewards/rejected = 0.1 · (-10 - 10 ln 3 - 20)/2
    = -1.5 - ln 3 / 2 = -2.049306; margins ln 3 / 2 = 0.549306; accuracies 1/2 (a tie is no
    win). logps/chosen = -15, logps/rejected = -15 - 5 ln 3 = -20.493061."""
    chosen, rejected = _batch()
    loss, m = cpo_loss(chosen, rejected, torch.tensor(2.0))
    assert (math.log(4 / 3) + LN2) / 2 == pytest.approx(0.490415, abs=1e-6)
    assert loss.item() == pytest.approx(2.490415, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-1.5, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-2.049306, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.549306, abs=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-15.0)
    assert m["logps/rejected"].item() == pytest.approx(-20.493061, abs=1e-5)
    assert m["nll_loss"].item() == pytest.approx(2.0)
    assert not any(v.requires_grad for v in m.values())


def test_cpo_nll_weight_and_beta():
    """α = 0: the preference term alone, 0.490415; α = 0.5: + 1.0 = 1.490415.
    β = 0.2 doubles β·Δ of pair 1 to 2 ln 3: -log σ(2 ln 3) = log(1 + 1/9) = 0.105361, so the
    mean is (0.105361 + 0.693147)/2 = 0.399254 with α = 0."""
    chosen, rejected = _batch()
    nll = torch.tensor(2.0)
    assert cpo_loss(chosen, rejected, nll, alpha=0.0)[0].item() == pytest.approx(0.490415,
                                                                                abs=1e-6)
    assert cpo_loss(chosen, rejected, nll, alpha=0.5)[0].item() == pytest.approx(1.490415,
                                                                                abs=1e-6)
    got = cpo_loss(chosen, rejected, nll, beta=0.2, alpha=0.0)[0].item()
    assert got == pytest.approx((math.log(10 / 9) + LN2) / 2, abs=1e-6)
    assert got == pytest.approx(0.399254, abs=1e-6)


def test_cpo_gradients():
    """d/d chosen of -log σ(βΔ) is -β·σ(-βΔ): pair 2 (Δ = 0) gives -0.1 · 0.5 / 2 pairs = -0.025;
    pair 1 gives -0.1 · σ(-ln 3) / 2 = -0.1 · 0.25 / 2 = -0.0125. Rejected: the opposite.
    The NLL gets gradient α."""
    chosen, rejected = (t.clone().requires_grad_() for t in _batch())
    nll = torch.tensor(2.0, requires_grad=True)
    loss, _ = cpo_loss(chosen, rejected, nll, alpha=0.7)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-0.0125, -0.025], abs=1e-7)
    assert rejected.grad.tolist() == pytest.approx([0.0125, 0.025], abs=1e-7)
    assert nll.grad.item() == pytest.approx(0.7)


def test_cpo_preference_term_is_dpo_with_a_zero_reference():
    """Without the NLL, CPO is DPO's sigmoid loss whose reference log-probs are all 0."""
    chosen, rejected = _batch()
    zeros = torch.zeros(2)
    want, dm = dpo_loss(chosen, rejected, zeros, zeros, beta=0.1)
    got, cm = cpo_loss(chosen, rejected, torch.tensor(5.0), alpha=0.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert cm[key].item() == pytest.approx(dm[key].item(), abs=1e-6)
