"""GRPO, RLOO and PPO recipe tests on the tiny model: rewards that move, parameters that change,
no reference model when β = 0, RLOO's KL in the reward or in the loss, a frozen reward model, and
config errors that fire."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import config as C
from posttrain.config import GRPOConfig, PPOConfig, RLOOConfig, TinyModelConfig
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import grpo, online_common, ppo
from posttrain.rewards import load_reward_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
PROMPTS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "task": "add"}
           for a in range(4) for b in range(4)]


def sevens(prompts, completions, **columns):
    """Share of '7' characters: random completions differ in it, so groups have variance.
    The prompts are conversational, so each completion is [{"role": "assistant", ...}] (TRL)."""
    assert columns["task"] == ["add"] * len(prompts)  # extra dataset columns reach the function
    texts = [c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


def _grpo_cfg(**kw) -> GRPOConfig:
    base = {"max_steps": 30, "per_device_batch_size": 32, "num_generations": 8,
            "learning_rate": 3e-3, "warmup_steps": 0, "max_length": 32,
            "max_completion_length": 6, "eval_every": 1000, "log_every": 1}
    return GRPOConfig(**{**base, **kw})


def _run_grpo(tokenizer, cfg, model=None):
    model = model or build_tiny_model(TINY, tokenizer)
    history: list[dict] = []
    grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4], cfg, reward_fns={"sevens": sevens},
               weights={"sevens": 1.0}, log_metrics=lambda m, s: history.append(m))
    return model, history


def test_grpo_raises_the_reward_and_logs_the_field_metrics(tokenizer):
    model = build_tiny_model(TINY, tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    _, history = _run_grpo(tokenizer, _grpo_cfg(), model)
    rewards = [m["reward"] for m in history]
    assert sum(rewards[-5:]) / 5 > 2 * sum(rewards[:5]) / 5, rewards
    for key in ("reward", "reward_std", "rewards/sevens/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "entropy",
                "clip_ratio/region_mean", "loss", "grad_norm", "eval/reward"):
        assert key in history[-1], key
    assert "kl" not in history[-1]  # beta = 0: no KL term at all
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grpo_without_kl_loads_no_reference(tokenizer, monkeypatch):
    calls = []
    real = grpo.reference_runner
    monkeypatch.setattr(grpo, "reference_runner", lambda *a: calls.append(a) or real(*a))
    _run_grpo(tokenizer, _grpo_cfg(max_steps=2))
    assert calls == []
    _, history = _run_grpo(tokenizer, _grpo_cfg(max_steps=3, beta=0.1))
    assert len(calls) == 1 and calls[0][0] == "copy"
    assert all(math.isfinite(m["kl"]) and m["kl"] >= 0 for m in history)


def test_grpo_iterations_reuse_each_generation_batch(tokenizer, monkeypatch):
    samples = []
    real = grpo._sample
    monkeypatch.setattr(grpo, "_sample", lambda *a: samples.append(1) or real(*a))
    _, history = _run_grpo(tokenizer, _grpo_cfg(max_steps=4, num_iterations=2))
    assert len(history) == 4 and len(samples) == 2
    # The first pass over a batch has ratio 1 everywhere (π = π_old): nothing is clipped.
    assert history[0]["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo"])
def test_grpo_normalizations_run(tokenizer, loss_type):
    _, history = _run_grpo(tokenizer, _grpo_cfg(max_steps=2, loss_type=loss_type, grad_accum=2,
                                                 per_device_batch_size=16))
    assert all(math.isfinite(m["loss"]) for m in history)


def test_grpo_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOConfig(per_device_batch_size=12, num_generations=8)
    with pytest.raises(C.ConfigError, match=r"stages\.grpo: .*multiple of num_generations"):
        C.load_pipeline_config(None, ["stages.grpo.per_device_batch_size=10"])


# ---------------------------------------------------------------------------------- RLOO


def _rloo_cfg(**kw) -> RLOOConfig:
    base = {"max_steps": 30, "per_device_batch_size": 32, "num_generations": 4,
            "learning_rate": 3e-3, "warmup_steps": 0, "max_length": 32,
            "max_completion_length": 6, "eval_every": 1000, "log_every": 1, "beta": 0.0}
    return RLOOConfig(**{**base, **kw})


def _spy_rloo(monkeypatch):
    """Record the total rewards scored and the rewards the leave-one-out baseline receives."""
    seen = {"scored": [], "baselined": []}
    score, loo = grpo.score_rollout, grpo.leave_one_out_advantages

    def scoring(*a, **kw):
        total, per_fn = score(*a, **kw)
        seen["scored"].append(total.clone())
        return total, per_fn

    def baselining(rewards, *a, **kw):
        seen["baselined"].append(rewards.clone())
        return loo(rewards, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("RLOO must not use GRPO's group-normalized advantages")

    monkeypatch.setattr(grpo, "score_rollout", scoring)
    monkeypatch.setattr(grpo, "leave_one_out_advantages", baselining)
    monkeypatch.setattr(grpo, "group_advantages", forbidden)
    return seen


def test_rloo_raises_the_reward_and_logs_the_field_metrics(tokenizer, monkeypatch):
    """β = 0: no reference, the leave-one-out baseline gets the scored rewards as they are, the
    reward rises, TRL's metric names are logged, and the first pass is on-policy (ratio 1,
    nothing clipped)."""
    seen = _spy_rloo(monkeypatch)
    calls = []
    monkeypatch.setattr(grpo, "reference_runner", lambda *a: calls.append(a))
    model = build_tiny_model(TINY, tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    history: list[dict] = []
    grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4], _rloo_cfg(), reward_fns={"sevens": sevens},
               weights={"sevens": 1.0}, log_metrics=lambda m, s: history.append(m))
    rewards = [m["reward"] for m in history]
    assert sum(rewards[-5:]) / 5 > 2 * sum(rewards[:5]) / 5, rewards
    for key in ("reward", "reward_std", "rewards/sevens/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "entropy",
                "clip_ratio/region_mean", "loss", "grad_norm", "eval/reward"):
        assert key in history[-1], key
    assert "kl" not in history[-1] and calls == []  # beta = 0: no KL, no reference
    assert all(m["clip_ratio/region_mean"] == 0.0 for m in history)  # one pass: ratio 1
    assert len(seen["baselined"]) == 30
    for scored, baselined in zip(seen["scored"], seen["baselined"]):
        assert torch.equal(scored, baselined)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rloo_kl_in_the_reward(tokenizer, monkeypatch):
    """β = 0.1, kl_placement 'reward' (the default): the baseline receives r − β·Σ_t (log π_old
    − log π_ref), so Σ_i (r_i − r'_i)/β equals the logged per-token mean `kl` times the number
    of completion tokens (mean_length · 32 completions). At step 1 the policy IS the reference:
    kl = 0 and the rewards pass unchanged. The loss carries no KL term."""
    seen = _spy_rloo(monkeypatch)
    history: list[dict] = []
    grpo.train(build_tiny_model(TINY, tokenizer), tokenizer, PROMPTS, PROMPTS[:4],
               _rloo_cfg(max_steps=4, beta=0.1), reward_fns={"sevens": sevens},
               weights={"sevens": 1.0}, log_metrics=lambda m, s: history.append(m))
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(seen["baselined"][0], seen["scored"][0], atol=1e-6, rtol=0)
    for m, scored, baselined in zip(history, seen["scored"], seen["baselined"]):
        tokens = m["completions/mean_length"] * 32
        assert float((scored - baselined).sum()) / 0.1 == pytest.approx(m["kl"] * tokens,
                                                                        abs=1e-4)
    assert history[-1]["kl"] != 0.0  # the policy has moved away from the reference


def test_rloo_kl_in_the_loss(tokenizer, monkeypatch):
    """kl_placement 'loss': the rewards reach the baseline untouched, no extra π_old forward
    runs, and `kl` is the loss's k3 estimate: 0 at step 1 (policy = reference), ≥ 0 after."""
    seen = _spy_rloo(monkeypatch)
    monkeypatch.setattr(grpo, "_policy_logps", lambda *a: (_ for _ in ()).throw(
        AssertionError("no π_old forward when the KL is in the loss")))
    history: list[dict] = []
    grpo.train(build_tiny_model(TINY, tokenizer), tokenizer, PROMPTS, PROMPTS[:4],
               _rloo_cfg(max_steps=4, beta=0.1, kl_placement="loss"),
               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
               log_metrics=lambda m, s: history.append(m))
    for scored, baselined in zip(seen["scored"], seen["baselined"]):
        assert torch.equal(scored, baselined)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(m["kl"] >= 0 for m in history) and history[-1]["kl"] > 0


def test_rloo_normalized_advantages_and_iterations_run(tokenizer):
    """normalize_advantages and μ = 2 passes with 2 micro-batches: finite losses; the second
    pass over a batch may clip, the first never does."""
    model = build_tiny_model(TINY, tokenizer)
    history: list[dict] = []
    grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4],
               _rloo_cfg(max_steps=4, normalize_advantages=True, num_iterations=2,
                         grad_accum=2, per_device_batch_size=16),
               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
               log_metrics=lambda m, s: history.append(m))
    assert len(history) == 4 and all(math.isfinite(m["loss"]) for m in history)
    assert history[0]["clip_ratio/region_mean"] == 0.0 == history[2]["clip_ratio/region_mean"]


