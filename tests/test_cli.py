"""The `posttrain` command line: fast checks in-process, failures end to end. (The whole demo
through `posttrain run`, then fully cached: tests/test_demo_quality.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "sft", "env"):
        assert command in result.output


def test_invalid_config_fails_before_any_work_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", str(ROOT / "conf/demo.yaml"),
                                 "stages.sft.max_steps=zero"])
    assert result.exit_code == 2
    assert "stages.sft.max_steps" in result.output
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


def test_env_prints_versions_and_tracking():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0
    assert "torch" in result.output and "MLflow tracking" in result.output


def _posttrain(args: list[str], cwd: Path, extra_env: dict | None = None
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_flow_modules_leave_the_ml_stack_to_the_stages_that_train():
    """A fully cached rerun never trains, so importing the CLI and the flows must not pull in
    torch, transformers or peft (seconds of start-up: benchmarks/RESULTS.md, orchestration).
    A fresh interpreter, since this test process has them imported already."""
    code = ("import json, sys; import pipelines.cli, pipelines.flows, tasks.common; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', "
            "'datasets') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


JUDGE = "def boom(completions, **kwargs):\n    raise RuntimeError('the judge is down')\n"


@pytest.mark.slow
def test_a_failing_stage_ends_in_one_message_and_a_log_with_the_traceback(tmp_path):
    """A reward function that raises mid-training: one closing message naming the stage, the
    cause and what to do; the traceback in the log file it names, not on the console; the
    stage's MLflow run FAILED, not RUNNING. (--verbose: test_verbose_keeps_tracebacks.)"""
    import re

    import yaml

    from posttrain import tracking
    from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

    (tmp_path / "judge.py").write_text(JUDGE)
    values = tiny_pipeline_values(
        tmp_path, [SFT_STAGE, stage("grpo", reward_functions={"judge:boom": 1.0})])
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(values))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MLFLOW_TRACKING_URI": uri}
    quiet = _posttrain(["grpo", str(config)], tmp_path, extra)
    assert quiet.returncode == 1, quiet.stdout + quiet.stderr
    assert "stage 'grpo' failed: RuntimeError: the judge is down" in quiet.stdout
    assert "what to do:" in quiet.stdout
    assert "Traceback" not in quiet.stdout + quiet.stderr
    log = Path(re.search(r"full traceback: (\S+)", quiet.stdout).group(1))
    assert "Traceback (most recent call last)" in log.read_text()
    assert "the judge is down" in log.read_text()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(values["tracking"]["experiment"])
                               .experiment_id])
    grpo = [r for r in runs if r.data.tags.get(tracking.STAGE_TAG) == "grpo"]
    assert grpo and all(r.info.status == "FAILED" for r in grpo)
    assert all(r.info.status != "RUNNING" for r in runs)



def test_an_mlflow_store_that_cannot_be_opened_ends_in_one_message_before_training(tmp_path):
    """The command opens the MLflow store while the embedded Prefect server starts
    (pipelines/cli.py `_ready_the_flow`); a store that cannot be opened there is still reported
    once, by the flow, with what to do, and nothing trains."""
    import yaml

    from tests.conftest import SFT_STAGE, tiny_pipeline_values

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_values(tmp_path, [SFT_STAGE])))
    (tmp_path / "not-a-folder").write_text("")
    uri = f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}"
    done = _posttrain(["sft", str(config)], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "what to do:" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert "the run failed" in done.stdout and "not-a-folder" in done.stdout, done.stdout
    assert not list((tmp_path / "artifacts").glob("sft/*/model"))


def test_verbose_keeps_tracebacks_on_the_console_and_quiet_moves_them_to_the_log(tmp_path):
    """errors.capture: without --verbose, Prefect's console handlers lose the traceback of a
    record (the log file keeps it); with --verbose they keep it."""
    import logging

    import prefect.logging  # noqa: F401 - its handlers are what capture() filters

    from pipelines import errors

    def console_text(verbose: bool) -> tuple[str, str]:
        handler = logging.StreamHandler()  # stands for Prefect's console handler
        logging.getLogger("prefect").addHandler(handler)
        cap = errors.capture(str(tmp_path / "artifacts"), verbose=verbose)
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1,
                                   "Task run failed", None, None)
        try:
            raise RuntimeError("the judge is down")
        except RuntimeError:
            import sys as _sys

            record.exc_info = _sys.exc_info()
        cap.handler.handle(record)  # the log file sees the record whole ...
        shown = all(f.filter(record) for f in handler.filters)  # ... then the console
        text = logging.Formatter().format(record) if shown else ""
        errors.release(cap)
        logging.getLogger("prefect").removeHandler(handler)
        assert not handler.filters  # released: the console is as it was
        return text, cap.path.read_text()

    quiet, log = console_text(verbose=False)
    assert "Task run failed" in quiet and "Traceback" not in quiet
    assert "Traceback" in log and "the judge is down" in log
    loud, _ = console_text(verbose=True)
    assert "Traceback" in loud


