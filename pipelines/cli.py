"""The `posttrain` command line.

Configs are validated before Prefect is even imported, so a typo fails in a second with the field
named, not after a server has started.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from posttrain.charts import CI_SUFFIXES

# Offline-friendly defaults for Prefect's embedded server; explicit settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

app = typer.Typer(
    help="posttrain: post-train language models with cached Prefect stages tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigArg = Annotated[
    str | None,
    typer.Argument(help="Pipeline YAML (e.g. conf/demo.yaml). Default: the built-in demo."),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Field overrides as dotted.path=value, e.g. sft.max_steps=50."),
]

_COMPARISON = (
    "checker_accuracy", "reward_score", "win_rate_vs_reference", "kl_to_reference", "eval_loss",
    "perplexity", "chosen_perplexity", "mean_completion_length", "eos_rate",
)
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print full tracebacks on the console too.")]


def _load(config: str | None, overrides: list[str] | None):
    from posttrain.config import ConfigError, load_pipeline_config

    overrides = list(overrides or [])
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `posttrain run sft.max_steps=5`: no file given
        config = None
    try:
        return load_pipeline_config(config, overrides)
    except ConfigError as e:
        console.print(str(e), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None


def _ready_the_flow() -> None:
    """The flow's first work, done while the temporary Prefect server comes up (the command
    would only wait for it): import the flows and Prefect's engine, and open the MLflow store
    (importing MLflow's SQLAlchemy store takes about a second; the first new store on a machine
    also runs MLflow's migrations, posttrain/mlflow_store.py). MLflow keeps the store for the
    flow."""
    import pipelines.flows  # noqa: F401 - imported now rather than after the wait
    from posttrain import tracking

    # A store that cannot be opened is reported by the flow, where every stage error goes.
    with contextlib.suppress(Exception):
        tracking.client()


def _preflight(cfg, targets: list[str] | None = None, *, flow: bool = False):
    """The plan, or every problem preflight finds and exit code 2, before anything trains.
    With `flow` (a flow runs next) and no Prefect server configured, the temporary one starts
    meanwhile (pipelines/temporary_server.py)."""
    from pipelines import temporary_server
    from posttrain.preflight import PreflightError, plan

    server = temporary_server.start() if flow else None
    try:
        result = plan(cfg, targets)
        if server is not None:
            _ready_the_flow()
            server.use()
        return result
    except PreflightError as e:
        console.print("[red]preflight found problems; nothing was trained:[/red]")
        for problem in e.problems:
            console.print(f"  - {problem}", markup=False, highlight=False)
        raise typer.Exit(2) from None


def _run_flow(flow_fn, cfg, verbose: bool) -> dict:
    """Run a flow; a failure ends in one message (stage, cause, what to do) with the full
    traceback in a log file (and on the console with --verbose)."""
    from pipelines import errors, stop

    stop.install(cfg, shlex.join(["posttrain", *sys.argv[1:]]))
    log = errors.capture(cfg.artifacts_root, verbose=verbose)
    try:
        return flow_fn(cfg)
    except Exception as e:  # noqa: BLE001 - reported whole below, never swallowed
        console.print(errors.explain(e, log), markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        errors.release(log)
        stop.uninstall()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _short(v, digits: int = 3) -> str:
    """`digits` significant digits, as narrow as that goes: a large value whole (7822.5 ->
    7822, not 7.82e+03), a tiny one with a short exponent where that is narrower (0.0009876 ->
    9.88e-4)."""
    if not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:.0f}"
    text = f"{v:.{digits}g}"
    if v and abs(v) < 0.01:
        mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
        short = f"{mantissa}e{int(exponent)}"
        if len(short) < len(text) or "e" in text:
            text = short
    return text


def _metric_label(metric: str) -> tuple[str | None, str]:
    """(group row, row name) of a metric: an lm-evaluation-harness metric
    (`lm_eval/<task>/<metric>[/filter]`) goes under a `lm_eval/<task>` row as
    `  <metric>[/filter]`, so the metric column stays as narrow as posttrain's own names."""
    if not metric.startswith("lm_eval/"):
        return None, metric
    task, _, rest = metric[len("lm_eval/"):].partition("/")
    return f"lm_eval/{task}", f"  {rest}"


def _comparison_tables(comparison: dict[str, dict], width: int) -> list[Table]:
    """The held-out comparison, one row per metric and one column per model, as tables that fit
    `width` columns without cutting a cell: four significant digits if they fit, else three,
    else two; still too wide, the models are split over several tables (three digits).

    Under a metric with bootstrap intervals (`<metric>_ci_low`/`_ci_high`), a `±95%` row gives
    each model's half-width (high - low) / 2 in two digits: the interval in a glance (the
    exact, possibly asymmetric, bounds are in comparison.json and MLflow). lm-evaluation-harness
    metrics follow posttrain's own, under a row per task (`_metric_label`). `eval_seconds` (each model's
    evaluation time) comes last."""
    harness = sorted({k for c in comparison.values() for k in c if k.startswith("lm_eval/")
                      and not k.endswith(CI_SUFFIXES)})
    metrics = [m for m in (*_COMPARISON, *harness, "eval_seconds")
               if any(m in c for c in comparison.values())]
    models = list(comparison)

    def half_width(m: dict, metric: str):
        low, high = m.get(metric + CI_SUFFIXES[0]), m.get(metric + CI_SUFFIXES[1])
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
            return ""
        return (float(high) - float(low)) / 2

    def table(names: list[str], digits: int, title: str | None) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        t.add_column("metric", no_wrap=True)
        for name in names:
            t.add_column(name, justify="right", no_wrap=True)
        group = None
        for metric in metrics:
            heading, label = _metric_label(metric)
            if heading is not None and heading != group:
                t.add_row(heading, *([""] * len(names)))
            group = heading
            t.add_row(label, *(_short(comparison[n].get(metric, ""), digits) for n in names))
            if any(metric + CI_SUFFIXES[0] in comparison[n] for n in names):
                t.add_row("  ±95%", *(_short(half_width(comparison[n], metric), min(digits, 2))
                                      for n in names), style="dim")
        return t

    def fits(t: Table) -> bool:
        return console.measure(t, options=console.options.update(width=10**4)).maximum <= width

    title = "evaluation (held-out)"
    for digits in (4, 3, 2):
        if fits(whole := table(models, digits, title)):
            return [whole]
    per = len(models)
    while per > 1 and not fits(table(models[:per], 3, title)):
        per -= 1
    return [table(models[i:i + per], 3, title if i == 0 else None)
            for i in range(0, len(models), per)]


def print_plan(cfg, plan) -> None:
    table = Table(title=f"posttrain plan: {cfg.name}", box=box.SIMPLE_HEAD, padding=(0, 1),
                  pad_edge=False)  # one space between columns: a long plan fits 80 columns
    for col in ("stage", "method", "from", "data", "uses", "status", "key"):
        # A narrow terminal folds the long cells (data, uses) rather than dropping a column.
        table.add_column(col, min_width=10 if col == "data" else len(col), overflow="fold",
                         no_wrap=col in ("stage", "status", "key"))
    for r in plan.rows:
        status = "[cyan]cached[/cyan]" if r.status == "cached" else r.status
        table.add_row(r.stage, r.method, r.start, r.data, r.uses, status,
                      (r.key or "after inputs")[:12])
    console.print(table)
    if plan.formats:
        console.print("data: " + ", ".join(
            f"{n} ({f}{', images' if n in plan.image_sources else ''})"
            for n, f in plan.formats.items()))
    if plan.promotion:
        p = plan.promotion
        guards = ", ".join(f"{g['metric']} ({g['direction']}, tolerance {g['tolerance']})"
                           for g in p["guards"]) or "none"
        gate = f"; min_margin {p['min_margin']}" if p.get("min_margin") else ""
        if p.get("require_significance"):
            gate += " at the 95% interval's lower bound"
        console.print(f"promotion: {p['metric']} ({p['direction']}); guards: {guards}{gate}")


def print_summary(result: dict, cfg) -> None:
    from posttrain.methods import method

    table = Table(title="posttrain run")
    for col in ("stage", "status", "time (s)", "key metrics"):
        # A metric too long for a narrow terminal folds onto the next line, never cut.
        table.add_column(col, overflow="fold")
    names = {s.name: method(s).key_metrics for s in cfg.stages}
    names["data"] = tuple(f"{n}_train_rows" for n in cfg.data) + ("dropped_rows",)
    for row in result["stages"]:
        shown = ", ".join(f"{k}={_fmt(row['metrics'][k])}" for k in names.get(row["stage"], ())
                          if k in row["metrics"])
        status = "[green]ran[/green]" if row["status"] == "ran" else "[cyan]cached[/cyan]"
        table.add_row(row["stage"], status, f"{row['seconds']:.1f}", shown)
    console.print(table)
    console.print("[bold]outputs[/bold] (folder, MLflow run that produced it):")
    for row in result["stages"]:
        folder = row.get("path") or ""
        if row["stage"] in names and row["stage"] != "data" and folder:
            folder = str(Path(folder) / "model")
        console.print(f"  {row['stage']}: {folder}  run {row.get('source_run_id') or '-'}",
                      markup=False, highlight=False, soft_wrap=True)
    comparison = result.get("comparison") or {}
    if comparison:
        # One row per metric, one column per model: metric names and numbers stay whole.
        for table in _comparison_tables(comparison, console.width):
            console.print(table)
    print_promotion(result.get("promotion"))


def print_promotion(decision: dict | None) -> None:
    if not decision:
        return
    if decision["promote"]:
        console.print(f"[green]promoted[/green] {decision['winner']} as version "
                      f"{decision['version']} of {decision['registered_model']} (champion)")
    else:
        console.print(f"[yellow]nothing promoted[/yellow] ({decision['registered_model']})")
    for reason in decision["reasons"]:
        console.print(f"  {reason}")


def print_ui_hints(result: dict) -> None:
    from posttrain.tracking import tracking_uri

    prefect = os.environ.get("PREFECT_API_URL")
    console.print(f"MLflow parent run: {result['mlflow_run_id']}  (store: {tracking_uri()})")
    if prefect:
        console.print(f"Prefect UI: {prefect.removesuffix('/api')}")
    # The ports `make ui` (infra/ui.sh) starts the servers on: the same variables, same defaults.
    prefect_port = os.environ.get("PREFECT_UI_PORT") or "4200"
    mlflow_port = os.environ.get("MLFLOW_UI_PORT") or "5000"
    console.print(
        f"Open the UIs: [bold]make ui[/bold] (Prefect on http://127.0.0.1:{prefect_port}, MLflow "
        f"on http://127.0.0.1:{mlflow_port}); stop them with [bold]make ui-stop[/bold].",
        soft_wrap=True,
    )


@app.command()
def plan(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Check everything that can be checked without training (config, model folder, every data
    row, reward functions, batch sizes, evaluation and promotion metrics) and print the stage
    graph: what each stage starts from, reads, and whether it is cached or will run."""
    cfg = _load(config, overrides)
    print_plan(cfg, _preflight(cfg))
    console.print("[green]preflight passed[/green]")


@app.command()
def run(config: ConfigArg = None, overrides: OverridesArg = None,
        verbose: VerboseOpt = False) -> None:
    """Run the whole pipeline (data, every stage in order, evaluation, promotion) as a Prefect
    flow, after preflight. Without CONFIG: the built-in demo (conf/demo.yaml)."""
    cfg = _load(config, overrides)
    print_plan(cfg, _preflight(cfg, flow=True))
    from pipelines.flows import pipeline

    result = _run_flow(pipeline, cfg, verbose)
    print_summary(result, cfg)
    print_ui_hints(result)


def _method_command(name: str, summary: str):
    def command(config: ConfigArg = None, overrides: OverridesArg = None,
                stage: Annotated[list[str] | None, typer.Option(
                    "--stage", "-s", help="Run only this stage (repeatable); default: every "
                    "stage of this method.")] = None,
                verbose: VerboseOpt = False) -> None:
        cfg = _load(config, overrides)
        targets = stage or [s.name for s in cfg.stages if s.method == name]
        wrong = [t for t in targets if t not in {s.name for s in cfg.stages}
                 or cfg.stage(t).method != name]
        if not targets or wrong:
            have = [s.name for s in cfg.stages if s.method == name]
            console.print(f"[red]no {name} stage {'named ' + str(wrong) if wrong else ''} in "
                          f"this config[/red] ({name} stages: {have or 'none'})")
            raise typer.Exit(2)
        print_plan(cfg, _preflight(cfg, targets, flow=True))
        from pipelines.flows import stage_flow

        result = _run_flow(lambda c: stage_flow(c, targets), cfg, verbose)
        print_summary(result, cfg)
        print_ui_hints(result)

    command.__doc__ = (f"Run the {name} stages ({summary}) and the stages they start from or "
                       "use (cached or run first), without evaluation.")
    return command


def _register_method_commands() -> None:
    from posttrain.methods import METHODS

    for name, m in METHODS.items():
        app.command(name=name)(_method_command(name, m.summary))
    app.command(name="rm", hidden=True)(_method_command("reward", METHODS["reward"].summary))


_register_method_commands()


@app.command()
def serve(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Serve the pipeline and retraining deployments from this process (needs PREFECT_API_URL;
    runs until stopped; schedules stay active after it stops)."""
    cfg = _load(config, overrides)
    _require_server("serve")
    from prefect import serve as prefect_serve

    from pipelines.flows import deployments

    r = cfg.retrain
    console.print(f"serving posttrain-pipeline/{cfg.name} and posttrain-retrain/{cfg.name} "
                  f"(schedule: {r.cron or 'none'} {r.timezone if r.cron else ''}; event trigger: "
                  f"{'on' if r.on_dataset_updated else 'off'})")
    prefect_serve(*deployments(cfg), pause_on_shutdown=False)


@app.command(name="emit-dataset-updated")
def emit_dataset_updated(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Emit a 'posttrain.dataset.updated' event for the pipeline, which triggers its retraining
    deployment (needs PREFECT_API_URL). Exits 1 when the server does not confirm it."""
    cfg = _load(config, overrides)
    _require_server("emit-dataset-updated")
    from tasks.events import NotDelivered, deliver_dataset_updated

    try:
        event = deliver_dataset_updated(cfg.name, {"source": "posttrain emit-dataset-updated"})
    except NotDelivered as e:
        console.print(f"[red]{e}[/red]\nNothing will be retrained: check that the server runs "
                      "and PREFECT_API_URL (and PREFECT_API_AUTH_STRING, if the server needs "
                      "one) are right, then run this again.", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"delivered posttrain.dataset.updated for {cfg.name} (event {event.id})")


@app.command()
def export(
    source: Annotated[str, typer.Argument(
        help="A stage artifact folder (<artifacts_root>/<stage>/<key>) or a registered version "
             "(models:/<name>@<alias>, models:/<name>/<version>).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (new, or empty).")],
) -> None:
    """Write a self-contained Hugging Face model folder: merged safetensors weights, tokenizer
    and chat template, generation_config.json, and a README model card with metrics, data
    fingerprints and lineage."""
    from posttrain.export import ExportError
    from posttrain.export import export as export_model

    try:
        out = export_model(source, out_dir)
    except ExportError as e:
        console.print(f"[red]export failed:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"exported {source} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _require_server(command: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        console.print(f"[red]{command} needs a Prefect server:[/red] set PREFECT_API_URL, e.g. "
                      "`make ui` then export PREFECT_API_URL=http://127.0.0.1:4200/api")
        raise typer.Exit(2)


@app.command()
def env() -> None:
    """Print versions, devices and where runs are tracked."""
    from posttrain.tracking import tracking_uri

    table = Table(title="posttrain environment", show_header=False)
    table.add_row("python", f"{platform.python_version()} ({sys.executable})")
    for name in ("posttrain", "torch", "transformers", "peft", "accelerate", "datasets",
                 "prefect", "mlflow", "pydantic"):
        try:
            table.add_row(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            table.add_row(name, "not installed")
    import torch

    device = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    table.add_row("device", f"{device}, {os.cpu_count()} CPU cores")
    table.add_row("MLflow tracking", tracking_uri())
    table.add_row("Prefect API", os.environ.get("PREFECT_API_URL") or "embedded (no server)")
    console.print(table)


def main() -> None:
    """The `posttrain` console entry point."""
    from posttrain.gc_tuning import tune_for_a_command

    tune_for_a_command()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
