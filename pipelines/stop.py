"""How the `posttrain` command ends on Ctrl-C (SIGINT) or SIGTERM: within seconds, with nothing
left open and one line saying what was interrupted and how to resume.

posttrain.interrupt decides when to stop (at a step boundary, after a checkpoint on SIGTERM);
this stopper then closes what this process still holds and exits, without waiting on Prefect,
whose embedded server the same Ctrl-C to the process group has usually stopped already:

- the MLflow runs this process opened and left RUNNING: KILLED, with the signal as the reason;
- its stage locks: released, and its half-written `.tmp-*` folders: removed;
- the flow run, on a real Prefect server that still answers: Cancelled (bounded wait);
- its child processes (the embedded Prefect server): terminated;
- exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from posttrain import artifacts, interrupt, tracking
from posttrain.config import PipelineConfig

DEADLINE_SECONDS = 8.0  # whatever still hangs then, the process exits anyway
_flow_run_id: str | None = None


def install(cfg: PipelineConfig, command: str) -> None:
    """Make SIGINT and SIGTERM end this `posttrain` process cleanly (see the module doc)."""

    def stopper(signal_name: str, where: str) -> None:
        code = 128 + int(signal.Signals[signal_name])
        watchdog = threading.Timer(DEADLINE_SECONDS, os._exit, (code,))
        watchdog.daemon = True
        watchdog.start()
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
        _terminate_children()
        resume = f"{reason}. To resume, run the same command again: {command}"
        interrupt.say("\n".join([*notes, resume]))
        os._exit(code)

    interrupt.install(stopper)


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


def _terminate_children() -> None:
    """Stop this process's children (the embedded Prefect server): SIGTERM, then SIGKILL."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=2)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
