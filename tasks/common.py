"""Cache policy shared by every stage task: content key, JSON results, serializable locks.

The Prefect cache key IS the stage's content key (posttrain.artifacts.stage_key), so Prefect's
cache and the artifact folder agree. Results (manifests) and cache records live under the
artifacts root, as JSON. SERIALIZABLE isolation with a file lock makes a second concurrent trigger
of the same stage wait for the first and then hit its cache instead of training twice. The lock
names its owner process (tasks.locks): one left by a killed run is taken over, not waited on.

A training stage runs in the task's own process, or, when the config's `launch` section asks for
it (several processes, or an accelerate config file), as `accelerate launch` processes whose
output lines go to the task's log, their progress lines as an in-process stage's
(`run_training_stage`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefect import Task, get_run_logger
from prefect.cache_policies import CacheKeyFnPolicy

from posttrain import artifacts, launch, progress
from posttrain.config import PipelineConfig
from tasks.locks import OwnedLockManager


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


def with_stage_cache(task: Task, stage: str, artifacts_root: str, key_fn: Callable[[dict], str],
                     on_cached: Callable[[dict], None] | None = None):
    """`task` configured to cache on the stage's content key under `artifacts_root`.

    A cache hit runs no task body: `on_cached(manifest)`, when given, is then called in the task
    run's context instead (for what the body would have shown in the UI, e.g. link artifacts).
    """
    root = Path(artifacts_root).resolve() / ".prefect"
    policy = CacheKeyFnPolicy(cache_key_fn=_cache_key_fn(stage, key_fn)).configure(
        key_storage=root / "cache",
        lock_manager=OwnedLockManager(root / "locks", stage),
        isolation_level="SERIALIZABLE",
    )
    return task.with_options(
        cache_policy=policy,
        persist_result=True,
        result_serializer="json",
        result_storage=root / "results",
        retries=2,
        retry_delay_seconds=2,
        retry_condition_fn=retry_only_transient,
        on_completion=[_on_cache_hit(on_cached)] if on_cached else None,
    )


_HOOK = "on_cache_hit"


def _on_cache_hit(on_cached: Callable[[dict], None]):
    """A Prefect on_completion hook calling `on_cached(manifest)` for a state from the cache.
    The engine calls hooks inside the task run's context, so what it creates (artifacts, log
    lines) belongs to the task run and its flow run."""

    def hook(_task, _task_run, state) -> None:
        if state.name == "Cached":
            on_cached(state.result())

    hook.__name__ = _HOOK
    _quiet_hook_lines()
    return hook


class _QuietHookLines(logging.Filter):
    """Drops the engine's INFO lines around our hook ("Running hook 'on_cache_hit' in response
    to entering state 'Completed'", "... finished running successfully"): every stage's run
    would show them, trained or not. Its errors (ERROR, with the traceback) stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or f"hook '{_HOOK}'" not in str(record.msg).lower()


def _quiet_hook_lines() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _QuietHookLines) for f in logger.filters):
        logger.addFilter(_QuietHookLines())


def is_transient(error: BaseException) -> bool:
    """I/O that may work on a second try (a full disk being cleaned, a flaky network mount, a
    server restarting). Configuration and data errors never are: retrying them only repeats
    the failure and delays the message."""
    from posttrain.config import ConfigError
    from posttrain.data.loading import DataError

    if isinstance(error, (ConfigError, DataError, ValueError, TypeError, KeyError, ImportError)):
        return False
    # A missing file or model, or a refused permission, will be just as missing next time.
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError)) or _is_not_found(error):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError))


def _is_not_found(error: BaseException) -> bool:
    """transformers and huggingface_hub report a model or file that does not exist as a plain
    OSError (or their own subclasses of it); their messages say so."""
    names = {t.__name__ for t in type(error).__mro__}
    if names & {"RepositoryNotFoundError", "EntryNotFoundError", "RevisionNotFoundError",
                "GatedRepoError", "HFValidationError"}:
        return True
    text = str(error)
    return isinstance(error, OSError) and any(s in text for s in (
        "is not a local folder and is not a valid model identifier",
        "does not appear to have a file named", "Repo id must be"))


def retry_only_transient(_task, _task_run, state) -> bool:
    """Prefect's retry condition: retry a failed stage only for transient errors."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classified right here
        return is_transient(error)
    return False


def run_training_stage(cfg: PipelineConfig, stage: str, upstream: dict,
                       parent_run_id: str | None = None) -> dict:
    """Run a training stage here, or under `accelerate launch` when cfg.launch asks for it.

    Launched, every line the processes print goes to the task's log, and a failure raises
    posttrain.launch.StageLaunchError carrying the stage's own error message. Their progress
    lines go to the `posttrain.progress` logger here, as an in-process stage's do (the task run's
    logs, tasks.train.send_progress_to_prefect), and to the console, which has no live progress
    bar from a launched process.
    """
    if not cfg.launch.launched:
        return launch.run_stage_by_name(cfg, stage, upstream, parent_run_id)
    logger = get_run_logger()

    def on_progress(line: str) -> None:
        progress.report(line)
        logger.info(f"{stage} {line}", extra={"send_to_api": False})

    return launch.run_launched(cfg, stage, upstream, parent_run_id=parent_run_id,
                               on_line=logger.info, on_progress=on_progress)
