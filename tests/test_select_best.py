"""Evaluation during training of the online methods (GRPO, RLOO, online DPO, PPO): eval/...
metrics at the eval_every steps under their names, evaluation reward functions and the
checker; `select_best` keeps the best evaluated step's weights (not the last step's), records
the step, survives a resume, and is refused when the stage would never log its metric."""

from __future__ import annotations

import pytest
import torch

from posttrain.best import BestState
from posttrain.config import GRPOConfig, OnlineDPOConfig, PPOConfig, TinyModelConfig
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import grpo, online_common, online_dpo, ppo
from posttrain.rewards import load_reward_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
PROMPTS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "task": "add"}
           for a in range(4) for b in range(4)]


def sevens(prompts, completions, **_):
    texts = [c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


def quarter(prompts, completions, **_):
    return [0.25] * len(prompts)


def _grpo_cfg(**kw) -> GRPOConfig:
    base = {"max_steps": 8, "per_device_batch_size": 16, "num_generations": 4,
            "learning_rate": 3e-3, "warmup_steps": 0, "max_length": 32,
            "max_completion_length": 5, "eval_every": 2, "log_every": 1000,
            "reward_functions": {"tests.test_select_best:sevens": 1.0}}
    return GRPOConfig(**{**base, **kw})


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _scripted(monkeypatch, values: list[float], metric: str = "eval/reward"):
    """evaluate_held_out returning `values` in turn (one per evaluation), for GRPO, RLOO,
    online DPO and PPO (they all evaluate through online_common.evaluate_due)."""
    calls = iter(values)
    monkeypatch.setattr(online_common, "evaluate_held_out",
                        lambda *a, **k: {metric: next(calls), "eval/completions/mean_length": 1.0})


def _logger(model, history, snapshots):
    def log(metrics, step):
        history.append((step, dict(metrics)))
        snapshots[step] = _weights(model)
    return log


def test_grpo_select_best_keeps_the_best_evaluated_step_not_the_last(tokenizer, monkeypatch):
    _scripted(monkeypatch, [0.1, 0.7, 0.3, 0.2])  # steps 2, 4, 6, 8: the best is step 4
    model = build_tiny_model(TINY, tokenizer)
    history, snapshots = [], {}
    final = grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4],
                       _grpo_cfg(select_best="eval/reward"), reward_fns={"sevens": sevens},
                       weights={"sevens": 1.0}, log_metrics=_logger(model, history, snapshots))
    assert [s for s, _ in history] == [2, 4, 6, 8]  # log_every 1000: the evaluated steps
    assert final["best_step"] == 4 and final["best/eval/reward"] == 0.7
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[4]))
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[8]))


def test_without_select_best_the_last_step_stays(tokenizer, monkeypatch):
    _scripted(monkeypatch, [0.1, 0.7, 0.3, 0.2])
    model = build_tiny_model(TINY, tokenizer)
    history, snapshots = [], {}
    final = grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4], _grpo_cfg(),
                       reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
                       log_metrics=_logger(model, history, snapshots))
    assert "best_step" not in final
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[8]))


def test_eval_metrics_at_the_eval_every_steps_with_eval_functions_and_checker(tokenizer):
    """Real greedy evaluation: eval/... only at steps 2 and 4 (and the last), scored by the
    evaluation's own functions (not the training one) with their weights, and the checker."""
    model = build_tiny_model(TINY, tokenizer)
    history, snapshots = [], {}
    seen = []

    def checker(prompt, text):
        seen.append((prompt, text))
        return prompt[0]["content"] == "0+0="  # one of the 2 held-out prompts

    grpo.train(model, tokenizer, PROMPTS, PROMPTS[:2], _grpo_cfg(max_steps=5, log_every=1),
               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
               eval_reward_fns={"quarter": quarter}, eval_weights={"quarter": 2.0},
               checker=checker, log_metrics=_logger(model, history, snapshots))
    evaluated = [s for s, m in history if "eval/reward" in m]
    assert evaluated == [2, 4, 5]
    names = {"eval/reward", "eval/rewards/quarter/mean", "eval/checker_accuracy",
             "eval/completions/mean_length", "eval/completions/clipped_ratio"}
    for step, m in history:
        assert names <= set(m) if step in evaluated else not names & set(m), (step, m)
        if step in evaluated:
            assert m["eval/reward"] == pytest.approx(0.5)  # 2 x 0.25
            assert m["eval/rewards/quarter/mean"] == pytest.approx(0.25)
            assert m["eval/checker_accuracy"] == 0.5
            assert 1 <= m["eval/completions/mean_length"] <= 5
            assert "eval/rewards/sevens/mean" not in m
    assert len(seen) == 2 * 3  # both held-out prompts at each of the 3 evaluations


