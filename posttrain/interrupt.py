"""Ctrl-C (SIGINT) and SIGTERM: stop at a step boundary, checkpoint on SIGTERM, then stop.

Inside a stage (`with interrupt.stage(name):`, entered by stages.common.run_stage) the first
signal only asks the training loop to stop: the loops call `after_step` (through
posttrain.checkpoints.after_step) at the end of every optimizer step, which on SIGTERM (what
schedulers and Kubernetes send before they kill) writes a checkpoint first, then raises
`Interrupted` (a KeyboardInterrupt). It unwinds the stage's own clean-up (metrics flushed, its
MLflow run marked KILLED, its temporary folder removed) and, leaving the stage, ends the process
through the stopper that the `posttrain` command installs (pipelines.stop: close this process's
other runs as KILLED, release its locks, one line, exit), so nothing waits on a Prefect server
that the same Ctrl-C may have stopped. A stage busy with something else (loading a model,
precomputing reference log-probs) is stopped after GRACE_SECONDS; outside a stage a signal stops
at once. Without a stopper (the library used from Python) the Interrupted is raised to the
caller.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import rich

GRACE_SECONDS = 4.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; `str()` says where and how to resume."""

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(f"interrupted by {signal_name} {where}")
        self.signal_name = signal_name
        self.where = where


@dataclass
class _State:
    pending: str | None = None  # the signal asked for, not yet acted on
    stopping: bool = False
    stage: str | None = None
    step: int | None = None
    checkpoint_step: int | None = None  # the newest checkpoint of the current stage
    checkpointing: bool = False
    timer: threading.Timer | None = None
    forced: bool = False  # set by the grace timer
    note: str | None = None  # why the stop, when no signal came (the launching command died)
    launching_command: int | None = None  # PID of the command that launched this process


_state = _State()
Stopper = Callable[[str, str], None]  # (signal name, where) -> never returns
_stopper: Stopper | None = None
_before_install: list | None = None  # the SIGINT and SIGTERM handlers `install` replaced


def install(stopper: Stopper | None) -> None:
    """Handle SIGINT and SIGTERM in this (main) thread; `stopper` ends the process."""
    global _stopper, _before_install
    if _before_install is None and threading.current_thread() is threading.main_thread():
        _before_install = [signal.getsignal(s) for s in SIGNALS]
    _stopper = stopper
    reset()
    rearm()


def uninstall() -> None:
    """Undo `install`: no stopper, the signal handlers from before it. The `posttrain` command
    exits after its flow anyway; this is for the same command run in-process (typer's
    CliRunner, a notebook), where a stopper left behind would end the host process (os._exit)
    at its next Ctrl-C or at a stage's grace stop."""
    global _stopper, _before_install
    _stopper = None
    reset()
    if _before_install is not None and threading.current_thread() is threading.main_thread():
        for sig, old in zip(SIGNALS, _before_install, strict=True):
            signal.signal(sig, old)
        _before_install = None


def rearm() -> None:
    """Put `handle` back for SIGINT and SIGTERM (a Prefect flow run swaps its own SIGTERM
    handler in); a no-op without a stopper or outside the main thread."""
    if _stopper is None or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, handle)


def reset() -> None:
    global _state
    if _state.timer is not None:
        _state.timer.cancel()
    _state = _State()


def pending() -> str | None:
    return _state.pending


def handle(signum: int, _frame=None) -> None:
    name = signal.Signals(signum).name
    if _state.forced:  # the grace timer, through interrupt_main: stop here
        _state.forced = False
        raise Interrupted(_state.pending or name, where())
    if _state.stopping or _state.pending:
        return  # already stopping; the grace timer and the stopper's own deadline bound it
    if _state.stage is None:
        finish(Interrupted(name, where()))
    _state.pending = name
    then = " after writing a checkpoint" if name == "SIGTERM" and _state.checkpointing else ""
    say(f"{name}: stopping stage {_state.stage!r} at the end of this step{then}")
    _state.timer = threading.Timer(GRACE_SECONDS, _stop_from_timer)
    _state.timer.daemon = True
    _state.timer.start()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """The extent of one stage: a signal waits for its next step boundary (or GRACE_SECONDS);
    an Interrupted leaving the outermost stage ends the process through the stopper, after the
    stage's own clean-up (its run marked KILLED, its temporary folder removed) has run."""
    outer = (_state.stage, _state.step, _state.checkpoint_step, _state.checkpointing)
    main = threading.current_thread() is threading.main_thread()
    previous = [signal.getsignal(s) for s in SIGNALS] if main else None
    if main:
        for sig in SIGNALS:
            signal.signal(sig, handle)
    _state.stage, _state.step, _state.checkpoint_step, _state.checkpointing = name, None, None, False
    watcher = _watch_launching_command() if outer[0] is None else None
    try:
        yield
    except Interrupted as e:
        if outer[0] is None:
            finish(e)
        raise
    except RuntimeError as e:
        stop = stopped_by_peer(e)
        if stop is None:
            raise
        stop.__cause__ = e
        if outer[0] is None:
            finish(stop)
        raise stop from e
    finally:
        if watcher is not None:
            watcher.set()
            _state.launching_command = None
        _state.stage, _state.step, _state.checkpoint_step, _state.checkpointing = outer
        if previous is not None:
            for sig, old in zip(SIGNALS, previous, strict=True):
                signal.signal(sig, old)
        if outer[0] is None and _stopper is None:
            reset()  # the library goes on after an Interrupted: the next signal counts again


def adopt(name: str) -> None:
    """Stop at this step boundary as if `name` had arrived here: another process of the same
    launch got it (posttrain.checkpoints.after_step agrees on it across processes, so that all
    of them stop, and checkpoint, at the same step)."""
    if _state.pending is None and not _state.stopping:
        _state.pending = name


