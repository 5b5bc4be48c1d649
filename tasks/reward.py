"""Reward-model task."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import with_stage_cache


@task(name="reward")
def _reward(cfg: PipelineConfig, data: dict, sft: dict, parent_run_id: str | None = None) -> dict:
    return stages.run_reward_stage(cfg, data, sft, parent_run_id=parent_run_id)


def reward_task(cfg: PipelineConfig):
    return with_stage_cache(
        _reward, "reward", cfg.artifacts_root,
        lambda p: stages.reward_stage_key(p["cfg"], p["data"], p["sft"]),
    )
