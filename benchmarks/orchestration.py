"""Orchestration overhead: the demo pipeline (Prefect flow + MLflow tracking) run twice.

    python -m benchmarks.orchestration                  # prints one JSON line
    python -m benchmarks.orchestration --prefect-server # against a running Prefect server
    python -m benchmarks.orchestration --prefect-server --mlflow-server
    python -m benchmarks.orchestration --child ...      # (internal) one flow run in this process

Runs `pipelines.flows.pipeline` on conf/demo.yaml with tiny step counts in a fresh temporary
folder (its own artifacts, sqlite MLflow store and PREFECT_HOME), in a child process, twice: a
cold run that trains every stage, then the same config again, which finds every stage cached.
Per stage it reads two times: the flow's row ("seconds": the whole Prefect task, cache lookup,
MLflow child run and artifact upload included) and the artifact manifest's "seconds" (the stage
body: loading, training, saving, inside the MLflow run). Their difference is what orchestration
adds to the stage. The cached rerun's times are all overhead.

By default each flow run starts Prefect's embedded server and writes MLflow's sqlite store.
--prefect-server starts `prefect server start` once, before both runs, and points them at it with
PREFECT_API_URL (what `make ui` + `export PREFECT_API_URL=...` gives a user); --mlflow-server does
the same for `mlflow server` and MLFLOW_TRACKING_URI (the infra/ set-up). The servers' own start-up
is reported apart (`server_start_s`): it is paid once, not per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "stages.sft.max_steps=10", "stages.sft.eval_every=5", "demo.num_train=200",
    "demo.num_eval=20", "stages.reward.max_steps=3", "stages.dpo.max_steps=3",
    "stages.orpo.max_steps=3", "stages.kto.max_steps=3", "stages.grpo.max_steps=2",
    "stages.ppo.max_steps=2", "evaluate.max_prompts=20",
]


def child(overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    from pipelines.flows import pipeline
    from posttrain.config import load_pipeline_config

    import_s = time.perf_counter() - t0
    cfg = load_pipeline_config(ROOT / "conf" / "demo.yaml", overrides)
    phases = _time_phases()
    t1 = time.perf_counter()
    result = pipeline(cfg)
    flow_s = time.perf_counter() - t1
    phases["flow_entered"] = phases.pop("start_entered", t1) - t1  # Prefect's flow start-up
    stages = []
    for row in result["stages"]:
        body = None
        manifest = Path(row["path"]) / "manifest.json" if row.get("path") else None
        if row["status"] == "ran" and manifest is not None and manifest.is_file():
            body = json.loads(manifest.read_text()).get("seconds")
        stages.append({"stage": row["stage"], "status": row["status"],
                       "seconds": row["seconds"], "body_s": body})
    heavy = [m for m in ("torch", "transformers", "peft", "accelerate", "datasets", "mlflow",
                         "matplotlib") if m in sys.modules]  # what this run had to import
    return {"import_s": import_s, "flow_s": flow_s, "phases": phases, "stages": stages,
            "modules": heavy}


def _time_phases() -> dict:
    """Wrap the flow's non-stage steps with timers: MLflow parent run start and finish (which
    logs the comparison chart), the data fingerprint check and promotion."""
    from pipelines import flows

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            if name == "start":
                phases.setdefault("start_entered", t)
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    flows.PipelineRun.start = classmethod(timed("start", flows.PipelineRun.start.__func__))
    flows.PipelineRun.finish = timed("finish", flows.PipelineRun.finish)
    flows.promote_task = timed("promote", flows.promote_task)
    flows.events.note_fingerprints = timed("fingerprints", flows.events.note_fingerprints)
    return phases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], health: str, env: dict, log: Path, timeout: float = 180):
    """Run a server process (its own session, so stopping it stops its children) until healthy;
    yields the seconds it took to become healthy."""
    import urllib.request

    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}): "
                                   f"{log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{health} not healthy after {timeout} s")
            time.sleep(0.25)
        yield time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def run_twice(overrides: list[str], timeout: int, python: str = sys.executable, *,
              prefect_server: bool = False, mlflow_server: bool = False) -> dict:
    out: dict = {"overrides": overrides, "prefect": "server" if prefect_server else "embedded",
                 "mlflow": "server" if mlflow_server else "sqlite", "server_start_s": {}}
    bin_dir = Path(python).parent
    with tempfile.TemporaryDirectory(prefix="posttrain-orch-") as tmp, \
            contextlib.ExitStack() as servers:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("PREFECT_API_URL", None)
        try:
            if prefect_server:
                port = _free_port()
                out["server_start_s"]["prefect"] = servers.enter_context(_server(
                    [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                     "--port", str(port), "--no-ui"],
                    f"http://127.0.0.1:{port}/api/health", env, Path(tmp) / "prefect.log"))
                env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            if mlflow_server:
                port = _free_port()
                out["server_start_s"]["mlflow"] = servers.enter_context(_server(
                    [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                     str(port), "--workers", "1", "--backend-store-uri", env.pop(
                         "MLFLOW_TRACKING_URI"), "--artifacts-destination",
                     str(Path(tmp) / "mlartifacts")],
                    f"http://127.0.0.1:{port}/health", env, Path(tmp) / "mlflow.log"))
                env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        except (RuntimeError, TimeoutError) as e:
            return {**out, "error": str(e).splitlines()[0]}
        for name in ("cold", "cached"):
            cmd = [python, "-m", "benchmarks.orchestration", "--child",
                   *[f"artifacts_root={Path(tmp) / 'artifacts'}", *overrides]]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            wall = time.perf_counter() - t0
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                return {**out, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
            out[name] = {"wall_s": wall, **json.loads(lines[-1])}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help="run the flow once, here")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--name", default="orchestration")
    p.add_argument("--prefect-server", action="store_true",
                   help="start `prefect server start` once and run both flows against it")
    p.add_argument("--mlflow-server", action="store_true",
                   help="start `mlflow server` once and track both flows there")
    p.add_argument("--threads", type=int, default=None, help="ignored (the config sets 1)")
    p.add_argument("overrides", nargs="*", help="config overrides (default: tiny step counts)")
    args = p.parse_args(argv)
    if args.child:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            result = child(args.overrides)
    else:
        result = {"name": args.name, "variant": "orchestration",
                  **run_twice(args.overrides or OVERRIDES, args.timeout,
                              prefect_server=args.prefect_server,
                              mlflow_server=args.mlflow_server)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
