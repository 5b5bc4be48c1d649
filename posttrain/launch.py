"""Run one training stage as its own process(es) through `accelerate launch`.

A stage asks for this with `launch.num_processes > 1` or `launch.accelerate_config` in the
pipeline config. `run_launched` then writes the resolved config and the upstream manifests into
a folder under the artifacts root (shared storage on a cluster, so every process can read it),
starts

    python -m accelerate.commands.launch [--config_file F | --multi_gpu ...] --num_processes N \\
        -m posttrain.launch --stage NAME --workdir DIR [--parent-run-id ID]

passes every output line to a callback (the Prefect task logs them), and returns the manifest
that rank 0 wrote. The stage's progress lines (the `posttrain.progress` logger: a metric line
every `log_every` steps, evaluation results) would be lost in the launched processes, where that
logger has no handler (logging drops INFO lines then): each process prints them marked with
PROGRESS_MARK, and the parent hands them, unmarked, to their own callback (the Prefect task sends
them to its run's logs under the same logger name as an in-process stage's). Each process runs the stage function of posttrain.stages; the recipes shard
the data by rank and DDP (or FSDP/DeepSpeed, from the config file) synchronizes gradients, and
only rank 0 writes the artifact and the MLflow run (posttrain/stages/common.py).

When a process fails, it writes its exception (type and message) next to the config before
dying; `StageLaunchError` carries the stage's own message rather than the launcher's
"child process failed" summary. Nothing here imports Prefect.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from posttrain import progress
from posttrain.config import LaunchConfig, PipelineConfig
from posttrain.gc_tuning import tune_for_a_command
from posttrain.stages.graph import run_training_stage

# Lazy imports: torch (posttrain.training) loads only in the launched processes; the Prefect
# task that starts them imports this module.

CONFIG_FILE = "config.json"
UPSTREAM_FILE = "upstream.json"
MANIFEST_FILE = "manifest.json"
ERROR_PREFIX = "error-rank"
# A line a launched process prints for each `posttrain.progress` record.
PROGRESS_MARK = "[posttrain.progress] "
# Launcher lines that summarize a child's failure without saying what it was.
_LAUNCHER_NOISE = ("ChildFailedError", "CalledProcessError", "SignalException")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))(:.*)?$")


class StageLaunchError(RuntimeError):
    """A launched stage failed; the message is the stage's own error (type and message)."""

    def __init__(self, stage: str, returncode: int, error: str):
        self.stage, self.returncode, self.error = stage, returncode, error
        super().__init__(f"stage {stage!r} failed (launched, exit code {returncode}): {error}")


def run_stage_by_name(cfg: PipelineConfig, stage: str, upstream: dict,
                      parent_run_id: str | None = None) -> dict:
    """Run the training stage named `stage` with its upstream manifests (data, start, reward)."""
    return run_training_stage(cfg, stage, upstream, parent_run_id=parent_run_id)


# ------------------------------------------------------------------------------ the parent


