"""Supervised fine-tuning: next-token cross-entropy on demonstrations.

Implements the standard SFT objective (Ouyang et al., 2022, "Training language models to follow
instructions with human feedback", §3.5): minimize -Σ log π(y_t | x, y_<t) over completion tokens.
Departures, each on purpose:
- The loss is normalized by the number of loss tokens of the whole accumulated batch (see
  posttrain/losses/sft.py), not averaged per micro-batch.
- With packing, examples share a row but never attend to each other (block-diagonal 4D mask and
  restarted position ids), so packing changes speed, not the objective.
- The LM head runs only on positions that carry a loss (posttrain/logprobs.py).

Run on its own (no Prefect): `python -m posttrain.recipes.sft --config conf/demo.yaml`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from posttrain.config import SFTConfig
from posttrain.data.packing import collate_packed, collate_padded, pack_bfd
from posttrain.logprobs import SelectedLogits, shift_targets
from posttrain.losses.sft import sft_loss
from posttrain.progress import TrainingProgress

MetricFn = Callable[[dict[str, float], int], None]


def micro_batches(
    examples: list[dict],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    pad_token_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, reshuffled every epoch; process `rank` takes every world_size-th.

    With packing, a micro-batch is `batch_size` packed rows of `max_length` tokens; without, it is
    `batch_size` examples padded to the longest.
    """
    if packing:
        bins = pack_bfd([len(e["input_ids"]) for e in examples], max_length)
        units = [[examples[i] for i in b] for b in bins]
    else:
        units = [[e] for e in examples]
    if len(units) < batch_size * world_size:
        raise ValueError(
            f"{len(units)} {'packed rows' if packing else 'examples'} cannot fill one batch of "
            f"{batch_size} per process x {world_size} processes"
        )
    epoch = 0
    while True:
        order = list(range(len(units)))
        random.Random(seed + epoch).shuffle(order)
        n_batches = len(order) // (batch_size * world_size)  # drop the ragged tail
        for b in range(n_batches):
            start = (b * world_size + rank) * batch_size
            chosen = [units[i] for i in order[start : start + batch_size]]
            if packing:
                yield collate_packed(chosen, pad_token_id, length=max_length)
            else:
                yield collate_padded([u[0] for u in chosen], pad_token_id)
        epoch += 1


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Token-mean cross-entropy over completion tokens of held-out batches, and perplexity."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        select, targets = shift_targets(batch["labels"])
        logits = model(batch["input_ids"], batch["attention_mask"], select, batch.get("position_ids"))
        _, m = sft_loss(logits, targets, 1)
        loss_sum += m["loss_sum"].item()
        n_tokens += int(m["num_tokens"])
        n_correct += int(m["num_correct"])
    model.train(was_training)
    mean = loss_sum / max(n_tokens, 1)
    return {
        "eval_loss": mean,
        "eval_perplexity": math.exp(min(mean, 50.0)),
        "eval_mean_token_accuracy": n_correct / max(n_tokens, 1),
    }


def train(
    model: torch.nn.Module,
    train_examples: list[dict],
    eval_examples: list[dict],
    config: SFTConfig,
    *,
    pad_token_id: int,
    log_metrics: MetricFn | None = None,
    checkpoint_dir: Path | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Train `model` in place on tokenized examples ({input_ids, labels}); return final metrics."""
    accelerator = accelerator or Accelerator()
    torch.manual_seed(config.seed)
    log_metrics = log_metrics or (lambda m, s: None)
    net = SelectedLogits(model)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
    )
    net, optimizer = accelerator.prepare(net, optimizer)
    batches = micro_batches(
        train_examples,
        batch_size=config.per_device_batch_size,
        max_length=config.max_length,
        packing=config.packing,
        pad_token_id=pad_token_id,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    eval_batches = [
        collate_padded(eval_examples[i : i + config.per_device_batch_size], pad_token_id)
        for i in range(0, len(eval_examples), config.per_device_batch_size)
    ]
    net.train()
    final: dict[str, float] = {}
    tokens_seen = 0
    progress = TrainingProgress("sft", config.max_steps, enabled=accelerator.is_main_process)
    with progress:
        for step in range(1, config.max_steps + 1):
            t0 = time.perf_counter()
            stats = _accumulated_step(
                net, optimizer, scheduler, batches, config, accelerator, params
            )
            tokens_seen += stats.pop("step_tokens")
            metrics = {
                **stats,
                "num_tokens": tokens_seen,
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": stats["real_tokens"] / max(time.perf_counter() - t0, 1e-9),
            }
            metrics.pop("real_tokens")
            if step % config.eval_every == 0 or step == config.max_steps:
                metrics.update(evaluate_loss(net, eval_batches, accelerator.device))
            if step % config.log_every == 0 or step == config.max_steps or "eval_loss" in metrics:
                if accelerator.is_main_process:
                    log_metrics(metrics, step)
            if checkpoint_dir and config.checkpoint_every and step % config.checkpoint_every == 0:
                accelerator.save_state(str(checkpoint_dir / f"step-{step:06d}"))
            progress.update(step, metrics)
            final.update(metrics)
    return final


def _accumulated_step(net, optimizer, scheduler, batches, config, accelerator, params) -> dict:
    """One optimizer step over `grad_accum` micro-batches, normalized by global loss tokens."""
    micro = [next(batches) for _ in range(config.grad_accum)]
    local_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
    # Sum over processes: every rank divides by the same global count. DDP then AVERAGES
    # gradients over ranks, so each rank's loss is scaled back up by the number of processes.
    global_items = accelerator.reduce(
        torch.tensor(local_items, device=accelerator.device), reduction="sum"
    ).item()
    loss_sum = correct = real_tokens = 0.0
    for i, mb in enumerate(micro):
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        select, targets = shift_targets(mb["labels"])
        sync = accelerator.no_sync(net) if i < len(micro) - 1 else nullcontext()
        with sync:
            logits = net(mb["input_ids"], mb["attention_mask"], select, mb.get("position_ids"))
            loss, m = sft_loss(logits, targets, max(global_items, 1))
            accelerator.backward(loss * accelerator.num_processes)
        loss_sum += m["loss_sum"].item()
        correct += m["num_correct"].item()
        real_tokens += _real_tokens(mb)
    grad_norm = None
    if config.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = accelerator.reduce(
        torch.tensor([loss_sum, correct, real_tokens], device=accelerator.device), "sum"
    )
    return {
        "loss": totals[0].item() / max(global_items, 1),
        "mean_token_accuracy": totals[1].item() / max(global_items, 1),
        "grad_norm": float(grad_norm),
        "real_tokens": totals[2].item(),
        "step_tokens": int(totals[2].item()),
    }


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "seq_ids" in batch:
        return int((batch["seq_ids"] >= 0).sum())
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask.dim() == 2 else int(mask.numel())


def main(argv: list[str] | None = None) -> None:
    """`python -m posttrain.recipes.sft --config FILE [field=value ...]`: data + SFT, no Prefect."""
    import argparse

    from posttrain.config import load_pipeline_config
    from posttrain.stages import run_data_stage, run_sft_stage

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", default=None, help="pipeline YAML (default: built-in demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.max_steps=50")
    args = parser.parse_args(argv)
    cfg = load_pipeline_config(args.config, args.overrides)
    data = run_data_stage(cfg)
    sft = run_sft_stage(cfg, data)
    print(f"SFT artifact: {sft['path']}")


if __name__ == "__main__":
    main()