# ------------------------------------------------------------------- the comparison table

SEVEN = {  # what a seven-model evaluation looks like: signs, tiny and large values
    "base": {"checker_accuracy": 0.0, "reward_score": -3.21456, "kl_to_reference": 61.93,
             "eval_loss": 4.60312, "perplexity": 102.3712, "mean_completion_length": 6.0},
    "sft": {"checker_accuracy": 0.4583, "reward_score": -0.21345, "kl_to_reference": 0.06234,
            "eval_loss": 0.93411, "perplexity": 2.54491, "mean_completion_length": 4.125},
    "dpo": {"checker_accuracy": 0.5417, "reward_score": 0.01234, "kl_to_reference": 0.13378,
            "eval_loss": 0.95544, "perplexity": 2.59986, "mean_completion_length": 4.0417},
    "dpo-b05": {"checker_accuracy": 0.5, "reward_score": -0.00071, "kl_to_reference": 0.25011,
                "eval_loss": 0.97012, "perplexity": 2.63822, "mean_completion_length": 3.9583},
    "orpo": {"checker_accuracy": 0.375, "reward_score": -1.23456, "kl_to_reference": 1.52344,
             "eval_loss": 1.12345, "perplexity": 3.07543, "mean_completion_length": 5.2917},
    "kto": {"checker_accuracy": 0.4167, "reward_score": 0.33333, "kl_to_reference": 0.0009876,
            "eval_loss": 0.99876, "perplexity": 2.71498, "mean_completion_length": 4.5},
    "grpo": {"checker_accuracy": 0.6667, "reward_score": 1.98765, "kl_to_reference": 12.3456,
             "eval_loss": 1.05432, "perplexity": 2.87012, "mean_completion_length": 3.0},
}


