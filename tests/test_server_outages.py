"""Servers that go away in the middle of a run (issue 13, item 6): the MLflow server unreachable
for 30 s while a stage trains, and the Prefect server killed while a stage trains. Apart from
tests/test_servers.py (whose tests share one pair of servers) so that the slow files run on
different workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from posttrain.config import PipelineConfig, validate
from tests.conftest import SFT_STAGE, tiny_pipeline_values
from tests.test_servers import BIN, ROOT, _free_port, _start, _stop, _wait_http


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stage_outlives_an_mlflow_server_away_for_30_seconds(tmp_path, monkeypatch):
    """The MLflow server stops in the middle of training and comes back 30 s later: the
    metrics sent meanwhile are kept and delivered, the stage finishes, its run is complete
    (issue 13, item 6)."""
    from concurrent.futures import ThreadPoolExecutor

    from posttrain import stages, tracking

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    port = _free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "mlartifacts")]

    def start(n: int) -> subprocess.Popen:
        proc = _start(cmd, tmp_path / f"mlflow{n}.log", env, cwd=tmp_path)
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 120, tmp_path / f"mlflow{n}.log")
        return proc

    server = start(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, [{**SFT_STAGE, "max_steps": 200, "log_every": 1, "eval_every": 1000}]))
    data = stages.run_data_stage(cfg)
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    training = ThreadPoolExecutor(1).submit(
        stages.run_training_stage, cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))
    try:
        deadline = time.time() + 120
        while True:  # the stage's first metrics have arrived: training is under way
            runs = c.search_runs([exp.experiment_id], "tags.`posttrain.stage` = 'sft'")
            if runs and c.get_metric_history(runs[0].info.run_id, "loss"):
                break
            assert time.time() < deadline and not training.done(), "no metrics in 120 s"
            time.sleep(0.2)
        _stop(server)
        time.sleep(30)
        assert not training.done() or training.exception() is None
        server = start(2)
        manifest = training.result(timeout=300)
        run = c.get_run(manifest["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(1, 201))
    finally:
        _stop(server)


# ------------------------------------------------------------- what the Prefect UI shows


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stage_outlives_the_prefect_server_and_the_rerun_finds_it_cached(tmp_path):
    """The Prefect server dies (SIGKILL) while `posttrain run` trains a stage: the stage still
    finishes and writes its artifact (stages do not need Prefect to train or to write), the
    command ends with one message saying that the server stopped answering, what was kept and
    what to do, with no traceback; once the server is back on the same port and database, the
    same command finds the stage cached and trains nothing (issue 13, item 6)."""
    from posttrain import artifacts, tracking
    from tests.test_crash import Command, _checkpoint_steps, _losses

    port = _free_port()
    home = tmp_path / "prefect-home"
    auth = "posttrain:test-secret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                  str(port), "--no-ui"]

    def start_server(n: int) -> subprocess.Popen:
        proc = _start(server_cmd, tmp_path / f"prefect{n}.log",
                      env | {"PREFECT_SERVER_API_AUTH_STRING": auth})
        _wait_http(f"http://127.0.0.1:{port}/api/health", proc, 120, tmp_path / f"prefect{n}.log")
        return proc

    # The command talks to the server; MLflow is this session's store (conftest). Each Prefect
    # request is retried once, not five times with back-off (about a minute per request): the
    # same path, in seconds.
    api = f"http://127.0.0.1:{port}/api"
    run_env = env | {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth,
                     "PREFECT_CLIENT_MAX_RETRIES": "1", "PYTHONPATH": str(ROOT),
                     "COLUMNS": "200"}
    values = tiny_pipeline_values(
        tmp_path, [{**SFT_STAGE, "max_steps": 150, "checkpoint_every": 5, "eval_every": 1000,
                    "log_every": 5}],
        evaluate={"enabled": False}, promotion={"enabled": False},
        tracking={"experiment": f"prefect-gone-{tmp_path.name}"})
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config)]
    root = tmp_path / "artifacts"
    server = start_server(1)
    try:
        first = Command(cmd, tmp_path, run_env, tmp_path / "1.log")
        first.wait_for(lambda: _checkpoint_steps(root / "sft"), "checkpoint", timeout=240)
        os.killpg(server.pid, signal.SIGKILL)  # the server crashes in the middle of training
        server.wait()
        assert not list((root / "sft").glob(f"*/{artifacts.MANIFEST}"))  # still training
        rc = first.proc.wait(timeout=240)
        out = first.output()
        text = " ".join(out.split())  # the console wraps long lines
        assert rc == 1, out
        assert f"the run failed: the Prefect server at {api} stopped answering (ConnectError" \
            in text, out
        assert "training is not lost: written during this run and kept: data (" in text, out
        assert f", sft ({root / 'sft'}/" in text, out
        assert "then rerun the same command: finished stages come from the cache" in text
        assert "Traceback" not in out, out
        # It exits after that message; Prefect's undeliverable logs and events are dropped.
        assert out.rstrip().splitlines()[-1].startswith("full traceback: "), out
        (folder,) = [p for p in (root / "sft").iterdir() if p.is_dir() and
                     not p.name.startswith(".")]
        assert artifacts.verify(folder, full=True)
        ((status, _, losses),) = _losses(values["tracking"]["experiment"])
        assert status == "FINISHED" and sorted(losses) == list(range(5, 151, 5))
        c = tracking.client()
        exp = c.get_experiment_by_name(values["tracking"]["experiment"])
        assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

        server = start_server(2)  # back, on the same port and database
        again = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True,
                               timeout=240, check=False)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out
        assert re.search(r"│ sft\s+│ cached\s+│", out) and "resuming" not in out, out
        assert [r[0] for r in _losses(values["tracking"]["experiment"])] == ["FINISHED"]
        assert [p for p in (root / "sft").iterdir() if p.is_dir()] == [folder]
    finally:
        _stop(server)
