"""The switches that make a method behave as TRL does where our default differs (issue 18,
item 6): each setting does what its description says, with hand-computed numbers where the loss
changes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import (
    ConfigError,
    DemoTaskConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ORPOConfig,
    PipelineConfig,
    RewardConfig,
    RLOOConfig,
    TinyModelConfig,
    validate,
)
from posttrain.data import demo
from posttrain.data.preference import collate_pairs, tokenize_preference_rows
from posttrain.logprobs import SelectedLogits, sequence_logps
from posttrain.losses.dpo import dpo_loss
from posttrain.losses.grpo import grpo_loss
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import grpo as grpo_recipe
from posttrain.recipes import kto, preference
from posttrain.rewards import load_reward_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = demo.generate_preference(DemoTaskConfig(num_train=40, num_eval=4), 0, "train")
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=48)
    return collate_pairs(pairs[:4], tokenizer.pad_token_id)


# ------------------------------------------------------------------ reward model head init


@pytest.mark.parametrize("head_init", ["scaled", "transformers"])
def test_reward_head_init(tmp_path, tokenizer, head_init):
    save_model(build_tiny_model(TINY, tokenizer), tokenizer, tmp_path)
    model = load_reward_model(tmp_path, new_head=True, seed=7, head_init=head_init)
    std = (model.config.initializer_range if head_init == "transformers"
           else 1.0 / math.sqrt(TINY.hidden_size + 1))
    assert model.config.initializer_range == 0.02
    expected = torch.empty_like(model.score.weight)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        torch.nn.init.normal_(expected, std=std)
    assert torch.equal(model.score.weight, expected)  # exactly the seeded draw of that std


def test_reward_head_init_default_and_refusal(tmp_path, tokenizer):
    assert RewardConfig(name="rm").head_init == "scaled"
    save_model(build_tiny_model(TINY, tokenizer), tokenizer, tmp_path)
    with pytest.raises(ValueError, match="head_init"):
        load_reward_model(tmp_path, new_head=True, head_init="xavier")


# --------------------------------------------------------------------------- ORPO NLL tokens


def _full_token_logps(lm, batch):
    """Reference computation: a full log-softmax over every position, (2B, T-1)."""
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("nll_tokens", ["completion", "prompt_and_completion"])
def test_orpo_nll_tokens(tokenizer, batch, nll_tokens):
    lm = build_tiny_model(TINY, tokenizer).eval()
    net = SelectedLogits(lm)
    config = ORPOConfig(name="orpo", nll_tokens=nll_tokens)
    captured = {}
    real = preference.orpo_loss

    def spy(avg_c, avg_r, nll, *, beta):
        captured.update(avg_c=avg_c, avg_r=avg_r, nll=nll)
        return real(avg_c, avg_r, nll, beta=beta)

    with torch.no_grad():
        preference.orpo_loss = spy
        try:
            preference._orpo_terms(net, batch, config)
        finally:
            preference.orpo_loss = real
        per_token = _full_token_logps(lm, batch)
    attn, comp = batch["attention_mask"], batch["completion_mask"]
    half = attn.shape[0] // 2
    both_real = (attn[:, 1:] * attn[:, :-1]).float()  # token t+1 real and predicted from real t
    tokens = both_real if nll_tokens == "prompt_and_completion" else comp[:, 1:].float()
    expected_nll = -(per_token * tokens)[:half].sum() / tokens[:half].sum()
    assert float(captured["nll"]) == pytest.approx(float(expected_nll), rel=1e-5)
    # The preference term's averages are over completion tokens in both settings.
    avg, _ = sequence_logps(lm, batch["input_ids"], attn, comp, average=True)
    torch.testing.assert_close(captured["avg_c"], avg[:half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured["avg_r"], avg[half:], rtol=1e-5, atol=1e-5)
    if nll_tokens == "prompt_and_completion":  # the prompt tokens really are in there
        assert tokens[:half].sum() > 2 * comp[:, 1:][:half].sum()


# --------------------------------------------------------------------------- KTO partners


def _examples(n):
    return [{"prompt_ids": [i], "completion_ids": [100 + i], "label": True} for i in range(n)]


@pytest.mark.parametrize(("chunk", "partners"), [
    (2, [1, 0, 3, 2, 4]),  # the one-row last chunk pairs its row with itself, as TRL's map
    (3, [2, 0, 1, 4, 3]),
    (5, [4, 0, 1, 2, 3]),
])
def test_kto_rotate_partners(chunk, partners):
    out = kto.assign_partners(_examples(5), seed=0, mode="rotate", chunk=chunk)
    assert [ex["kl_completion_ids"] for ex in out] == [[100 + p] for p in partners]


def test_kto_shuffle_partners_is_the_default_derangement():
    assert KTOConfig(name="kto").kl_partners == "shuffle"
    out = kto.assign_partners(_examples(5), seed=3)
    assert out == kto.assign_partners(_examples(5), seed=3, mode="shuffle", chunk=2)
    assert all(ex["kl_completion_ids"] != ex["completion_ids"] for ex in out)
    with pytest.raises(ValueError, match="kl_partners"):
        kto.assign_partners(_examples(5), seed=0, mode="random")


# --------------------------------------------------------------------------------- GRPO


def _one_token(use_bias_correction_kl):
    logps = torch.tensor([[-1.0]], requires_grad=True)
    loss, m = grpo_loss(logps, torch.tensor([[-1.1]]), torch.tensor([1.0]), torch.ones(1, 1),
                        beta=0.1, ref_logps=torch.tensor([[-1.2]]),
                        use_bias_correction_kl=use_bias_correction_kl)
    loss.backward()
    return float(loss.detach()), float(m["kl"]), float(logps.grad)


def test_grpo_bias_correction_kl_hand_computed():
    rho, k3 = math.exp(0.1), math.exp(-0.2) + 0.2 - 1.0  # ratio e^{-1.0+1.1}; KL_t at delta -0.2
    loss, kl, grad = _one_token(False)
    assert loss == pytest.approx(-rho + 0.1 * k3, abs=1e-6)  # -1.103298
    assert kl == pytest.approx(k3, abs=1e-7)
    dk3 = 1.0 - math.exp(-0.2)  # d KL_t / d log pi
    assert grad == pytest.approx(-rho + 0.1 * dk3, abs=1e-6)
    loss, kl, grad = _one_token(True)
    assert loss == pytest.approx(-rho + 0.1 * rho * k3, abs=1e-6)  # -1.103101
    assert kl == pytest.approx(rho * k3, abs=1e-7)  # logged as TRL logs it: the weighted one
    assert grad == pytest.approx(-rho + 0.1 * (rho * k3 + rho * dk3), abs=1e-6)


def test_grpo_defaults_keep_ours():
    c = GRPOConfig(name="grpo", per_device_batch_size=8)
    assert (c.loss_type, c.use_bias_correction_kl, c.mask_truncated_completions) == \
        ("grpo", False, False)
    assert RLOOConfig(name="rloo", per_device_batch_size=8).mask_truncated_completions is False


@pytest.mark.parametrize("on", [False, True])
def test_mask_truncated_completions(on):
    rollout = SimpleNamespace(model_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]]),
                              truncated=torch.tensor([False, True, False]))
    config = GRPOConfig(name="grpo", per_device_batch_size=8, mask_truncated_completions=on)
    mask = grpo_recipe.loss_mask(rollout, config)
    second = [0, 0, 0] if on else [1, 1, 1]
    assert mask.tolist() == [[1, 1, 0], second, [1, 1, 1]]
    # dapo: the sum over the kept tokens / their count. Per-token losses 1..9, advantage -1,
    # ratio 1: loss_t = 1 each, so the loss is 1 either way but the token count is 5 or 8.
    logps = torch.zeros(3, 3)
    loss, _ = grpo_loss(logps, logps, -torch.ones(3), mask, loss_type="dapo",
                        num_items_in_batch=float(mask.sum()))
    assert float(loss) == pytest.approx(1.0)
    adv = torch.tensor([1.0, 5.0, 1.0])  # the truncated row's large advantage is dropped
    loss, _ = grpo_loss(logps, logps, adv, mask, loss_type="dapo",
                        num_items_in_batch=float(mask.sum()))
    assert float(loss) == pytest.approx(-1.0 if on else -(2 + 15 + 3) / 8)


# ---------------------------------------------------------------------------------- IPO


@pytest.mark.parametrize("summed", [False, True])
def test_ipo_metrics_hand_computed(summed):
    # chosen: policy -4 vs reference -5 over 2 tokens; rejected: -9 vs -8 over 3 tokens.
    loss, m = dpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-5.0]),
                       torch.tensor([-8.0]), beta=0.1, loss_type="ipo",
                       chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]),
                       summed_rewards=summed)
    assert float(loss) == pytest.approx((0.5 + 1 / 3 - 5.0) ** 2, rel=1e-6)  # 17.3611, both
    chosen, rejected = (0.1, -0.1) if summed else (0.05, -0.1 / 3)
    assert float(m["rewards/chosen"]) == pytest.approx(chosen, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(rejected, rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(chosen - rejected, rel=1e-6)


def test_ipo_metrics_in_the_recipe(tokenizer, batch):
    """Same loss, metrics from summed (TRL) or averaged (ours) log-probs."""
    torch.manual_seed(0)
    net = SelectedLogits(build_tiny_model(TINY, tokenizer).eval())
    policy = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, seed=1),
                              tokenizer).eval()
    reference = lambda fn: fn(SelectedLogits(policy))
    out = {}
    with torch.no_grad():
        for mode in ("averaged", "summed"):
            config = DPOConfig(name="dpo", loss_type="ipo", ipo_metrics=mode)
            out[mode] = preference._dpo_terms(net, batch, config, reference)
        sums, counts = sequence_logps(net, batch["input_ids"], batch["attention_mask"],
                                      batch["completion_mask"])
    assert float(out["summed"][0]) == pytest.approx(float(out["averaged"][0]), rel=1e-5)
    half = sums.shape[0] // 2
    assert float(out["summed"][1]["logps/chosen"]) == pytest.approx(
        float(sums[:half].mean()), rel=1e-5)
    assert float(out["averaged"][1]["logps/chosen"]) == pytest.approx(
        float((sums[:half] / counts[:half]).mean()), rel=1e-5)
    assert DPOConfig(name="dpo").ipo_metrics == "averaged"


# ---------------------------------------------------------------------------------- PPO


def test_ppo_refuses_grad_accum(tmp_path):
    from tests.conftest import stage, tiny_pipeline_values

    stages = [{"name": "sft", "method": "sft", "data": "sft"},
              stage("reward"), stage("ppo", grad_accum=2)]
    with pytest.raises(ConfigError) as err:
        validate(PipelineConfig, tiny_pipeline_values(tmp_path, stages))
    assert "stages.ppo.grad_accum" in str(err.value)
    assert "does not accumulate" in str(err.value)
    validate(PipelineConfig, tiny_pipeline_values(tmp_path, stages[:2] + [stage("ppo")]))


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_rl_switches_run_in_the_recipe(tokenizer, method, on):
    """GRPO (bias-corrected KL, dapo) and RLOO with mask_truncated_completions off and on. No
    completion of the untrained model stops within 3 tokens, so with the switch on every one is
    masked: the loss is 0 and nothing moves (gradient norm exactly 0); off, they train."""
    prompts = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4)
               for b in range(4)]

    def sevens(prompts, completions, **_):  # varies between any two different completions
        return [float(sum(map(ord, c[0]["content"])) % 7) for c in completions]

    seen = []
    real = grpo_recipe.loss_mask

    def spy(rollout, config):
        mask = real(rollout, config)
        seen.append((rollout.truncated.clone(), mask.clone()))
        return mask

    extra = {"use_bias_correction_kl": True, "loss_type": "dapo"} if method == "grpo" else {}
    cls = GRPOConfig if method == "grpo" else RLOOConfig
    cfg = cls(max_steps=3, per_device_batch_size=8, num_generations=4, learning_rate=1e-3,
              warmup_steps=0, max_length=32, max_completion_length=3, eval_every=100,
              log_every=1, beta=0.1, mask_truncated_completions=on, **extra)
    history = []
    try:
        grpo_recipe.loss_mask = spy
        grpo_recipe.train(build_tiny_model(TINY, tokenizer), tokenizer, prompts, prompts[:2],
                          cfg, reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
                          log_metrics=lambda m, s: history.append(m))
    finally:
        grpo_recipe.loss_mask = real
    assert len(history) == 3 and all(math.isfinite(m["loss"]) for m in history)
    assert all(truncated.all() for truncated, _ in seen)  # the premise
    if on:
        assert all(mask.sum() == 0 for _, mask in seen)
        # (RLOO's masked rows keep ratio 1 and loss -A, whose mean over a group is 0)
        assert all(abs(m["loss"]) < 1e-6 and m["grad_norm"] == 0.0 for m in history)
    else:
        assert all(mask.sum() == mask.numel() for _, mask in seen)
        assert all(m["grad_norm"] > 0.0 for m in history)
