"""The evaluation's comparison chart: one panel per metric, a bar per model (matplotlib, Agg)."""

from __future__ import annotations

import math
from typing import Any

CI_SUFFIXES = ("_ci_low", "_ci_high")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def comparison_chart(comparison: dict[str, dict[str, float]], base: str = "base"):
    """A matplotlib Figure (Agg backend, no display needed): one panel per metric, a bar per
    model with its value written on it.

    Each panel has its own y axis, scaled to the trained models: the untrained `base` model is
    often far off (perplexity 100 against 2, say) and would flatten their differences. Its bar
    is still drawn (grey), cut at the axis' edge and hatched when it lies beyond, with its true
    value on it.

    A metric's bootstrap interval (`<metric>_ci_low`, `<metric>_ci_high` beside it, from the
    evaluation) is drawn as an error bar on its bar (not on a cut one), and is not a panel of
    its own; the axis makes room for the trained models' intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(comparison)
    metrics = sorted({k for m in comparison.values() for k in m
                      if not k.endswith(CI_SUFFIXES)})
    cols = min(3, max(1, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        intervals = [(comparison[m].get(metric + CI_SUFFIXES[0]),
                      comparison[m].get(metric + CI_SUFFIXES[1])) for m in models]
        _metric_panel(ax, metric, models, [comparison[m].get(metric) for m in models], base,
                      intervals)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    plt.close(fig)  # the Figure still renders when saved; pyplot just forgets it
    return fig


def _metric_panel(ax, metric: str, models: list[str], values: list, base: str,
                  intervals: list | None = None) -> None:
    numbers = [float(v) if is_number(v) else math.nan for v in values]
    bounds = [(float(a), float(b)) if is_number(a) and is_number(b) else None
              for a, b in (intervals or [(None, None)] * len(models))]
    trained = [v for m, v in zip(models, numbers) if m != base and not math.isnan(v)]
    spans = [x for m, v, b in zip(models, numbers, bounds)
             if m != base and not math.isnan(v) and b is not None for x in b]
    lo, hi = _axis_limits((trained + spans) or numbers)
    heights = [0.0 if math.isnan(v) else min(max(v, lo), hi) for v in numbers]
    bars = ax.bar(models, heights, color=["#999999" if m == base else "#4c72b0" for m in models])
    labels = []
    for bar, v, h in zip(bars, numbers, heights):
        cut = not math.isnan(v) and h != v
        if cut:  # beyond the axis: drawn to its edge, hatched, its true value written on it
            bar.set_hatch("//")
            bar.set_edgecolor("black")
        labels.append("n/a" if math.isnan(v) else f"{v:.3g}" + (" (cut)" if cut else ""))
    ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    whiskers = [(bar.get_x() + bar.get_width() / 2, v, b) for bar, v, h, b
                in zip(bars, numbers, heights, bounds)
                if b is not None and not math.isnan(v) and h == v]
    if whiskers:  # the 95% bootstrap interval of each bar not cut at the axis
        xs, ys, bs = zip(*whiskers)
        ax.errorbar(xs, ys, yerr=[[max(y - b[0], 0.0) for y, b in zip(ys, bs)],
                                  [max(b[1] - y, 0.0) for y, b in zip(ys, bs)]],
                    fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_ylim(lo, hi)
    ax.set_title(metric, fontsize=10)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)


def _axis_limits(values: list[float]) -> tuple[float, float]:
    """A bar axis for `values` that includes zero, with room beyond the bars for their labels."""
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(0.0, *finite), max(0.0, *finite)
    span = (hi - lo) or 1.0
    return (lo - 0.25 * span if lo < 0 else 0.0), (hi + 0.25 * span if hi > 0 or lo == 0 else 0.0)
