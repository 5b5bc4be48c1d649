"""What the Prefect UI shows: the parameter form's schema, and a flow run's logs and artifacts
read back through the Prefect API of a real (temporary) server."""

from __future__ import annotations

import json
import re
import time
import typing
from pathlib import Path

import pytest

from posttrain.config import PipelineConfig, StageConfig, validate
from tests.conftest import SFT_STAGE, tiny_pipeline_values


def _walk(schema, path=""):
    """Every (path, sub-schema) of a JSON schema."""
    if isinstance(schema, dict):
        yield path, schema
        for k, v in schema.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _walk(v, f"{path}/{i}")


def _form_schema() -> dict:
    """The parameter schema Prefect derives for the pipeline flow (what its UI form renders)."""
    from prefect.utilities.callables import parameter_schema

    from pipelines.flows import pipeline

    return parameter_schema(pipeline.fn).model_dump_for_openapi()


def test_parameter_form_has_no_const_but_each_stage_method():
    """The UI shows a `const` as "cannot be changed": only a stage's `method`, which picks the
    stage's alternative, may be one. `gradient_checkpointing` (true, false or 'auto') and
    `target_modules` (a list or 'all-linear') offer their word as a choice."""
    schema = _form_schema()
    consts = [p for p, s in _walk(schema) if "const" in s]
    assert consts and all(p.endswith("/properties/method") for p in consts), consts
    model = schema["definitions"]["ModelConfig"]["properties"]["gradient_checkpointing"]
    assert model["anyOf"] == [{"type": "boolean"}, {"type": "string", "enum": ["auto"]}]
    lora = schema["definitions"]["LoraConfig"]["properties"]["target_modules"]
    assert {"type": "string", "enum": ["all-linear"]} in lora["anyOf"]
    # Every value the form offers still validates, and nothing else does.
    for value in (True, False, "auto"):
        cfg = validate(PipelineConfig, {"model": {"gradient_checkpointing": value}})
        assert cfg.model.gradient_checkpointing == value
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        validate(PipelineConfig, {"model": {"gradient_checkpointing": "sometimes"}})


