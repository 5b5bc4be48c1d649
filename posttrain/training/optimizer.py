"""AdamW and its learning-rate schedule, and the optimizer step: clipping, the non-finite guard
(a step with a NaN/inf loss or gradient is skipped; too many in a row fail the run)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from posttrain.config import TrainingConfig


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
