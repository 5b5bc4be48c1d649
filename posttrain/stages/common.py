"""What every stage shares: the content key, the idempotent artifact, the MLflow child run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig


def dump(model) -> dict:
    return model.model_dump(mode="json")


def digest(manifest: dict) -> str:
    return manifest["digest"]


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    key: str,
    params: dict,
    body: Callable[[artifacts.StageOutput, str], dict],
    *,
    parent_run_id: str | None = None,
) -> dict:
    """Return the artifact of (stage, key), producing it with `body(out, run_id)` if needed.

    `body` writes files into `out.dir`, may add JSON facts to `out.meta`, and returns the stage's
    final metrics. The returned manifest carries `cached` (True when nothing ran).
    """
    if cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    existing = artifacts.load_manifest(cfg.artifacts_root, stage, key)
    experiment = cfg.tracking.experiment
    if existing is not None:
        tracking.record_cache_hit(experiment, parent_run_id, stage, existing)
        return {**existing, "cached": True}
    run_id = tracking.start_run(
        experiment,
        stage,
        parent_run_id=parent_run_id,
        params=params,
        tags={tracking.STAGE_TAG: stage, tracking.KEY_TAG: key},
    )
    started = time.time()
    try:
        with artifacts.write_stage(cfg.artifacts_root, stage, key) as out:
            out.meta.update(config=params, mlflow_run_id=run_id)
            metrics = body(out, run_id)
            out.meta["metrics"] = metrics
            out.meta["seconds"] = round(time.time() - started, 3)
            (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracking.log_folder(run_id, out.manifest["path"], cfg.tracking.max_artifact_mb)
        tracking.end_run(run_id)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    return {**out.manifest, "cached": False}
