"""Resumable training checkpoints, written atomically and verified before use.

A checkpoint is accelerate's state (model weights as safetensors, optimizer, registered
scheduler, RNG states) plus `manifest.json` with the digest of every file. It is written into a
temporary folder and renamed to `step-NNNNNN` only when complete, so a crash while writing leaves
the previous checkpoint as the latest. On resume the newest checkpoint whose files match their
digests is used; a corrupted one is refused with a message and the one before it is tried.

Only the `keep` newest checkpoints stay: older ones are deleted after a newer one is written and
verified. The stage removes the whole folder once its artifact is complete (`remove`), unless
its `keep_checkpoints` says otherwise. `after_step` is what every training loop calls at the end
of an optimizer step: the periodic checkpoint, and the stop that SIGINT/SIGTERM asked for
(posttrain.interrupt), after a last checkpoint on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

from accelerate import Accelerator

from posttrain import artifacts, disk, interrupt

log = logging.getLogger(__name__)
PREFIX = "step-"


class GeneratorState:
    """Lets accelerate checkpoint a torch.Generator (e.g. the sampling RNG of a rollout) like any
    stateful object: `accelerator.register_for_checkpointing(GeneratorState(generator))`.

    accelerate writes a registered object from the main process only, but each process of a
    launch has its own generator, and their states part (a rollout that ends early at EOS
    draws fewer numbers): the state saved holds every process's (gathered; accelerate asks each
    process for its state_dict), and each process loads its own."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self) -> dict:
        state = self.generator.get_state()
        _, world = _rank_and_world()
        if world == 1:
            return {"state": state}
        import torch.distributed as dist

        states: list = [None] * world
        dist.all_gather_object(states, state)
        return {"state": state, "states": states}

    def load_state_dict(self, state: dict) -> None:
        rank, _ = _rank_and_world()
        states = state.get("states")
        self.generator.set_state(states[rank] if states and rank < len(states)
                                 else state["state"])


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save(accelerator: Accelerator, root: Path, step: int, keep: int | None = None) -> Path:
    """Write the training state at `step` atomically; return the checkpoint folder. With
    `keep`, verify it and then delete all but the `keep` newest checkpoints."""
    root = Path(root)
    final = root / f"{PREFIX}{step:06d}"
    # One folder for all processes (each writes its own RNG state into it): rank 0's name,
    # which names rank 0 as its owner.
    tmp = root / _same_on_every_process(
        accelerator, artifacts.tmp_name(f"{PREFIX}{step:06d}")
        if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        artifacts.remove_dead_tmp(root)  # half-written checkpoints of a killed run
    previous = latest_valid(root) if accelerator.is_main_process and keep is not None else None
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's files are in before the digests
        if accelerator.is_main_process:
            files = {
                str(p.relative_to(tmp)): artifacts.sha256_file(p)
                for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            (tmp / artifacts.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
            if final.exists():  # a previous attempt got this far: the new one replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
            if keep is not None:
                artifacts.verify(final, full=True)  # only a verified newer one replaces older
                for old in _folders(root)[keep:]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if disk.is_disk_full(e):
            needed = disk.folder_bytes(previous[0]) if previous else _state_bytes(accelerator)
            raise disk.full_error(root, f"the checkpoint of step {step}", needed) from e
        raise
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    interrupt.checkpointed(step)
    return final


def _same_on_every_process(accelerator: Accelerator, value):
    """`value` as the main process has it, on every process of the launch."""
    if accelerator.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def after_step(accelerator: Accelerator, root: Path | None, step: int, *, every: int | None,
               keep: int | None = None, can_save: bool = True) -> None:
    """End of optimizer step `step` of a training loop: a checkpoint every `every` steps (when
    `can_save`: GRPO saves only between its policy iterations), then the stop a signal asked
    for, if any (raising posttrain.interrupt.Interrupted)."""
    saveable = root is not None and bool(every) and can_save
    if saveable and step % every == 0:
        save(accelerator, root, step, keep)
    agree_on_stop(accelerator)
    interrupt.after_step(step, (lambda: save(accelerator, root, step, keep)) if saveable
                         else None)


_CODES = {None: 0, "SIGINT": int(signal.SIGINT), "SIGTERM": int(signal.SIGTERM)}


def agree_on_stop(accelerator: Accelerator) -> None:
    """In a launch of several processes, a stop that one process was asked for (its signal
    arrives a moment before or after the others', or only there) is every process's stop at
    this same step boundary, SIGTERM over SIGINT: otherwise one process enters the checkpoint
    (collective) or exits while another starts the next step's all-reduce, and both wait on
    each other. One small all-reduce per step; nothing with a single process."""
    if accelerator.num_processes <= 1:
        return
    import torch
    import torch.distributed as dist

    flag = torch.tensor([_CODES.get(interrupt.pending(), int(signal.SIGTERM))],
                        device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    code = int(flag.item())
    if code:
        interrupt.adopt(signal.Signals(code).name)


def _state_bytes(accelerator: Accelerator) -> int:
    """About the size of a checkpoint: weights plus optimizer state, as held in memory."""
    import torch

    total = sum(p.numel() * p.element_size() for m in accelerator._models
                for p in m.parameters())
    for opt in accelerator._optimizers:
        for state in opt.state_dict()["state"].values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor))
    return total


def remove(root: Path) -> None:
    """Delete a stage's checkpoint folder (its artifact is complete: nothing resumes from it)."""
    root = Path(root)
    if root.is_dir():
        shutil.rmtree(root, ignore_errors=True)


def _folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, newest first."""
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  reverse=True)


def latest_valid(root: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint whose files match their digests, with its step."""
    root = Path(root)
    if not root.is_dir():
        return None
    for folder in _folders(root):
        try:
            manifest = artifacts.verify(folder, full=True)
        except artifacts.ArtifactError as e:
            log.warning("refusing checkpoint %s: %s; trying the previous one", folder, e)
            continue
        return folder, int(manifest["step"])
    return None


def restore(accelerator: Accelerator, root: Path | None) -> int:
    """Load the latest valid checkpoint under `root` into the prepared objects; return its step
    (0 when there is none)."""
    if root is None:
        return 0
    if accelerator.is_main_process:
        artifacts.remove_dead_tmp(root)
    found = latest_valid(root)
    if found is None:
        return 0
    folder, step = found
    accelerator.load_state(str(folder))
    interrupt.checkpointed(step)
    if accelerator.is_main_process:
        # On the console of `posttrain run` (a print in a task goes to its log and the console).
        root = Path(root)
        print(f"resuming stage {root.parent.name} "
              f"({root.parent / root.name.removesuffix('.checkpoints')}) from step {step} "
              f"(checkpoint {folder})", flush=True)
    log.info("resumed from %s (step %d)", folder, step)
    return step
