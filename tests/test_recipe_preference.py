"""DPO, ORPO, SimPO and CPO recipes on the tiny model: ln 2 at the start, the three reference
modes give the same loss (one batch and whole trajectories), every loss type runs with its known
step-0 value, IPO uses averaged log-probs, and the reference-free methods (ORPO, SimPO, CPO) never
run a reference forward yet learn."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.config import (
    CPOConfig,
    DemoTaskConfig,
    DPOConfig,
    LoraConfig,
    ORPOConfig,
    SimPOConfig,
    TinyModelConfig,
)
from posttrain.data import demo
from posttrain.data.preference import collate_pairs, tokenize_preference_rows
from posttrain.models import apply_lora, build_tiny_model
from posttrain.recipes import preference
from posttrain.training import reference_runner

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
LORA = LoraConfig(r=4, alpha=8)
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    cfg = DemoTaskConfig(num_train=200, num_eval=20)
    out = {}
    for split in ("train", "eval"):
        out[split], _ = tokenize_preference_rows(
            demo.generate_preference(cfg, 0, split), tokenizer, max_length=48
        )
    return out


def _lora_policy(tokenizer):
    """peft draws lora_A from the global RNG: seeding first makes every call build the same one."""
    torch.manual_seed(0)
    return apply_lora(build_tiny_model(TINY, tokenizer), LORA)


def _perturb_lora_b(policy, std=0.3):
    """lora_B starts at 0 (policy = base = reference); random B makes policy != reference."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _train(method, policy, pairs, tokenizer, **overrides):
    config_cls = {"dpo": DPOConfig, "orpo": ORPOConfig, "simpo": SimPOConfig,
                  "cpo": CPOConfig}[method]
    cfg = config_cls(**{"max_steps": 5, "per_device_batch_size": 8, "learning_rate": 1e-2,
                        "warmup_steps": 0, "eval_every": 5, "log_every": 1, **overrides})
    history: list[dict] = []
    final = preference.train(method, policy, pairs["train"], pairs["eval"][:16], cfg,
                             pad_token_id=tokenizer.pad_token_id,
                             log_metrics=lambda m, s: history.append(dict(m)))
    return final, history


