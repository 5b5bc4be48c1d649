"""MLflow logging through explicit run ids.

Everything goes through `MlflowClient` with run ids passed as arguments: MLflow's active-run stack
is thread-local, and a Prefect task may run in another thread than its flow. The default store is
`sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` points elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import ClassVar

from posttrain import mlflow_store, progress
from posttrain.artifacts import current_owner, owner_alive
from posttrain.charts import comparison_chart, is_number

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CACHE_HIT_TAG = "posttrain.cache_hit"
SOURCE_RUN_TAG = "posttrain.source_run_id"
STAGE_TAG = "posttrain.stage"
KEY_TAG = "posttrain.key"
# The process that opened a run: a later run closes it (KILLED) when that process is gone.
OWNER_TAGS = {"host": "posttrain.owner.host", "pid": "posttrain.owner.pid",
              "start_time": "posttrain.owner.start_time",
              "pid_namespace": "posttrain.owner.pid_namespace"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_store.seed_new_sqlite_store(tracking_uri()))


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server, or for a local store on the UI
    that `make ui` starts over it (127.0.0.1, MLFLOW_UI_PORT, default 5000)."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        uri = f"http://127.0.0.1:{os.environ.get('MLFLOW_UI_PORT') or 5000}"
    experiment = client().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another process created it between the two calls
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.dtype': 'float32', ...} (MLflow params are flat strings). A list
    of named mappings (the stages) is keyed by name: 'stages.dpo.beta'."""
    out: dict[str, str] = {}
    for k, v in values.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (list, tuple)) and v and all(
                isinstance(i, dict) and "name" in i for i in v):
            for item in v:
                out.update(flatten(item, f"{name}.{item['name']}."))
        else:
            out[name] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _params(values: dict[str, str]):
    from mlflow.entities import Param

    # MLflow caps param values at 6000 characters.
    return [Param(k, v[:6000]) for k, v in values.items()]


