"""Kahneman-Tversky Optimization on unpaired desirable / undesirable completions.

Ethayarajh et al. (2024), "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8:
v(x, y) = σ(β(r − z_ref)) for desirable and σ(β(z_ref − r)) for undesirable y, with
r = log π(y|x) − log π_ref(y|x), loss = weight·(1 − v), and z_ref a detached, non-negative
estimate of KL(π ‖ π_ref) from mismatched pairs (x_i, y_j), j ≠ i.

Choices:
- Each example's mismatched partner completion is fixed once, before training, by a seeded
  derangement (`kl_partners='shuffle'`, the default), or by TRL's rule ('rotate': completions
  rotated by one within consecutive per_device_batch_size chunks of the data order), instead of
  being drawn from whatever else shares its batch at training time. z_ref is still the
  batch mean over mismatched pairs, but every reference log-prob becomes precomputable, so the
  'precomputed' reference mode (default) needs no reference model during training; it covers
  only the examples the run trains on (max_steps x the global batch, in the sampler's order)
  and the held-out examples it evaluates (`max_eval_rows`).
- The policy's KL-pair log-probs are computed without gradient: z_ref is detached anyway.
- Across processes, z_ref is the mean over the whole micro-batch (every shard's mismatched pairs,
  all-reduced), so 2 processes x 2 rows train exactly as 1 process x 4 rows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import KTOConfig
from posttrain.data.preference import collate_unpaired
from posttrain.logprobs import SelectedLogits, sequence_logps
from posttrain.losses.kto import kl_estimate, kto_loss
from posttrain.training import (
    Metrics,
    Objective,
    build_optimizer,
    endless_batches,
    fit,
    make_accelerator,
    precompute_used,
    prepare,
    reference_runner,
    sums_from_means,
    to_device,
)

MetricFn = Callable[[dict[str, float], int], None]


def assign_partners(examples: list[dict], seed: int, *, mode: str = "shuffle",
                    chunk: int = 2) -> list[dict]:
    """Give every example a `kl_completion_ids` taken from another example.

    'shuffle': a seeded derangement of the whole list (never the example itself). 'rotate'
    (TRL's): within consecutive chunks of `chunk` examples, example i gets example i-1's
    completion and a chunk's first example its last one's (a chunk of one: itself).
    """
    if len(examples) < 2:
        raise ValueError("KTO needs at least two examples to form mismatched pairs")
    if mode == "rotate":
        partner = {i: i - 1 if i % chunk else min(i + chunk, len(examples)) - 1
                   for i in range(len(examples))}
        return [{**ex, "kl_completion_ids": examples[partner[i]]["completion_ids"]}
                for i, ex in enumerate(examples)]
    if mode != "shuffle":
        raise ValueError(f"unknown kl_partners {mode!r}; valid: shuffle, rotate")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return [
        {**ex, "kl_completion_ids": examples[partner[i]]["completion_ids"]}
        for i, ex in enumerate(examples)
    ]


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Main rows (prompt_i, y_i) and KL rows (prompt_i, y_partner(i)) of one KTO batch."""
    batch = collate_unpaired(
        [{k: v for k, v in ex.items() if k != "kl_completion_ids"} for ex in examples],
        pad_token_id,
    )
    kl_rows = [
        {"prompt_ids": ex["prompt_ids"], "completion_ids": ex["kl_completion_ids"],
         "label": ex["label"]}
        for ex in examples
    ]
    kl = collate_unpaired(kl_rows, pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        batch[f"kl_{key}"] = kl[key]
    return batch


def _logps(net, batch: dict, prefix: str = "") -> torch.Tensor:
    logps, _ = sequence_logps(
        net, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
        batch[f"{prefix}completion_mask"],
    )
    return logps


def _reference_logps(reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        return batch["ref_logps"], batch["kl_ref_logps"]
    return reference(lambda ref: _logps(ref, batch)), reference(lambda ref: _logps(ref, batch, "kl_"))


@torch.no_grad()
def precompute_reference(policy, examples: list[dict], *, pad_token_id: int,
                         batch_size: int, device: torch.device | None = None) -> list[dict]:
    """Copies of `examples` with `ref_logps` and `kl_ref_logps` of the policy as it is now,
    computed on `device` (default: the policy's)."""
    device = device or next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = to_device(collate(chunk, pad_token_id), device)
        main, kl = _logps(policy, batch), _logps(policy, batch, "kl_")
        for ex, a, b in zip(chunk, main.tolist(), kl.tolist()):
            out.append({**ex, "ref_logps": a, "kl_ref_logps": b})
    policy.train(was_training)
    return out


def _precompute_references(net, train_examples: list[dict], eval_examples: list[dict], *,
                           pad_token_id: int, batch_size: int, num_batches: int, seed: int,
                           accelerator: Accelerator) -> tuple[list[dict], list[dict]]:
    """Reference log-probs through the prepared net: on the device, in the training forward's
    precision; only the examples the run trains on, and every held-out one."""
    precompute = partial(precompute_reference, net, pad_token_id=pad_token_id,
                         batch_size=batch_size, device=accelerator.device)
    train_examples = precompute_used(
        train_examples, precompute, batch_size=batch_size, num_batches=num_batches, seed=seed,
        world_size=accelerator.num_processes)
    return train_examples, precompute(eval_examples)


def train(
    policy: torch.nn.Module,
    train_examples: list[dict],
    eval_examples: list[dict],
    config: KTOConfig,
    *,
    pad_token_id: int,
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, float]:
    """Train `policy` in place on tokenized unpaired examples (prompt_ids, completion_ids, label)."""
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    pairing = {"mode": config.kl_partners, "chunk": config.per_device_batch_size}
    train_examples = assign_partners(train_examples, config.seed, **pairing)
    eval_examples = assign_partners(eval_examples, config.seed + 1, **pairing)
    eval_examples = eval_examples[: config.max_eval_rows]
    reference = reference_runner(config.reference, policy, accelerator)
    net = SelectedLogits(policy)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer, params = prepare(accelerator, net, optimizer, config)
    if reference is None:
        train_examples, eval_examples = _precompute_references(
            net, train_examples, eval_examples, pad_token_id=pad_token_id,
            batch_size=config.per_device_batch_size,
            num_batches=config.max_steps * config.grad_accum, seed=config.seed,
            accelerator=accelerator)
    eval_batches = [
        collate(eval_examples[i : i + config.per_device_batch_size], pad_token_id)
        for i in range(0, len(eval_examples), config.per_device_batch_size)
    ]
    batches = endless_batches(
        train_examples, config.per_device_batch_size, partial(collate, pad_token_id=pad_token_id),
        seed=config.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        what="KTO examples",
    )
    objective = KTOObjective(net, reference, accelerator, eval_batches, beta=config.beta,
                             desirable_weight=config.desirable_weight,
                             undesirable_weight=config.undesirable_weight)
    return fit(
        accelerator, net, optimizer, scheduler, params, batches, config, name="kto",
        objective=objective, log_metrics=log_metrics, checkpoint_dir=checkpoint_dir,
    )


class KTOObjective(Objective):
    """The KTO loss summed over a micro-batch's rows (z_ref over the whole micro-batch, across
    processes); the held-out loss, a mean over rows; the reward margin of the accumulated step."""

    evaluates = True

    def __init__(self, net, reference, accelerator: Accelerator, eval_batches: list[dict], *,
                 beta: float, desirable_weight: float, undesirable_weight: float):
        self.net, self.reference, self.accelerator = net, reference, accelerator
        self.eval_batches = eval_batches
        self.beta, self.desirable_weight = beta, desirable_weight
        self.undesirable_weight = undesirable_weight

    def terms(self, batch: dict, *, global_batch: bool) -> tuple[torch.Tensor, dict]:
        """The KTO loss (a mean over the batch's rows) and metrics of one batch."""
        policy_logps = _logps(self.net, batch)
        with torch.no_grad():
            kl_policy = _logps(self.net, batch, "kl_")
        ref, kl_ref = _reference_logps(self.reference, batch)
        # Training micro-batches are sharded across processes: z_ref over all shards. Every
        # process evaluates the whole held-out set, so there the local estimate is the global one.
        spread = global_batch and self.accelerator.num_processes > 1
        z_ref = kl_estimate(kl_policy, kl_ref, partial(self.accelerator.reduce, reduction="sum")
                            if spread else None)
        return kto_loss(
            policy_logps, ref, batch["labels"], kl_policy, kl_ref, beta=self.beta,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            z_ref=z_ref,
        )

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        loss, m = self.terms(batch, global_batch=True)
        n = batch["input_ids"].shape[0]
        # Rewards of desirable / undesirable rows are means over those rows alone: (sum, count)
        # pairs, so a micro-batch or shard without one side adds nothing instead of a NaN.
        desirable = int(batch["labels"].bool().sum())
        for key, rows in (("rewards/chosen", desirable), ("rewards/rejected", n - desirable)):
            m[key] = (float(m[key]) * rows if rows else 0.0, rows)
        del m["rewards/margins"]  # derived after accumulation (step_metrics)
        return sums_from_means(loss, m, n)

    def step_metrics(self, micro: list[dict], metrics: dict[str, float],
                     seconds: float) -> dict[str, float]:
        return {"rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}

    def evaluate(self) -> dict[str, float]:
        """The held-out loss, a mean over rows."""
        total, n_total = 0.0, 0
        for batch in self.eval_batches:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            loss, _ = self.terms(batch, global_batch=False)
            n_total += batch["input_ids"].shape[0]
            total += float(loss) * batch["input_ids"].shape[0]
        return {"eval_loss": total / max(n_total, 1)}