# ---------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("reference", ["precomputed", "copy", "adapter"])
def test_dpo_starts_at_ln2_when_policy_is_the_reference(pairs, tokenizer, reference):
    """Δ = 0 at step 1 (before the update), so the sigmoid loss is -log σ(0) = ln 2, the rewards
    are 0 and the held-out metrics carry the same names with an eval_ prefix."""
    final, history = _train("dpo", _lora_policy(tokenizer), pairs, tokenizer, max_steps=1,
                            eval_every=1, reference=reference)
    first = history[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < 0
    assert set(final) >= {"rewards/rejected", "rewards/accuracies", "logps/rejected",
                          "eval_loss", "eval_rewards/margins"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_three_reference_modes_give_the_same_loss(pairs, tokenizer, loss_type):
    """THE reference test: with policy != reference (perturbed LoRA B), the DPO loss of one batch
    is the same whether the reference log-probs were (a) precomputed before the perturbation,
    (b) taken from a frozen copy made before it, or (c) computed by disabling the adapter.
    The precomputed values came from batches of 3 (other padding), the batch here holds 8."""
    policy = _lora_policy(tokenizer)
    average = loss_type == "ipo"
    examples = pairs["train"][:8]
    precomputed = preference.precompute_reference(
        policy, examples, pad_token_id=tokenizer.pad_token_id, batch_size=3, average=average
    )
    copy_ref = reference_runner("copy", policy)
    _perturb_lora_b(policy)
    adapter_ref = reference_runner("adapter", policy)
    late_copy = reference_runner("copy", policy)  # a copy of the PERTURBED policy: not the ref

    cfg = DPOConfig(loss_type=loss_type)
    batch = collate_pairs(precomputed, tokenizer.pad_token_id)
    policy.eval()  # LoRA dropout is 0 anyway; eval makes the three calls strictly comparable
    with torch.no_grad():
        a, ma = preference._dpo_terms(policy, batch, cfg, None)
        b, mb = preference._dpo_terms(policy, batch, cfg, copy_ref)
        c, mc = preference._dpo_terms(policy, batch, cfg, adapter_ref)
        wrong, _ = preference._dpo_terms(policy, batch, cfg, late_copy)

    assert float(a) == pytest.approx(float(b), abs=1e-5)
    assert float(a) == pytest.approx(float(c), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(ma[key]) == pytest.approx(float(mb[key]), abs=1e-5)
        assert float(ma[key]) == pytest.approx(float(mc[key]), abs=1e-5)
    # the perturbation matters: Δ != 0, and a reference made after it gives the step-0 value
    start = LN2 if loss_type == "sigmoid" else (1 / (2 * cfg.beta)) ** 2
    assert abs(float(a) - start) > 1e-3
    assert float(wrong) == pytest.approx(start, abs=1e-5)


def test_three_reference_modes_give_the_same_training_trajectory(pairs, tokenizer):
    """Five optimizer steps from identical LoRA policies: per-step losses, margins and the final
    adapter weights agree across the modes, and the loss leaves ln 2."""
    runs = {}
    for mode in ("precomputed", "copy", "adapter"):
        policy = _lora_policy(tokenizer)
        _, history = _train("dpo", policy, pairs, tokenizer, reference=mode)
        weights = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
        runs[mode] = ([m["loss"] for m in history], [m["rewards/margins"] for m in history],
                      weights)
    losses, margins, weights = runs["precomputed"]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    assert losses[-1] < LN2 - 1e-3  # it trained: the modes are compared on a moving policy
    for mode in ("copy", "adapter"):
        other_losses, other_margins, other_weights = runs[mode]
        assert other_losses == pytest.approx(losses, abs=1e-5)
        assert other_margins == pytest.approx(margins, abs=1e-5)
        for name, w in weights.items():
            torch.testing.assert_close(other_weights[name], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        ({"loss_type": "hinge"}, 1.0),  # relu(1 - β·0)
        ({"loss_type": "ipo"}, 25.0),  # (0 - 1/(2·0.1))²
        ({"loss_type": "robust", "label_smoothing": 0.2}, LN2),  # ln2·(1-2ε)/(1-2ε)
        ({"length_normalize": True}, LN2),
    ],
    ids=["hinge", "ipo", "robust", "length_normalize"],
)
def test_dpo_loss_variants_run_through_the_recipe(pairs, tokenizer, overrides, start):
    policy = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _, history = _train("dpo", policy, pairs, tokenizer, max_steps=3, eval_every=3,
                        learning_rate=3e-3, **overrides)
    losses = [m["loss"] for m in history]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(start, abs=1e-5)
    assert math.isfinite(history[-1]["eval_loss"])
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())


@pytest.mark.parametrize(("loss_type", "average"), [("ipo", True), ("sigmoid", False)])
def test_ipo_uses_averaged_logps(pairs, tokenizer, monkeypatch, loss_type, average):
    """Every log-prob of an IPO run (precomputed reference, training, eval) is a per-token mean;
    every one of a sigmoid run is a sum."""
    calls: list[bool] = []
    real = preference._pair_logps

    def spy(net, batch, average):
        calls.append(average)
        return real(net, batch, average)

    monkeypatch.setattr(preference, "_pair_logps", spy)
    _train("dpo", build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=1, eval_every=1,
           loss_type=loss_type)
    assert len(calls) > 3 and set(calls) == {average}
    # precompute_reference(average=True) gives the sum divided by the completion's token count
    examples = pairs["train"][:8]
    summed = preference.precompute_reference(
        build_tiny_model(TINY, tokenizer), examples, pad_token_id=tokenizer.pad_token_id,
        batch_size=8, average=False)
    averaged = preference.precompute_reference(
        build_tiny_model(TINY, tokenizer), examples, pad_token_id=tokenizer.pad_token_id,
        batch_size=8, average=True)
    for s, a, ex in zip(summed, averaged, examples):
        assert a["ref_chosen_logps"] == pytest.approx(
            s["ref_chosen_logps"] / len(ex["chosen_ids"]), rel=1e-5)


# ---------------------------------------------------------------------------------- ORPO


def test_orpo_runs_one_policy_forward_per_micro_batch_and_no_reference(
    pairs, tokenizer, monkeypatch
):
    calls = {"n": 0}
    real = preference.sequence_logps

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("ORPO must not touch a reference model")

    monkeypatch.setattr(preference, "sequence_logps", counting)
    monkeypatch.setattr(preference, "reference_runner", forbidden)
    monkeypatch.setattr(preference, "precompute_reference", forbidden)
    # 4 steps x 2 micro-batches, plus 2 evaluations (steps 2 and 4) of 16 eval pairs / 8 = 2
    _train("orpo", build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=4,
           grad_accum=2, eval_every=2)
    assert calls["n"] == 4 * 2 + 2 * 2

    # the counter does see reference forwards: DPO with a frozen copy runs two per micro-batch
    calls["n"] = 0
    monkeypatch.setattr(preference, "reference_runner", reference_runner)
    _train("dpo", build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=4,
           grad_accum=2, eval_every=2, reference="copy")
    assert calls["n"] == 2 * (4 * 2 + 2 * 2)


def test_orpo_trains_the_policy_and_its_nll_falls(pairs, tokenizer):
    policy = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    final, history = _train("orpo", policy, pairs, tokenizer, max_steps=30, eval_every=15,
                            learning_rate=1e-2, warmup_steps=2)
    nll = [m["nll_loss"] for m in history]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert sum(nll[-5:]) / 5 < 0.75 * sum(nll[:5]) / 5  # ~4.5 -> ~2.7 nats per token
    assert set(final) >= {"log_odds_ratio", "log_odds_chosen", "rewards/chosen",
                          "rewards/accuracies", "eval_nll_loss"}
    # loss = nll - β·log σ(log_odds): both terms are logged, so the identity can be checked
    assert final["loss"] == pytest.approx(final["nll_loss"] - 0.1 * final["log_odds_ratio"],
                                          abs=1e-5)
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


# ---------------------------------------------------------------------------- SimPO, CPO


@pytest.mark.parametrize("method", ["simpo", "cpo"])
def test_reference_free_methods_run_no_reference_forward(pairs, tokenizer, monkeypatch, method):
    """One policy forward per micro-batch and per evaluation batch, no reference of any kind:
    4 steps x 2 micro-batches + 2 evaluations x 2 batches of 8."""
    calls = {"n": 0}
    real = preference.sequence_logps

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"{method} must not touch a reference model")

    monkeypatch.setattr(preference, "sequence_logps", counting)
    monkeypatch.setattr(preference, "reference_runner", forbidden)
    monkeypatch.setattr(preference, "precompute_reference", forbidden)
    _train(method, build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=4,
           grad_accum=2, eval_every=2)
    assert calls["n"] == 4 * 2 + 2 * 2


