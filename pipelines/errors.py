"""How a failed command reports: one message at the end (which stage, what went wrong, what to
do), the full traceback in a log file that the message names (and on the console with
--verbose), instead of hundreds of lines of tracebacks from Prefect's loggers."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
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
    return Capture(path, handler, filters)


def release(cap: Capture) -> None:
    logging.getLogger("prefect").removeHandler(cap.handler)
    cap.handler.close()
    for h, f in cap.filters:
        h.removeFilter(f)


def explain(error: BaseException, cap: Capture) -> str:
    """The closing message for `error`; its full traceback is appended to the log file."""
    with cap.path.open("a") as f:
        f.write("\n" + "".join(traceback.format_exception(error)))
    stage = getattr(error, STAGE_ATTR, None)
    what = f"stage {stage!r} failed" if stage else "the run failed"
    cause = f"{type(error).__name__}: {error}".strip()
    return (f"{what}: {cause}\n"
            f"what to do: {_advice(error)}\n"
            f"full traceback: {cap.path} (or rerun with --verbose)")


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
