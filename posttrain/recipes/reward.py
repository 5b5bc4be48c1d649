"""Reward model training: Bradley-Terry on preference pairs.

Implements the pairwise loss of Ouyang et al. (2022), eq. 1: -log σ(r(x, y_c) - r(x, y_r)), with
two optional terms: a per-pair `margin` subtracted inside the sigmoid (Llama 2, Touvron et al.,
2023, eq. 2) and reward centering c·(r_c + r_r)² (Eisenstein et al., 2023). Chosen and rejected
go through one forward (concatenated along the batch); the score is read at the last real token.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import RewardConfig
from posttrain.data.preference import collate_pairs
from posttrain.losses.reward import reward_loss
from posttrain.rewards import RewardScorer
from posttrain.training import (
    Metrics,
    Objective,
    build_optimizer,
    endless_batches,
    fit,
    make_accelerator,
    prepare,
    sums_from_means,
)

MetricFn = Callable[[dict[str, float], int], None]


def _pair_scores(scorer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scorer(batch["input_ids"], batch["attention_mask"])  # (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def pairwise_accuracy(
    scorer: torch.nn.Module, batches: list[dict], device: torch.device
) -> dict[str, float]:
    """Share of held-out pairs whose chosen response scores above the rejected one."""
    wins = total = 0
    margin = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected = _pair_scores(scorer, batch)
        wins += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        total += chosen.shape[0]
    return {"eval_accuracy": wins / max(total, 1), "eval_margin": margin / max(total, 1)}


def train(
    model: torch.nn.Module,
    train_pairs: list[dict],
    eval_pairs: list[dict],
    config: RewardConfig,
    *,
    pad_token_id: int,
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, float]:
    """Train a one-output sequence classifier in place on tokenized pairs."""
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    scorer = RewardScorer(model)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    scorer, optimizer, params = prepare(accelerator, scorer, optimizer, config)
    batches = endless_batches(
        train_pairs, config.per_device_batch_size, partial(collate_pairs, pad_token_id=pad_token_id),
        seed=config.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        what="preference pairs",
    )
    eval_batches = [
        collate_pairs(eval_pairs[i : i + config.per_device_batch_size], pad_token_id)
        for i in range(0, len(eval_pairs), config.per_device_batch_size)
    ]

    objective = RewardObjective(scorer, eval_batches, config.center_rewards_coefficient,
                                accelerator.device)
    return fit(
        accelerator, scorer, optimizer, scheduler, params, batches, config, name="reward",
        objective=objective, log_metrics=log_metrics, checkpoint_dir=checkpoint_dir,
    )


class RewardObjective(Objective):
    """Bradley-Terry loss summed over a micro-batch's pairs; held-out pairwise accuracy."""

    evaluates = True

    def __init__(self, scorer: RewardScorer, eval_batches: list[dict],
                 center_coefficient: float | None, device: torch.device):
        self.scorer, self.eval_batches, self.device = scorer, eval_batches, device
        self.center_coefficient = center_coefficient

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        chosen, rejected = _pair_scores(self.scorer, batch)
        loss, m = reward_loss(
            chosen, rejected, margin=batch.get("margin"),
            center_coefficient=self.center_coefficient,
        )
        return sums_from_means(loss, m, chosen.shape[0])

    def evaluate(self) -> dict[str, float]:
        return pairwise_accuracy(self.scorer, self.eval_batches, self.device)
