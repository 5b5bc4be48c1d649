"""Pieces every training loop shares, written and tested once: optimizer and schedule, endless
shuffled (and sharded) batches, and gradient accumulation normalized over the global batch.

The loops themselves (posttrain/recipes/) stay separate and readable top to bottom.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from posttrain import checkpoints
from posttrain.best import best_state
from posttrain.config import TrainingConfig
from posttrain.progress import TrainingProgress

Batch = dict[str, Any]


def resolve_mixed_precision(setting: str, *, cuda: bool | None = None) -> str:
    """'auto' -> 'bf16' on a GPU that supports it, 'fp16' on an older GPU, 'no' on CPU."""
    if setting != "auto":
        return setting
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_gradient_checkpointing(setting: bool | str, *, cuda: bool | None = None) -> bool:
    """'auto' -> on with a GPU (memory is the limit there), off on CPU (it only costs time)."""
    if setting != "auto":
        return bool(setting)
    return torch.cuda.is_available() if cuda is None else cuda


def cpu_processes() -> bool:
    """True for a multi-process launch without GPUs. accelerate only joins such a launch (as
    MULTI_CPU, gloo) when told cpu=True; otherwise each process would train alone, silently."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """The Accelerator of one training run. Under `accelerate launch`/`torchrun` it joins the
    process group (DDP, or FSDP/DeepSpeed from the launch config; gloo on CPU); alone it is one
    process. `mixed_precision`: 'auto' (see resolve_mixed_precision), 'no', 'bf16', 'fp16', or
    None for the launcher's choice (ACCELERATE_MIXED_PRECISION, default 'no')."""
    if mixed_precision is not None:
        mixed_precision = resolve_mixed_precision(mixed_precision)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu_processes())


def enable_gradient_checkpointing(model: torch.nn.Module, setting: bool | str) -> bool:
    """Turn on activation recomputation (non-reentrant: works with LoRA's frozen inputs and DDP)
    when `setting` resolves to on; return whether it is on."""
    on = resolve_gradient_checkpointing(setting)
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return on


def prepare(accelerator: Accelerator, net: torch.nn.Module, optimizer, cfg: TrainingConfig):
    """`accelerator.prepare(net, optimizer)`, returning (net, optimizer, params) where params are
    the trainable parameters of the PREPARED net (FSDP2 replaces the module's parameters, and
    clipping must see the new ones).

    DeepSpeed learns the micro-batch size here (no dataloader goes through accelerate), and
    refuses accumulation: its engine steps inside `backward`, which the shared loop's
    normalization over the accumulated global batch does not expect.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if cfg.grad_accum != 1 or ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            raise ValueError("with DeepSpeed, use grad_accum=1 and gradient_accumulation_steps: 1 "
                             "(raise per_device_batch_size or the process count instead)")
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        ds["gradient_accumulation_steps"] = 1
    net, optimizer = accelerator.prepare(net, optimizer)
    return net, optimizer, [p for p in net.parameters() if p.requires_grad]


def gathered_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict | None:
    """The full weights of `model` when FSDP or DeepSpeed ZeRO-3 shard them across processes,
    gathered by accelerate (every process must call this; rank 0 gets the full dict), keyed as
    `model.state_dict()`. None when each process holds the whole model (one process, DDP,
    ZeRO-1/2): save `model` itself.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        if accelerator.state.deepspeed_plugin.zero_stage != 3:
            return None
    elif kind != DistributedType.FSDP:
        return None
    prepared = [m for m in accelerator._models  # the wrapper `prepare` made around `model`
                if any(sub is model for sub in accelerator.unwrap_model(m).modules())]
    if not prepared:
        raise ValueError("gathered_state_dict: the model was not prepared by this accelerator")
    state = accelerator.get_state_dict(prepared[-1])
    names = set(model.state_dict())
    # The prepared module wraps `model` (e.g. SelectedLogits.lm): drop that prefix, and any
    # weights of the wrapper itself (e.g. a value head).
    prefix = next((k[: len(k) - len(n)] for k in state for n in names
                   if k.endswith(n) and (len(k) == len(n) or k[len(k) - len(n) - 1] == ".")), "")
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):] in names}


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, *,
                    updates_per_step: int = 1):
    """AdamW with linear warm-up then the configured decay, scheduled over cfg.max_steps steps
    (and cfg.warmup_steps of warm-up) of `updates_per_step` optimizer updates each: PPO updates
    num_ppo_epochs x num_mini_batches times per rollout, every other method once."""
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * updates_per_step,
        num_training_steps=cfg.max_steps * updates_per_step,
    )
    return optimizer, scheduler


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
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def place(module: torch.nn.Module, accelerator: Accelerator, *,
          frozen: bool = False) -> torch.nn.Module:
    """Put a model the run uses besides the prepared (trained) one on the accelerator's device:
    the one placement for reference copies, reward models, evaluation candidates. `frozen`:
    eval mode, no gradients. The dtype stays the one the model was loaded in; under mixed
    precision its forwards run inside `accelerator.autocast()`, as the prepared policy's do, so
    a frozen copy of the policy computes exactly what the policy computes."""
    module = module.to(accelerator.device)
    if frozen:
        module.eval().requires_grad_(False)
    return module


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in `model`, in training mode too (RL: the log-probs of the sampling policy,
    of the update and of π_old must come from one distribution). Dropout modules get p = 0,
    and float `*dropout` attributes (attention dropout, which transformers' attention reads
    from the module while training) become 0. The saved config is left alone."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(m, name, 0.0)
    return model


LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


def as_sums(loss: torch.Tensor, metrics: dict, n: int) -> tuple[torch.Tensor, dict]:
    """A batch-MEAN loss and metrics over `n` items turned into the sums `accumulate` expects.
    (sum, count) pairs, metrics over their own subset of items, pass through unchanged."""
    return loss * n, {"loss": loss.item() * n,
                      **{k: v if isinstance(v, tuple) else float(v) * n
                         for k, v in metrics.items()}}


def accumulate(
    accelerator: Accelerator,
    net: torch.nn.Module,
    micro: list[Batch],
    count: Callable[[Batch], int],
    loss_fn: LossFn,
) -> tuple[dict[str, float], int]:
    """Backward over micro-batches so that the gradient is that of one global batch.

    `count(mb)` is the number of loss items of a micro-batch (tokens for SFT, pairs for DPO),
    known before its forward. `loss_fn(mb)` returns the loss SUMMED over those items and metrics
    also summed over them. Each sum is divided by the item count of the whole accumulated batch
    across processes; since DDP averages gradients over processes, each process's share is
    multiplied back by the number of processes. Returns metrics as global per-item means and the
    global item count.

    A metric given as a (sum, count) pair is a mean over its own items (KTO's reward of the
    desirable rows): both parts are summed over micro-batches and processes, and the metric is
    sum / count, NaN when no micro-batch anywhere had such an item.
    """
    local = sum(count(mb) for mb in micro)
    total = int(global_sum(accelerator, float(local)))
    denom = max(total, 1)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}  # the own item counts of (sum, count) metrics
    for i, mb in enumerate(micro):
        mb = to_device(mb, accelerator.device)
        sync = accelerator.no_sync(net) if i < len(micro) - 1 else nullcontext()
        with sync:
            loss_sum, metrics = loss_fn(mb)
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


def global_sum(accelerator: Accelerator, value: float) -> float:
    t = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, "sum"))


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class NonFiniteGuard:
    """Skips steps whose loss or gradient is not finite; fails after `max_in_row` in a row.

    A skipped step changes nothing: no parameter update, no scheduler step, gradients dropped.
    Failing (rather than skipping forever) keeps a diverged run from saving NaN weights: the
    stage's artifact is never written and its MLflow run ends FAILED with this message.
    """

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0

    def allows(self, *values: float) -> bool:
        if all(math.isfinite(v) for v in values):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(values {values}); stopping so that no NaN weights are saved"
            )
        return False


