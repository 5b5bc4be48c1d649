"""Publishing a benchmark report: a ratio chart (PNG) and, optionally, an MLflow run.

`python -m benchmarks.run ... --mlflow` logs one parent run per benchmark invocation to the
tracking store posttrain uses (`MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db`): the run's
options as params, the machine and command as tags, every side-by-side ratio and the matmul
calibration as metrics, and the markdown, JSON and chart as artifacts. Each variant is a child
run with its worker arguments as params, its medians as metrics and its per-step seconds as a
curve, so two benchmark runs (before/after a change, CPU/GPU) compare in the MLflow UI like two
training runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from posttrain import tracking

DEFAULT_EXPERIMENT = "posttrain-benchmarks"


def metric_key(text: str) -> str:
    """A readable MLflow metric name from a ratio's description: MLflow allows letters, digits,
    `_ - . /`, spaces and colons, and refuses keys that a path normalisation would change."""
    words = re.sub(r"[^\w.\-]+", " ", text).split()
    return "_".join(words)[:240]


def numeric_leaves(obj, prefix: str = "") -> dict[str, float]:
    """Every finite number in a worker result, flattened: nested dicts join their keys with '.',
    a list of per-stage dicts (orchestration) is keyed by each item's 'stage'; other lists (per
    step times, token ids) are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out[prefix.rstrip(".")] = float(obj)
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{prefix}{metric_key(str(k))}."))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "stage" in x for x in obj):
        for item in obj:
            rest = {k: v for k, v in item.items() if k != "stage"}
            out.update(numeric_leaves(rest, f"{prefix}{metric_key(item['stage'])}."))
    return out


def worker_params(args: list[str]) -> dict[str, str]:
    """`--hidden 64 --packing --name x` -> {'hidden': '64', 'packing': 'true', 'name': 'x'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            key = args[i][2:]
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[key] = args[i + 1]
                i += 2
                continue
            out[key] = "true"
        i += 1
    return out


def ratio_chart(ratios: list[dict], title: str):
    """A horizontal bar per ratio on a log axis, a line at 1 (parity); green where the ratio is
    on its better side, red where not, grey where neither side is better. Returns a matplotlib
    Figure (Agg backend, no display needed), or None without ratios."""
    if not ratios:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def colour(r: dict) -> str:
        if r.get("better") == "higher":
            return "#55a868" if r["value"] >= 1 else "#c44e52"
        if r.get("better") == "lower":
            return "#55a868" if r["value"] <= 1 else "#c44e52"
        return "#8c8c8c"

    rows = list(reversed(ratios))  # matplotlib draws the first bar at the bottom
    values = [max(r["value"], 1e-3) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.2))
    # Bars grow from parity (1) to the value, rightwards above 1 and leftwards below it.
    ax.barh(range(len(rows)), [v - 1 for v in values], left=1, color=[colour(r) for r in rows])
    ax.set_xscale("log")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ticks = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r["ratio"] for r in rows], fontsize=7)
    for i, v in enumerate(values):  # the number at the bar's far end, outside it
        ax.text(v, i, f" {v:.2f} " if v >= 1 else f"{v:.2f} ", va="center", fontsize=7,
                ha="left" if v >= 1 else "right")
    ax.set_xlabel("ratio (log scale; green: better side of 1, red: worse, grey: no better side)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # the Figure still saves; pyplot just forgets it
    return fig


def log_to_mlflow(report: dict, variants: list, files: list[Path],
                  experiment: str = DEFAULT_EXPERIMENT) -> str:
    """One parent run for the report, one child run per variant; returns the parent's run id."""
    label = report["options"].get("label") or "benchmark"
    parent = tracking.start_run(
        experiment, f"{label} {report['date']}", params=report["options"],
        tags={"posttrain.benchmark.command": report["command"][:5000],
              "posttrain.benchmark.machine": report["machine"],
              "posttrain.benchmark.torch": str(report["torch"]),
              "posttrain.benchmark.date": report["date"]})
    try:
        cal = report["calibration"]
        metrics = {f"calibration/{name}_gflops": cal[k]
                   for name, k in (("median", "gflops"), ("start", "start"), ("end", "end"))
                   if isinstance(cal.get(k), (int, float))}
        metrics.update({f"ratio/{metric_key(r['ratio'])}": r["value"] for r in report["ratios"]})
        tracking.log_metrics(parent, metrics)
        tracking.log_table(parent, report["ratios"], "ratios.json")
        by_name = {r["name"]: r for r in report["results"]}
        for v in variants:
            _log_variant(experiment, parent, v, by_name.get(v.name, {}))
        client = tracking.client()
        for path in files:
            client.log_artifact(parent, str(path))
    except BaseException as exc:
        tracking.end_run(parent, "FAILED", reason=repr(exc))
        raise
    tracking.end_run(parent)
    return parent


def _log_variant(experiment: str, parent: str, variant, result: dict) -> None:
    run = tracking.start_run(experiment, variant.name, parent_run_id=parent,
                             params={"module": variant.module, **worker_params(variant.args)},
                             tags={"posttrain.benchmark.group": variant.group})
    if "error" in result:
        tracking.end_run(run, "FAILED", reason=str(result["error"]))
        return
    logger = tracking.MetricLogger(run)
    logger(numeric_leaves(result), 0)
    first = next((r for r in variant.runs if "error" not in r), {})
    for step, seconds in enumerate(first.get("step_seconds") or []):
        logger({"step_seconds": seconds}, step)
    logger.flush()
    tracking.end_run(run)
