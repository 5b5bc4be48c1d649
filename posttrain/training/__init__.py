"""Pieces every training loop shares, written and tested once. The loops themselves
(posttrain/recipes/) stay separate and readable top to bottom.

- devices.py    the Accelerator and its settings for the device, `prepare`, gathering sharded
                weights, `place` (every model besides the trained one), global sums, teardown
- batches.py    endless shuffled, sharded micro-batches; the rows a run will train on
- optimizer.py  AdamW and its schedule, the optimizer step with clipping and the NaN/inf guard
- loop.py       the offline loop `fit`, the `Objective` each offline recipe gives it, and
                gradient accumulation over the global batch
- reference.py  the frozen reference (a copy, or the adapter off), dropout off for RL
- oom.py        out-of-memory back-off (half the micro-batch, twice the accumulation)

Every name is importable from `posttrain.training` too, as the recipes do.
"""

from posttrain.training.batches import (
    Batch,
    endless_batches,
    global_batches,
    precompute_used,
    rows_used,
    to_device,
)
from posttrain.training.devices import (
    cpu_processes,
    enable_gradient_checkpointing,
    end_distributed,
    gathered_state_dict,
    global_sum,
    make_accelerator,
    place,
    prepare,
    resolve_gradient_checkpointing,
    resolve_mixed_precision,
)
from posttrain.training.loop import Metrics, Objective, accumulate, fit, sums_from_means
from posttrain.training.oom import halve_micro_batch, is_out_of_memory, with_oom_backoff
from posttrain.training.optimizer import (
    NonFiniteError,
    NonFiniteGuard,
    build_optimizer,
    optimizer_step,
)
from posttrain.training.reference import disable_dropout, reference_runner

__all__ = [
    "Batch", "Metrics", "NonFiniteError", "NonFiniteGuard", "Objective", "accumulate",
    "build_optimizer", "cpu_processes", "disable_dropout", "enable_gradient_checkpointing",
    "end_distributed", "endless_batches", "fit", "gathered_state_dict", "global_batches",
    "global_sum", "halve_micro_batch", "is_out_of_memory", "make_accelerator", "optimizer_step",
    "place", "precompute_used", "prepare", "reference_runner", "resolve_gradient_checkpointing",
    "resolve_mixed_precision", "rows_used", "sums_from_means", "to_device", "with_oom_backoff",
]
