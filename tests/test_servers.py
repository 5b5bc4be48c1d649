"""Against real servers: `prefect server start` and `mlflow server` on free 127.0.0.1 ports,
`posttrain serve` in a background process, deployment runs created through the Prefect API.

The servers and the serving process are started once for the module and stopped (their whole
process groups) in fixture teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from posttrain.config import PipelineConfig, read_yaml, validate
from tests.conftest import SFT_STAGE, stage, stage_runs, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_prefect_yaml_declares_the_served_deployments():
    """prefect.yaml (work pools) and `posttrain serve conf/demo.yaml` declare the same thing."""
    from pipelines.flows import deployments
    from posttrain.config import load_pipeline_config

    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    served = deployments(load_pipeline_config(ROOT / "conf" / "demo.yaml"))
    assert [d["entrypoint"] for d in declared] == [d.entrypoint for d in served]
    for spec, dep in zip(declared, served):
        assert spec["name"] == dep.name
        assert spec["parameters"]["cfg"] == read_yaml(ROOT / "conf" / "demo.yaml"), \
            "prefect.yaml is stale: run `make prefect-yaml`"
        validate(PipelineConfig, spec["parameters"]["cfg"])
        assert spec["concurrency_limit"] == dep.concurrency_limit == 1
        assert spec["enforce_parameter_schema"] is dep.enforce_parameter_schema is True
    retrain, served_retrain = declared[1], served[1]
    assert retrain["schedules"][0]["cron"] == served_retrain.schedules[0].schedule.cron
    trigger, served_trigger = retrain["triggers"][0], served_retrain.triggers[0]
    assert set(trigger["expect"]) == served_trigger.expect
    assert trigger["match"] == dict(served_trigger.match.root)


# ------------------------------------------------------------------------------ real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    out = log.open("w")
    # A session of its own: teardown stops the process and every child it started.
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server and an MLflow server; yields the environment that points at them."""
    tmp = tmp_path_factory.mktemp("servers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    prefect_port, mlflow_port = _free_port(), _free_port()
    # The Prefect server asks for credentials, as a shared one should; clients send them.
    auth = "posttrain:test-secret"
    procs = []
    try:
        procs.append(_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(prefect_port), "--no-ui"], tmp / "prefect.log",
                            env | {"PREFECT_SERVER_API_AUTH_STRING": auth}))
        procs.append(_start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(mlflow_port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "mlartifacts")],
                            tmp / "mlflow.log", env, cwd=tmp))
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], 120,
                   tmp / "prefect.log")
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs[1], 120, tmp / "mlflow.log")
        env |= {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                "PREFECT_API_AUTH_STRING": auth,
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        yield {"env": env, "tmp": tmp}
    finally:
        for p in procs:
            _stop(p)


@pytest.fixture(scope="module")
def served(servers):
    """`posttrain serve` for a tiny pipeline, in a background process; yields its config."""
    tmp = servers["tmp"]
    values = tiny_pipeline_values(tmp, name="srv",
                                  promotion={"registered_model": "srv-model", "guards": []},
                                  retrain={"cron": "0 3 * * 1"})
    values["tracking"] = {"experiment": "srv"}
    config = tmp / "srv.yaml"
    config.write_text(yaml.safe_dump(values))
    proc = _start([str(BIN / "posttrain"), "serve", str(config)], tmp / "serve.log",
                  servers["env"])
    try:
        yield {"values": values, "log": tmp / "serve.log", "proc": proc, "config": config}
    finally:
        _stop(proc)


@pytest.fixture
def apis(servers, monkeypatch):
    """This test process talks to the same servers (Prefect client, MLflow client)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["env"]["MLFLOW_TRACKING_URI"])
    with temporary_settings({PREFECT_API_URL: servers["env"]["PREFECT_API_URL"],
                             PREFECT_API_AUTH_STRING: servers["env"]["PREFECT_API_AUTH_STRING"]}):
        yield


def _deployment(client, name: str, served: dict, timeout: float = 90):
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + timeout
    while True:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if served["proc"].poll() is not None or time.time() > deadline:
                raise RuntimeError("deployment not served:\n"
                                   + served["log"].read_text()[-3000:]) from None
            time.sleep(1)


def _wait_final(client, flow_run_id, served: dict, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished:\n"
                       + served["log"].read_text()[-3000:])


def _wait_for_run_of(client, deployment_id, served: dict, timeout: float = 90):
    """The first run of the deployment that its schedule did not create: the retraining
    deployment also has a cron schedule, and Prefect's scheduler service may have created its
    next (future) runs before the event's run exists; waiting on one of those never ends."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id]))) if not r.auto_scheduled]
        if runs:
            return runs[0]
        time.sleep(1)
    raise TimeoutError("the event did not trigger the retraining deployment:\n"
                       + served["log"].read_text()[-3000:])


def _parent_of(flow_run_id):
    from posttrain import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name("srv")
    runs = c.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployment_run_with_custom_parameters_tracks_and_promotes(servers, served, apis):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from posttrain import registry, tracking

    with get_client(sync_client=True) as client:
        dep = _deployment(client, "posttrain-pipeline/srv", served)
        retrain = _deployment(client, "posttrain-retrain/srv", served)
        assert retrain.global_concurrency_limit.limit == 1 and retrain.schedules
        assert retrain.schedules[0].schedule.cron == "0 3 * * 1"
        assert dep.enforce_parameter_schema

        # The server validates parameters against the schema generated from PipelineConfig,
        # stage list included.
        with pytest.raises(PrefectHTTPStatusError):
            client.create_flow_run_from_deployment(dep.id, parameters={"cfg": {"stages": [
                {"name": "sft", "method": "sft", "data": "sft", "learning_rate": "fast"}]}})
        with pytest.raises(PrefectHTTPStatusError):
            client.create_flow_run_from_deployment(dep.id, parameters={"cfg": {"stages": [
                {"name": "x", "method": "no-such-method", "data": "sft"}]}})

        # A three-stage chain, and nothing else: the rest comes from the served config (its
        # artifacts root, tiny model, data sources, experiment), not the code's defaults.
        chain = [SFT_STAGE, stage("dpo", beta=0.3), stage("grpo", start="dpo")]
        run = client.create_flow_run_from_deployment(dep.id,
                                                     parameters={"cfg": {"stages": chain}})
        run = _wait_final(client, run.id, served)
        assert run.state.is_completed(), run.state

        parent = _parent_of(run.id)  # in the served config's experiment ("srv")
        assert parent.data.params["stages.dpo.beta"] == "0.3"  # the custom value was used
        assert parent.data.params["stages.grpo.start"] == "dpo"
        assert parent.data.params["artifacts_root"] == served["values"]["artifacts_root"]
        assert parent.data.params["model.tiny.hidden_size"] == "32"  # served, not the default 64
        assert parent.info.status == "FINISHED"
        children = stage_runs(parent.info.run_id)
        assert set(children) == {"data", "sft", "dpo", "grpo", "evaluate"}
        assert all(c.info.status == "FINISHED" for c in children.values())
        artifacts = {a.path for a in tracking.client().list_artifacts(parent.info.run_id)}
        assert {"comparison.json", "comparison.png"} <= artifacts
        champion = registry.champion_version("srv-model")
        assert champion is not None and champion.aliases == ["champion"]
        assert champion.tags[registry.STAGE_TAG] == parent.data.tags["posttrain.promoted_stage"]
        assert champion.tags[registry.STAGE_TAG] in {"sft", "dpo", "grpo"}
        assert parent.data.tags["posttrain.promoted_version"] == str(champion.version)
        assert any(a.type == "markdown" and "Promotion decision" in str(a.data)
                   for a in client.read_artifacts())
        # What the Prefect UI shows of this deployment run (issue 15, item 4).
        _assert_progress_in_task_run_logs(client, run.id, {"sft": 6, "dpo": 3, "grpo": 2})
        _assert_stage_links_and_table(client, run.id, "srv",
                                      {k: children[k] for k in ("sft", "dpo", "grpo")},
                                      ["base", "sft", "dpo", "grpo"])

        # A `dataset updated` event (emitted by the CLI) triggers the retraining deployment. It
        # runs the served config (default parameters): the same SFT stage on the same data, so
        # SFT comes from the cache.
        emitted = subprocess.run(
            [str(BIN / "posttrain"), "emit-dataset-updated", str(served["config"])],
            env=servers["env"], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )
        assert emitted.returncode == 0, emitted.stdout + emitted.stderr
        triggered = _wait_final(client, _wait_for_run_of(client, retrain.id, served).id, served)
        assert triggered.state.is_completed(), triggered.state
        retrain_children = stage_runs(_parent_of(triggered.id).info.run_id)
        assert set(retrain_children) == {"data", "sft", "evaluate"}
        assert retrain_children["sft"].data.tags.get(tracking.CACHE_HIT_TAG) == "true"
        # The cached stage still links the MLflow run and folder that produced it: the first
        # deployment run's SFT run.
        links = _assert_stage_links_and_table(client, triggered.id, "srv",
                                              {"sft": children["sft"]}, ["base", "sft"])
        assert links["srv-sft-mlflow-run"].description.startswith(
            f"Stage `sft` (cached, produced by MLflow run `{children['sft'].info.run_id}`)")


@pytest.mark.slow
def test_emit_dataset_updated_fails_when_the_event_is_not_delivered(servers):
    """Retraining hangs on this event: a server that is down or refuses the credentials must
    make the command fail, not print that it emitted."""
    cases = {
        "wrong credentials": servers["env"] | {"PREFECT_API_AUTH_STRING": "posttrain:wrong"},
        "server down": servers["env"] | {"PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"},
    }
    for what, env in cases.items():
        r = subprocess.run([str(BIN / "posttrain"), "emit-dataset-updated"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (what, out)
        assert "the event was not delivered to http://127.0.0.1:" in out, (what, out)
        assert "Nothing will be retrained" in out and "emitted" not in out, (what, out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_posttrain_runs_at_once_train_each_stage_once(servers, apis):
    """Four `posttrain run` processes started together on one artifacts root, one Prefect
    server and one MLflow server (issue 13, item 7)."""
    from posttrain import artifacts, tracking

    tmp = servers["tmp"] / "four"
    values = tiny_pipeline_values(tmp, name="four", promotion={"enabled": False},
                                  tracking={"experiment": "four"})
    config = tmp / "four.yaml"
    tmp.mkdir()
    config.write_text(yaml.safe_dump(values))
    procs = [_start([str(BIN / "posttrain"), "run", str(config)], tmp / f"run{i}.log",
                    servers["env"]) for i in range(4)]
    try:
        for p in procs:
            p.wait(timeout=480)
    finally:
        for p in procs:
            _stop(p)
    logs = [(tmp / f"run{i}.log").read_text() for i in range(4)]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]

    c = tracking.client()
    exp = c.get_experiment_by_name("four")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status != "FINISHED"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 4
    for name in ("data", "sft", "evaluate"):
        trained = [r for r in runs if r.data.tags.get(tracking.STAGE_TAG) == name
                   and r.data.tags.get(tracking.CACHE_HIT_TAG) != "true"]
        assert len(trained) == 1, name  # the three others found it cached
        folders = [p for p in (tmp / "artifacts" / name).iterdir() if p.is_dir()]
        assert len(folders) == 1 and artifacts.verify(folders[0], full=True)
    assert not list((tmp / "artifacts").rglob(".tmp-*"))
    assert not list((tmp / "artifacts" / ".prefect" / "locks").glob("*.lock"))


def _task_runs(client, flow_run_id) -> dict:
    """The task runs of a flow run by task name (`sft-3f2` -> `sft`)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name.rsplit("-", 1)[0]: t for t in runs}


def _assert_progress_in_task_run_logs(client, flow_run_id, max_steps: dict[str, int]) -> None:
    """Each trained stage's task run holds its metric lines (log_every 1: one per step, under
    the `posttrain.progress` logger), sent by the process that served the deployment run."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    tasks = _task_runs(client, flow_run_id)
    for name, steps in max_steps.items():
        deadline = time.time() + 30  # the serving process sends logs in batches
        while True:
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[tasks[name].id])))
            lines = [log.message for log in logs if log.name == "posttrain.progress"]
            seen = {int(line.split(":")[0].removeprefix("step ")) for line in lines}
            if seen >= set(range(1, steps + 1)) or time.time() > deadline:
                break
            time.sleep(1)
        assert seen == set(range(1, steps + 1)), (name, lines)
        assert all(line.startswith("step ") for line in lines), (name, lines)
    sft = [log.message for log in client.read_logs(log_filter=LogFilter(
        task_run_id=LogFilterTaskRunId(any_=[tasks["sft"].id])))]
    assert any(line.startswith("step 3:") and "eval_loss=" in line for line in sft), sft


def _assert_stage_links_and_table(client, flow_run_id, pipeline: str, runs: dict,
                                  models: list[str]) -> dict:
    """The flow run's artifacts: per training stage (`runs`: its MLflow run) a link to that run
    (on the tracking server) and to its model folder; the evaluation's run; the comparison table
    (one row per model) and the decision."""
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}
    server = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    for name, run in runs.items():
        link = artifacts[f"{pipeline}-{name}-mlflow-run"]
        assert link.type == "markdown" and link.data == (
            f"[MLflow run of {name}]({server}/#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id})"), link.data
        folder = artifacts[f"{pipeline}-{name}-folder"].data
        assert folder.startswith("[") and "/model](file://" in folder, folder
    assert f"{pipeline}-evaluate-mlflow-run" in artifacts
    table = artifacts[f"{pipeline}-comparison"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["model"] for r in rows][:len(models)] == models, rows
    assert all("decision" in r for r in rows), rows
    assert artifacts[f"{pipeline}-promotion"].type == "markdown"
    return artifacts