def start_run(
    experiment: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    params: dict | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run (a child when `parent_run_id` is given) and return its id."""
    c = client()
    all_tags = {**owner_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(experiment), run_name=name, tags=all_tags)
    if params:
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=_params(dict(items[i : i + 100])))
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    c = client()
    if reason:
        c.set_tag(run_id, "posttrain.failure", reason[:5000])
    c.set_terminated(run_id, status=status)


def owner_tags() -> dict[str, str]:
    """This process (host, PID, start time) as the owner tags of a run it opens."""
    return {OWNER_TAGS[k]: str(v) for k, v in current_owner().items()}


def close_orphaned_runs(experiment: str, tags: dict[str, str], *, closer: str) -> list[str]:
    """Mark KILLED, with the reason, every RUNNING run of `experiment` carrying `tags` whose
    owner process is gone (on this host: no such PID, or a PID reused by a later process), and
    the RUNNING children of each. `closer` says who closes them. Returns the run ids closed.

    A process killed with SIGKILL cannot close its runs; the next run of the same stage or
    pipeline does. Runs of live processes, of another host, or without owner tags stay."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []

    def running(filters: dict[str, str]):
        if any("'" in v for v in filters.values()):
            return []
        where = " and ".join(["attributes.status = 'RUNNING'",
                              *(f"tags.`{k}` = '{v}'" for k, v in filters.items())])
        return c.search_runs([exp.experiment_id], where, max_results=1000)

    closed = []
    for run in running(tags):
        if run.info.run_id in closed:
            continue
        owner = {k: run.data.tags.get(tag) for k, tag in OWNER_TAGS.items()}
        if owner["pid"] is None or owner_alive(owner) is not False:
            continue
        reason = (f"killed: its process (PID {owner['pid']} on {owner['host']}) ended without "
                  f"closing the run; closed by {closer} (PID {os.getpid()})")
        for child in running({"mlflow.parentRunId": run.info.run_id}):
            child_owner = {k: child.data.tags.get(tag) for k, tag in OWNER_TAGS.items()}
            if child_owner["pid"] is not None and owner_alive(child_owner) is False:
                end_run(child.info.run_id, "KILLED", reason=reason)
                closed.append(child.info.run_id)
        end_run(run.info.run_id, "KILLED", reason=reason)
        closed.append(run.info.run_id)
    return closed


def close_own_runs(experiment: str, *, status: str, reason: str,
                   pids: list[int] | None = None) -> list[str]:
    """End every run of `experiment` that this process opened and left RUNNING (children first),
    after flushing the metrics still buffered: what an interrupted command does before it
    exits. With `pids`: the runs that those processes of this host opened instead (a launched
    stage's processes, which its command killed at the stop's deadline before they closed
    their own)."""
    # the points this process still buffers (a launched process buffered its own)
    for logger in list(MetricLogger.live) if pids is None else []:
        with contextlib.suppress(Exception):  # closing the runs matters more than the points
            logger.flush(wait_seconds=2.0)
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    me = owner_tags()
    keys = ("pid", "start_time") if pids is None else ("host",)
    where = " and ".join(["attributes.status = 'RUNNING'",
                          *(f"tags.`{OWNER_TAGS[k]}` = '{me[OWNER_TAGS[k]]}'" for k in keys)])
    runs = c.search_runs([exp.experiment_id], where, max_results=1000)
    if pids is not None:
        runs = [r for r in runs if r.data.tags.get(OWNER_TAGS["pid"]) in {str(p) for p in pids}]
    runs.sort(key=lambda r: "mlflow.parentRunId" not in r.data.tags)  # children first
    for run in runs:
        end_run(run.info.run_id, status, reason=reason)
    return [r.info.run_id for r in runs]


class MetricLogger:
    """Buffers per-step metrics and sends them in batches (one SQLite write per few hundred).

    Batches due during training (every `flush_every` points or `flush_seconds`) are sent by a
    background thread, so a slow or unreachable MLflow server never stalls training: what could
    not be sent stays buffered (with one warning) and goes out when the server answers again.
    `flush()` at the end of the stage sends the rest, waiting up to `wait_seconds` for the
    server before it gives up with the server's error.

    With `echo` (the default), each call also reports the step's metrics as one line through
    posttrain.progress (the `posttrain.progress` logger, which a Prefect task sends to its run's
    logs): the training loops call it every `log_every` steps and after each evaluation."""

    live: ClassVar[weakref.WeakSet] = weakref.WeakSet()  # flushed by close_own_runs on an interrupt

    def __init__(self, run_id: str | None, flush_every: int = 500, flush_seconds: float = 10.0,
                 echo: bool = True, wait_seconds: float = 300.0):
        self.run_id = run_id
        self.echo = echo
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds  # a killed run loses at most this much of its curve
        self.wait_seconds = wait_seconds
        self._last_flush = time.monotonic()
        self._buffer: list = []
        self._lock = threading.Lock()  # guards _buffer
        self._sending = threading.Lock()  # one batch in flight at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self.history: list[tuple[int, dict[str, float]]] = []
        MetricLogger.live.add(self)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.history.append((step, clean))
        if self.echo:
            progress.report_metrics(step, clean)
        if self.run_id is None:
            return
        from mlflow.entities import Metric  # imported only when there is a run to log to

        now = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend(Metric(k, v, now, step) for k, v in clean.items()
                                if math.isfinite(v))
            size = len(self._buffer)
        stale = time.monotonic() - self._last_flush > self.flush_seconds
        if size >= self.flush_every or stale:
            self._last_flush = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._send_in_background, daemon=True,
                                                name=f"mlflow-metrics-{self.run_id[:8]}")
                self._thread.start()
            self._wake.set()

    def _send_in_background(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._send() is None:
                continue
            self._wake.wait(min(self.flush_seconds, 5.0))  # the server failed: retry later
            self._wake.set()

    def _send(self) -> Exception | None:
        """Send what is buffered; the error (the unsent points back in the buffer) or None."""
        with self._sending:
            with self._lock:
                batch, self._buffer = self._buffer, []
            sent = 0
            try:
                c = client()
                for sent in range(0, len(batch), 1000):
                    c.log_batch(self.run_id, metrics=batch[sent : sent + 1000])
                sent = len(batch)
            except Exception as e:  # noqa: BLE001 - kept and retried; flush() raises it
                with self._lock:
                    self._buffer[:0] = batch[sent:]
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"MLflow did not take the metrics of run {self.run_id} "
                                  f"({type(e).__name__}: {e}); they stay buffered and are sent "
                                  "when it answers again", stacklevel=2)
                return e
        if self._warned and not self._buffer:
            self._warned = False
            warnings.warn(f"MLflow answers again: buffered metrics of run {self.run_id} sent",
                          stacklevel=2)
        return None

    def flush(self, wait_seconds: float | None = None) -> None:
        """Send every buffered point now, waiting up to `wait_seconds` (default: the logger's)
        for an unreachable server; then raise its error."""
        self._last_flush = time.monotonic()
        if self.run_id is None:
            return
        deadline = time.monotonic() + (self.wait_seconds if wait_seconds is None
                                       else wait_seconds)
        delay = 0.5
        while True:
            error = self._send()
            if error is None:
                return
            if time.monotonic() + delay > deadline:
                raise error
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    logger = MetricLogger(run_id, echo=False)
    logger(metrics, step)
    logger.flush()


