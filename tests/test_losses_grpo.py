"""GRPO clipped surrogate, its four normalizations and the k3 KL, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.grpo import grpo_loss, k3_kl

LN2 = math.log(2.0)


def _batch():
    """2 rows × 3 tokens, ε = 0.2 (clip to [0.8, 1.2]); old log-probs 0, so ρ = e^{logp}.

    Row 1, A = +1, ρ = (1, 1.5, 0.5), all 3 tokens active:
      ρA = (1, 1.5, 0.5), clip(ρ)A = (1, 1.2, 0.8), min = (1, 1.2, 0.5)
      -> per-token loss (−1, −1.2, −0.5), row sum −2.7; token 2 is high-clipped.
    Row 2, A = −2, ρ = (0.5, 1.5, [3, masked]), 2 tokens active:
      ρA = (−1, −3), clip(ρ)A = (−1.6, −2.4), min = (−1.6, −3)
      -> per-token loss (1.6, 3), row sum 4.6; token 1 is low-clipped.
    Total over active tokens 1.9, 5 active tokens.
    """
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 3.0]])
    logps = ratios.log().requires_grad_()
    old = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, old, advantages, mask


def test_grpo_normalization_by_hand():
    """Mean of row token means: (−2.7/3 + 4.6/2)/2 = (−0.9 + 2.3)/2 = 0.7.
    Clip metrics over 5 active tokens: low 1/5, high 1/5, region 2/5. No `kl` when β = 0."""
    loss, m = grpo_loss(*_batch())
    assert loss.item() == pytest.approx(0.7, abs=1e-6)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(0.2)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.2)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(0.4)
    assert "kl" not in m
    assert not any(v.requires_grad for v in m.values())


def test_bnpo_normalization_by_hand():
    """Sum over active tokens / active tokens = 1.9 / 5 = 0.38."""
    loss, _ = grpo_loss(*_batch(), loss_type="bnpo")
    assert loss.item() == pytest.approx(0.38, abs=1e-6)


def test_dr_grpo_normalization_by_hand():
    """Sum / (B · max_completion_length) = 1.9 / (2 · 4) = 0.2375."""
    loss, _ = grpo_loss(*_batch(), loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(0.2375, abs=1e-6)


def test_dapo_normalization_by_hand():
    """Sum / active tokens of the whole accumulated batch = 1.9 / 10 = 0.19 (this micro-batch
    holds 5 of the step's 10 tokens); two such micro-batches summed give 0.38 = bnpo of both."""
    loss, _ = grpo_loss(*_batch(), loss_type="dapo", num_items_in_batch=10)
    assert loss.item() == pytest.approx(0.19, abs=1e-6)
    loss, _ = grpo_loss(*_batch(), loss_type="dapo", num_items_in_batch=torch.tensor(10.0))
    assert loss.item() == pytest.approx(0.19, abs=1e-6)


def test_clip_higher_by_hand():
    """ε_high = 0.6 (clip to [0.8, 1.6]): row 1 token 2 (ρ = 1.5 < 1.6) is no longer clipped,
    loss −1.5 instead of −1.2 -> row 1 sum −3.0, total 1.6, bnpo 1.6/5 = 0.32; high clip 0,
    low clip still 1/5 (ε = 0.2 on the low side)."""
    loss, m = grpo_loss(*_batch(), epsilon_high=0.6, loss_type="bnpo")
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert m["clip_ratio/high_mean"].item() == 0.0
    assert m["clip_ratio/low_mean"].item() == pytest.approx(0.2)


def test_clipped_tokens_get_no_gradient():
    """bnpo divides by 5. d(−ρA)/d logp = −ρA on an unclipped token:
    row 1: token 1 −1·1/5 = −0.2, token 2 (ρ = 1.5 > 1.2, A > 0, clipped) 0, token 3 −0.5/5 = −0.1;
    row 2: token 1 (ρ = 0.5 < 0.8, A < 0, clipped) 0, token 2 −1.5·(−2)/5 = 0.6, masked token 0."""
    logps, old, advantages, mask = _batch()
    loss, _ = grpo_loss(logps, old, advantages, mask, loss_type="bnpo")
    loss.backward()
    expected = torch.tensor([[-0.2, 0.0, -0.1], [0.0, 0.6, 0.0]])
    torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)


def test_k3_kl_by_hand():
    """ref − logp = ln 2: e^{ln 2} − ln 2 − 1 = 2 − 0.693147 − 1 = 0.306853.
    ref − logp = −ln 2: 0.5 + 0.693147 − 1 = 0.193147. ref = logp: 1 − 0 − 1 = 0."""
    logps = torch.tensor([-1.0, -1.0, -1.0])
    ref = logps + torch.tensor([LN2, -LN2, 0.0])
    torch.testing.assert_close(
        k3_kl(logps, ref), torch.tensor([0.306853, 0.193147, 0.0]), atol=1e-6, rtol=0
    )


def test_kl_penalty_by_hand():
    """β = 0.1, ref − logp = (ln 2, 0, −ln 2 | ln 2, ln 2, [junk]) -> KL_t = (0.306853, 0,
    0.193147 | 0.306853, 0.306853). Masked mean kl = 1.113706/5 = 0.222741.
    bnpo loss = (1.9 + 0.1 · 1.113706)/5 = 2.011371/5 = 0.402274.
    grpo loss: row 1 (−2.7 + 0.05)/3 = −0.883333, row 2 (4.6 + 0.061371)/2 = 2.330685,
    mean 0.723676."""
    logps, old, advantages, mask = _batch()
    ref = logps.detach() + torch.tensor([[LN2, 0.0, -LN2], [LN2, LN2, 5.0]])
    loss, m = grpo_loss(logps, old, advantages, mask, beta=0.1, ref_logps=ref, loss_type="bnpo")
    assert m["kl"].item() == pytest.approx(0.222741, abs=1e-6)
    assert loss.item() == pytest.approx(0.402274, abs=1e-6)
    loss, _ = grpo_loss(logps, old, advantages, mask, beta=0.1, ref_logps=ref)
    assert loss.item() == pytest.approx(0.723676, abs=1e-6)


def test_on_policy_start_is_minus_mean_advantage():
    """ρ = 1 everywhere (old = logp, nothing clipped): grpo loss = −mean(A) over rows with tokens,
    the gradient is −A/T_i per token; group-normalized advantages average to 0."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    loss, m = grpo_loss(logps, logps.detach(), torch.tensor([0.5, -0.5]), torch.ones(2, 2))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert m["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    # d/dlogp of mean_i (1/2) Σ_t −A_i ρ_t = −A_i / (2 · 2)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.125, -0.125], [0.125, 0.125]]))


def test_validation():
    batch = _batch()
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(*batch, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*batch, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(*batch, loss_type="dapo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(*batch, beta=0.04)
