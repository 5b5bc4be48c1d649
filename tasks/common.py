"""Cache policy shared by every stage task: content key, JSON results, serializable locks.

The Prefect cache key IS the stage's content key (posttrain.artifacts.stage_key), so Prefect's
cache and the artifact folder agree. Results (manifests) and cache records live under the
artifacts root, as JSON. SERIALIZABLE isolation with a file lock makes a second concurrent trigger
of the same stage wait for the first and then hit its cache instead of training twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import Task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.locking.filesystem import FileSystemLockManager

from posttrain import artifacts


def cache_record_dir(artifacts_root: str | Path) -> Path:
    return Path(artifacts_root).resolve() / ".prefect" / "cache"


def _cache_key_fn(stage: str, key_fn: Callable[[dict], str]):
    def cache_key(_ctx, params: dict) -> str:
        cfg = params["cfg"]
        key = key_fn(params)
        prefect_key = f"posttrain-{stage}-{key}"
        # A cache record whose artifact is gone (deleted by hand, moved aside as corrupt) would
        # hand out a manifest pointing nowhere: forget it so that the stage runs again.
        manifest = artifacts.stage_dir(cfg.artifacts_root, stage, key) / artifacts.MANIFEST
        if not manifest.is_file():
            (cache_record_dir(cfg.artifacts_root) / prefect_key).unlink(missing_ok=True)
        return prefect_key

    return cache_key


def with_stage_cache(task: Task, stage: str, artifacts_root: str, key_fn: Callable[[dict], str]):
    """`task` configured to cache on the stage's content key under `artifacts_root`."""
    root = Path(artifacts_root).resolve() / ".prefect"
    policy = CacheKeyFnPolicy(cache_key_fn=_cache_key_fn(stage, key_fn)).configure(
        key_storage=root / "cache",
        lock_manager=FileSystemLockManager(root / "locks"),
        isolation_level="SERIALIZABLE",
    )
    return task.with_options(
        cache_policy=policy,
        persist_result=True,
        result_serializer="json",
        result_storage=root / "results",
    )
