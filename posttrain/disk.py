"""Disk space: what a stage will write, and a clear error when the disk fills up.

A full disk shows up as OSError(ENOSPC) from Python's own writes, and as a RuntimeError from
torch's zip writer ("unexpected pos ...", "file write failed") when a checkpoint's tensors are
written: `is_disk_full` recognizes both. `DiskFullError` names the folder, about how many bytes
the write needed and how many are free. Writers write into temporary folders, so nothing
half-written is ever used, and a checkpoint that could not be written leaves the previous one
as the latest.

`stage_bytes` estimates a training stage's artifact plus its checkpoints from the base model's
size, for preflight to refuse a stage that cannot fit.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from posttrain.config import ModelConfig, PipelineConfig

# Lazy imports: posttrain.models (torch) loads only to size a model; preflight imports this.

# A checkpoint holds the trained weights and AdamW's two moments (fp32): about 3x the weights.
CHECKPOINT_FACTOR = 3.0
LORA_CHECKPOINT_SHARE = 0.05  # LoRA checkpoints hold only the adapters and their moments


class DiskFullError(OSError):
    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os error 28" in text:
            return True  # e.g. safetensors' own error type
        if isinstance(error, RuntimeError) and ("unexpected pos" in text
                                                or "file write failed" in text):
            return True  # torch's zip writer
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def full_error(folder: str | Path, what: str, needed: int | None) -> DiskFullError:
    free = free_bytes(folder)
    return DiskFullError(
        f"no space left on the disk of {folder} while writing {what}: it needs about "
        f"{human(needed)}, {human(free)} are free. Free space there (or set artifacts_root to a "
        "bigger disk, or lower checkpoint_keep), then rerun: nothing half-written is used")


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def model_bytes(model_cfg: ModelConfig) -> int | None:
    """The base model's weights in bytes: counted for the built-in model, the weight files of
    a local folder; None for a hub id (not known before it is downloaded)."""
    if model_cfg.name_or_path == "tiny":
        import torch

        from posttrain.models import build_tiny_model, build_tiny_tokenizer

        with torch.device("meta"):
            model = build_tiny_model(model_cfg.tiny, build_tiny_tokenizer())
        return sum(p.numel() * p.element_size() for p in model.parameters())
    folder = Path(model_cfg.name_or_path).expanduser()
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin")
               for p in folder.glob(pattern))


def stage_bytes(cfg: PipelineConfig, stage, weights: int | None = None) -> int | None:
    """About what a training stage writes at most: its model, plus `checkpoint_keep` + 1
    checkpoints at the moment a new one is written (when checkpointing)."""
    weights = model_bytes(cfg.model) if weights is None else weights
    if weights is None:
        return None
    total = float(weights)
    if stage.checkpoint_every:
        share = LORA_CHECKPOINT_SHARE if cfg.model.lora else 1.0
        total += (stage.checkpoint_keep + 1) * CHECKPOINT_FACTOR * share * weights
    return int(total)
