"""Supervised fine-tuning task."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task(name="sft")
def _sft(cfg: PipelineConfig, data: dict, parent_run_id: str | None = None) -> dict:
    return run_training_stage(cfg, "sft", {"data": data}, parent_run_id)


def sft_task(cfg: PipelineConfig):
    return with_stage_cache(
        _sft, "sft", cfg.artifacts_root, lambda p: stages.sft_stage_key(p["cfg"], p["data"])
    )
