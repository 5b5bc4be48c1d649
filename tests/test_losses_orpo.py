"""ORPO loss against hand-computed numbers, and the stable log(1 - e^x)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.orpo import log1mexp, orpo_loss

LN_HALF = math.log(0.5)
LN_QUARTER = math.log(0.25)


def test_orpo_by_hand():
    """Pair 1: lp_c = ln 1/2 -> odds (1/2)/(1/2) = 1; lp_r = ln 1/4 -> odds (1/4)/(3/4) = 1/3;
    log_odds = ln 1 - ln(1/3) = ln 3, log σ(ln 3) = ln(3/4) = -0.287682.
    Pair 2 swapped: log_odds = -ln 3, log σ(-ln 3) = ln(1/4) = -1.386294.
    log_odds_ratio = mean = -0.836988; log_odds_chosen = (ln 3 - ln 3)/2 = 0.
    β = 0.1, nll = 1.5: loss = 1.5 - 0.1 · (-0.836988) = 1.583699.
    rewards/chosen = 0.1 · (ln 1/2 + ln 1/4)/2 = -0.103972 = rewards/rejected, margins 0,
    accuracies 1/2.
    """
    lp_c = torch.tensor([LN_HALF, LN_QUARTER])
    lp_r = torch.tensor([LN_QUARTER, LN_HALF])
    loss, m = orpo_loss(lp_c, lp_r, torch.tensor(1.5), beta=0.1)
    assert loss.item() == pytest.approx(1.583699, abs=1e-6)
    assert m["nll_loss"].item() == pytest.approx(1.5)
    assert m["log_odds_ratio"].item() == pytest.approx(-0.836988, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-0.103972, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(-0.103972, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert not any(v.requires_grad for v in m.values())


def test_orpo_single_pair_and_gradient():
    """Pair 1 alone: loss = 1.5 - 0.1 · ln(3/4) = 1.528768; log_odds_chosen = ln 3.
    The NLL enters with weight 1; raising lp_c lowers the loss (negative gradient), raising
    lp_r raises it."""
    lp_c = torch.tensor([LN_HALF], requires_grad=True)
    lp_r = torch.tensor([LN_QUARTER], requires_grad=True)
    nll = torch.tensor(1.5, requires_grad=True)
    loss, m = orpo_loss(lp_c, lp_r, nll, beta=0.1)
    assert loss.item() == pytest.approx(1.528768, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(3), abs=1e-6)
    loss.backward()
    assert nll.grad.item() == pytest.approx(1.0)
    assert lp_c.grad.item() < 0 < lp_r.grad.item()


def test_log1mexp_is_accurate_near_zero_and_far():
    """Against float64: log(1 - e^x) at x = -1e-5 is log(1e-5 - 5e-11) = -11.512930 and at
    x = -50 it is log1p(-e^-50) = -e^-50 = -1.9287e-22 (in double, log(1 - e^-50) would round to
    0, hence each reference value uses the form that is exact for its range). In float32 the
    naive log1p(-exp(x)) is off by ~1e-2 at x = -1e-5 (exp(x) keeps only ~7 digits)."""
    values = [-1e-5, -0.1, -0.7, -5.0, -50.0]
    x = torch.tensor(values)
    want = torch.tensor(
        [math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in values],
        dtype=torch.float64,
    )
    assert torch.allclose(log1mexp(x).double(), want, rtol=1e-6, atol=0)
    naive = torch.log1p(-torch.exp(x))
    assert not torch.allclose(naive.double(), want, rtol=1e-6, atol=0)


def test_orpo_finite_gradient_at_certain_chosen():
    """lp_c = 0 (probability 1, infinite odds) is clamped just below 0: loss and grads finite."""
    lp_c = torch.tensor([0.0, -1e-9], requires_grad=True)
    lp_r = torch.tensor([-1.0, -60.0], requires_grad=True)
    loss, _ = orpo_loss(lp_c, lp_r, torch.tensor(0.0))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(lp_c.grad).all() and torch.isfinite(lp_r.grad).all()