def test_max_eval_rows_bounds_the_evaluation(tokenizer):
    model = build_tiny_model(TINY, tokenizer)
    seen = []
    grpo.train(model, tokenizer, PROMPTS, PROMPTS, _grpo_cfg(max_steps=2, max_eval_rows=3),
               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
               checker=lambda p, t: seen.append(p) or True)
    assert len(seen) == 3  # one evaluation (step 2), of the first 3 held-out prompts
    assert seen == [r["prompt"] for r in PROMPTS[:3]]


def test_online_dpo_select_best_min(tokenizer, monkeypatch):
    _scripted(monkeypatch, [0.4, 0.3, 0.1, 0.2], metric="eval/completions/clipped_ratio")
    model = build_tiny_model(TINY, tokenizer)
    history, snapshots = [], {}
    cfg = OnlineDPOConfig(max_steps=8, per_device_batch_size=4, learning_rate=3e-3,
                          warmup_steps=0, max_length=32, max_completion_length=5, eval_every=2,
                          log_every=1000, reward_functions={"tests.test_select_best:sevens": 1},
                          select_best="eval/completions/clipped_ratio")
    assert cfg.best_mode == "min"
    final = online_dpo.train(model, tokenizer, PROMPTS, PROMPTS[:2], cfg,
                             reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
                             log_metrics=_logger(model, history, snapshots))
    assert final["best_step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[6]))


def test_ppo_evaluates_with_its_reward_model_and_selects_the_best_step(tokenizer, tmp_path):
    """PPO's evaluation by default: the reward model's score of greedy completions; the saved
    policy is the one of the evaluated step with the highest eval/reward (the real one)."""
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 1}), tokenizer), tokenizer,
               tmp_path)
    policy = build_tiny_model(TINY, tokenizer)
    history, snapshots = [], {}
    cfg = PPOConfig(max_steps=6, per_device_batch_size=4, num_mini_batches=2, num_ppo_epochs=2,
                    learning_rate=1e-2, warmup_steps=0, max_length=32, max_completion_length=5,
                    eval_every=1, log_every=1000, select_best="eval/reward")
    final = ppo.train(policy, load_reward_model(tmp_path, new_head=True),
                      load_reward_model(tmp_path, new_head=True), tokenizer, PROMPTS, cfg,
                      eval_prompts=PROMPTS[:4], log_metrics=_logger(policy, history, snapshots))
    assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6]
    for _, m in history:
        assert m["eval/reward"] == pytest.approx(m["eval/rewards/reward_model/mean"])
    rewards = {s: m["eval/reward"] for s, m in history}
    best = max(rewards, key=lambda s: (rewards[s], -s))  # the first of equal bests
    assert final["best_step"] == best and final["best/eval/reward"] == rewards[best]
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), snapshots[best]))


def test_best_state_copies_only_trainable_parameters_and_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # as a LoRA base: frozen, never copied
    best = BestState(model, "eval/reward", "max")
    assert not best.update({"eval/loss": 1.0}, 1) and best.step is None  # not evaluated
    assert best.update({"eval/reward": 0.5}, 2)
    assert set(best.weights) == {"1.weight", "1.bias"}
    assert not best.update({"eval/reward": 0.5}, 3)  # a tie keeps the earlier step
    assert not best.update({"eval/reward": float("nan")}, 4)
    kept = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    other = BestState(model, "eval/reward", "max")
    other.load_state_dict(best.state_dict())
    assert other.restore() == 2 and torch.equal(model[1].weight, kept)
    with pytest.raises(ValueError, match="checkpoint selects"):
        BestState(model, "eval/reward", "min").load_state_dict(best.state_dict())


def test_best_state_of_a_lora_policy_copies_the_adapter_only(tokenizer):
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    policy = apply_lora(build_tiny_model(TINY, tokenizer), LoraConfig(r=4, alpha=8))
    best = BestState(policy, "eval/reward", "max")
    best.update({"eval/reward": 1.0}, 1)
    assert best.weights and all("lora_" in name for name in best.weights)
    assert len(best.weights) == sum(p.requires_grad for p in policy.parameters())


# --------------------------------------------------------------------- config and preflight


def test_select_best_must_be_a_metric_the_stage_logs():
    with pytest.raises(ValueError, match="select_best: 'eval_loss' is not a metric"):
        GRPOConfig(reward_functions={"m:f": 1.0}, select_best="eval_loss")
    with pytest.raises(ValueError, match="select_best: 'eval/rewards/g/mean'"):
        GRPOConfig(reward_functions={"m:f": 1.0}, select_best="eval/rewards/g/mean")
    assert GRPOConfig(reward_functions={"m:f": 1.0},
                      select_best="eval/rewards/f/mean").best_mode == "max"
    # the evaluation's own functions name the metrics when given
    cfg = GRPOConfig(reward_functions={"m:f": 1.0}, eval_reward_functions={"pkg.mod.g": 1.0},
                     select_best="eval/rewards/g/mean")
    assert cfg.eval_functions() == {"pkg.mod.g": 1.0}
    with pytest.raises(ValueError, match="select_best_mode"):
        GRPOConfig(reward_functions={"m:f": 1.0}, select_best="eval/completions/mean_length")
    assert GRPOConfig(reward_functions={"m:f": 1.0}, select_best="eval/completions/mean_length",
                      select_best_mode="min").best_mode == "min"
    assert PPOConfig(select_best="eval/rewards/reward_model/mean").best_mode == "max"
    with pytest.raises(ValueError, match="select_best"):
        PPOConfig(select_best="eval/rewards/f/mean")
    # a reward model among the evaluation's functions needs the reward stage
    assert GRPOConfig(reward_functions={"m:f": 1.0},
                      eval_reward_functions={"reward_model": 1.0}).uses_reward_stage


