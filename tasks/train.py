"""Training-stage task: one task per stage of the graph, named after the stage in the Prefect UI,
cached on the stage's content key."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task
def _train(cfg: PipelineConfig, stage: str, data: dict, start: dict | None = None,
           reward: dict | None = None, parent_run_id: str | None = None) -> dict:
    upstream = {"data": data, "start": start, "reward": reward}
    return run_training_stage(cfg, stage, upstream, parent_run_id)


def train_task(cfg: PipelineConfig, stage: str):
    """The task of training stage `stage`."""
    return with_stage_cache(
        _train.with_options(name=stage), stage, cfg.artifacts_root,
        lambda p: stages.stage_key(p["cfg"], p["stage"], {
            "data": p["data"], "start": p.get("start"), "reward": p.get("reward")}),
    )
