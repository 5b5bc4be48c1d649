"""The generalized JSD of GKD, worked by hand on two-token vocabularies."""

import math

import pytest
import torch

from posttrain.losses.gkd import generalized_jsd, gkd_loss

# Student logits (0, 0): S = (1/2, 1/2). Teacher logits (ln 3, 0): T = (3/4, 1/4).
S = torch.tensor([[0.0, 0.0]])
T = torch.tensor([[math.log(3.0), 0.0]])
FORWARD = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(T || S) = 0.130812
REVERSE = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(S || T) = 0.143841


def test_beta_zero_is_forward_kl_and_one_is_reverse_kl():
    assert generalized_jsd(S, T, beta=0.0).item() == pytest.approx(FORWARD, abs=1e-6)
    assert generalized_jsd(S, T, beta=1.0).item() == pytest.approx(REVERSE, abs=1e-6)
    assert FORWARD == pytest.approx(0.130812, abs=1e-6)
    assert REVERSE == pytest.approx(0.143841, abs=1e-6)


def test_half_is_the_jensen_shannon_divergence_by_hand():
    # M = (T + S) / 2 = (5/8, 3/8)
    kl_t_m = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_s_m = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    expected = 0.5 * kl_t_m + 0.5 * kl_s_m
    assert expected == pytest.approx(0.033822, abs=1e-6)
    assert generalized_jsd(S, T, beta=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_interior_beta_by_hand():
    beta = 0.25  # M = 0.25 T + 0.75 S = (9/16, 7/16)
    m = (0.25 * 0.75 + 0.75 * 0.5, 0.25 * 0.25 + 0.75 * 0.5)
    kl_t_m = 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    kl_s_m = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    expected = beta * kl_t_m + (1 - beta) * kl_s_m
    assert generalized_jsd(S, T, beta=beta).item() == pytest.approx(expected, abs=1e-6)


def test_symmetry_and_bounds():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 2
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        # swapping the two models is the same as beta -> 1 - beta
        assert torch.allclose(generalized_jsd(s, t, beta=beta),
                              generalized_jsd(t, s, beta=1 - beta), atol=1e-6)
    half = generalized_jsd(s, t, beta=0.5)
    assert torch.allclose(half, generalized_jsd(t, s, beta=0.5), atol=1e-6)  # symmetric
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    for beta in (0.0, 0.3, 1.0):  # zero exactly when the distributions are equal
        assert generalized_jsd(s, s + 3.0, beta=beta).abs().max().item() < 1e-6


def test_small_beta_over_beta_tends_to_forward_kl():
    # the ends are the limits of JSD_beta / beta (beta -> 0) and / (1 - beta) (beta -> 1)
    # (float32: beta = 1e-3 is small enough for 0.2% and large enough for no cancellation)
    assert generalized_jsd(S, T, beta=1e-3).item() / 1e-3 == pytest.approx(FORWARD, rel=2e-3)
    assert generalized_jsd(S, T, beta=1 - 1e-3).item() / 1e-3 == pytest.approx(REVERSE, rel=2e-3)


def test_temperature_divides_the_logits():
    # logits (2 ln 3, 0) at temperature 2 are (ln 3, 0): the same T as above
    hot = generalized_jsd(S * 2, T * 2, beta=0.0, temperature=2.0)
    assert hot.item() == pytest.approx(FORWARD, abs=1e-6)


def test_loss_sums_positions_and_counts_tokens():
    s = torch.cat([S, S, torch.zeros(1, 2)])
    t = torch.cat([T, T, torch.zeros(1, 2)])  # the last position agrees: 0
    loss, m = gkd_loss(s, t, beta=0.0)
    assert loss.item() == pytest.approx(2 * FORWARD, abs=1e-6)
    assert int(m["num_tokens"]) == 3 and m["jsd_sum"].item() == pytest.approx(2 * FORWARD,
                                                                              abs=1e-6)


def test_gradient_flows_to_the_student_only():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    loss, _ = gkd_loss(s, t, beta=0.5)
    loss.backward()
    assert s.grad.abs().sum() > 0  # the teacher is run under no_grad by the recipe anyway


def test_refusals():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(S, T, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(S, T, temperature=0.0)
    with pytest.raises(ValueError, match="tokenizers must match"):
        generalized_jsd(S, torch.zeros(1, 3))
