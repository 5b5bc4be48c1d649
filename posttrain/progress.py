"""Console progress for long work (training steps, generation batches), via rich."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_SHOWN = ("loss", "eval_loss", "tokens_per_second")


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
