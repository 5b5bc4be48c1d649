"""Which rows each micro-batch holds: endless shuffled epochs, sharded across processes, the
same order for what is precomputed (`rows_used`, `precompute_used`) and what is trained on."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

Batch = dict[str, Any]


def global_batches(n: int, batch_size: int, *, seed: int, world_size: int = 1
                   ) -> Iterator[list[int]]:
    """The unit indices of every global micro-batch, forever: epoch e shuffles range(n) with
    random.Random(seed + e) and cuts it into batch_size x world_size blocks (process r takes the
    r-th batch_size slice of each); the ragged tail of an epoch is dropped. `endless_batches`
    and `rows_used` both read this, so what is precomputed is what is trained on."""
    size = batch_size * world_size
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        for b in range(n // size):
            yield order[b * size : (b + 1) * size]
        epoch += 1


def rows_used(n: int, batch_size: int, num_batches: int, *, seed: int,
              world_size: int = 1) -> list[int]:
    """Sorted indices of the units in the first `num_batches` micro-batches of every process
    (`endless_batches` with the same arguments): the rows a run of num_batches = max_steps x
    grad_accum micro-batches trains on, across epochs. The same list on every process."""
    seen: set[int] = set()
    batches = global_batches(n, batch_size, seed=seed, world_size=world_size)
    for _ in range(num_batches):
        if len(seen) == n:
            break
        seen.update(next(batches))
    return sorted(seen)


def precompute_used(units: list, compute: Callable[[list], list], *, batch_size: int,
                    num_batches: int, seed: int, world_size: int = 1) -> list:
    """`units` with `compute(rows)` (one output per row, e.g. the row plus its reference
    log-probs) in place of each unit the first `num_batches` micro-batches of every process
    will hold (`rows_used`); the other units are left as they are and no batch of the run holds
    one. Every process computes the same rows, so sharded models run the same forwards."""
    used = rows_used(len(units), batch_size, num_batches, seed=seed, world_size=world_size)
    out = list(units)
    for i, unit in zip(used, compute([units[i] for i in used]), strict=True):
        out[i] = unit
    return out


def endless_batches(
    units: list,
    batch_size: int,
    collate: Callable[[list], Batch],
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    what: str = "examples",
) -> Iterator[Batch]:
    """Micro-batches forever, reshuffled each epoch; process `rank` takes every world_size-th.

    The ragged tail of an epoch is dropped so that every micro-batch has `batch_size` units and
    every process the same number of batches (`global_batches`).
    """
    if len(units) < batch_size * world_size:  # checked now, not at the first next()
        raise ValueError(
            f"{len(units)} {what} cannot fill one batch of {batch_size} per process x "
            f"{world_size} processes"
        )

    def forever() -> Iterator[Batch]:
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        for block in global_batches(len(units), batch_size, seed=seed, world_size=world_size):
            yield collate([units[i] for i in block[mine]])

    return forever()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors, and those of its nested dicts (image inputs), on `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor)
            else to_device(v, device) if isinstance(v, dict) else v for k, v in batch.items()}