def optimizer_step(
    accelerator: Accelerator,
    optimizer,
    scheduler,
    params: list,
    max_grad_norm: float | None,
    guard: NonFiniteGuard | None = None,
    loss: float = 0.0,
) -> float:
    """Clip (when configured), step, schedule, zero; return the pre-clip global gradient norm.

    With a `guard`, a step whose `loss` or gradient norm is not finite is skipped.
    """
    if max_grad_norm is not None:
        norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    else:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
    if guard is None or guard.allows(float(loss), norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


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
    count: Callable[[Batch], int],
    loss_fn: LossFn,
    evaluate: Callable[[], dict[str, float]] | None = None,
    step_extras: Callable[[list[Batch], float], dict[str, float]] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    checkpoint_dir=None,
) -> dict[str, float]:
    """The offline training loop shared by SFT, reward modelling, DPO, ORPO and KTO.

    With `checkpoint_dir`, training resumes from the newest valid checkpoint there (model,
    optimizer, scheduler, RNG and data position) and saves one every `checkpoint_every` steps.
    Per optimizer step: `grad_accum` micro-batches through `accumulate`, clip and step, then
    `step_extras(micro, seconds)` for throughput-style metrics, `evaluate()` every `eval_every`
    steps and at the end, and metrics logged every `log_every` steps (rank 0 only).

    With `cfg.select_best`, the model of the evaluated step where that metric was best is put
    back at the end (posttrain/best.py; the state is in the checkpoints) and `best_step`,
    `best/<metric>` are in the returned metrics.
    """
    import time

    net.train()
    final: dict[str, float] = {}
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    accelerator.register_for_checkpointing(scheduler)
    best = best_state(accelerator.unwrap_model(net), cfg, accelerator)
    if best is not None and evaluate is None:
        raise ValueError(f"select_best: {cfg.select_best} needs an evaluation during training, "
                         f"and {name} has none here")
    start = checkpoints.restore(accelerator, checkpoint_dir) if checkpoint_dir else 0
    for _ in range(start * cfg.grad_accum):  # the data position: batches are deterministic
        next(batches)
    with TrainingProgress(name, cfg.max_steps, enabled=accelerator.is_main_process) as progress:
        for step in range(start + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            metrics, _ = accumulate(accelerator, net, micro, count, loss_fn)
            metrics["grad_norm"] = optimizer_step(
                accelerator, optimizer, scheduler, params, cfg.max_grad_norm, guard,
                metrics.get("loss", 0.0),
            )
            metrics["skipped_steps"] = guard.skipped
            metrics["learning_rate"] = scheduler.get_last_lr()[0]
            if step_extras is not None:
                metrics.update(step_extras(micro, time.perf_counter() - t0))
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                net.eval()
                with torch.no_grad():
                    metrics.update(evaluate())
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


def reference_runner(mode: str, policy: torch.nn.Module,
                     accelerator: Accelerator | None = None) -> Callable[[Callable], Any] | None:
    """How to run the reference model: None for 'precomputed' (the caller precomputes with the
    starting policy); otherwise `run(fn)` = fn(reference) in eval mode without gradients, inside
    the accelerator's autocast.

    'copy' freezes a deep copy of the starting policy now (call it before `accelerator.prepare`,
    which may shard the policy) and places it on the accelerator's device; 'adapter' runs the
    policy (a peft model) with its adapter disabled, so no second model is held in memory.
    Without an accelerator the copy stays where the policy is.
    """
    import copy

    if mode == "precomputed":
        return None
    if mode == "copy":
        ref, context = copy.deepcopy(policy).eval().requires_grad_(False), nullcontext
        if accelerator is not None:
            ref = place(ref, accelerator, frozen=True)
    elif mode == "adapter":
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("reference='adapter' needs a LoRA (peft) policy; set model.lora")
        ref, context = policy, policy.disable_adapter
    else:
        raise ValueError(f"unknown reference mode {mode!r}")
    precision = accelerator.autocast if accelerator is not None else nullcontext

    @torch.no_grad()
    def run(fn: Callable[[torch.nn.Module], Any]) -> Any:
        was_training = ref.training
        ref.eval()
        with context(), precision():
            out = fn(ref)
        ref.train(was_training)
        return out

    return run


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


def end_distributed() -> None:
    """Tear down the process group a multi-process run created. Left to interpreter exit, the
    gloo group's threads can abort the process (SIGABRT, "terminate called without an active
    exception") after all the work is done, failing a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
