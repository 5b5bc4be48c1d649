"""On-policy, GRPO's and PPO's first importance ratio is exactly 1, in fp32 and in bf16 autocast,
with a model that has dropout (attention dropout 0.1 and LoRA dropout 0.1): π_old is the training
forward's own detached log-prob (GRPO) or a no-gradient pass of the same training forward (PPO),
not the log-probs recorded while sampling (eval mode, no autocast), and dropout is off in the
policy and the value model for the whole run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import GRPOConfig, LoraConfig, PPOConfig, TinyModelConfig
from posttrain.models import apply_lora, build_tiny_model, save_model
from posttrain.recipes import grpo, ppo
from posttrain.rewards import load_reward_model
from posttrain.training import make_accelerator

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
PROMPTS = [{"prompt": f"{a}+{b}="} for a in range(3) for b in range(3)]
PRECISIONS = ["no", "bf16"]  # bf16: CPU autocast, where sampling and training forwards differ


def _with_dropout(tokenizer, seed: int = 0) -> torch.nn.Module:
    """The tiny Qwen2 with attention_dropout 0.1 (read by the attention in training mode)."""
    config = build_tiny_model(TINY, tokenizer).config
    config.attention_dropout = 0.1
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _dropout_is_off(model: torch.nn.Module) -> bool:
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    return len(rates) > 0 and all(r == 0.0 for r in rates)


def _spy(monkeypatch, module, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(new, old) of every call of the loss `name`: log-probs (policy) or values."""
    calls = []
    real = getattr(module, name)

    def spy(new, old, *args, **kwargs):
        calls.append((new.detach().clone(), old.detach().clone()))
        return real(new, old, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def accelerator_for(monkeypatch):
    """make_accelerator(precision) in a fresh accelerate state (one process keeps one mixed
    precision setting otherwise), reset again afterwards for the tests that follow."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield make_accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def _spread(prompts, completions, **kwargs):
    """A reward that differs between random completions, so advantages are not all 0."""
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grpo_first_pass_ratio_is_exactly_one(tokenizer, monkeypatch, accelerator_for,
                                                precision):
    """Two iterations (μ = 2) over one generation batch of 2 micro-batches: on the first pass
    new == old bit for bit (ratio 1, nothing clipped); the second pass's π_old is the first
    pass's log-probs, and the policy has moved in between."""
    policy = apply_lora(_with_dropout(tokenizer), LoraConfig(r=4, alpha=8, dropout=0.1))
    calls = _spy(monkeypatch, grpo, "grpo_loss")
    history: list[dict] = []
    cfg = GRPOConfig(max_steps=2, num_iterations=2, per_device_batch_size=4, grad_accum=2,
                     num_generations=2, learning_rate=1e-2, warmup_steps=0, max_length=24,
                     max_completion_length=4, eval_every=100, log_every=1)
    grpo.train(policy, tokenizer, PROMPTS, PROMPTS[:2], cfg, reward_fns={"spread": _spread},
               weights={"spread": 1.0}, accelerator=accelerator_for(precision),
               log_metrics=lambda m, s: history.append(dict(m)))
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    for new, old in calls[:2]:
        assert torch.equal(torch.exp(new - old), torch.ones_like(new))
    assert history[0]["clip_ratio/region_mean"] == 0.0
    for (new, _), (_, old) in zip(calls[:2], calls[2:]):
        assert torch.equal(old, new)  # π_old fixed across the iterations
    assert not torch.equal(calls[2][0], calls[2][1])  # an update happened: ratio != 1 now
    assert _dropout_is_off(policy)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ppo_first_update_sees_ratio_one_and_the_old_values(tokenizer, monkeypatch, tmp_path,
                                                           accelerator_for, precision):
    """One minibatch, two PPO epochs: the first update's log-probs and values equal π_old and
    V_old bit for bit (ratio 1, value clip inactive); the second epoch's do not (it trained).
    Dropout is off in the policy and in the value model."""
    save_model(_with_dropout(tokenizer, seed=1), tokenizer, tmp_path)
    value_model = load_reward_model(tmp_path, new_head=True)
    assert value_model.config.attention_dropout == 0.1
    policy = _with_dropout(tokenizer)
    logps = _spy(monkeypatch, ppo, "ppo_policy_loss")
    values = _spy(monkeypatch, ppo, "ppo_value_loss")
    cfg = PPOConfig(max_steps=1, per_device_batch_size=4, num_ppo_epochs=2, learning_rate=1e-2,
                    warmup_steps=0, max_length=24, max_completion_length=4, log_every=1)
    ppo.train(policy, value_model, load_reward_model(tmp_path), tokenizer, PROMPTS, cfg,
              accelerator=accelerator_for(precision))
    assert len(logps) == len(values) == 2
    new, old = logps[0]
    assert torch.equal(torch.exp(new - old), torch.ones_like(new))
    assert torch.equal(values[0][0], values[0][1])
    assert not torch.equal(*logps[1]) and not torch.equal(*values[1])
    assert _dropout_is_off(policy) and _dropout_is_off(value_model)
