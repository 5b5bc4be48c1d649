"""GRPO and PPO recipe tests on the tiny model: rewards that move, parameters that change, no
reference model when β = 0, a frozen reward model, and config errors that fire."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import config as C
from posttrain.config import GRPOConfig, PPOConfig, TinyModelConfig
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import grpo, ppo
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
                "clip_ratio/region_mean", "loss", "grad_norm", "eval_reward"):
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
    prompt = grpo.prepare_prompts(PROMPTS[:1], tokenizer, 16)[0]["prompt_ids"]
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