def _printed_comparison(monkeypatch, comparison: dict, width: int = 80) -> str:
    from rich.console import Console

    from pipelines import cli
    from posttrain.config import PipelineConfig

    console = Console(width=width, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli.print_summary({"stages": [], "comparison": comparison}, PipelineConfig())
    return console.export_text()


def _cells(text: str, metric: str) -> list[str]:
    """The cells of a metric's row (rows may continue on the next lines of a split table)."""
    return [line.split()[1:] for line in text.splitlines() if line.split()[:1] == [metric]]


def _whole(cell: str, value: float) -> bool:
    """`cell` is `value` rounded to the digits it shows (-0.213 for -0.21345, 9.88e-4 for
    0.0009876, 102 for 102.37): within half a unit of its last digit."""
    from decimal import Decimal

    return abs(float(cell) - value) <= 0.5 * 10.0 ** Decimal(cell).as_tuple().exponent + 1e-12


def test_comparison_table_never_truncates_a_number(monkeypatch):
    """Seven models at 80 columns: every line fits, no cell is cut (no ellipsis), and every
    number is whole, with three significant digits: one table."""
    text = _printed_comparison(monkeypatch, SEVEN)
    assert "\u2026" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert text.count("evaluation (held-out)") == 1
    models = list(SEVEN)
    for metric in ("checker_accuracy", "reward_score", "kl_to_reference", "eval_loss",
                   "perplexity", "mean_completion_length"):
        (shown,) = _cells(text, metric)
        assert len(shown) == len(models), (metric, text)
        for model, cell in zip(models, shown):
            value = SEVEN[model][metric]
            assert _whole(cell, value), (model, metric, cell, value)
    assert _cells(text, "reward_score")[0][:2] == ["-3.21", "-0.213"]
    assert _cells(text, "kl_to_reference")[0][5] == "9.88e-4"


def test_comparison_table_splits_models_it_cannot_fit(monkeypatch):
    """Ten models cannot fit 80 columns even at two digits: the models go over two tables, each
    within 80 columns, every number whole with three digits."""
    ten = {**SEVEN, **{f"{name}-2": m for name, m in list(SEVEN.items())[1:4]}}
    text = _printed_comparison(monkeypatch, ten)
    assert "\u2026" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    rows = _cells(text, "reward_score")
    assert len(rows) == 2 and sum(len(r) for r in rows) == 10
    cells = [c for r in rows for c in r]
    assert all(_whole(c, ten[m]["reward_score"]) for c, m in zip(cells, ten))
    assert cells[1] == "-0.213"


def test_comparison_table_keeps_digits_it_has_room_for(monkeypatch):
    """Two models leave room for four significant digits; a value of 7822.5 prints whole (7822
    and not 7.82e+03), a tiny one keeps its digits (0.0009876 -> 9.876e-4)."""
    two = {"base": {"eval_loss": 4.60312, "perplexity": 7822.5},
           "sft": {"eval_loss": 0.93411, "perplexity": 0.0009876}}
    text = _printed_comparison(monkeypatch, two)
    assert _cells(text, "eval_loss") == [["4.603", "0.9341"]]
    assert _cells(text, "perplexity") == [["7822", "9.876e-4"]]


def test_the_plan_names_the_promotion_gate_margin_and_significance(monkeypatch):
    from rich.console import Console

    from pipelines import cli
    from posttrain.config import PipelineConfig
    from posttrain.preflight import Plan

    def printed(**gate) -> str:
        console = Console(width=120, record=True, color_system=None)
        monkeypatch.setattr(cli, "console", console)
        promotion = {"metric": "checker_accuracy", "direction": "max", "guards": [], **gate}
        cli.print_plan(PipelineConfig(), Plan(promotion=promotion))
        return console.export_text()

    assert "guards: none\n" in printed(min_margin=0.0, require_significance=False)
    assert "guards: none; min_margin 0.02 at the 95% interval's lower bound" in printed(
        min_margin=0.02, require_significance=True)


def test_a_long_plan_keeps_every_column_in_an_80_column_terminal(monkeypatch):
    """Thirteen stages with long method names and a PPO's "reward, reference": the narrow
    terminal folds long cells; no column is dropped (the data column used to vanish)."""
    from rich.console import Console

    from pipelines import cli
    from posttrain.config import PipelineConfig
    from posttrain.preflight import Plan, PlanRow

    rows = [PlanRow("data", "-", "-", "sft, preference, prompts", "-", "will run", "ab" * 8)]
    rows += [PlanRow(f"online_dpo{i}", "online_dpo", "sft", "preference", "reward, reference",
                     "will run", None) for i in range(12)]
    console = Console(width=80, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli.print_plan(PipelineConfig(), Plan(rows=rows))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "stage" in line)
    assert header.split() == ["stage", "method", "from", "data", "uses", "status", "key"]
    assert "preference" in text and "online_dpo3" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_the_command_run_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """`_run_flow` installs a stopper that ends the process (os._exit) on Ctrl-C; run in-process
    (CliRunner, a notebook, a pytest worker), it must not outlive the flow: a later Ctrl-C
    is the host's KeyboardInterrupt again, not an exit of the host."""
    import signal

    import yaml

    from pipelines.cli import _run_flow
    from posttrain.config import load_pipeline_config
    from tests.conftest import tiny_pipeline_values

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_values(tmp_path)))
    cfg = load_pipeline_config(config)
    host = signal.getsignal(signal.SIGINT)  # a pytest-xdist worker may ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
    try:
        before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        seen = []
        assert _run_flow(lambda c: seen.append(signal.getsignal(signal.SIGINT)) or {"ok": 1},
                         cfg, verbose=False) == {"ok": 1}
        assert seen and seen[0] not in before  # the stopper's handler while the flow ran
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, host)