def log_dataset(
    run_id: str, rows: list[dict], *, name: str, source: str, digest: str, context: str
) -> None:
    """Record a dataset as an input of the run (visible in the MLflow UI's 'Datasets' column)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    # Nested message lists become JSON strings so that MLflow can infer a schema.
    df = pd.DataFrame(
        [{k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in r.items()}
         for r in rows[:1000]]
    )
    with warnings.catch_warnings():
        # A bare name such as 'demo' or a hub id matches several source kinds; MLflow picks one
        # and warns each time, which says nothing to a user.
        warnings.simplefilter("ignore", UserWarning)
        # "demo:sft" would read as a URI scheme MLflow has no resolver for.
        ds = mlflow.data.from_pandas(df, source=source.replace(":", "-"), name=name,
                                     digest=digest[:36])
    client().log_inputs(
        run_id,
        datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
    )


def log_folder(run_id: str, folder: str | Path, max_mb: float, artifact_path: str = "stage") -> None:
    """Copy a stage folder into the run's artifacts; large folders log only their manifest."""
    folder = Path(folder)
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    c = client()
    c.set_tag(run_id, "posttrain.artifact_dir", str(folder.resolve()))
    if size_mb <= max_mb:
        c.log_artifacts(run_id, str(folder), artifact_path)
    else:
        c.log_artifact(run_id, str(folder / "manifest.json"), artifact_path)


def log_table(run_id: str, rows: list[dict], artifact_file: str) -> None:
    """A list of row dicts as an MLflow table (JSON, shown in the UI's artifact view)."""
    columns = list(rows[0].keys()) if rows else []
    payload = {"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(payload, default=str))
        parent = str(Path(artifact_file).parent)
        client().log_artifact(run_id, str(path), None if parent == "." else parent)


def record_cache_hit(
    experiment: str, parent_run_id: str | None, stage: str, manifest: dict
) -> str:
    """A child run that says 'this stage was cached' and points at the run that produced it.

    Its params and final metrics are copied from the manifest so that comparisons across
    pipeline runs show the cached stage like any other.
    """
    source = manifest.get("mlflow_run_id") or ""
    run_id = start_run(
        experiment,
        f"{stage} (cached)",
        parent_run_id=parent_run_id,
        params=manifest.get("config") or {},
        tags={
            CACHE_HIT_TAG: "true",
            SOURCE_RUN_TAG: source,
            STAGE_TAG: stage,
            KEY_TAG: manifest.get("key", ""),
            "mlflow.note.content": f"Cached: produced by run {source} "
            f"(artifact {manifest.get('path', '')}).",
        },
    )
    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if is_number(v)}
    if metrics:
        log_metrics(run_id, metrics)
    end_run(run_id)
    return run_id


def log_comparison(run_id: str, comparison: dict[str, dict[str, float]],
                   artifact_file: str = "comparison.json",
                   chart_file: str = "comparison.png") -> None:
    """The evaluation comparison as an MLflow table (one row per stage) and a PNG chart with one
    panel per metric, its bars the stages."""
    import pandas as pd

    rows = [{"stage": stage, **metrics} for stage, metrics in comparison.items()]
    c = client()
    c.log_table(run_id, pd.DataFrame(rows), artifact_file)
    if rows:
        c.log_figure(run_id, comparison_chart(comparison), chart_file)
