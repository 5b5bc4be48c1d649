"""kill -9 where users hit it: the stage lock, the MLflow runs and the temporary folders a killed
`posttrain` command leaves behind are taken over or cleaned up by the next run, which resumes
from the last checkpoint (issue 13, items 1 and 2)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from posttrain import artifacts, tracking
from tasks.locks import OwnedLockManager
from tests.conftest import SFT_STAGE, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _write_lock(path: Path, pid: int, start_time, host: str | None = None, **more) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": host or socket.gethostname(), "pid": pid, "start_time": start_time, **more}
    path.write_text(json.dumps({"holder": "someone", "expiration": None, "owner": owner}))


@pytest.fixture
def lock_messages(monkeypatch):
    """What the lock manager logs (outside a Prefect run, to its own logger)."""
    from tasks import locks

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test_crash.locks")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(locks, "_log", logger)
    yield records
    logger.removeHandler(handler)


def test_a_dead_owners_lock_is_taken_over_a_live_ones_is_not(tmp_path, lock_messages):
    locks = OwnedLockManager(tmp_path / "locks", "sft")
    path = tmp_path / "locks" / "k.lock"
    dead = _dead_pid()
    _write_lock(path, dead, 123)
    assert locks.acquire_lock("k", "me", acquire_timeout=2)
    assert json.loads(path.read_text())["owner"]["pid"] == os.getpid()
    assert lock_messages == [(f"taking over the lock of stage sft left by PID {dead} on "
                              f"{socket.gethostname()}, which is no longer running")]
    locks.release_lock("k", "me")
    assert not path.exists()

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = artifacts.process_start_time(sleeper.pid)
        _write_lock(path, sleeper.pid, started)  # a live owner: waited on, never taken over
        assert not OwnedLockManager(tmp_path / "locks", "sft").acquire_lock(
            "k", "me", acquire_timeout=0.5)
        assert json.loads(path.read_text())["owner"]["pid"] == sleeper.pid
        assert f"waiting for stage sft: PID {sleeper.pid}" in lock_messages[-1]
        _write_lock(path, sleeper.pid, started + 1)  # the PID reused by a later process
        assert OwnedLockManager(tmp_path / "locks", "sft").acquire_lock(
            "k", "me", acquire_timeout=2)
        _write_lock(path, sleeper.pid, started, host="elsewhere.example")  # cannot be checked
        assert not OwnedLockManager(tmp_path / "locks", "sft").acquire_lock(
            "k", "me", acquire_timeout=0.3)
        assert "on elsewhere.example, another host" in lock_messages[-1]
        # A dead PID of another container with this host name: not ours to judge either.
        _write_lock(path, dead, 123, pid_namespace="pid:[1]")
        assert not OwnedLockManager(tmp_path / "locks", "sft").acquire_lock(
            "k", "me", acquire_timeout=0.3)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_tmp_folders_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    live = tmp_path / artifacts.tmp_name("abc")
    legacy = tmp_path / ".tmp-abc-deadbeef"  # no owner in its name: nobody can tell, it stays
    me = artifacts.current_owner()
    dead = tmp_path / live.name.replace(f".{me['pid']}.{me['start_time']}", f".{_dead_pid()}.1")
    for folder in (live, legacy, dead):
        folder.mkdir()
    assert artifacts.remove_dead_tmp(tmp_path) == [dead]
    assert live.is_dir() and legacy.is_dir() and not dead.exists()


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    experiment = f"crash-{tmp_path.name}"
    dead = {tracking.OWNER_TAGS["pid"]: str(_dead_pid()), tracking.OWNER_TAGS["start_time"]: "1"}
    orphan = tracking.start_run(experiment, "p", tags={"posttrain.pipeline": "x", **dead})
    child = tracking.start_run(experiment, "sft", parent_run_id=orphan,
                               tags={tracking.STAGE_TAG: "sft", **dead})
    alive = tracking.start_run(experiment, "p", tags={"posttrain.pipeline": "x"})
    closed = tracking.close_orphaned_runs(experiment, {"posttrain.pipeline": "x"}, closer="test")
    assert sorted(closed) == sorted([orphan, child])
    c = tracking.client()
    for run_id in (orphan, child):
        run = c.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "ended without closing the run; closed by test" in run.data.tags[
            "posttrain.failure"]
    assert c.get_run(alive).info.status == "RUNNING"
    tracking.end_run(alive)


@pytest.mark.parametrize("keep", [False, True])
def test_checkpoints_are_removed_once_the_artifact_is_complete_unless_kept(tmp_path, keep):
    from posttrain import stages
    from posttrain.config import PipelineConfig, validate

    sft = {**SFT_STAGE, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": keep}
    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, [sft]))
    manifest = stages.run_training_stage(
        cfg, "sft", stages.inputs_for(cfg.stage("sft"), stages.run_data_stage(cfg), {}))
    left = sorted(p.name for p in (tmp_path / "artifacts" / "sft").glob("*.checkpoints/*"))
    assert left == (["step-000002", "step-000004"] if keep else [])
    assert (Path(manifest["path"]) / "model").is_dir()


# ----------------------------------------------------------------------------- through the CLI


def _losses(experiment: str, stage: str = "sft",
            metric: str = "loss") -> list[tuple[str, str, dict[int, float]]]:
    """(status, failure reason, `metric` by step) of each run of `stage`, oldest first."""
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], f"tags.`posttrain.stage` = '{stage}'",
                         order_by=["attributes.start_time ASC"])
    return [(r.info.status, r.data.tags.get("posttrain.failure", ""),
             {m.step: m.value for m in c.get_metric_history(r.info.run_id, metric)})
            for r in runs if r.data.tags.get(tracking.CACHE_HIT_TAG) != "true"]


def _checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in folder.glob("*.checkpoints/step-*")
                  if p.is_dir())


class Command:
    """One `posttrain` command started in its own process group, its output in a file."""

    def __init__(self, cmd, cwd, env, log: Path):
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 150) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"ended before {what}:\n{self.output()}"
            assert time.time() < deadline, f"no {what} in {timeout} s:\n{self.output()}"
            time.sleep(0.02)

    def signal(self, sig) -> tuple[int, float]:
        """Send `sig` to the whole process group; (exit status, seconds until it ended)."""
        sent = time.time()
        os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return rc, time.time() - sent


def _resumed_from(out: str, stage: str = "sft") -> int | None:
    if f"resuming stage {stage} (" not in out:
        return None
    return int(out.split(f"resuming stage {stage} (", 1)[1].split(" from step ", 1)[1].split()[0])


@pytest.mark.slow
def test_posttrain_sft_interrupted_every_way_resumes_and_leaves_nothing_open(tmp_path):
    """Ctrl-C, kill -9 and SIGTERM of `posttrain sft` in turn, then a rerun to the end: each
    interrupted command exits at once and closes what it holds (or the next run does, after a
    kill -9), each rerun resumes from the newest checkpoint, and the final losses are those of
    an uninterrupted run."""
    from posttrain import stages
    from posttrain.config import PipelineConfig, validate

    sft = {**SFT_STAGE, "max_steps": 24, "checkpoint_every": 2, "eval_every": 1000}
    values = tiny_pipeline_values(tmp_path / "k", [sft],
                                  tracking={"experiment": f"crash-{tmp_path.name}-k"})
    config = tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # the embedded server, signalled along with the command
    cmd = [sys.executable, "-m", "pipelines.cli", "sft", str(config)]
    root = tmp_path / "k" / "artifacts"
    locks = root / ".prefect" / "locks"
    c = tracking.client()
    experiment = values["tracking"]["experiment"]

    def running() -> list:
        exp = c.get_experiment_by_name(experiment)
        return c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    # Ctrl-C in the terminal: SIGINT to the process group, after the first checkpoint.
    first = Command(cmd, tmp_path, env, tmp_path / "1.log")
    # The uninterrupted reference, in this process under another root, while the command starts.
    clean = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path / "c", [sft], tracking={"experiment": f"crash-{tmp_path.name}-c"}))
    reference = ThreadPoolExecutor(1).submit(lambda: stages.run_training_stage(
        clean, "sft", stages.inputs_for(clean.stage("sft"), stages.run_data_stage(clean), {})))
    first.wait_for(lambda: _checkpoint_steps(root / "sft"), "checkpoint")
    rc, seconds = first.signal(signal.SIGINT)
    out = first.output()
    assert rc == 130 and seconds < 10, (rc, seconds, out)
    assert "interrupted by SIGINT during stage 'sft' after step" in out, out
    assert f"run the same command again: posttrain sft {config}" in out
    assert "Traceback" not in out and "ConnectError" not in out, out
    assert not list(locks.glob("*.lock")) and not running()
    assert not list(root.rglob(".tmp-*"))

    # kill -9 of the rerun once it has resumed and written a newer checkpoint.
    second = Command(cmd, tmp_path, env, tmp_path / "2.log")
    second.wait_for(lambda: _resumed_from(second.output()) is not None, "resume")
    resumed = _resumed_from(second.output())
    assert resumed >= 2
    second.wait_for(lambda: max(_checkpoint_steps(root / "sft")) > resumed, "new checkpoint")
    os.killpg(second.proc.pid, signal.SIGKILL)  # the command and its embedded Prefect server
    second.proc.wait()
    assert json.loads(next(locks.glob("*sft*.lock")).read_text())["owner"]["pid"] == \
        second.proc.pid

    # SIGTERM (a scheduler stopping the job): a checkpoint of the step it stops after, then exit.
    third = Command(cmd, tmp_path, env, tmp_path / "3.log")
    third.wait_for(lambda: _resumed_from(third.output()) is not None, "resume")
    resumed = _resumed_from(third.output())
    third.wait_for(lambda: max(_checkpoint_steps(root / "sft")) > resumed, "new checkpoint")
    rc, seconds = third.signal(signal.SIGTERM)
    out = third.output()
    assert rc == 143 and seconds < 10, (rc, seconds, out)
    assert (f"taking over the lock of stage sft left by PID {second.proc.pid} on "
            f"{socket.gethostname()}, which is no longer running") in out
    line = out.split("interrupted by SIGTERM during stage 'sft' after step ", 1)[1]
    stopped = int(line.split(";")[0])
    assert f"a rerun resumes it from the checkpoint at step {stopped}" in line, out
    assert max(_checkpoint_steps(root / "sft")) == stopped > resumed
    assert len(_checkpoint_steps(root / "sft")) <= 2  # checkpoint_keep
    assert not list(locks.glob("*.lock")) and not running()

    # The last rerun resumes from that checkpoint and finishes.
    last = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400, check=False)
    out = last.stdout + last.stderr
    assert last.returncode == 0, out
    assert _resumed_from(out) == stopped, out
    assert not running()
    assert not list(root.rglob(".tmp-*"))
    assert not list((root / "sft").glob("*.checkpoints"))  # the artifact is complete

    runs = _losses(experiment)
    assert [(status, reason.split(" during")[0].split(":")[0]) for status, reason, _ in runs] == [
        ("KILLED", "Interrupted"), ("KILLED", "killed"), ("KILLED", "Interrupted"),
        ("FINISHED", "")]
    assert f"PID {second.proc.pid}" in runs[1][1] and "closed by" in runs[1][1]
    reference.result(timeout=120)
    ((_, _, full),) = _losses(clean.tracking.experiment)
    final = runs[-1][2]
    assert min(final) == stopped + 1 and max(final) == 24
    for s, loss in final.items():
        assert loss == pytest.approx(full[s], abs=1e-4), s



@pytest.mark.slow
@pytest.mark.timeout(400)
def test_posttrain_run_killed_in_dpo_then_in_grpo_resumes_both_exactly(tmp_path):
    """kill -9 of the whole process group of `posttrain run` (SFT -> DPO -> GRPO) once DPO has
    written a checkpoint, a rerun killed the same way once GRPO has, and a last rerun to the
    end: each rerun takes over the dead run's lock, says which stage it resumes from which
    step, and logs after the resume the losses of an uninterrupted run of the same config
    (DPO's precomputed reference log-probs and data position, GRPO's sampling RNG and prompt
    position come back with the checkpoint)."""
    from posttrain import stages
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import stage

    chain = [{**SFT_STAGE, "max_steps": 4, "eval_every": 1000},
             stage("dpo", max_steps=10, checkpoint_every=2, eval_every=1000),
             stage("grpo", start="dpo", max_steps=8, checkpoint_every=2, eval_every=1000)]
    off = {"evaluate": {"enabled": False}, "promotion": {"enabled": False}}
    values = tiny_pipeline_values(tmp_path / "k", chain, **off,
                                  tracking={"experiment": f"crash-{tmp_path.name}-k"})
    config = tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config)]
    root = tmp_path / "k" / "artifacts"
    locks = root / ".prefect" / "locks"
    experiment = values["tracking"]["experiment"]

    first = Command(cmd, tmp_path, env, tmp_path / "1.log")
    clean = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path / "c", chain, **off, tracking={"experiment": f"crash-{tmp_path.name}-c"}))
    reference = ThreadPoolExecutor(1).submit(stages.run_all, clean)
    first.wait_for(lambda: _checkpoint_steps(root / "dpo"), "DPO checkpoint", timeout=240)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    assert (root / "sft").is_dir() and not list((root / "grpo").glob("*")), first.output()

    second = Command(cmd, tmp_path, env, tmp_path / "2.log")
    second.wait_for(lambda: _resumed_from(second.output(), "dpo") is not None, "DPO resume")
    dpo_from = _resumed_from(second.output(), "dpo")
    second.wait_for(lambda: _checkpoint_steps(root / "grpo"), "GRPO checkpoint", timeout=240)
    os.killpg(second.proc.pid, signal.SIGKILL)
    second.proc.wait()
    out = second.output()
    assert dpo_from >= 2 and dpo_from % 2 == 0, out
    assert (f"taking over the lock of stage dpo left by PID {first.proc.pid} on "
            f"{socket.gethostname()}, which is no longer running") in out
    assert "resuming stage sft" not in out  # SFT's artifact was complete: cached, not resumed

    last = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    out = last.stdout + last.stderr
    assert last.returncode == 0, out
    grpo_from = _resumed_from(out, "grpo")
    assert grpo_from is not None and grpo_from >= 2, out
    assert _resumed_from(out, "dpo") is None  # cached by the second run
    assert f"PID {second.proc.pid}" in out
    assert not list(root.rglob(".tmp-*")) and not list(locks.glob("*.lock"))
    assert not list(root.rglob("*.checkpoints"))

    reference.result(timeout=300)
    for name, resumed, end in (("dpo", dpo_from, 10), ("grpo", grpo_from, 8)):
        runs = _losses(experiment, name)
        assert [status for status, _, _ in runs] == ["KILLED", "FINISHED"], (name, runs)
        assert "ended without closing the run; closed by the next run of" in runs[0][1]
        ((_, _, full),) = _losses(clean.tracking.experiment, name)
        after = runs[1][2]
        assert sorted(after) == list(range(resumed + 1, end + 1)), (name, after)
        for s, loss in after.items():
            assert loss == pytest.approx(full[s], abs=1e-4), (name, s, loss, full[s])
        # What the killed run logged before its checkpoint is the reference's too.
        for s, loss in runs[0][2].items():
            assert loss == pytest.approx(full[s], abs=1e-4), (name, s)


def test_a_lost_prefect_server_is_named_with_what_was_kept(tmp_path, monkeypatch):
    """The closing message of a run whose Prefect server stopped answering (a connection error
    anywhere in the exception's chain) names the server, the artifacts written during the run
    and what to do; any other error keeps the usual message."""
    import httpx

    from pipelines import errors

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    root = tmp_path / "artifacts"
    old = root / "sft" / "old-key"
    old.mkdir(parents=True)
    (old / artifacts.MANIFEST).write_text("{}")
    os.utime(old / artifacts.MANIFEST, (1, 1))  # written long before this command
    cap = errors.capture(str(root), verbose=False)
    try:
        new = root / "dpo" / "new-key"
        new.mkdir(parents=True)
        (new / artifacts.MANIFEST).write_text("{}")
        request = httpx.Request("POST", "http://127.0.0.1:9/api/flow_runs/x/set_state")
        try:
            try:
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            except httpx.ConnectError as e:
                raise RuntimeError("could not propose state") from e
        except RuntimeError as e:
            text = errors.explain(e, cap)
        assert text.startswith("the run failed: the Prefect server at http://127.0.0.1:9/api "
                               "stopped answering (RuntimeError: could not propose state)")
        assert f"written during this run and kept: dpo ({new})" in text
        assert "old-key" not in text and cap.server_gone
        assert "then rerun the same command: finished stages come from the cache" in text
        cap.server_gone = False  # release() would exit this process
        other = errors.explain(ValueError("bad"), cap)
        assert other.startswith("the run failed: ValueError: bad") and "Prefect" not in other
    finally:
        errors.release(cap)


@pytest.mark.slow
def test_a_command_killed_outright_takes_its_temporary_prefect_server_along(tmp_path):
    """kill -9 of the `posttrain` process alone (not its process group: no stop handler runs)
    while it uses the temporary Prefect server it started: the server gets SIGTERM from the
    kernel when its parent dies (pipelines/temporary_server.py) and stops answering, instead
    of staying behind on its port."""
    import re

    values = tiny_pipeline_values(tmp_path, [{**SFT_STAGE, "max_steps": 5000,
                                              "eval_every": 10000}])
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    command = Command([sys.executable, "-m", "pipelines.cli", "sft", str(config)], tmp_path, env,
                      tmp_path / "out.log")
    started = r"temporary Prefect server on http://127\.0\.0\.1:(\d+)/api"
    try:
        command.wait_for(lambda: re.search(started, command.output()), "temporary server")
        port = int(re.search(started, command.output())[1])
        command.wait_for(lambda: "Beginning flow run" in command.output(), "the flow run")
        os.kill(command.proc.pid, signal.SIGKILL)
        command.proc.wait()

        def answers() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        deadline = time.time() + 15
        while answers() and time.time() < deadline:
            time.sleep(0.1)
        assert not answers(), "the temporary server outlived its command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.proc.pid, signal.SIGKILL)  # whatever is left of the group
