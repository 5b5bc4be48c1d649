"""How the `posttrain` command ends on Ctrl-C (SIGINT) or SIGTERM: within seconds, with nothing
left open and one line saying what was interrupted and how to resume.

posttrain.interrupt decides when to stop (at a step boundary, after a checkpoint on SIGTERM);
this stopper then closes what this process still holds and exits, without waiting on Prefect,
whose embedded server the same Ctrl-C to the process group has usually stopped already:

- the MLflow runs this process opened and left RUNNING: KILLED, with the signal as the reason;
- its stage locks: released, and its half-written `.tmp-*` folders: removed;
- the flow run, on a real Prefect server that still answers: Cancelled (bounded wait);
- its child processes (the embedded Prefect server, a stage's `accelerate launch` processes,
  which run in a session of their own and so get no Ctrl-C from the terminal): sent the same
  signal first, so that a launched stage stops at a step boundary (after a checkpoint on
  SIGTERM) and closes its own MLflow run while this process closes the rest; waited for until
  shortly before the deadline, then killed, and the runs a killed one left RUNNING closed;
- exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from posttrain import artifacts, interrupt, tracking
from posttrain.config import PipelineConfig

DEADLINE_SECONDS = 8.0  # whatever still hangs then, the process exits anyway
_flow_run_id: str | None = None


def install(cfg: PipelineConfig, command: str) -> None:
    """Make SIGINT and SIGTERM end this `posttrain` process cleanly (see the module doc)."""

    def stopper(signal_name: str, where: str) -> None:
        code = 128 + int(signal.Signals[signal_name])
        started = time.monotonic()
        watchdog = threading.Timer(DEADLINE_SECONDS, os._exit, (code,))
        watchdog.daemon = True
        watchdog.start()
        children = _signal_children(signal.Signals[signal_name])
        launched = _launched_stage(children)
        if launched is not None and _state_is_outside_stages(where):
            where = f"during stage {launched[0]!r} ({launched[1]} launched processes)"
        reason = f"interrupted by {signal_name} {where}"
        notes = []
        for what, step in (("MLflow runs", lambda: _close_runs(cfg, reason)),
                           ("locks", lambda: _release_locks(cfg)),
                           ("temporary folders", lambda: artifacts.remove_own_tmp(
                               cfg.artifacts_root)),
                           ("the Prefect flow run", lambda: _cancel_flow_run(reason))):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - the rest must still happen
                notes.append(f"could not close {what}: {type(e).__name__}: {e}")
        _reap_children(children, started + DEADLINE_SECONDS - 1.5)
        if launched is not None:
            step = _newest_checkpoint(cfg, launched[0])
            reason += (f"; a rerun resumes it from the checkpoint at step {step}"
                       if step is not None else "; a rerun starts it again")
            try:  # what the launched processes could not close before the deadline killed them
                tracking.close_own_runs(cfg.tracking.experiment, status="KILLED",
                                        reason=f"Interrupted: {reason}",
                                        pids=[c.pid for c in children])
            except Exception as e:  # noqa: BLE001 - the exit must still happen
                notes.append(f"could not close the launched stage's runs: {type(e).__name__}: {e}")
        resume = f"{reason}. To resume, run the same command again: {command}"
        interrupt.say("\n".join([*notes, resume]))
        os._exit(code)

    interrupt.install(stopper)


def uninstall() -> None:
    """After the flow: the process's signals as before `install` (see interrupt.uninstall)."""
    interrupt.uninstall()
    note_flow_run(None)


def note_flow_run(flow_run_id: str | None) -> None:
    """The flow run to mark Cancelled if this process is interrupted."""
    global _flow_run_id
    _flow_run_id = flow_run_id or None


def _close_runs(cfg: PipelineConfig, reason: str) -> None:
    tracking.close_own_runs(cfg.tracking.experiment, status="KILLED", reason=reason)


def _release_locks(cfg: PipelineConfig) -> None:
    from tasks.locks import release_owned

    release_owned(Path(cfg.artifacts_root).resolve() / ".prefect" / "locks")


def _cancel_flow_run(reason: str) -> None:
    """On a real server (PREFECT_API_URL), mark the flow run Cancelled; at most 3 s."""
    if not (_flow_run_id and os.environ.get("PREFECT_API_URL")):
        return

    def cancel() -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(_flow_run_id, Cancelled(message=reason), force=True)

    worker = threading.Thread(target=cancel, daemon=True)
    worker.start()
    worker.join(3.0)


def _signal_children(sig: signal.Signals) -> list:
    """Stop every process this one started (recursively); return them. A launched stage's
    processes get `sig` itself (SIGTERM: checkpoint first; SIGINT: stop at the step boundary);
    the others (the embedded Prefect server) SIGTERM: uvicorn re-raises the last signal it
    caught when it exits, and a second SIGINT would print a KeyboardInterrupt traceback."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            launched = "posttrain.launch" in child.cmdline()
            child.send_signal(sig if launched else signal.SIGTERM)
        except psutil.Error:
            pass
    return children


def _launched_stage(children: list) -> tuple[str, int] | None:
    """(stage, number of processes) of a stage running under `accelerate launch` among
    `children` (its `python -m posttrain.launch --stage NAME` processes, not the launcher whose
    command line names them too), or None."""
    import psutil

    stages = []
    for child in children:
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "posttrain.launch" in cmdline and "--stage" in cmdline[:-1] and not any(
                "accelerate.commands.launch" in part for part in cmdline):  # the launcher
            stages.append(cmdline[cmdline.index("--stage") + 1])
    return (stages[0], len(stages)) if stages else None


def _state_is_outside_stages(where: str) -> bool:
    return where.startswith("before or between stages")


def _newest_checkpoint(cfg: PipelineConfig, stage: str) -> int | None:
    """The step of the newest checkpoint of `stage` (of its most recently written checkpoint
    folder; complete ones only: they are renamed into place when written)."""
    folders = [p for p in (Path(cfg.artifacts_root) / stage).glob("*.checkpoints") if p.is_dir()]
    if not folders:
        return None
    newest = max(folders, key=lambda p: p.stat().st_mtime)
    steps = [int(p.name.removeprefix("step-")) for p in newest.glob("step-*")
             if p.name.removeprefix("step-").isdigit()]
    return max(steps) if steps else None


def _reap_children(children: list, until: float) -> None:
    """Wait for `children` (already signalled) until the monotonic time `until`; kill the rest."""
    import psutil

    _, alive = psutil.wait_procs(children, timeout=max(until - time.monotonic(), 0.5))
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=1)