def test_stage_refuses_select_best_it_cannot_evaluate():
    from posttrain.stages.online import check_select_best

    cfg = GRPOConfig(name="grpo", data="demo", reward_functions={"m:f": 1.0},
                     select_best="eval/checker_accuracy")
    with pytest.raises(ValueError, match="no checker"):
        check_select_best(cfg, PROMPTS, None)
    with pytest.raises(ValueError, match="needs held-out prompts"):
        check_select_best(cfg, [], lambda p, t: True)
    check_select_best(cfg, PROMPTS, lambda p, t: True)
    check_select_best(GRPOConfig(name="grpo", reward_functions={"m:f": 1.0}), [], None)


# ----------------------------------------------------------------------------- as a stage


@pytest.mark.slow
def test_grpo_stage_logs_eval_metrics_and_records_the_best_step(tmp_path):
    """A GRPO stage on the demo prompts (which have the checker) logs eval/... at its
    evaluated steps in its MLflow run and records the selected step in its manifest and as
    the run's best_step tag; the artifact is saved from the restored weights."""
    from posttrain import stages, tracking
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

    values = tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("grpo", max_steps=3, eval_every=1, max_eval_rows=8,
                         select_best="eval/checker_accuracy",
                         eval_reward_functions={"posttrain.reward_functions:demo_checker": 2.0})],
        evaluate={"enabled": False})
    manifests = stages.run_all(validate(PipelineConfig, values))
    m = manifests["grpo"]
    chosen = m["select_best"]
    assert chosen["metric"] == "eval/checker_accuracy" and chosen["mode"] == "max"
    assert chosen["step"] in (1, 2, 3) and m["metrics"]["best_step"] == chosen["step"]
    client = tracking.client()
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.tags["best_step"] == str(chosen["step"])
    history = client.get_metric_history(run.info.run_id, "eval/checker_accuracy")
    assert sorted(h.step for h in history) == [1, 2, 3]
    best = max(history, key=lambda h: (h.value, -h.step))
    assert best.step == chosen["step"] and chosen["value"] == pytest.approx(best.value)
    for name in ("eval/reward", "eval/rewards/demo_checker/mean",
                 "eval/completions/mean_length"):
        assert name in run.data.metrics, name
    # the evaluation's own function, weight 2: the checker's reward function agrees with the
    # data's checker on every evaluated step
    rewards = {h.step: h.value for h in client.get_metric_history(run.info.run_id,
                                                                  "eval/reward")}
    assert rewards == pytest.approx({h.step: 2 * h.value for h in history})


def test_recipes_refuse_select_best_with_nothing_to_evaluate(tokenizer):
    """Before any step: no held-out prompts, or eval/checker_accuracy without a checker."""
    model = build_tiny_model(TINY, tokenizer)
    before = _weights(model)
    with pytest.raises(ValueError, match="select_best: eval/reward needs held-out prompts"):
        grpo.train(model, tokenizer, PROMPTS, [], _grpo_cfg(select_best="eval/reward"),
                   reward_fns={"sevens": sevens}, weights={"sevens": 1.0})
    with pytest.raises(ValueError, match="eval/checker_accuracy needs a checker"):
        grpo.train(model, tokenizer, PROMPTS, PROMPTS[:2],
                   _grpo_cfg(select_best="eval/checker_accuracy"),
                   reward_fns={"sevens": sevens}, weights={"sevens": 1.0})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_ppo_stage_evaluates_with_its_reward_stage_and_selects(tmp_path):
    """PPO as a stage: held-out prompts of its source scored by the reward stage's model
    (eval/rewards/reward_model/mean) and the data's checker, the selected step recorded."""
    from posttrain import stages, tracking
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

    values = tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("reward", max_steps=4),
        stage("ppo", max_steps=3, eval_every=1, max_eval_rows=6, select_best="eval/reward")],
        evaluate={"enabled": False})
    m = stages.run_all(validate(PipelineConfig, values))["ppo"]
    run = tracking.client().get_run(m["mlflow_run_id"])
    history = {h.step: h.value for h in tracking.client().get_metric_history(
        run.info.run_id, "eval/reward")}
    assert sorted(history) == [1, 2, 3]
    assert "eval/checker_accuracy" in run.data.metrics
    assert "eval/rewards/reward_model/mean" in run.data.metrics
    best = max(history, key=lambda s: (history[s], -s))
    assert m["select_best"]["step"] == best == int(run.data.tags["best_step"])
