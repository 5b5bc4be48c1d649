"""Evaluation task: the base model and every candidate stage on the same held-out prompts."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import with_stage_cache


@task(name="evaluate")
def _evaluate(
    cfg: PipelineConfig,
    data: dict,
    candidates: dict[str, dict],
    reward: dict | None = None,
    parent_run_id: str | None = None,
) -> dict:
    return stages.run_eval_stage(cfg, data, candidates, reward, parent_run_id=parent_run_id)


def evaluate_task(cfg: PipelineConfig):
    return with_stage_cache(
        _evaluate,
        "evaluate",
        cfg.artifacts_root,
        lambda p: stages.eval_stage_key(p["cfg"], p["data"], p["candidates"], p.get("reward")),
    )
