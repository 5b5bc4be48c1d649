"""Online DPO: the ranking and the loss by hand, and the recipe on the tiny model (metrics
logged under TRL's names, parameters that change, the chosen completion is the higher-reward
one, the reward rises)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import OnlineDPOConfig, TinyModelConfig
from posttrain.losses import online_dpo as loss_module
from posttrain.losses.online_dpo import online_dpo_loss, rank_pairs
from posttrain.methods import METHODS, uses_reference
from posttrain.models import build_tiny_model
from posttrain.recipes import online_dpo

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
PROMPTS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "task": "add"}
           for a in range(4) for b in range(4)]


def sevens(prompts, completions, **columns):
    """Share of '7' characters (random completions differ in it)."""
    assert columns["task"] == ["add"] * len(prompts)  # dataset columns reach the function
    texts = [c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


def test_rank_pairs_higher_reward_is_chosen_and_a_tie_keeps_the_first():
    chosen, rejected = rank_pairs(torch.tensor([1.0, 2.0, 3.0, 3.0, 0.0, -1.0]))
    assert chosen.tolist() == [1, 2, 4]
    assert rejected.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="pairs"):
        rank_pairs(torch.tensor([1.0, 2.0, 3.0]))


def _one_pair(loss_type):
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    ref = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # row 1 has one token: its -0.5 at t=1 is padding
    return online_dpo_loss(logps, ref, mask, torch.tensor([0.0, 1.0]), beta=0.1,
                           loss_type=loss_type)


def test_online_dpo_loss_hand_computed():
    # Row 1 (reward 1) is chosen: log-ratio -0.5 - (-1) = 0.5; row 0 rejected: log-ratio 0.
    loss, m = _one_pair("sigmoid")
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.1 * 0.5)), abs=1e-6)  # 0.66846
    expected = {"rewards/chosen": 0.05, "rewards/rejected": 0.0, "rewards/margins": 0.05,
                "rewards/accuracies": 1.0, "logps/chosen": -0.5, "logps/rejected": -3.0,
                "objective/scores": 0.5, "objective/scores_margin": 1.0,
                "objective/kl": 0.25, "objective/non_score_reward": -0.025,
                "objective/rlhf_reward": (0.0 + 1.0 - 0.1 * 0.5) / 2,
                "objective/entropy": (3.0 + 0.5) / 2, "beta": 0.1}
    for key, value in expected.items():
        assert float(m[key]) == pytest.approx(value, abs=1e-6), key
    # IPO on per-token averaged log-ratios: chosen 0.5 / 1 token, rejected 0 / 2 tokens.
    loss, m = _one_pair("ipo")
    assert float(loss) == pytest.approx((0.5 - 1 / (2 * 0.1)) ** 2, abs=1e-5)  # 20.25
    assert float(m["rewards/chosen"]) == pytest.approx(0.05, abs=1e-6)  # summed, as TRL logs


def test_online_dpo_in_the_method_table():
    m = METHODS["online_dpo"]
    assert (m.config, m.reference, m.generates, m.unit) == (OnlineDPOConfig, True, True,
                                                            "pairs")
    c = OnlineDPOConfig(reward_functions={"reward_model": 1.0})
    assert c.name == "online_dpo" and c.uses_reward_stage and uses_reference(c)
    # TRL's OnlineDPOConfig defaults
    assert (c.learning_rate, c.beta, c.temperature, c.max_completion_length, c.loss_type) == \
        (5e-7, 0.1, 0.9, 64, "sigmoid")
    assert not OnlineDPOConfig(reward_functions={"a.b:c": 1.0}).uses_reward_stage


def test_online_dpo_recipe_trains_on_ranked_fresh_pairs(tokenizer, monkeypatch):
    seen = []
    real_loss, real_dpo = online_dpo.online_dpo_loss, loss_module.dpo_loss

    def loss_spy(logps, ref_logps, mask, rewards, **kw):
        seen.append({"logps": logps.detach(), "mask": mask, "rewards": rewards})
        return real_loss(logps, ref_logps, mask, rewards, **kw)

    def dpo_spy(chosen, rejected, *args, **kw):
        seen[-1]["chosen"], seen[-1]["rejected"] = chosen.detach(), rejected.detach()
        return real_dpo(chosen, rejected, *args, **kw)

    monkeypatch.setattr(online_dpo, "online_dpo_loss", loss_spy)
    monkeypatch.setattr(loss_module, "dpo_loss", dpo_spy)
    model = build_tiny_model(TINY, tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = OnlineDPOConfig(max_steps=24, per_device_batch_size=8, grad_accum=2,
                          learning_rate=3e-3, warmup_steps=0, max_length=32,
                          max_completion_length=6, eval_every=1000, log_every=1,
                          beta=0.1, temperature=1.0,
                          reward_functions={"tests.test_online_dpo:sevens": 1.0})
    history = []
    online_dpo.train(model, tokenizer, PROMPTS, PROMPTS[:4], cfg, reward_fns={"sevens": sevens},
                     weights={"sevens": 1.0}, log_metrics=lambda m, s: history.append(m))
    assert len(history) == 24 and len(seen) == 48  # two micro-batches of 8 pairs per step
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "objective/kl",
                "objective/scores", "objective/scores_margin", "objective/rlhf_reward",
                "objective/non_score_reward", "objective/entropy", "val/contain_eos_token",
                "beta", "grad_norm", "learning_rate", "eval/reward"):
        assert key in history[-1], key
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for s in seen:
        assert s["rewards"].shape == (16,) and s["logps"].shape[0] == 16  # 8 prompts x 2
        sums = (s["logps"] * s["mask"]).sum(-1).view(-1, 2)
        r = s["rewards"].view(-1, 2)
        first = r[:, 0] >= r[:, 1]
        torch.testing.assert_close(s["chosen"], torch.where(first, sums[:, 0], sums[:, 1]))
        torch.testing.assert_close(s["rejected"], torch.where(first, sums[:, 1], sums[:, 0]))
    assert all(m["objective/scores_margin"] >= 0 for m in history)


@pytest.mark.slow
def test_online_dpo_stage_ranks_with_a_reward_stage_and_is_evaluated(tmp_path):
    from posttrain import stages, tracking
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

    values = tiny_pipeline_values(tmp_path, [SFT_STAGE, stage("reward", start="sft"),
                                             stage("online_dpo", per_device_batch_size=4)])
    cfg = validate(PipelineConfig, values)
    manifests = stages.run_all(cfg)
    assert "online_dpo" in manifests["evaluate"]["comparison"]
    client = tracking.client()
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    run = runs["online_dpo"]
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "online_dpo"
    keys = {"loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "objective/scores", "objective/scores_margin", "objective/kl",
            "objective/rlhf_reward", "val/contain_eos_token", "rewards/reward_model/mean"}
    assert keys <= set(run.data.metrics), keys - set(run.data.metrics)


def test_online_dpo_resumes_exactly(tmp_path, tokenizer):
    """Killed after step 5 with checkpoints at 2 and 4, the rerun continues from step 4 on the
    uninterrupted run's loss curve (weights, optimizer, scheduler, sampling RNG, prompts)."""
    from tests.test_resume import _assert_resumed

    cfg = OnlineDPOConfig(max_steps=8, per_device_batch_size=4, learning_rate=3e-3,
                          warmup_steps=3, max_length=32, max_completion_length=5,
                          eval_every=100, log_every=1, checkpoint_every=2, temperature=1.0,
                          reward_functions={"tests.test_online_dpo:sevens": 1.0})

    def train(log, ckpt):
        online_dpo.train(build_tiny_model(TINY, tokenizer), tokenizer, PROMPTS, PROMPTS[:2],
                         cfg, reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
                         log_metrics=log, checkpoint_dir=ckpt)

    _assert_resumed(train, tmp_path)
