"""Orchestration overhead: the demo pipeline (Prefect flow + MLflow tracking) run twice.

    python -m benchmarks.orchestration                  # prints one JSON line
    python -m benchmarks.orchestration --child ...      # (internal) one flow run in this process

Runs `pipelines.flows.pipeline` on conf/demo.yaml with tiny step counts in a fresh temporary
folder (its own artifacts, sqlite MLflow store and PREFECT_HOME), in a child process, twice: a
cold run that trains every stage, then the same config again, which finds every stage cached.
Per stage it reads two times: the flow's row ("seconds": the whole Prefect task, cache lookup,
MLflow child run and artifact upload included) and the artifact manifest's "seconds" (the stage
body: loading, training, saving, inside the MLflow run). Their difference is what orchestration
adds to the stage. The cached rerun's times are all overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "sft.max_steps=10", "sft.eval_every=5", "data.demo.num_train=200", "data.demo.num_eval=20",
    "reward.max_steps=3", "dpo.max_steps=3", "orpo.max_steps=3", "kto.max_steps=3",
    "grpo.max_steps=2", "ppo.max_steps=2", "evaluate.max_prompts=20",
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
    return {"import_s": import_s, "flow_s": flow_s, "phases": phases, "stages": stages}


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


def run_twice(overrides: list[str], timeout: int, python: str = sys.executable) -> dict:
    out: dict = {"overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="posttrain-orch-") as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("PREFECT_API_URL", None)
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
    p.add_argument("--threads", type=int, default=None, help="ignored (the config sets 1)")
    p.add_argument("overrides", nargs="*", help="config overrides (default: tiny step counts)")
    args = p.parse_args(argv)
    if args.child:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            result = child(args.overrides)
    else:
        result = {"name": args.name, "variant": "orchestration",
                  **run_twice(args.overrides or OVERRIDES, args.timeout)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