def test_parameter_form_groups_fields_by_stage():
    """Each stage of the list is one of the methods' forms (`anyOf`: the UI's form renders it,
    not `oneOf`, which it shows as raw JSON), and the server-side check the deployment enforces
    (jsonschema against the same schema) accepts a valid stage list and refuses a bad one."""
    import jsonschema

    schema = _form_schema()
    assert not [p for p, s in _walk(schema) if "oneOf" in s]
    items = schema["definitions"]["PipelineConfig"]["properties"]["stages"]["items"]
    refs = [a["$ref"].rsplit("/", 1)[1] for a in items["anyOf"]]
    methods = typing.get_args(typing.get_args(StageConfig)[0])  # one form per method, in order
    assert refs == [m.__name__ for m in methods]
    assert refs[:4] == ["SFTConfig", "RewardConfig", "DPOConfig", "ORPOConfig"]
    assert {"KTOConfig", "GRPOConfig", "PPOConfig"} <= set(refs)
    check = jsonschema.Draft202012Validator(schema)
    good = {"cfg": {"stages": [SFT_STAGE, {"name": "dpo", "method": "dpo", "start": "sft",
                                           "data": "preference", "beta": 0.2}]}}
    assert not list(check.iter_errors(good))
    bad = {"cfg": {"stages": [{"name": "x", "method": "dpo", "data": "p", "beta": "high"}]}}
    assert list(check.iter_errors(bad))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_run_logs_progress_and_creates_artifacts(tmp_path):
    """A tiny pipeline (SFT, 6 steps, a metric line every 2 steps), read back through the
    Prefect API: the SFT task run's logs hold its metric lines (steps 2, 4, 6; the evaluation
    at step 3 and 6 adds eval_loss), the evaluate task run's one line per model; each stage
    links its MLflow run and folder; the flow run has the comparison table with the decision."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterTaskRunId,
    )
    from prefect.logging.handlers import APILogWorker

    from pipelines.flows import pipeline
    from posttrain import tracking

    values = tiny_pipeline_values(tmp_path, [{**SFT_STAGE, "log_every": 2}], name="ui",
                                  evaluate={"tasks": ["posttrain_demo"]})
    result = pipeline(validate(PipelineConfig, values))
    flow_run_id, by_name = _task_runs(result)
    with get_client(sync_client=True) as client:
        assert {"sft", "evaluate", "promote"} <= set(by_name)

        def lines(task_name: str, want: int) -> list[str]:
            deadline = time.time() + 20  # logs reach the server in batches, in the background
            while True:
                logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                    any_=[by_name[task_name].id])))
                found = [log.message for log in logs if log.name == "posttrain.progress"
                         or log.message.startswith("held-out")]
                if len(found) >= want or time.time() > deadline:
                    return found
                time.sleep(0.5)

        sft = lines("sft", 4)
        steps = [line.split(":")[0] for line in sft]
        assert steps == ["step 2", "step 3", "step 4", "step 6"], sft  # log_every 2, eval at 3
        assert all(" loss=" in line or line.startswith("step 3") for line in sft)
        assert "eval_loss=" in sft[1] and "eval_loss=" in sft[3] and "learning_rate=" in sft[0]
        held = lines("evaluate", 2)
        assert [line.split(":")[0] for line in held] == ["held-out base", "held-out sft"]
        assert "checker_accuracy=" in held[0]
        # ... and nothing that the harness's libraries print (dill disassembles functions
        # with print while datasets fingerprints them: hundreds of bytecode lines per model)
        every = [log.message for log in client.read_logs(log_filter=LogFilter(
            task_run_id=LogFilterTaskRunId(any_=[by_name["evaluate"].id])))]
        assert not [m for m in every if "LOAD_GLOBAL" in m or "RETURN_VALUE" in m], every[:20]

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        by_key = {a.key: a for a in artifacts}
        # A link artifact is stored (and shown) as markdown: [text](link).
        run_link = by_key["ui-sft-mlflow-run"].data
        sft_run = result["stages"][1]["source_run_id"]
        assert re.fullmatch(rf"\[MLflow run of sft\]\(http://\S+/#/experiments/\d+/runs/"
                            rf"{sft_run}\)", run_link), run_link
        folder = Path(result["stages"][1]["path"]) / "model"
        assert by_key["ui-sft-folder"].data == f"[{folder}]({folder.resolve().as_uri()})"
        assert "MLflow run of evaluate" in by_key["ui-evaluate-mlflow-run"].data
        table = by_key["ui-comparison"]
        assert table.type == "table"
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert [r["model"] for r in rows] == ["base", "sft"]
        winner = result["promotion"]["winner"]
        assert {r["model"]: r["decision"] for r in rows}[winner] in {"promoted",
                                                                     "best, not promoted"}
        assert rows[1]["checker_accuracy"] == pytest.approx(
            result["comparison"]["sft"]["checker_accuracy"])
        assert by_key["ui-promotion"].type == "markdown"  # the report is still there

        # A second run finds every stage in Prefect's cache (no task body runs): its flow run
        # still links the MLflow run and the folder that produced the cached SFT stage (and the
        # evaluation).
        again = pipeline(validate(PipelineConfig, values))
        assert [r["status"] for r in again["stages"]] == ["cached", "cached", "cached"]
        again_id = tracking.client().get_run(again["mlflow_run_id"]).data.tags[
            "prefect.flow_run_id"]
        cached = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[again_id])))}
        assert cached["ui-sft-mlflow-run"].data == run_link
        assert cached["ui-sft-mlflow-run"].description.startswith(
            f"Stage `sft` (cached, produced by MLflow run `{sft_run}`)")
        assert cached["ui-sft-folder"].data == by_key["ui-sft-folder"].data
        assert cached["ui-evaluate-mlflow-run"].data == by_key["ui-evaluate-mlflow-run"].data
        assert "cached, produced by" in cached["ui-evaluate-mlflow-run"].description
        sft_task = next(t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[again_id]))) if t.name.startswith("sft-"))
        assert sft_task.state.name == "Cached"
        assert {a.task_run_id for a in cached.values() if a.key.startswith("ui-sft-")} == {
            sft_task.id}
        APILogWorker.drain_all(timeout=10)
        said = [log.message for log in client.read_logs(log_filter=LogFilter(
            task_run_id=LogFilterTaskRunId(any_=[sft_task.id, by_name["sft"].id])))]
        assert any(m.startswith(f"sft from the cache: {folder}, produced by MLflow run "
                                f"{sft_run}") for m in said), said
        assert not [m for m in said if "on_cache_hit" in m]  # the engine's lines on our hook


# ------------------------------------------------------------------------- launched stages


def test_launched_processes_progress_lines_reach_their_own_callback(tmp_path, monkeypatch):
    """A launched process's `posttrain.progress` records (dropped by logging without a
    handler) come out as marked lines that the parent hands, unmarked, to `on_progress`; the
    other output goes to `on_line`, and without `on_progress` everything does."""
    import sys

    from posttrain import launch

    script = (
        "import json, sys\nfrom pathlib import Path\nfrom posttrain import launch, progress\n"
        "progress.report_metrics(1, {'loss': 9.0})\n"  # before: lost, as it used to be
        "launch.progress_to_stdout()\nlaunch.progress_to_stdout()\n"  # idempotent
        "print('plain output', flush=True)\n"
        "progress.report_metrics(2, {'loss': 1.25, 'learning_rate': 0.001})\n"
        "progress.report('held-out base: checker_accuracy=0.5')\n"
        "w = Path(sys.argv[sys.argv.index('--workdir') + 1])\n"
        "(w / 'manifest.json').write_text(json.dumps({'key': 'k'}))\n")
    monkeypatch.setattr(launch, "launch_command",
                        lambda _launch, _mp, args: [sys.executable, "-c", script, *args])
    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, launch={"num_processes": 2}))
    lines, progress_lines = [], []
    manifest = launch.run_launched(cfg, "sft", {}, on_line=lines.append,
                                   on_progress=progress_lines.append)
    assert manifest == {"key": "k"}
    assert progress_lines == ["step 2: loss=1.25 learning_rate=0.001",
                              "held-out base: checker_accuracy=0.5"]
    assert lines[0].startswith("$ ") and lines[1:] == ["plain output"]
    lines.clear()
    launch.run_launched(cfg, "sft", {}, on_line=lines.append)
    assert lines[1:] == ["plain output", "step 2: loss=1.25 learning_rate=0.001",
                         "held-out base: checker_accuracy=0.5"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_launched_stage_logs_its_progress_in_its_task_run(tmp_path):
    """An SFT stage run as an `accelerate launch` process (one CPU process, from an accelerate
    config file): its task run's logs hold the same metric lines as an in-process stage's
    (steps 2, 3, 4, 6 under `posttrain.progress`), and the console gets them too (records the
    task's logger keeps off the API), named after the stage."""
    import logging

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterTaskRunId,
    )
    from prefect.logging.handlers import APILogWorker

    from pipelines.flows import stage_flow
    from posttrain import tracking

    accelerate = tmp_path / "one_cpu.yaml"
    accelerate.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_machines": 1,
        "num_processes": 1, "machine_rank": 0, "use_cpu": True, "mixed_precision": "no"}))
    values = tiny_pipeline_values(tmp_path, [{**SFT_STAGE, "log_every": 2}], name="launched",
                                  cpu_threads=1, launch={"accelerate_config": str(accelerate)})
    console = []

    class Console(logging.Handler):
        def emit(self, record):
            if not getattr(record, "send_to_api", True):
                console.append(record.getMessage())

    handler = Console()
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        result = stage_flow(validate(PipelineConfig, values), ["sft"])
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert [r["status"] for r in result["stages"]] == ["ran", "ran"]
    flow_run_id = tracking.client().get_run(result["mlflow_run_id"]).data.tags[
        "prefect.flow_run_id"]
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        sft = next(t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id]))) if t.name.startswith("sft-"))
        deadline = time.time() + 20
        while True:
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[sft.id])))
            found = [log.message for log in logs if log.name == "posttrain.progress"]
            if len(found) >= 4 or time.time() > deadline:
                break
            time.sleep(0.5)
    assert [line.split(":")[0] for line in found] == ["step 2", "step 3", "step 4", "step 6"]
    assert "eval_loss=" in found[1] and " loss=" in found[0]
    assert any("accelerate.commands.launch" in log.message for log in logs)  # the launch
    assert not any(log.message.startswith(("[posttrain.progress]", "sft step")) for log in logs)
    assert [line.split(":")[0] for line in console] == ["sft step 2", "sft step 3",
                                                        "sft step 4", "sft step 6"]


