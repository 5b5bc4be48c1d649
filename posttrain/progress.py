"""Progress of long work: a console bar (rich) while training runs, and a metric line per
logged step through the standard `logging` logger `posttrain.progress`.

The library never talks to Prefect: a Prefect task attaches a handler to that logger (see
tasks/train.py), so the lines land in the task run's logs in the Prefect UI. Without a handler
the lines go nowhere (the console has the bar); `logging.basicConfig(level="INFO")` prints them.
A stage launched as its own processes (posttrain.launch) prints them, marked, to the parent,
which puts them back on this logger, in its task run.
"""

from __future__ import annotations

import logging
import math

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_SHOWN = ("loss", "eval_loss", "tokens_per_second")
logger = logging.getLogger("posttrain.progress")


def report(line: str) -> None:
    """One line of progress (INFO on the `posttrain.progress` logger)."""
    logger.info(line)


def report_metrics(step: int, metrics: dict[str, float]) -> None:
    """The metrics of one logged step as one line: `step 20: loss=1.234 eval_loss=...`."""
    if logger.isEnabledFor(logging.INFO):
        report(metric_line(step, metrics))


def metric_line(step: int, metrics: dict[str, float]) -> str:
    """`step N: ` and the metrics (metrics_text)."""
    return f"step {step}: " + metrics_text(metrics)


def metrics_text(metrics: dict[str, float]) -> str:
    """`loss=1.235 eval_loss=2 lr=0.001`: four significant digits, the losses first."""
    first = [k for k in ("loss", "eval_loss") if k in metrics]
    names = first + sorted(k for k in metrics if k not in first)
    return " ".join(f"{k}={_number(metrics[k])}" for k in names)


def _number(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


class TrainingProgress:
    """A progress bar with the latest loss and throughput; silent when `enabled` is False."""

    def __init__(self, name: str, total: int, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn(f"[bold]{name}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not enabled,
        )
        self._task = self._progress.add_task(name, total=total, info="")
        self._latest: dict[str, float] = {}

    def __enter__(self) -> TrainingProgress:  # noqa: PYI034
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self._latest.update({k: metrics[k] for k in _SHOWN if k in metrics})
        info = "  ".join(
            f"{k}={v:,.0f}" if k == "tokens_per_second" else f"{k}={v:.4f}"
            for k, v in self._latest.items()
        )
        self._progress.update(self._task, completed=step, info=info)
