"""Accelerate set-up and what every process of a launch shares: mixed precision and gradient
checkpointing resolved for the device, the Accelerator, `prepare` (DeepSpeed's micro-batch),
gathering sharded weights, placing the models besides the trained one, global sums, teardown."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from posttrain.config import TrainingConfig


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




def global_sum(accelerator: Accelerator, value: float) -> float:
    t = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, "sum"))


def end_distributed() -> None:
    """Tear down the process group a multi-process run created. Left to interpreter exit, the
    gloo group's threads can abort the process (SIGABRT, "terminate called without an active
    exception") after all the work is done, failing a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
