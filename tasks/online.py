"""Online-method tasks (GRPO, PPO): one task per method, each from the SFT artifact."""

from __future__ import annotations

from prefect import task

from posttrain import stages
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task
def _online(cfg: PipelineConfig, method: str, data: dict, sft: dict, reward: dict | None = None,
            parent_run_id: str | None = None) -> dict:
    upstream = {"data": data, "sft": sft, "reward": reward}
    return run_training_stage(cfg, method, upstream, parent_run_id)


def online_task(method: str):
    """The task of one online method, named after it in the Prefect UI."""

    def configured(cfg: PipelineConfig):
        return with_stage_cache(
            _online.with_options(name=method), method, cfg.artifacts_root,
            lambda p: stages.online_stage_key(p["cfg"], p["method"], p["data"], p["sft"],
                                              p.get("reward")),
        )

    return configured
