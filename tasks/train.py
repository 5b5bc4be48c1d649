"""Training-stage task: one task per stage of the graph, named after the stage in the Prefect UI,
cached on the stage's content key.

What the Prefect UI shows of a stage: its training progress in the task run's logs (the library
reports a metric line every `log_every` steps on the `posttrain.progress` logger, sent to the run
by `send_progress_to_prefect`), and link artifacts to the stage's MLflow run and model folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from pipelines.errors import prefect_unreachable
from posttrain import progress, stages, tracking
from posttrain.config import PipelineConfig
from tasks.common import run_training_stage, with_stage_cache


@task
def _train(cfg: PipelineConfig, stage: str, data: dict, start: dict | None = None,
           reward: dict | None = None, parent_run_id: str | None = None,
           teacher: dict | None = None) -> dict:
    send_progress_to_prefect()
    upstream = {"data": data, "start": start, "reward": reward}
    if teacher is not None:  # GKD's teacher stage: an input, so Prefect's graph draws its edge
        upstream["teacher"] = teacher
    manifest = run_training_stage(cfg, stage, upstream, parent_run_id)
    link_stage(cfg.name, stage, manifest, Path(manifest["path"]) / "model")
    return manifest


def train_task(cfg: PipelineConfig, stage: str):
    """The task of training stage `stage`. From Prefect's cache (no body run) it still links
    the MLflow run and folder that produced the stage."""

    def on_cached(manifest: dict) -> None:
        folder = Path(manifest["path"]) / "model"
        get_run_logger().info(f"{stage} from the cache: {folder}, produced by MLflow run "
                              f"{manifest.get('mlflow_run_id')}")
        link_stage(cfg.name, stage, manifest, folder, cached=True)

    return with_stage_cache(
        _train.with_options(name=stage), stage, cfg.artifacts_root,
        lambda p: stages.stage_key(p["cfg"], p["stage"], {
            "data": p["data"], "start": p.get("start"), "reward": p.get("reward"),
            "teacher": p.get("teacher")}),
        on_cached=on_cached,
    )


class _RunLogs(APILogHandler):
    """Prefect's API log handler for the library's progress logger: a record goes to the flow or
    task run current in the thread that logs it (so stages training at the same time keep
    their own lines), and outside any run nowhere (no warning)."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            super().emit(record)


def send_progress_to_prefect() -> None:
    """Send the `posttrain.progress` lines (metrics every `log_every` steps, evaluation results)
    to the current Prefect run's logs; they stay off the console, which has the progress bar.
    Idempotent: installs the handler once per process."""
    logger = progress.logger
    if not any(isinstance(h, _RunLogs) for h in logger.handlers):
        logger.addHandler(_RunLogs())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def link_stage(pipeline: str, stage: str, manifest: dict, folder: Path,
               cached: bool = False) -> None:
    """Link artifacts of a stage: its MLflow run (the one that produced it, when cached: by
    the stage's own artifact check, `manifest["cached"]`, or by Prefect's cache, `cached`) and
    its output folder. A trained stage never fails for want of a link: a server that does not
    answer costs a warning in the run's log. Once the Prefect server has stopped answering, later
    stages do not ask it again (each call would wait out the client's retries, about a minute
    with Prefect's defaults)."""
    global _prefect_gone
    if _prefect_gone:
        _warn(f"no link artifacts for stage {stage}: {_prefect_gone} stopped answering")
        return
    try:
        _link_stage(pipeline, stage, manifest, folder, cached or bool(manifest.get("cached")))
    except Exception as e:  # noqa: BLE001 - reported, and the stage's result stands
        _prefect_gone = prefect_unreachable(e)
        _warn(f"no link artifacts for stage {stage}: {type(e).__name__}: {e}")


_prefect_gone: str | None = None  # the server that stopped answering, once one has


def _warn(message: str) -> None:
    try:
        get_run_logger().warning(message)
    except MissingContextError:  # outside a flow or task run
        logging.getLogger(__name__).warning(message)


def _link_stage(pipeline: str, stage: str, manifest: dict, folder: Path, cached: bool) -> None:
    run_id = manifest.get("mlflow_run_id")
    where = "cached, produced by" if cached else "produced by"
    if run_id:
        create_link_artifact(
            link=tracking.run_url(run_id), link_text=f"MLflow run of {stage}",
            key=artifact_key(f"{pipeline}-{stage}-mlflow-run"),
            description=f"Stage `{stage}` ({where} MLflow run `{run_id}`): params, metrics "
                        "per step, datasets and artifacts.",
        )
    create_link_artifact(
        link=folder.resolve().as_uri(), link_text=str(folder),
        key=artifact_key(f"{pipeline}-{stage}-folder"),
        description=f"Output folder of stage `{stage}` (key `{manifest.get('key', '')}`).",
    )


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "posttrain"
