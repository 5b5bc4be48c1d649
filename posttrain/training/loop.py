"""The offline training loop (`fit`: SFT, reward model, DPO & co., KTO, GKD) and its gradient
accumulation, normalized over the items of the whole accumulated batch across processes.

One loop for every offline recipe, not one per recipe: what is easy to get wrong is the same in
all of them (the loss normalized over the global batch's items across micro-batches and
processes, resuming at the data position, checkpoints, `select_best`, the non-finite guard), and
it is written and tested once here. What a recipe adds is its `Objective`, a module-level class
with four methods: `count` (a micro-batch's loss items), `loss` (their SUMMED loss and metrics),
`evaluate` (the held-out metrics, run when `evaluates`) and `step_metrics` (throughput and
other per-step metrics). `fit` knows nothing else about the recipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Protocol

import torch
from accelerate import Accelerator

from posttrain import checkpoints
from posttrain.best import best_state
from posttrain.config import TrainingConfig
from posttrain.progress import TrainingProgress
from posttrain.training.batches import Batch, to_device
from posttrain.training.devices import global_sum
from posttrain.training.optimizer import NonFiniteGuard, optimizer_step

# A micro-batch's metrics, each SUMMED over its loss items, or a (sum, count) pair for a metric
# that is a mean over its own subset of items (KTO's reward of the desirable rows).
Metrics = dict[str, float | tuple[float, float]]


class Objective(Protocol):
    """What an offline recipe trains, as `fit` and `accumulate` see it.

    Subclass it for the defaults: no held-out evaluation, no per-step metrics."""

    evaluates: bool = False  # whether `evaluate` has held-out rows (select_best needs them)

    def count(self, batch: Batch) -> int:
        """The number of loss items of a micro-batch (tokens for SFT, pairs for DPO), known
        before its forward."""
        ...

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """The loss SUMMED over the micro-batch's items (a tensor to backpropagate), and its
        metrics summed over them (`Metrics`)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, called in eval mode under no_grad."""
        return {}

    def step_metrics(self, micro: list[Batch], metrics: dict[str, float],
                     seconds: float) -> dict[str, float]:
        """Metrics of the whole step (after accumulation and the optimizer step) from its
        micro-batches, its accumulated `metrics` and its time."""
        return {}


def sums_from_means(loss: torch.Tensor, metrics: dict, n: int) -> tuple[torch.Tensor, Metrics]:
    """A loss and metrics that are MEANS over a micro-batch's `n` items (the losses of
    posttrain/losses/ are, as their papers write them) as the sums `Objective.loss` returns:
    each times n. (sum, count) pairs pass through unchanged. One helper, not a sum inside each
    loss: the losses stay as their hand-worked tests check them, and mean x n is the product the
    loop has always taken, so every float is what it was."""
    return loss * n, {"loss": loss.item() * n,
                      **{k: v if isinstance(v, tuple) else float(v) * n
                         for k, v in metrics.items()}}


def accumulate(
    accelerator: Accelerator,
    net: torch.nn.Module,
    micro: list[Batch],
    objective: Objective,
) -> tuple[dict[str, float], int]:
    """Backward over micro-batches so that the gradient is that of one global batch.

    `objective.count(mb)` is the number of loss items of a micro-batch, `objective.loss(mb)` the
    loss and metrics summed over them. Each sum is divided by the item count of the whole accumulated batch
    across processes; since DDP averages gradients over processes, each process's share is
    multiplied back by the number of processes. Returns metrics as global per-item means and the
    global item count.

    A metric given as a (sum, count) pair is a mean over its own items (KTO's reward of the
    desirable rows): both parts are summed over micro-batches and processes, and the metric is
    sum / count, NaN when no micro-batch anywhere had such an item.
    """
    local = sum(objective.count(mb) for mb in micro)
    total = int(global_sum(accelerator, float(local)))
    denom = max(total, 1)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}  # the own item counts of (sum, count) metrics
    for i, mb in enumerate(micro):
        mb = to_device(mb, accelerator.device)
        sync = accelerator.no_sync(net) if i < len(micro) - 1 else nullcontext()
        with sync:
            loss_sum, metrics = objective.loss(mb)
            accelerator.backward(loss_sum / denom * accelerator.num_processes)
        for k, v in metrics.items():
            if isinstance(v, tuple):
                sums[k] = sums.get(k, 0.0) + float(v[0])
                counts[k] = counts.get(k, 0.0) + float(v[1])
            else:
                sums[k] = sums.get(k, 0.0) + float(v)
    names, own = sorted(sums), sorted(counts)
    if names:
        values = [sums[k] for k in names] + [counts[k] for k in own]
        reduced = accelerator.reduce(
            torch.tensor(values, device=accelerator.device, dtype=torch.float64), "sum"
        ).tolist()
        sums = dict(zip(names, reduced))
        counts = dict(zip(own, reduced[len(names):]))
    return {k: (v / counts[k] if counts[k] else float("nan")) if k in counts else v / denom
            for k, v in sums.items()}, total


def fit(
    accelerator: Accelerator,
    net: torch.nn.Module,
    optimizer,
    scheduler,
    params: list,
    batches: Iterator[Batch],
    cfg: TrainingConfig,
    *,
    name: str,
    objective: Objective,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    checkpoint_dir=None,
) -> dict[str, float]:
    """The offline training loop shared by SFT, reward modelling, DPO, ORPO, SimPO, CPO, KTO
    and GKD; what each trains is its `objective`.

    With `checkpoint_dir`, training resumes from the newest valid checkpoint there (model,
    optimizer, scheduler, RNG and data position) and saves one every `checkpoint_every` steps.
    Per optimizer step: `grad_accum` micro-batches through `accumulate`, clip and step, then
    `objective.step_metrics(micro, metrics, seconds)`, `objective.evaluate()` every `eval_every`
    steps and at the end (when `objective.evaluates`), and metrics logged every `log_every`
    steps (rank 0 only).

    With `cfg.select_best`, the model of the evaluated step where that metric was best is put
    back at the end (posttrain/best.py; the state is in the checkpoints) and `best_step`,
    `best/<metric>` are in the returned metrics.
    """
    net.train()
    final: dict[str, float] = {}
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    accelerator.register_for_checkpointing(scheduler)
    best = best_state(accelerator.unwrap_model(net), cfg, accelerator)
    if best is not None and not objective.evaluates:
        raise ValueError(f"select_best: {cfg.select_best} needs an evaluation during training, "
                         f"and {name} has none here")
    start = checkpoints.restore(accelerator, checkpoint_dir) if checkpoint_dir else 0
    for _ in range(start * cfg.grad_accum):  # the data position: batches are deterministic
        next(batches)
    with TrainingProgress(name, cfg.max_steps, enabled=accelerator.is_main_process) as progress:
        for step in range(start + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            metrics, _ = accumulate(accelerator, net, micro, objective)
            metrics["grad_norm"] = optimizer_step(
                accelerator, optimizer, scheduler, params, cfg.max_grad_norm, guard,
                metrics.get("loss", 0.0),
            )
            metrics["skipped_steps"] = guard.skipped
            metrics["learning_rate"] = scheduler.get_last_lr()[0]
            metrics.update(objective.step_metrics(micro, metrics, time.perf_counter() - t0))
            if objective.evaluates and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                net.eval()
                with torch.no_grad():
                    metrics.update(objective.evaluate())
                net.train()
                if best is not None:
                    best.update(metrics, step)
            due = step % cfg.log_every == 0 or step == cfg.max_steps or step % cfg.eval_every == 0
            if due and accelerator.is_main_process and log_metrics is not None:
                log_metrics(metrics, step)
            progress.update(step, metrics)
            final.update(metrics)
            checkpoints.after_step(accelerator, checkpoint_dir, step, every=cfg.checkpoint_every,
                                   keep=cfg.checkpoint_keep)
    if best is None:
        return final
    if best.restore() is None:
        raise RuntimeError(f"select_best: {best.metric} was never logged (no held-out rows "
                           "were evaluated), so no step can be selected")
    return {**final, **best.summary()}
