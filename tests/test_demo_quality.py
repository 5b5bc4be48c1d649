"""`make demo` as a user runs it: `posttrain run conf/demo.yaml` in a fresh folder with the
default stores (embedded Prefect, sqlite:///mlflow.db in the working directory), every method
trained for real; then the held-out numbers the README promises, and a rerun that is fully
cached. Slow (a few minutes): the only test that runs the whole demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_cli import ROOT, _posttrain

STAGES = ("data", "sft", "reward", "dpo", "orpo", "kto", "grpo", "ppo", "simpo", "cpo", "rloo",
          "online_dpo", "gkd", "evaluate")
# Every method that the checker, preference pairs or a teacher can teach beats SFT on it.
BEAT_SFT = ("dpo", "orpo", "kto", "grpo", "simpo", "cpo", "rloo", "online_dpo", "gkd")


def _manifest(artifacts: Path, stage: str) -> dict:
    """The one artifact of `stage` in a fresh artifacts root."""
    (found,) = artifacts.glob(f"{stage}/*/manifest.json")
    return json.loads(found.read_text())


@pytest.mark.slow
def test_make_demo_methods_beat_sft_and_a_rerun_is_fully_cached(tmp_path):
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        first = _posttrain(["run", str(ROOT / "conf/demo.yaml")], tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert (tmp_path / "mlflow.db").exists()
        second = _posttrain(["run", str(ROOT / "conf/demo.yaml")], tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri

    # What the README promises of the demo's held-out numbers.
    artifacts = tmp_path / "artifacts"
    reward = _manifest(artifacts, "reward")
    comparison = _manifest(artifacts, "evaluate")["comparison"]
    acc = {name: m["checker_accuracy"] for name, m in comparison.items()}
    assert reward["metrics"]["eval_accuracy"] > 0.75  # held-out pairs, chance is 0.5
    assert acc["sft"] > acc["base"] + 0.5
    for method in BEAT_SFT:
        assert acc[method] > acc["sft"] + 0.05, (method, acc)
    # PPO optimizes the reward model: its score rises, checker accuracy does not fall.
    assert comparison["ppo"]["reward_score"] > comparison["sft"]["reward_score"] + 1.0
    assert acc["ppo"] >= acc["sft"] - 0.02, acc

    # Every stage ran once, then was cached; the second plan already knew it.
    first_run, second_run = (p.stdout.split("posttrain run", 1)[1] for p in (first, second))
    for stage in STAGES:
        assert f"│ {stage}" in first_run
    assert first_run.count(" ran ") == len(STAGES), first.stdout
    assert second_run.count(" cached ") == len(STAGES), second.stdout
    plan = second.stdout.split("posttrain plan", 1)[1].split("promotion:", 1)[0]
    assert plan.count("cached") == len(STAGES), plan
    assert "checker_accuracy" in first.stdout and "make ui" in first.stdout
