"""DPO and ORPO recipes on the tiny model: ln 2 at the start, the three reference modes give the
same loss (one batch and whole trajectories), every loss type runs with its known step-0 value,
IPO uses averaged log-probs, and ORPO never runs a reference forward yet learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.config import DemoTaskConfig, DPOConfig, LoraConfig, ORPOConfig, TinyModelConfig
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
    config_cls = DPOConfig if method == "dpo" else ORPOConfig
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


def test_unknown_method_is_refused(pairs, tokenizer):
    with pytest.raises(ValueError, match="unknown preference method 'simpo'"):
        preference.train("simpo", build_tiny_model(TINY, tokenizer), pairs["train"],
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
