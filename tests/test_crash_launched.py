"""Crash safety of stages launched as several processes (launch.num_processes: 2, gloo on this
CPU), through the command line: Ctrl-C and SIGTERM of `posttrain sft` stop every process
at the same step and resume exactly; each process gets its own sampling generator back (issue 13,
item 3). Apart from tests/test_crash.py so that the two slowest files run on different workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from posttrain import artifacts, tracking
from tests.conftest import SFT_STAGE, tiny_pipeline_values
from tests.test_crash import ROOT, Command, _checkpoint_steps, _losses, _resumed_from


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_and_sigterm_of_a_two_process_stage_stop_it_and_resume_exactly(tmp_path):
    """Ctrl-C, then SIGTERM, to the process group of `posttrain sft` whose stage runs as two
    launched processes (launch.num_processes: 2, gloo on CPU; they run in a session of their
    own, so the terminal's signal does not reach them): the command passes the signal on, the
    processes stop at a step boundary (after a checkpoint of that step on SIGTERM) and rank 0
    marks its run KILLED; the command exits within seconds naming the stage and the checkpoint
    a rerun resumes from, leaving no process, no RUNNING run and no lock. The last rerun
    resumes from the SIGTERM's checkpoint and logs the losses of an uninterrupted two-process
    run."""
    import psutil

    from posttrain import launch, stages
    from posttrain.config import PipelineConfig, validate

    sft = {**SFT_STAGE, "max_steps": 40, "checkpoint_every": 4, "eval_every": 1000,
           "log_every": 1}
    two = {"cpu_threads": 1, "launch": {"num_processes": 2}}
    values = tiny_pipeline_values(tmp_path / "k", [sft], **two,
                                  tracking={"experiment": f"crash-{tmp_path.name}-l"})
    config = tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "sft", str(config)]
    root = tmp_path / "k" / "artifacts"
    locks = root / ".prefect" / "locks"
    c = tracking.client()
    experiment = values["tracking"]["experiment"]

    def running() -> list:
        exp = c.get_experiment_by_name(experiment)
        return c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    def left_behind() -> list:
        return [p for p in psutil.process_iter(["cmdline"])
                if "posttrain.launch" in (p.info["cmdline"] or [])
                and str(root) in " ".join(p.info["cmdline"] or [])]

    def stopped_cleanly(command: Command, sig, rc_expected: int, resumed: int) -> int:
        command.wait_for(lambda: max(_checkpoint_steps(root / "sft") or [0]) > resumed,
                         "checkpoint", timeout=240)
        rc, seconds = command.signal(sig)
        out = command.output()
        assert rc == rc_expected and seconds < 10, (rc, seconds, out[-3000:])
        newest = max(_checkpoint_steps(root / "sft"))
        assert (f"interrupted by {sig.name} during stage 'sft' (2 launched processes); a rerun "
                f"resumes it from the checkpoint at step {newest}. To resume, run the same "
                f"command again: posttrain sft {config}") in " ".join(out.split()), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert not left_behind() and not running() and not list(locks.glob("*.lock"))
        return newest

    first = Command(cmd, tmp_path, env, tmp_path / "1.log")
    # The uninterrupted reference: the same stage launched as two processes, another root.
    clean = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path / "c", [sft], **two, tracking={"experiment": f"crash-{tmp_path.name}-c"}))
    reference = ThreadPoolExecutor(1).submit(lambda: launch.run_launched(
        clean, "sft", {"data": stages.run_data_stage(clean), "start": None, "reward": None},
        on_line=lambda line: None))
    after_int = stopped_cleanly(first, signal.SIGINT, 130, 0)

    second = Command(cmd, tmp_path, env, tmp_path / "2.log")
    second.wait_for(lambda: _resumed_from(second.output()) is not None, "resume", timeout=240)
    assert _resumed_from(second.output()) == after_int
    after_term = stopped_cleanly(second, signal.SIGTERM, 143, after_int)

    # kill -9 of the command with a launched stage is not asserted here: in fresh-clone runs the
    # launched processes stopped on their own (posttrain.interrupt's watcher) but the outcome
    # raced three ways (a broken pipe, the launcher's SIGTERM, once not within 30 s); handled
    # for the first two, the third is open (issue 13 note).

    last = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    out = last.stdout + last.stderr
    assert last.returncode == 0, out[-3000:]
    assert _resumed_from(out) == after_term, out[-3000:]
    assert not running() and not left_behind()

    runs = _losses(experiment)
    assert [(status, reason.split(" during")[0]) for status, reason, _ in runs] == [
        ("KILLED", "Interrupted: interrupted by SIGINT"),
        ("KILLED", "Interrupted: interrupted by SIGTERM"), ("FINISHED", "")]
    assert f"a rerun resumes it from the checkpoint at step {after_term}" in runs[1][1]
    reference.result(timeout=300)
    ((_, _, full),) = _losses(clean.tracking.experiment)
    final = runs[-1][2]
    assert sorted(final) == list(range(after_term + 1, 41))
    for s, loss in final.items():
        assert loss == pytest.approx(full[s], abs=1e-4), s


def _two_processes(tmp_path, *args: str) -> str:
    """tests/interrupt_worker.py as two gloo processes; their output."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / "tests" / "interrupt_worker.py"), str(out), str(tmp_path / "ckpt"),
           *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)  # processes waiting on each other: a hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_each_process_of_a_launch_gets_its_own_sampling_generator_back(tmp_path):
    """accelerate saves registered objects from the main process alone: without every
    process's generator state in the checkpoint, the second process of a GRPO/PPO launch
    resumed with the first one's and sampled other completions than an uninterrupted run."""
    _two_processes(tmp_path, "generators")
    for rank in (0, 1):
        gen = json.loads((tmp_path / "out" / f"gen{rank}.json").read_text())
        assert gen["got"] == gen["expected"], rank


@pytest.mark.slow
def test_a_process_waiting_on_a_peer_that_the_grace_period_stopped_stops_too(tmp_path):
    """Both processes of a launch asked to stop, one of them busy past the grace period: that
    one is stopped where it is, and the other, waiting for it in the step's gradient
    all-reduce, gets the transport's "connection closed by peer". That is the same stop (its
    run KILLED by the signal, as the command says), not a crash of the stage: in a fresh-clone
    make test, rank 0 marked its run FAILED with gloo's error."""
    _two_processes(tmp_path, "slow")
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["stopped_by"] == "SIGTERM" and r["steps"] == [1, 2], ranks
    assert "(another process of the launch stopped first)" in ranks[0]["message"], ranks
    assert "during stage 'toy' after step 2" in ranks[1]["message"], ranks


@pytest.mark.slow
def test_processes_of_a_launch_stop_and_checkpoint_at_the_same_step(tmp_path):
    """SIGTERM reaching one process of a two-process launch (signals arrive one at a time, or
    only to some) stops both at the same step boundary after one checkpoint of that step that
    both wrote: no process starts a step's all-reduce that the other will never join."""
    _two_processes(tmp_path)
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["stopped_by"] == "SIGTERM" and r["steps"] == [1, 2, 3], ranks
        assert "during stage 'toy' after step 3; a rerun resumes it from the checkpoint at " \
            "step 3" in r["message"], ranks
    # One folder, with both processes' RNG states (each writes its own into rank 0's folder).
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000003"]
    manifest = json.loads((tmp_path / "ckpt" / "step-000003" / artifacts.MANIFEST).read_text())
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"])
