"""Out-of-memory back-off: a stage retried with half the micro-batch and twice the accumulation
(the same effective batch) until it fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posttrain.config import TrainingConfig


def is_out_of_memory(error: BaseException) -> bool:
    """A device out-of-memory error (torch's own type, or the older RuntimeError text)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def halve_micro_batch(cfg: TrainingConfig, group: int = 1) -> TrainingConfig | None:
    """Half the micro-batch and twice the accumulation (the same effective batch for even sizes);
    None when the micro-batch is already 1 or half of it would not hold whole groups of `group`
    rows (GRPO's and RLOO's completions of one prompt)."""
    if cfg.per_device_batch_size <= 1 or (cfg.per_device_batch_size // 2) % group:
        return None
    return cfg.model_copy(update={"per_device_batch_size": cfg.per_device_batch_size // 2,
                                  "grad_accum": cfg.grad_accum * 2})


def with_oom_backoff(run: Callable[[TrainingConfig], Any], cfg: TrainingConfig,
                     on_backoff: Callable[[TrainingConfig, TrainingConfig], None], *,
                     group: int = 1) -> Any:
    """`run(cfg)`, retried after an out-of-memory error with half the micro-batch and twice the
    accumulation until it fits or the micro-batch is 1 (or would split a `group`, see
    `halve_micro_batch`). `run` must start from scratch (load its model afresh) each time;
    `on_backoff(old, new)` records the change."""
    import gc

    while True:
        try:
            return run(cfg)
        except Exception as error:
            smaller = halve_micro_batch(cfg, group) if is_out_of_memory(error) else None
            if smaller is None:
                raise
            on_backoff(cfg, smaller)
            del error
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg = smaller