# What a collective of torch.distributed (gloo, NCCL) raises when another process of the launch
# has left: its sockets closed under a pending all-reduce.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted")


def stopped_by_peer(error: BaseException) -> Interrupted | None:
    """`error` as the stop it is, or None: in a launch of several processes, a signal asks every
    process to stop, and one that no step boundary reached in GRACE_SECONDS is stopped where it
    is; another process waiting on it in a collective (a gradient all-reduce, the agreement on
    the stop) then fails because its peer left. That failure is the same stop, not a crash of
    the stage (its run KILLED with the signal, not FAILED with a transport error)."""
    if isinstance(error, Interrupted) or _state.pending is None:
        return None
    if not isinstance(error, RuntimeError) or not any(s in str(error) for s in _PEER_GONE):
        return None
    if _state.note is None:
        _state.note = "another process of the launch stopped first"
    return Interrupted(_state.pending, where())


def _watch_launching_command() -> threading.Event | None:
    """In a process of a launched stage (torchrun / `accelerate launch`: TORCHELASTIC_RUN_ID is
    set), a thread that notices when the command that started the launcher is gone (killed
    with SIGKILL: no signal reaches the launch, which runs in a session of its own) and then
    stops the stage as SIGTERM would, at the next step boundary after a checkpoint (every
    process of the launch agrees on it, posttrain.checkpoints.agree_on_stop). Otherwise the
    launch trains on, orphaned, beside the rerun that took over the stage. Returns the event
    that ends the thread, or None when there is nothing to watch."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        import psutil

        launcher = psutil.Process(os.getppid())
        command = launcher.ppid()
    except Exception:  # noqa: BLE001 - no watching then, as before
        return None
    if command <= 1:
        return None
    done = threading.Event()
    # The pipe to the command may break before the watcher looks (a progress bar refresh):
    # rich's console would then exit the process on the spot (SystemExit 1, the run FAILED,
    # no checkpoint). The broken pipe is the same news, so it stops the stage the same way.
    rich.get_console().on_broken_pipe = lambda: _command_gone(command)
    _state.launching_command = command

    def watch() -> None:
        while not done.wait(0.5):
            try:
                gone = launcher.ppid() != command or not psutil.pid_exists(command)
            except psutil.Error:
                gone = True
            if gone:
                _command_gone(command)
                return

    threading.Thread(target=watch, daemon=True, name="posttrain-launch-watch").start()
    return done


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid)
    except Exception:  # noqa: BLE001 - no psutil: assume it is, say nothing more
        return True


def _command_gone(command: int) -> None:
    """The command that launched this process is gone: nobody reads its output any more (a
    write to the broken pipe would end the process before its checkpoint), so output goes to
    /dev/null, and the stage stops as on SIGTERM at the next step boundary."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    if _state.pending is None and not _state.stopping:
        _state.note = f"the command that launched it, PID {command}, is gone"
        _state.pending = "SIGTERM"


def checkpointed(step: int) -> None:
    """The current stage has a valid checkpoint at `step` (written or resumed from)."""
    _state.checkpoint_step = step


def after_step(step: int, save: Callable[[], None] | None) -> None:
    """At the end of optimizer step `step`: if a signal asked to stop, raise Interrupted, after
    `save()` (a checkpoint of this step; None when none can be written here) on SIGTERM."""
    _state.step = step
    _state.checkpointing = save is not None
    name = _state.pending
    if name is None:
        return
    if _state.timer is not None:
        _state.timer.cancel()  # at a boundary now: the checkpoint may take its time
    if name == "SIGTERM" and save is not None and _state.checkpoint_step != step:
        save()
        _state.checkpoint_step = step
    _state.stopping = True
    raise Interrupted(name, where())


def say(line: str) -> None:
    """One line on stderr, safe inside a signal handler (print may be in the middle of a write
    to the same stream and would fail as a reentrant call)."""
    try:
        os.write(2, f"\n{line}\n".encode())
    except OSError:  # stderr gone (the pipe of a command that was killed): the stop goes on
        pass


def where() -> str:
    """Where the run stands, for the closing line: stage, step, and what a rerun resumes from."""
    if _state.stage is None:
        return "before or between stages"
    text = f"during stage {_state.stage!r}"
    if _state.step is not None:
        text += f" after step {_state.step}"
    if _state.note is None and _state.launching_command and not _alive(_state.launching_command):
        # A SIGTERM from the launcher, which ends its processes when the command goes, can
        # come before the watcher sees the command gone: the same cause, so the same words.
        _state.note = f"the command that launched it, PID {_state.launching_command}, is gone"
    if _state.note:
        text += f" ({_state.note})"
    if _state.checkpoint_step is not None:
        text += f"; a rerun resumes it from the checkpoint at step {_state.checkpoint_step}"
    elif _state.checkpointing:
        text += "; it had no checkpoint yet, so a rerun starts it again"
    else:
        text += "; a rerun starts it again (set checkpoint_every to resume mid-stage)"
    return text


def finish(error: Interrupted) -> None:
    """End the process through the stopper; without one, raise `error`."""
    _state.stopping = True
    if _state.timer is not None:
        _state.timer.cancel()
    if _stopper is not None:
        _stopper(error.signal_name, error.where)
    raise error


def _stop_from_timer() -> None:
    """A stage that reached no step boundary in GRACE_SECONDS is stopped where it is."""
    if _state.stopping:
        return
    _state.stopping = True
    if _stopper is not None:
        _stopper(_state.pending or "SIGINT", where())
    else:
        _state.forced = True  # the signal wakes a blocked main thread; `handle` raises
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