# ------------------------------------------------------------------------------ UI hints


def test_ui_hints_name_the_ports_make_ui_uses(monkeypatch, capsys):
    """`Open the UIs` names the ports infra/ui.sh starts the servers on: PREFECT_UI_PORT and
    MLFLOW_UI_PORT, 4200 and 5000 when unset or empty (as the script's ${VAR:-default})."""
    from pipelines.cli import print_ui_hints

    ui_sh = (Path(__file__).resolve().parents[1] / "infra" / "ui.sh").read_text()
    assert "PREFECT_PORT=${PREFECT_UI_PORT:-4200}" in ui_sh
    assert "MLFLOW_PORT=${MLFLOW_UI_PORT:-5000}" in ui_sh
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for prefect, mlflow, want in [(None, None, ("4200", "5000")), ("", "", ("4200", "5000")),
                                  ("4310", "5123", ("4310", "5123"))]:
        for name, value in (("PREFECT_UI_PORT", prefect), ("MLFLOW_UI_PORT", mlflow)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        print_ui_hints({"mlflow_run_id": "abc"})
        out = capsys.readouterr().out
        assert (f"make ui (Prefect on http://127.0.0.1:{want[0]}, MLflow on "
                f"http://127.0.0.1:{want[1]})") in out, out


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_cli_run_points_at_the_ports_make_ui_was_given(tmp_path):
    """`posttrain sft` with non-default ports for `make ui`: its closing lines name them."""
    import yaml
    from typer.testing import CliRunner

    from pipelines.cli import app

    values = tiny_pipeline_values(tmp_path, [{**SFT_STAGE, "max_steps": 2, "eval_every": 2}])
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(values))
    done = CliRunner().invoke(app, ["sft", str(config)],
                              env={"PREFECT_UI_PORT": "4310", "MLFLOW_UI_PORT": "5123"})
    assert done.exit_code == 0, done.output
    assert ("make ui (Prefect on http://127.0.0.1:4310, MLflow on http://127.0.0.1:5123)"
            in done.output), done.output
    assert "127.0.0.1:4200" not in done.output and "127.0.0.1:5000" not in done.output


