"""Data preparation task."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import with_stage_cache


@task(name="data")
def _prepare_data(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict:
    return stages.run_data_stage(cfg, parent_run_id=parent_run_id)


def prepare_data_task(cfg: PipelineConfig):
    return with_stage_cache(
        _prepare_data, "data", cfg.artifacts_root, lambda p: stages.data_stage_key(p["cfg"])
    )
