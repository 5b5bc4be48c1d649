"""Reward-model task."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task(name="reward")
def _reward(cfg: PipelineConfig, data: dict, sft: dict, parent_run_id: str | None = None) -> dict:
    return run_training_stage(cfg, "reward", {"data": data, "sft": sft}, parent_run_id)


def reward_task(cfg: PipelineConfig):
    return with_stage_cache(
        _reward, "reward", cfg.artifacts_root,
        lambda p: stages.reward_stage_key(p["cfg"], p["data"], p["sft"]),
    )