@pytest.mark.slow
def test_a_command_without_a_prefect_server_starts_the_temporary_one_itself(tmp_path):
    """Without PREFECT_API_URL the command starts Prefect's temporary server itself
    (pipelines/temporary_server.py): Prefect's server API is never imported into the command's
    process (Prefect's own start imports it, seconds of CPU beside preflight), the flow run is
    recorded on that server's database (without heartbeats), and the server is stopped when the
    command exits."""
    import re
    import socket
    import sqlite3

    import yaml

    from tests.conftest import tiny_pipeline_values

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_values(tmp_path)))
    probe = ("import atexit, sys\n"  # registered first, so it runs after every other exit hook
             "atexit.register(lambda: print('server API imported:', "
             "'prefect.server.api.server' in sys.modules))\n"
             f"sys.argv = ['posttrain', 'sft', {str(config)!r}]\n"
             "from pipelines.cli import main\nmain()\n")
    env = {**os.environ, "COLUMNS": "200", "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "server API imported: False" in done.stdout, out
    assert "View at" not in out  # no link to a server without a UI that is gone after exit
    port = int(re.search(r"temporary Prefect server on http://127\.0\.0\.1:(\d+)/api", out)[1])
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        runs = db.execute("SELECT flow.name, flow_run.state_type FROM flow_run "
                          "JOIN flow ON flow.id = flow_run.flow_id").fetchall()
        events = {e for (e,) in db.execute("SELECT event FROM events")}
    assert runs == [("posttrain-stage", "COMPLETED")], runs
    # The run's events reached the server, without heartbeats: nothing outlives the command to
    # watch for them, and their thread held the flow's end for up to a second.
    assert "prefect.flow-run.Completed" in events and "prefect.flow-run.heartbeat" not in events
    with socket.socket() as sock:  # stopped: nothing listens on its port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_temporary_server_that_does_not_come_up_is_stopped_and_left_to_prefect(monkeypatch):
    """When the server exits before it answers, `use` says so, nothing is left running, and
    Prefect's settings still name no server (its own start then tries and reports why)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import temporary_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(temporary_server.TemporaryServer, "_launch", lambda self: setattr(
        self, "process", subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])))
    # No server configured, even in a test process that has the session's Prefect server.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        server = temporary_server.start()
        assert server is not None and PREFECT_API_URL.value() is None
        assert server.use() is False
        assert server.process is None and temporary_server.current_url() is None
        assert PREFECT_API_URL.value() is None


def test_a_lost_temporary_server_is_named_as_such(monkeypatch):
    """The command's temporary server is Prefect's API URL in this process, but a run that
    loses it is told it lost the temporary server, not a server at some local port."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import errors, temporary_server

    url = "http://127.0.0.1:8123/api"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(temporary_server, "current_url", lambda: url)
    lost = RuntimeError("could not propose state")
    lost.__cause__ = httpx.ConnectError("refused")
    with temporary_settings(updates={PREFECT_API_URL: url}):  # as `TemporaryServer.use` leaves it
        assert errors.prefect_unreachable(lost) == "the temporary Prefect server"
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api")
    assert errors.prefect_unreachable(lost) == "the Prefect server at http://10.0.0.5:4200/api"