def test_links_stop_asking_a_prefect_server_that_went_away(tmp_path, monkeypatch, caplog):
    """The first link artifact that cannot reach the Prefect API costs a warning; the stages
    after it do not call the API again (each call would wait out the client's retries, about a
    minute with Prefect's defaults), and say why they have no links."""
    import logging

    import httpx

    from tasks import train

    calls = []

    def unreachable(**kwargs):
        calls.append(kwargs["key"])
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(train, "create_link_artifact", unreachable)
    monkeypatch.setattr(train, "_prefect_gone", None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    manifest = {"key": "k", "path": str(tmp_path)}  # no MLflow run: the folder link only
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        for stage in ("sft", "dpo", "grpo"):
            train.link_stage("ui", stage, manifest, tmp_path)
    assert calls == ["ui-sft-folder"]  # one attempt, then no more
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("no link artifacts for stage sft: ConnectError")
    assert said[1:] == [f"no link artifacts for stage {s}: the Prefect server at "
                        "http://127.0.0.1:9/api stopped answering" for s in ("dpo", "grpo")]


def test_the_flow_run_graph_draws_the_gkd_teacher_edge(tmp_path):
    """A GKD stage's teacher stage is an input of its task run, as `start` is: the flow run's
    graph in the Prefect UI draws the teacher -> student edge (it used to show the student
    depending on the data alone when the student started from the base model)."""
    from pipelines.flows import pipeline
    from tests.conftest import stage

    values = tiny_pipeline_values(tmp_path, [{**SFT_STAGE, "max_steps": 2},
                                             stage("gkd", start="base", max_steps=2)],
                                  name="teacher-edge", evaluate={"enabled": False})
    _, by_name = _task_runs(pipeline(validate(PipelineConfig, values)))
    assert by_name["sft"].id in {i.id for i in by_name["gkd"].task_inputs["teacher"]}
    assert by_name["gkd"].task_inputs["start"] == []


def _task_runs(result: dict) -> tuple[str, dict]:
    """The Prefect flow run of a pipeline's `result` and its task runs by stage name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from posttrain import tracking

    flow_run_id = tracking.client().get_run(result["mlflow_run_id"]).data.tags[
        "prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    return flow_run_id, {t.name.rsplit("-", 1)[0]: t for t in tasks}