def launch_command(launch: LaunchConfig, mixed_precision: str, script_args: list[str]) -> list[str]:
    """The `accelerate launch` command line for `python -m posttrain.launch <script_args>`.

    Without a config file, N > 1 processes run as accelerate's multi-process (torchrun) launch
    on this machine: DDP over the GPUs, or gloo on CPU. A config file decides everything it
    sets (FSDP, DeepSpeed, machines); num_processes > 1 still overrides its process count.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config is not None:
        cmd += ["--config_file", launch.accelerate_config]
        if launch.num_processes > 1:
            cmd += ["--num_processes", str(launch.num_processes)]
    else:
        cmd += ["--multi_gpu", "--num_processes", str(launch.num_processes),
                "--num_machines", "1", "--mixed_precision", mixed_precision,
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return [*cmd, "-m", "posttrain.launch", *script_args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(
    cfg: PipelineConfig,
    stage: str,
    upstream: dict,
    *,
    parent_run_id: str | None = None,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Run `stage` under `accelerate launch` as cfg.launch says; return rank 0's manifest.

    Every line the processes print goes to `on_line` as it comes, except their progress lines
    (PROGRESS_MARK), which go without the mark to `on_progress` (default: `on_line`). A non-zero
    exit raises StageLaunchError with the stage's own error message.
    """
    from posttrain.training import resolve_mixed_precision

    workdir = Path(cfg.artifacts_root).resolve() / ".launch" / f"{stage}-{uuid.uuid4().hex[:12]}"
    workdir.mkdir(parents=True)
    try:
        (workdir / CONFIG_FILE).write_text(cfg.model_dump_json())
        (workdir / UPSTREAM_FILE).write_text(json.dumps(upstream))
        args = ["--stage", stage, "--workdir", str(workdir)]
        if parent_run_id:
            args += ["--parent-run-id", parent_run_id]
        cmd = launch_command(cfg.launch, resolve_mixed_precision(cfg.model.mixed_precision), args)
        on_line("$ " + " ".join(cmd))
        tail: deque[str] = deque(maxlen=200)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1, env=env, errors="replace",
                              start_new_session=True) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    tail.append(line)
                    if line.startswith(PROGRESS_MARK):
                        (on_progress or on_line)(line.removeprefix(PROGRESS_MARK))
                    else:
                        on_line(line)
                returncode = proc.wait()
            except BaseException:  # cancelled or interrupted: take the training down with us
                _stop(proc)
                raise
        if returncode != 0:
            raise StageLaunchError(stage, returncode, _stage_error(workdir, tail))
        manifest_path = workdir / MANIFEST_FILE
        if not manifest_path.is_file():
            raise StageLaunchError(stage, returncode, "the launched stage wrote no manifest")
        return json.loads(manifest_path.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the launcher and its workers (their own process group), SIGKILL after `grace` s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stage_error(workdir: Path, tail: deque[str]) -> str:
    """The failed stage's own 'Type: message', from the error files the ranks wrote (lowest
    rank first), else the last exception line of the output that is not the launcher's."""
    for path in sorted(workdir.glob(f"{ERROR_PREFIX}*.json"),
                       key=lambda p: int(p.stem.removeprefix(ERROR_PREFIX) or 0)):
        try:
            err = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if err.get("type") not in ("SystemExit", "KeyboardInterrupt"):
            return f"{err['type']}: {err['message']}"
    for line in reversed(tail):
        m = _ERROR_LINE.match(line.strip())
        if m and not any(noise in m.group(1) for noise in _LAUNCHER_NOISE):
            return line.strip()
    return "\n".join(list(tail)[-10:]) or "no output"


# ------------------------------------------------------------------------------ each process


def _terminate(signum, _frame):
    # torchrun stops the other ranks with SIGTERM when one fails. Unwind, so that rank 0 marks
    # its MLflow run FAILED, instead of dying on the spot; a process already unwinding from its
    # own error (inside an `except`) goes on doing so undisturbed.
    if sys.exc_info()[0] is None:
        raise SystemExit(128 + signum)


def progress_to_stdout() -> None:
    """Print this process's `posttrain.progress` records as PROGRESS_MARK lines on stdout (the
    parent's pipe), once per process. Unhandled, logging would drop them (its last-resort
    handler prints only warnings)."""
    if not any(getattr(h, "posttrain_progress", False) for h in progress.logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(PROGRESS_MARK + "%(message)s"))
        handler.posttrain_progress = True
        progress.logger.addHandler(handler)
    progress.logger.setLevel(logging.INFO)
    progress.logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    """One process of a launched stage: run it, write the manifest (rank 0) or the error."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--stage", required=True, help="name of a training stage")
    parser.add_argument("--workdir", required=True, help="folder written by run_launched")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run id")
    args = parser.parse_args(argv)
    tune_for_a_command()
    signal.signal(signal.SIGTERM, _terminate)
    progress_to_stdout()
    workdir = Path(args.workdir)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = PipelineConfig.model_validate_json((workdir / CONFIG_FILE).read_text())
        upstream = json.loads((workdir / UPSTREAM_FILE).read_text())
        manifest = run_stage_by_name(cfg, args.stage, upstream, args.parent_run_id)
    except BaseException as e:
        error = {"type": type(e).__name__, "message": str(e)}
        (workdir / f"{ERROR_PREFIX}{rank}.json").write_text(json.dumps(error))
        raise
    if rank == 0:
        tmp = workdir / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(manifest))
        tmp.replace(workdir / MANIFEST_FILE)
    from posttrain.training import end_distributed  # torch: only in the launched process

    end_distributed()


if __name__ == "__main__":
    main()
