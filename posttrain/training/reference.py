"""The frozen reference of the methods that compare with the starting policy (a copy, or the
policy with its LoRA adapter off), and dropout off for RL."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from posttrain.training.devices import place


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
