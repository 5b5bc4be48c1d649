"""Preference-method tasks (DPO, ORPO, KTO): one task per method, each from the SFT artifact."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task
def _method(cfg: PipelineConfig, method: str, data: dict, sft: dict,
            parent_run_id: str | None = None) -> dict:
    return run_training_stage(cfg, method, {"data": data, "sft": sft}, parent_run_id)


def method_task(method: str):
    """The task of one method, named after it in the Prefect UI."""

    def configured(cfg: PipelineConfig):
        named = _method.with_options(name=method)
        return with_stage_cache(
            named, method, cfg.artifacts_root,
            lambda p: stages.method_stage_key(p["cfg"], p["method"], p["data"], p["sft"]),
        )

    return configured
