"""Supervised fine-tuning: next-token cross-entropy on demonstrations.

Implements the standard SFT objective (Ouyang et al., 2022, "Training language models to follow
instructions with human feedback", §3.5): minimize -Σ log π(y_t | x, y_<t) over completion tokens.
Departures, each on purpose:
- The loss is normalized by the number of loss tokens of the whole accumulated batch (see
  posttrain/losses/sft.py), not averaged per micro-batch.
- With packing, examples share a row but never attend to each other (restarted position ids,
  and a FlexAttention document mask, flash-attention varlen or a block-diagonal 4D mask, chosen
  by posttrain.models.packed_attention and logged), so packing changes speed, not the objective.
- The LM head runs only on positions that carry a loss, in row chunks: no (N, V) logits
  (posttrain/logprobs.py). Held-out loss and perplexity go the same way.

Run on its own (no Prefect): `python -m posttrain.recipes.sft --config conf/demo.yaml`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import SFTConfig
from posttrain.data.packing import collate_packed, collate_padded, document_block_mask, pack_bfd
from posttrain.logprobs import SelectedLogits, shift_targets
from posttrain.losses.sft import sft_loss
from posttrain.models import packed_attention, set_attention
from posttrain.training import (
    Objective,
    build_optimizer,
    endless_batches,
    fit,
    global_sum,
    make_accelerator,
    prepare,
    to_device,
)

MetricFn = Callable[[dict[str, float], int], None]
log = logging.getLogger(__name__)


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
    attention: str = "dense_mask",
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches: `batch_size` packed rows of `max_length` tokens in the
    `attention` layout (posttrain.data.packing), or (without packing) `batch_size` examples
    padded to the longest."""
    def collate(chosen: list) -> dict[str, torch.Tensor]:
        if packing:
            return collate_packed(chosen, pad_token_id, length=max_length, attention=attention)
        return collate_padded(chosen, pad_token_id)

    units: list = examples
    if packing:
        bins = pack_bfd([len(e["input_ids"]) for e in examples], max_length)
        units = [[examples[i] for i in b] for b in bins]
    return endless_batches(units, batch_size, collate, seed=seed, rank=rank,
                           world_size=world_size, what="packed rows" if packing else "examples")


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Token-mean cross-entropy over completion tokens of held-out batches, and perplexity."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
        select, targets = shift_targets(batch["labels"])
        logps, correct = model(batch["input_ids"], attention_mask(batch), select,
                               batch.get("position_ids"), targets=targets,
                               image_inputs=batch.get("image_inputs"))
        _, m = sft_loss(logps, 1)
        loss_sum += m["loss_sum"].item()
        n_tokens += int(m["num_tokens"])
        n_correct += int(correct.sum())
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
    """Train `model` in place on tokenized examples ({input_ids, labels}); return final metrics,
    with `attention`: how packed examples were kept apart (a PACKED_LAYOUTS name, or "padded")."""
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    attention, implementation, why = packed_attention(
        model.config._attn_implementation, accelerator.device.type, config.packing)
    if config.packing:
        # Not on posttrain.progress: that logger carries the metric lines only. The stage also
        # records the path as an MLflow tag of its run (posttrain.attention).
        log.info("sft: packed rows use attention path %r (%s)", attention, why)
    restore = set_attention(model, implementation)
    try:
        final = _train(model, train_examples, eval_examples, config, attention,
                       pad_token_id=pad_token_id, log_metrics=log_metrics,
                       checkpoint_dir=checkpoint_dir, accelerator=accelerator)
    finally:
        set_attention(model, restore)
    return {**final, "attention": attention}


def attention_mask(batch: dict[str, torch.Tensor], attention: str = "dense_mask"):
    """What the decoder gets as its attention mask: a document BlockMask for the
    "flex_attention" layout (built on the batch's device), else the batch's own: the dense 4D
    block mask, a 2D padding mask (padded batches), or None ("varlen": the boundaries come from
    the position ids)."""
    if attention == "flex_attention":
        return document_block_mask(batch["seq_ids"])
    return batch.get("attention_mask")


def _train(model, train_examples, eval_examples, config: SFTConfig, attention: str, *,
           pad_token_id: int, log_metrics, checkpoint_dir, accelerator) -> dict[str, float]:
    net = SelectedLogits(model)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer, params = prepare(accelerator, net, optimizer, config)
    batches = micro_batches(
        train_examples,
        batch_size=config.per_device_batch_size,
        max_length=config.max_length,
        packing=config.packing,
        pad_token_id=pad_token_id,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        attention=attention if config.packing else "dense_mask",
    )
    eval_batches = [
        collate_padded(eval_examples[i : i + config.per_device_batch_size], pad_token_id)
        for i in range(0, len(eval_examples), config.per_device_batch_size)
    ]

    return fit(
        accelerator, net, optimizer, scheduler, params, batches, config, name="sft",
        objective=SFTObjective(net, eval_batches, attention, accelerator),
        log_metrics=log_metrics, checkpoint_dir=checkpoint_dir,
    )


class SFTObjective(Objective):
    """Cross-entropy summed over a micro-batch's completion tokens; held-out loss and
    perplexity; tokens seen and per second."""

    evaluates = True

    def __init__(self, net: SelectedLogits, eval_batches: list[dict], attention: str,
                 accelerator: Accelerator):
        self.net, self.eval_batches, self.attention = net, eval_batches, attention
        self.accelerator = accelerator
        self.tokens_seen = 0

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        select, targets = shift_targets(batch["labels"])
        logps, correct = self.net(batch["input_ids"], attention_mask(batch, self.attention),
                                  select, batch.get("position_ids"), targets=targets,
                                  image_inputs=batch.get("image_inputs"))
        loss_sum, m = sft_loss(logps, 1)
        return loss_sum, {
            "loss": m["loss_sum"].item(),
            "mean_token_accuracy": correct.sum().item(),
        }

    def evaluate(self) -> dict[str, float]:
        return evaluate_loss(self.net, self.eval_batches, self.accelerator.device)

    def step_metrics(self, micro: list[dict], metrics: dict[str, float],
                     seconds: float) -> dict[str, float]:
        real = global_sum(self.accelerator, sum(_real_tokens(mb) for mb in micro))
        self.tokens_seen += int(real)
        return {"num_tokens": self.tokens_seen, "tokens_per_second": real / max(seconds, 1e-9)}


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "seq_ids" in batch:
        return int((batch["seq_ids"] >= 0).sum())
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask.dim() == 2 else int(mask.numel())


if __name__ == "__main__":  # runs as module __main__, which nothing imports: no cycle
    from posttrain.stages.graph import command_line

    command_line("sft")
