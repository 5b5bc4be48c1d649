"""Evaluation task: the base model and every candidate stage on the same held-out prompts.

In the Prefect UI its run logs one line of held-out metrics per model, and links to its MLflow
run and output folder (samples, comparison.json), from the cache too."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from posttrain import progress, stages
from posttrain.charts import CI_SUFFIXES
from posttrain.config import PipelineConfig
from tasks.common import with_stage_cache
from tasks.train import link_stage, send_progress_to_prefect


# Not the flows' log_prints: dill (under datasets' fingerprinting in the harness) finds a
# function's globals by disassembling it with print into a swapped sys.stdout, which Prefect's
# print-as-log patch sent to the run's log instead (hundreds of bytecode lines per model).
@task(name="evaluate", log_prints=False)
def _evaluate(
    cfg: PipelineConfig,
    data: dict,
    candidates: dict[str, dict],
    reward: dict | None = None,
    parent_run_id: str | None = None,
) -> dict:
    send_progress_to_prefect()
    manifest = stages.run_eval_stage(cfg, data, candidates, reward, parent_run_id=parent_run_id)
    logger = get_run_logger()
    for name, metrics in manifest.get("comparison", {}).items():
        # the values (their 95% intervals are in comparison.json and the MLflow run)
        shown = {k: v for k, v in metrics.items() if not k.endswith(CI_SUFFIXES)}
        logger.info(f"held-out {name}: {progress.metrics_text(shown)}")
    link_stage(cfg.name, "evaluate", manifest, Path(manifest["path"]))
    return manifest


def evaluate_task(cfg: PipelineConfig):
    return with_stage_cache(
        _evaluate,
        "evaluate",
        cfg.artifacts_root,
        lambda p: stages.eval_stage_key(p["cfg"], p["data"], p["candidates"], p.get("reward")),
        on_cached=lambda m: link_stage(cfg.name, "evaluate", m, Path(m["path"]), cached=True),
    )
