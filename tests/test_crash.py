"""kill -9 where users hit it: the stage lock, the MLflow runs and the temporary folders a killed
`posttrain` command leaves behind are taken over or cleaned up by the next run, which resumes
from the last checkpoint (issue 13, items 1 and 2)."""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- through the CLI


def _losses(experiment: str) -> list[tuple[str, str, dict[int, float]]]:
    """(status, failure reason, loss by step) of each sft run, oldest first."""
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], "tags.`posttrain.stage` = 'sft'",
                         order_by=["attributes.start_time ASC"])
    return [(r.info.status, r.data.tags.get("posttrain.failure", ""),
             {m.step: m.value for m in c.get_metric_history(r.info.run_id, "loss")})
            for r in runs if r.data.tags.get(tracking.CACHE_HIT_TAG) != "true"]


@pytest.mark.slow
def test_posttrain_sft_killed_with_sigkill_resumes_and_leaves_nothing_running(tmp_path):
    from posttrain import stages
    from posttrain.config import PipelineConfig, validate

    sft = {**SFT_STAGE, "max_steps": 16, "checkpoint_every": 2, "eval_every": 1000}
    values = tiny_pipeline_values(tmp_path / "k", [sft],
                                  tracking={"experiment": f"crash-{tmp_path.name}-k"})
    config = tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # the embedded server, killed along with the command
    cmd = [sys.executable, "-m", "pipelines.cli", "sft", str(config)]

    killed = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The uninterrupted reference, in this process under another root, while the command starts.
    clean = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path / "c", [sft], tracking={"experiment": f"crash-{tmp_path.name}-c"}))
    reference = ThreadPoolExecutor(1).submit(lambda: stages.run_training_stage(
        clean, "sft", stages.inputs_for(clean.stage("sft"), stages.run_data_stage(clean), {})))
    ckpt = tmp_path / "k" / "artifacts" / "sft"
    deadline = time.time() + 120
    try:
        while not list(ckpt.glob("*.checkpoints/step-*")):
            assert killed.poll() is None, "the command ended before it could be killed"
            assert time.time() < deadline, "no checkpoint in 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the command and its embedded Prefect server
        killed.wait()
    lock = next((tmp_path / "k" / "artifacts" / ".prefect" / "locks").glob("*sft*.lock"))
    assert json.loads(lock.read_text())["owner"]["pid"] == killed.pid

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=180, check=False)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    assert (f"taking over the lock of stage sft left by PID {killed.pid} on "
            f"{socket.gethostname()}, which is no longer running") in out
    assert "resuming stage sft (" in out, out
    step = int(out.split("resuming stage sft (", 1)[1].split(" from step ", 1)[1].split()[0])
    assert step >= 2 and step % 2 == 0

    # No run left RUNNING; the killed stage's run says why it was closed.
    c = tracking.client()
    exp = c.get_experiment_by_name(values["tracking"]["experiment"])
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    (status, reason, _), (resumed_status, _, resumed) = _losses(values["tracking"]["experiment"])
    assert status == "KILLED" and f"PID {killed.pid}" in reason and "closed by" in reason
    assert resumed_status == "FINISHED"
    assert not list((tmp_path / "k" / "artifacts").rglob(".tmp-*"))

    # The losses after the resume are the uninterrupted run's.
    reference.result(timeout=120)
    ((_, _, full),) = _losses(clean.tracking.experiment)
    assert min(resumed) == step + 1 and max(resumed) == 16
    for s, loss in resumed.items():
        assert loss == pytest.approx(full[s], abs=1e-4), s