def test_rloo_config_defaults_and_checks():
    """TRL's RLOOConfig defaults: k = 2, β = 0.05 with the KL in the reward, ε = 0.2, no advantage
    normalization, learning rate 1e-6; batches hold whole groups; k ≥ 2."""
    cfg = RLOOConfig()
    assert (cfg.num_generations, cfg.beta, cfg.kl_placement, cfg.epsilon, cfg.epsilon_high,
            cfg.normalize_advantages, cfg.learning_rate) == (2, 0.05, "reward", 0.2, None,
                                                             False, 1e-6)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        RLOOConfig(per_device_batch_size=9, num_generations=2)
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        RLOOConfig(num_generations=1)
    with pytest.raises(ValueError, match="kl_placement"):
        RLOOConfig(kl_placement="advantage")
    # like GRPO: a reward stage only with 'reward_model' among the functions, a reference only
    # with a KL term
    from posttrain.methods import uses_reference

    assert RLOOConfig(reward_functions={"reward_model": 1.0}).uses_reward_stage
    assert not RLOOConfig(reward_functions={"m:f": 1.0}).uses_reward_stage
    assert uses_reference(RLOOConfig()) and not uses_reference(RLOOConfig(beta=0.0))


def test_ppo_updates_policy_and_value_and_keeps_the_reward_model_frozen(tokenizer, tmp_path):
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 1}), tokenizer), tokenizer,
               tmp_path)
    reward_model = load_reward_model(tmp_path, new_head=True)
    value_model = load_reward_model(tmp_path, new_head=True)
    policy = build_tiny_model(TINY, tokenizer)
    frozen = [p.detach().clone() for p in reward_model.parameters()]
    policy_before = [p.detach().clone() for p in policy.parameters()]
    value_before = [p.detach().clone() for p in value_model.parameters()]
    history: list[dict] = []
    cfg = PPOConfig(max_steps=3, per_device_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
                    learning_rate=1e-3, warmup_steps=0, max_length=32, max_completion_length=6,
                    missing_eos_penalty=1.0, log_every=1)
    ppo.train(policy, value_model, reward_model, tokenizer, PROMPTS, cfg,
              log_metrics=lambda m, s: history.append(m))
    assert len(history) == 3
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward",
                "policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg"):
        assert math.isfinite(history[-1][key]), key
    # π = π_ref at the first rollout: the sampled tokens' KL estimate is exactly 0.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(value_before, value_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(frozen, reward_model.parameters()))


def test_ppo_values_read_the_positions_that_predict_completion_tokens(tokenizer, tmp_path):
    """token_values(...)[:, j] is V at position P + j - 1 of prompt + completion."""
    from posttrain.rollout import generate

    save_model(build_tiny_model(TINY, tokenizer), tokenizer, tmp_path)
    value_model = load_reward_model(tmp_path, new_head=True).eval()
    prompt = online_common.prepare_prompts(PROMPTS[:1], tokenizer, 16)[0]["prompt_ids"]
    rollout = generate(build_tiny_model(TINY, tokenizer), [prompt], max_new_tokens=4,
                       eos_token_ids={tokenizer.eos_token_id}, pad_token_id=0,
                       generator=torch.Generator().manual_seed(0))
    values = ppo.token_values(value_model, rollout)
    ids = torch.tensor([prompt + rollout.completion_ids[0].tolist()])
    hidden = value_model.base_model(input_ids=ids).last_hidden_state
    full = value_model.score(hidden).squeeze(-1)[0]
    n = int(rollout.completion_mask[0].sum())
    expected = full[len(prompt) - 1 : len(prompt) - 1 + n]
    assert torch.allclose(values[0, :n], expected, atol=1e-5)
