"""Resumable training checkpoints, written atomically and verified before use.

A checkpoint is accelerate's state (model weights as safetensors, optimizer, registered
scheduler, RNG states) plus `manifest.json` with the digest of every file. It is written into a
temporary folder and renamed to `step-NNNNNN` only when complete, so a crash while writing leaves
the previous checkpoint as the latest. On resume the newest checkpoint whose files match their
digests is used; a corrupted one is refused with a message and the one before it is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from posttrain import artifacts

log = logging.getLogger(__name__)
PREFIX = "step-"


class GeneratorState:
    """Lets accelerate checkpoint a torch.Generator (e.g. the sampling RNG of a rollout) like any
    stateful object: `accelerator.register_for_checkpointing(GeneratorState(generator))`."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def save(accelerator: Accelerator, root: Path, step: int) -> Path:
    """Write the training state at `step` atomically; return the checkpoint folder."""
    root = Path(root)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / artifacts.tmp_name(f"{PREFIX}{step:06d}")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        artifacts.remove_dead_tmp(root)  # half-written checkpoints of a killed run
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            files = {
                str(p.relative_to(tmp)): artifacts.sha256_file(p)
                for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            (tmp / artifacts.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
            if final.exists():  # a previous attempt got this far: the new one replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_valid(root: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint whose files match their digests, with its step."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True
    )
    for folder in candidates:
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
    if accelerator.is_main_process:
        # On the console of `posttrain run` (a print in a task goes to its log and the console).
        root = Path(root)
        print(f"resuming stage {root.parent.name} "
              f"({root.parent / root.name.removesuffix('.checkpoints')}) from step {step} "
              f"(checkpoint {folder})", flush=True)
    log.info("resumed from %s (step %d)", folder, step)
    return step
