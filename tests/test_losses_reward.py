"""Bradley–Terry reward loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.reward import reward_loss

LN3 = math.log(3.0)


def test_reward_loss_by_hand():
    """r_c = (ln 3, 0), r_r = (0, ln 3): r_c - r_r = (ln 3, -ln 3).

    σ(ln 3) = 3/4, σ(-ln 3) = 1/4 -> losses ln(4/3) = 0.287682 and ln 4 = 1.386294,
    mean 0.836988. accuracy 1/2; margin mean (ln 3 - ln 3)/2 = 0; scores {ln 3, 0, 0, ln 3}:
    mean ln 3 / 2 = 0.549306, min 0, max ln 3 = 1.098612.
    """
    chosen = torch.tensor([LN3, 0.0])
    rejected = torch.tensor([0.0, LN3])
    loss, m = reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.836988, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["mean_reward"].item() == pytest.approx(0.549306, abs=1e-6)
    assert m["min_reward"].item() == pytest.approx(0.0)
    assert m["max_reward"].item() == pytest.approx(1.098612, abs=1e-6)
    assert set(m) == {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"}
    assert not any(v.requires_grad for v in m.values())


def test_reward_loss_margin_and_centering():
    """Same scores, margin m = (ln 3, 0): logits (ln 3 - ln 3, -ln 3) = (0, -ln 3)
    -> losses ln 2 and ln 4, mean 1.5 ln 2 = 1.039721; the `margin` metric stays 0.

    Centering c = 0.01 without margin: (r_c + r_r)² = (ln 3)² = 1.206949 for both pairs
    -> 0.836988 + 0.01 · 1.206949 = 0.849058.
    """
    chosen = torch.tensor([LN3, 0.0])
    rejected = torch.tensor([0.0, LN3])
    loss, m = reward_loss(chosen, rejected, margin=torch.tensor([LN3, 0.0]))
    assert loss.item() == pytest.approx(1.039721, abs=1e-6)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-7)
    loss, _ = reward_loss(chosen, rejected, center_coefficient=0.01)
    assert loss.item() == pytest.approx(0.849058, abs=1e-6)


def test_reward_loss_gradient_separates_scores():
    """d/dr_c [-log σ(r_c - r_r)] = -σ(r_r - r_c): at equal scores -1/2 per pair, divided by the
    batch of 1 -> -0.5 for chosen, +0.5 for rejected (descent raises chosen, lowers rejected)."""
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    loss, _ = reward_loss(chosen, rejected)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)