def _completion_logps_by_hand(policy, batch):
    """Per-pair summed completion log-probs and token counts of both halves from a plain
    full-vocabulary log_softmax: ((2B,), (2B,)), chosen first."""
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # (2B, T-1)
    mask = batch["completion_mask"][:, 1:].float()
    return (token * mask).sum(-1), mask.sum(-1)


def test_simpo_and_cpo_terms_match_the_formulas_on_a_real_batch(pairs, tokenizer):
    """On 8 real pairs, the recipe's loss is the paper's formula applied to log-probs computed
    independently here: SimPO −log σ(β·(s_c/n_c − s_r/n_r) − γ) on AVERAGED log-probs plus
    α·NLL; CPO −log σ(β·(s_c − s_r)) on SUMMED ones plus α·NLL, where NLL = −Σs_c / Σn_c (the
    token mean over the chosen completions)."""
    policy = build_tiny_model(TINY, tokenizer).eval()
    batch = collate_pairs(pairs["train"][:8], tokenizer.pad_token_id)
    summed, count = _completion_logps_by_hand(policy, batch)
    s_c, s_r, n_c, n_r = summed[:8], summed[8:], count[:8], count[8:]
    nll = float(-s_c.sum() / n_c.sum())

    def softplus_neg(z):  # −log σ(z) = log(1 + e^−z), in float64 from the floats
        return sum(math.log1p(math.exp(-float(v))) for v in z) / len(z)

    cfg = SimPOConfig(beta=2.0, gamma=1.0, cpo_alpha=0.3)
    with torch.no_grad():
        loss, m = preference._simpo_terms(policy, batch, cfg)
    want = softplus_neg(2.0 * (s_c / n_c - s_r / n_r) - 1.0) + 0.3 * nll
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert float(m["logps/chosen"]) == pytest.approx(float((s_c / n_c).mean()), abs=1e-5)
    assert float(m["nll_loss"]) == pytest.approx(nll, abs=1e-5)

    cfg = CPOConfig(beta=0.1, cpo_alpha=1.0)
    with torch.no_grad():
        loss, m = preference._cpo_terms(policy, batch, cfg)
    want = softplus_neg(0.1 * (s_c - s_r)) + nll
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert float(m["logps/chosen"]) == pytest.approx(float(s_c.mean()), abs=1e-4)
    assert float(m["rewards/rejected"]) == pytest.approx(float(0.1 * s_r.mean()), abs=1e-5)


