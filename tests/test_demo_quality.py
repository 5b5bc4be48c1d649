"""The demo shows every method working: the full conf/demo.yaml, stage by stage (no Prefect), and
the held-out numbers the README promises. Slow (a few minutes): it trains everything for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain import stages
from posttrain.config import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_methods_beat_sft_and_the_reward_model_ranks_pairs(tmp_path):
    cfg = load_pipeline_config(ROOT / "conf" / "demo.yaml",
                               [f"artifacts_root={tmp_path}", "tracking.experiment=demo-quality"])
    manifests = stages.run_all(cfg)
    reward = manifests["reward"]
    comparison = manifests["evaluate"]["comparison"]
    acc = {name: m["checker_accuracy"] for name, m in comparison.items()}

    assert reward["metrics"]["eval_accuracy"] > 0.75  # held-out pairs, chance is 0.5
    assert acc["sft"] > acc["base"] + 0.5
    for method in ("dpo", "orpo", "kto", "grpo"):
        assert acc[method] > acc["sft"] + 0.05, (method, acc)
    # PPO optimizes the reward model: its score rises, checker accuracy does not fall.
    assert comparison["ppo"]["reward_score"] > comparison["sft"]["reward_score"] + 1.0
    assert acc["ppo"] >= acc["sft"] - 0.02, acc
