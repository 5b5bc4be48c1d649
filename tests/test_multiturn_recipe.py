"""GRPO and RLOO on multi-turn episodes (tiny model): the environment's reward rises, the
episode metrics and sample-episode tables are logged, and environment and reward-function
rewards add up."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import GRPOConfig, RLOOConfig, TinyModelConfig
from posttrain.environments import Environment, Step
from posttrain.models import build_tiny_model
from posttrain.multiturn import Episode
from posttrain.recipes import grpo, online_common
from posttrain.rollout import Rollout

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
PROMPTS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "task": "add"}
           for a in range(4) for b in range(4)]


class Sevens(Environment):
    """Two turns ("again" after the first); the reward, given at the end, is 1 when the model
    wrote a '7' in either turn (dense enough for a random tiny model to learn in seconds)."""

    def step(self, messages):
        said = [m["content"] for m in messages if m["role"] == "assistant"]
        if len(said) < 2:
            return Step([{"role": "user", "content": "again"}])
        return Step(done=True, reward=float(any("7" in t for t in said)))


def _train(tokenizer, cls, **kw):
    base = {"max_steps": 30, "per_device_batch_size": 32, "num_generations": 8,
            "learning_rate": 3e-3, "warmup_steps": 0, "max_length": 64,
            "max_completion_length": 8, "eval_every": 10, "log_every": 1,
            "environment": {"path": "tests.test_multiturn_recipe:Sevens", "max_turns": 2,
                            "max_episode_tokens": 40, "sample_episodes": 3}}
    cfg = cls(**{**base, **kw})
    model = build_tiny_model(TINY, tokenizer)
    # The random model would hardly ever write its stop token: a few letters stop turns too.
    stops = tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]
    history, tables = [], []
    final = grpo.train(model, tokenizer, PROMPTS, PROMPTS[:4], cfg, reward_fns={}, weights={},
                       log_metrics=lambda m, s: history.append(m),
                       log_table=lambda rows, name: tables.append((name, rows)))
    return history, tables, final


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig], ids=["grpo", "rloo"])
def test_the_environment_reward_rises_and_episodes_are_logged(tokenizer, cls):
    kw = {"beta": 0.0} if cls is RLOOConfig else {}
    history, tables, _ = _train(tokenizer, cls, **kw)
    rewards = [m["reward"] for m in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    last = history[-1]
    for key in ("episodes/turns_mean", "episodes/tool_calls_mean", "episodes/tool_error_rate",
                "episodes/tool_call_parse_failure_rate", "episodes/reward_mean",
                "eval/episodes/turns_mean", "eval/reward", "entropy"):
        assert key in last and math.isfinite(last[key]), key
    assert 1.0 <= last["episodes/turns_mean"] <= 2.0
    assert [name for name, _ in tables] == ["episodes/step_000001.json",
                                            "episodes/step_000010.json",
                                            "episodes/step_000020.json",
                                            "episodes/step_000030.json"]
    rows = tables[0][1]
    assert len(rows) == 3 and {"conversation", "reward", "turns", "tool_calls"} <= set(rows[0])


def test_environment_and_reward_function_rewards_add_up():
    """Episode reward 0.5 (environment, weight 2) + 3 × 0.25 (a reward function of weight 3
    that sees the episode's later messages): 1.0 + 0.75 = 1.75; an episode the environment
    gave no reward gets only the function's 0.75."""
    def quarter(prompts, completions, **columns):
        assert completions[0][0] == {"role": "assistant", "content": "hi"}
        assert prompts[0] == [{"role": "user", "content": "q"}]
        return [0.25] * len(completions)

    episodes = [Episode([{"role": "user", "content": "q"}, {"role": "assistant",
                                                             "content": "hi"}], 1,
                        rewards=[0.25, 0.25]),
                Episode([{"role": "user", "content": "q"}, {"role": "assistant",
                                                             "content": "hi"}], 1)]
    empty = torch.zeros(2, 1)
    rollout = Rollout(empty.long(), empty.long(), empty.long(), empty.long(), empty,
                      torch.zeros(2, dtype=torch.bool), torch.zeros(2).long(),
                      tool_mask=empty.long(), episodes=episodes)
    total, per_fn = online_common.score_rollout([{"prompt": "q"}], rollout, None, {"quarter": quarter},
                                       {"quarter": 3.0}, 2, env_weight=2.0)
    assert total.tolist() == [1.75, 0.75]
    assert per_fn["environment"][0] == 0.5 and math.isnan(per_fn["environment"][1])


@pytest.mark.slow
def test_agentic_example_logs_episode_metrics_and_tables_to_mlflow(tmp_path):
    """conf/examples/agentic.yaml, shortened, through the library's graph runner: the grpo
    stage's MLflow run has the episode metrics at every step and the sample-episode tables."""
    import json
    from pathlib import Path

    from posttrain import stages, tracking
    from posttrain.config import load_pipeline_config

    root = Path(__file__).resolve().parents[1]
    overrides = [
        "demo.num_train=200", "demo.num_eval=16", f"artifacts_root={tmp_path / 'artifacts'}",
        "stages.sft.max_steps=40", "stages.sft.eval_every=20",
        "stages.grpo.max_steps=3", "stages.grpo.per_device_batch_size=16",
        "stages.grpo.eval_every=2", "evaluate.max_prompts=16",
        f"tracking.experiment=agentic-{tmp_path.name}",
    ]
    cfg = load_pipeline_config(root / "conf/examples/agentic.yaml", overrides)
    manifests = stages.run_all(cfg)
    assert list(manifests["evaluate"]["comparison"]) == ["base", "sft", "grpo"]
    client = tracking.client()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    run = next(r for r in client.search_runs([experiment]) if r.info.run_name == "grpo")
    assert run.info.status == "FINISHED"
    for key in ("episodes/turns_mean", "episodes/tool_calls_mean",
                "episodes/tool_call_parse_failure_rate", "episodes/tool_error_rate",
                "episodes/reward_mean", "rewards/environment/mean", "eval/episodes/turns_mean"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history, key
    assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                      "episodes/turns_mean")] == [1, 2, 3]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "episodes")}
    assert files == {"episodes/step_000001.json", "episodes/step_000002.json",
                     "episodes/step_000003.json"}
    table = json.loads(Path(client.download_artifacts(
        run.info.run_id, "episodes/step_000001.json", str(tmp_path))).read_text())
    assert table["columns"][:3] == ["step", "prompt", "conversation"] and len(table["data"]) == 2