# Eight pairs, the whole batch at every step: each method's loss on them must fall.
FIXED = {"max_steps": 15, "learning_rate": 3e-3, "warmup_steps": 0, "eval_every": 15}


def test_simpo_learns_a_fixed_batch(pairs, tokenizer):
    """SimPO (β = 2, γ = 1, α = 0) on one batch of 8 pairs: the loss falls by more than half
    (1.28 -> 0.44 here), the reward margin β·Δlp grows past γ and every pair ends ranked right;
    the NLL is logged but is no part of the loss (α = 0); every parameter moves."""
    policy = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    fixed = {"train": pairs["train"][:8], "eval": pairs["eval"]}
    final, history = _train("simpo", policy, fixed, tokenizer, **FIXED)
    first, last = history[0], history[-1]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["rewards/margins"] > 1.0 > first["rewards/margins"]
    assert last["rewards/accuracies"] == 1.0
    assert first["rewards/chosen"] == pytest.approx(2.0 * first["logps/chosen"], abs=1e-5)
    assert -10 < first["logps/chosen"] < 0  # averaged per token, not summed
    assert set(final) >= {"rewards/rejected", "logps/rejected", "nll_loss", "eval_loss",
                          "eval_rewards/margins", "eval_rewards/accuracies"}
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_simpo_cpo_alpha_adds_the_logged_nll(pairs, tokenizer):
    """CPO-SimPO: with α = 0.5 the first logged loss is the SimPO term plus 0.5 · nll_loss,
    the SimPO term being the α = 0 run's first loss (same model, same batch)."""
    _, plain = _train("simpo", build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=1,
                      eval_every=1)
    _, mixed = _train("simpo", build_tiny_model(TINY, tokenizer), pairs, tokenizer, max_steps=1,
                      eval_every=1, cpo_alpha=0.5)
    assert mixed[0]["nll_loss"] == pytest.approx(plain[0]["nll_loss"], abs=1e-6)
    assert mixed[0]["loss"] == pytest.approx(plain[0]["loss"] + 0.5 * plain[0]["nll_loss"],
                                             abs=1e-5)


def test_cpo_learns_a_fixed_batch(pairs, tokenizer):
    """CPO (β = 0.1, α = 1) on one batch of 8 pairs: the rewards are β·(SUMMED log-prob), the
    loss and the chosen NLL fall, every pair ends ranked right, and the loss stays the NLL plus
    a positive preference term; every parameter moves."""
    policy = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    fixed = {"train": pairs["train"][:8], "eval": pairs["eval"]}
    final, history = _train("cpo", policy, fixed, tokenizer, **FIXED)
    first, last = history[0], history[-1]
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], abs=1e-5)
    assert first["logps/chosen"] < -2 * first["nll_loss"]  # summed over several tokens
    assert all(0 < m["loss"] - m["nll_loss"] < 1 for m in history)
    assert last["loss"] < first["loss"] - 0.5
    assert last["nll_loss"] < 0.9 * first["nll_loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert last["rewards/accuracies"] == 1.0
    assert set(final) >= {"rewards/rejected", "logps/rejected", "eval_nll_loss",
                          "eval_rewards/accuracies"}
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_unknown_method_is_refused(pairs, tokenizer):
    with pytest.raises(ValueError, match="unknown preference method 'kto'"):
        preference.train("kto", build_tiny_model(TINY, tokenizer), pairs["train"],
                         pairs["eval"], DPOConfig(), pad_token_id=tokenizer.pad_token_id)


def test_precompute_reference_leaves_the_policy_untouched(pairs, tokenizer):
    policy = build_tiny_model(TINY, tokenizer).train()
    snapshot = copy.deepcopy(policy.state_dict())
    out = preference.precompute_reference(policy, pairs["train"][:5],
                                          pad_token_id=tokenizer.pad_token_id, batch_size=2,
                                          average=False)
    assert policy.training
    assert all(torch.equal(v, snapshot[k]) for k, v in policy.state_dict().items())
    assert [set(e) - set(pairs["train"][0]) for e in out] == [
        {"ref_chosen_logps", "ref_rejected_logps"}] * 5
    assert all(e["ref_chosen_logps"] < 0 and e["ref_rejected_logps"] < 0 for e in out)
