"""How a failed command reports: one message at the end (which stage, what went wrong, what to
do), the full traceback in a log file that the message names (and on the console with
--verbose), instead of hundreds of lines of tracebacks from Prefect's loggers."""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

STAGE_ATTR = "posttrain_stage"


def note_stage(error: BaseException, stage: str) -> None:
    """Remember on the exception which stage raised it (the innermost stage wins)."""
    if getattr(error, STAGE_ATTR, None) is None:
        try:
            setattr(error, STAGE_ATTR, stage)
        except AttributeError:  # an exception type without __dict__: the message says less
            pass


class _NoTraceback(logging.Filter):
    """On the console, log records keep their one-line message and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@dataclass
class Capture:
    path: Path
    handler: logging.Handler
    filters: list[tuple[logging.Handler, logging.Filter]]
    artifacts_root: Path | None = None
    started: float = field(default_factory=time.time)
    server_gone: bool = False  # the run failed because the Prefect server stopped answering


def capture(artifacts_root: str, *, verbose: bool) -> Capture:
    """Log everything Prefect logs (tracebacks included) to `<artifacts_root>/logs/<time>.log`
    and, unless `verbose`, keep tracebacks off the console."""
    import prefect.logging

    folder = Path(artifacts_root) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    prefect = logging.getLogger("prefect")
    prefect.addHandler(handler)
    filters = []
    if not verbose:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            for h in logging.getLogger(name).handlers:
                if h is handler or isinstance(h, logging.FileHandler):
                    continue
                f = _NoTraceback()
                h.addFilter(f)
                filters.append((h, f))
    return Capture(path, handler, filters, Path(artifacts_root))


def release(cap: Capture) -> None:
    """Undo `capture`. After a run that failed because the Prefect server stopped answering
    (its closing message already printed), exit at once with status 1: otherwise Prefect's
    workers spend minutes at exit retrying to deliver the run's queued logs and events to the
    server that is gone, printing each failure. Everything of the run's own is closed by then
    (artifacts written or removed, MLflow runs ended by the flow, locks released by the
    tasks); only those undeliverable logs and events are dropped."""
    logging.getLogger("prefect").removeHandler(cap.handler)
    cap.handler.close()
    for h, f in cap.filters:
        h.removeFilter(f)
    if cap.server_gone:
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)


def explain(error: BaseException, cap: Capture) -> str:
    """The closing message for `error`; its full traceback is appended to the log file."""
    with cap.path.open("a") as f:
        f.write("\n" + "".join(traceback.format_exception(error)))
    stage = getattr(error, STAGE_ATTR, None)
    what = f"stage {stage!r} failed" if stage else "the run failed"
    cause = f"{type(error).__name__}: {error}".strip()
    server = prefect_unreachable(error)
    if server is not None:
        cause, advice = f"{server} stopped answering ({cause})", _server_gone_advice(cap)
        cap.server_gone = True
    else:
        advice = _advice(error)
    return (f"{what}: {cause}\n"
            f"what to do: {advice}\n"
            f"full traceback: {cap.path} (or rerun with --verbose)")


def prefect_unreachable(error: BaseException) -> str | None:
    """'the Prefect server at <url>' (or 'the temporary Prefect server') when `error`, or an
    exception it was raised from, is a failure to reach the Prefect API (connection refused
    or reset, timeout): the server went away, which costs the run its bookkeeping but not its
    training. None for any other error."""
    import httpx

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, httpx.TransportError):
            from pipelines import temporary_server

            url = os.environ.get("PREFECT_API_URL")
            if not url and temporary_server.current_url() is None:
                try:
                    from prefect.settings import PREFECT_API_URL

                    url = PREFECT_API_URL.value()
                except Exception:  # noqa: BLE001 - the message then names no address
                    url = None
            return f"the Prefect server at {url}" if url else "the temporary Prefect server"
        error = error.__cause__ or error.__context__
    return None


def _server_gone_advice(cap: Capture) -> str:
    """What a run that lost its Prefect server keeps, and how to go on: the stages are plain
    functions that write their artifacts themselves, so what finished is on disk, and a rerun
    finds it there (and in Prefect's cache records, which are files under the artifacts
    root)."""
    kept = _artifacts_written_since(cap)
    done = (f"training is not lost: written during this run and kept: {', '.join(kept)}; "
            if kept else "training is not lost: stages that finished are kept in their "
            f"folders under {cap.artifacts_root}; ")
    return (done + "a stage cut short resumes from its last checkpoint (checkpoint_every). "
            "Start the Prefect server again (or unset PREFECT_API_URL to use a temporary one), "
            "then rerun the same command: finished stages come from the cache")


def _artifacts_written_since(cap: Capture) -> list[str]:
    """'stage (folder)' for each complete artifact under the artifacts root written since the
    command started."""
    from posttrain import artifacts

    root = cap.artifacts_root
    if root is None or not root.is_dir():
        return []
    kept = []
    for manifest in sorted(root.glob(f"*/*/{artifacts.MANIFEST}")):
        try:
            if manifest.stat().st_mtime >= cap.started - 1:
                kept.append(f"{manifest.parent.parent.name} ({manifest.parent})")
        except OSError:
            continue
    return kept


def _advice(error: BaseException) -> str:
    from posttrain.config import ConfigError
    from posttrain.data.loading import DataError
    from posttrain.training import is_out_of_memory

    if isinstance(error, DataError):
        return "fix the rows or fields named above (or set on_bad_rows: drop for that source), " \
               "then rerun: finished stages come from the cache"
    if isinstance(error, ConfigError):
        return "fix the configuration fields named above, then rerun"
    if is_out_of_memory(error):
        return "lower that stage's per_device_batch_size (raising grad_accum keeps the batch), " \
               "or its max_length, then rerun"
    if isinstance(error, (ModuleNotFoundError, ImportError)):
        return "install the missing package or fix the dotted path, then rerun"
    return "read the cause above and the traceback in the log; rerun the same command to " \
           "continue: finished stages come from the cache (and a stage with checkpoint_every " \
           "set resumes from its last checkpoint)"
