"""Offline preference optimization on pairs: DPO (and its loss variants), ORPO, SimPO and CPO.

DPO: Rafailov et al. (2023), "Direct Preference Optimization", eq. 7, with the hinge (SLiC), IPO
and robust (rDPO) variants and SimPO-style length normalization as options (posttrain/losses/dpo.py).
ORPO: Hong et al. (2024), "ORPO: Monolithic Preference Optimization without Reference Model",
eq. 6: NLL on the chosen response plus λ times the odds-ratio term; no reference forward at all.
SimPO: Meng et al. (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward",
eq. 6: −log σ(β·(lp_c − lp_r) − γ) on per-token averaged log-probs, no reference; optionally
plus α·NLL (CPO-SimPO).
CPO: Xu et al. (2024), "Contrastive Preference Optimization": −log σ(β·(log π(y_c) −
log π(y_r))) on summed log-probs, no reference, plus α·NLL on the chosen response.

Departures and choices:
- Chosen and rejected go through one forward (concatenated along the batch).
- The reference log-probs come from one of three places (`reference`): precomputed once before
  training with the starting policy (the default: no reference model during training), a frozen
  copy, or the policy itself with its LoRA adapter disabled. All three give the same loss.
  Precomputing covers only the pairs the run will train on (max_steps x the global batch, drawn
  in the sampler's seeded order, across epochs) and the held-out pairs it evaluates
  (`max_eval_rows`), on the accelerator's device.
- IPO uses per-token averaged log-probs, as the IPO paper's definition of the policy's
  log-likelihood does; its metrics use them too unless `ipo_metrics='summed'` (TRL's logging:
  summed log-probs, then divided by the lengths for the loss alone).
- ORPO's, SimPO's and CPO's NLL is normalized by the chosen completion tokens of the micro-batch
  (a mean over tokens, as in the papers; ORPO with `nll_tokens='prompt_and_completion'`: over
  every non-pad token of the chosen sequences, TRL's rule), and the preference term by pairs; the accumulated step
  weighs micro-batches by pairs. The NLL comes from the same summed log-probs as the preference
  term: one policy forward per micro-batch, none of a reference.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import CPOConfig, DPOConfig, ORPOConfig, SimPOConfig
from posttrain.data.preference import collate_pairs
from posttrain.logprobs import (
    SelectedLogits,
    position_ids_from_mask,
    sequence_logps,
    token_logps,
)
from posttrain.losses.cpo import cpo_loss
from posttrain.losses.dpo import dpo_loss
from posttrain.losses.orpo import orpo_loss
from posttrain.losses.simpo import simpo_loss
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


def _pair_logps(net, batch: dict, average: bool):
    """Policy log-probs of chosen and rejected halves: ((B,), (B,), (B,), (B,)) incl. counts."""
    logps, counts = sequence_logps(
        net, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
        average=average, image_inputs=batch.get("image_inputs"),
    )
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], counts[:half], counts[half:]


@torch.no_grad()
def precompute_reference(
    policy: torch.nn.Module, pairs: list[dict], *, pad_token_id: int, batch_size: int,
    average: bool, device: torch.device | None = None,
) -> list[dict]:
    """Copies of `pairs` carrying `ref_chosen_logps` / `ref_rejected_logps` of the policy as it is
    now (call before any training step), computed on `device` (default: the policy's)."""
    device = device or next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = to_device(collate_pairs(chunk, pad_token_id), device)
        chosen, rejected, _, _ = _pair_logps(policy, batch, average)
        for ex, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            out.append({**ex, "ref_chosen_logps": c, "ref_rejected_logps": r})
    policy.train(was_training)
    return out


def _averaged(config: DPOConfig) -> bool:
    """Whether DPO's log-probs are per-token averages from the start (IPO with its own metrics);
    otherwise summed, and divided by the lengths where the loss wants averages."""
    return config.loss_type == "ipo" and config.ipo_metrics == "averaged"


def _dpo_terms(net, batch: dict, config: DPOConfig, reference) -> tuple[torch.Tensor, dict]:
    average = _averaged(config)
    chosen, rejected, n_c, n_r = _pair_logps(net, batch, average)
    if reference is None:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_c, ref_r, _, _ = reference(lambda ref: _pair_logps(ref, batch, average))
    lengths = {}
    ipo_summed = config.loss_type == "ipo" and not average
    if (config.length_normalize or ipo_summed) and not average:
        lengths = {"chosen_lengths": n_c, "rejected_lengths": n_r, "summed_rewards": ipo_summed}
    return dpo_loss(
        chosen, rejected, ref_c, ref_r, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing, **lengths,
    )


def _reference_free_logps(net, batch: dict):
    """Summed and averaged policy log-probs of both halves and the chosen responses' token-mean
    NLL, from one forward: (sum_c, sum_r, avg_c, avg_r, nll)."""
    chosen, rejected, n_c, n_r = _pair_logps(net, batch, average=False)
    nll = -chosen.sum() / n_c.sum().clamp(min=1)  # token-mean NLL of the chosen responses
    return chosen, rejected, chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1), nll


def _orpo_terms(net, batch: dict, config: ORPOConfig) -> tuple[torch.Tensor, dict]:
    if config.nll_tokens == "completion":
        _, _, avg_c, avg_r, nll = _reference_free_logps(net, batch)
    else:
        avg_c, avg_r, nll = _sequence_nll_logps(net, batch)
    return orpo_loss(avg_c, avg_r, nll, beta=config.beta)


def _sequence_nll_logps(net, batch: dict):
    """ORPO's terms with the NLL over every non-pad token of the chosen sequences (prompt and
    response, TRL's ORPOTrainer), from one forward that scores every real token:
    (avg_c, avg_r, nll), the averages over completion tokens only."""
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    select = torch.zeros_like(attn, dtype=torch.bool)  # position t predicts token t+1
    select[:, :-1] = attn[:, 1:].bool() & attn[:, :-1].bool()  # the first real token: none
    logits = net(ids, attn, select, position_ids_from_mask(attn))
    per_token = token_logps(logits, ids[:, 1:][select[:, :-1]])  # (N,)
    rows = select.nonzero()[:, 0]
    in_completion = comp[:, 1:][select[:, :-1]].float()  # (N,)
    zeros = per_token.new_zeros(ids.shape[0])
    sums = zeros.index_add(0, rows, per_token * in_completion)  # (2B,) completion only
    counts = zeros.index_add(0, rows, in_completion)
    half = ids.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    chosen_rows = rows < half
    nll = -per_token[chosen_rows].sum() / chosen_rows.sum().clamp(min=1)
    return avg[:half], avg[half:], nll


def _simpo_terms(net, batch: dict, config: SimPOConfig) -> tuple[torch.Tensor, dict]:
    _, _, avg_c, avg_r, nll = _reference_free_logps(net, batch)
    return simpo_loss(avg_c, avg_r, nll, beta=config.beta, gamma=config.gamma,
                      alpha=config.cpo_alpha)


def _cpo_terms(net, batch: dict, config: CPOConfig) -> tuple[torch.Tensor, dict]:
    sum_c, sum_r, _, _, nll = _reference_free_logps(net, batch)
    return cpo_loss(sum_c, sum_r, nll, beta=config.beta, alpha=config.cpo_alpha)


REFERENCE_FREE = {"orpo": _orpo_terms, "simpo": _simpo_terms, "cpo": _cpo_terms}


def train(
    method: str,
    policy: torch.nn.Module,
    train_pairs: list[dict],
    eval_pairs: list[dict],
    config: DPOConfig | ORPOConfig | SimPOConfig | CPOConfig,
    *,
    pad_token_id: int,
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, float]:
    """Train `policy` in place with `method` ('dpo', 'orpo', 'simpo' or 'cpo') on tokenized
    pairs."""
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    if method != "dpo" and method not in REFERENCE_FREE:
        raise ValueError(f"unknown preference method {method!r}")
    eval_pairs = eval_pairs[: config.max_eval_rows]
    reference = reference_runner(config.reference, policy, accelerator) if method == "dpo" \
        else None
    net = SelectedLogits(policy)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer, params = prepare(accelerator, net, optimizer, config)
    if method == "dpo" and reference is None:
        # Through the prepared net: on the device, in the training forward's precision.
        precompute = partial(
            precompute_reference, net, pad_token_id=pad_token_id,
            batch_size=config.per_device_batch_size, average=_averaged(config),
            device=accelerator.device)
        train_pairs = precompute_used(
            train_pairs, precompute, batch_size=config.per_device_batch_size,
            num_batches=config.max_steps * config.grad_accum, seed=config.seed,
            world_size=accelerator.num_processes)
        eval_pairs = precompute(eval_pairs)
    eval_batches = [
        collate_pairs(eval_pairs[i : i + config.per_device_batch_size], pad_token_id)
        for i in range(0, len(eval_pairs), config.per_device_batch_size)
    ]
    batches = endless_batches(
        train_pairs, config.per_device_batch_size, partial(collate_pairs, pad_token_id=pad_token_id),
        seed=config.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        what="preference pairs",
    )
    return fit(
        accelerator, net, optimizer, scheduler, params, batches, config, name=method,
        objective=PairObjective(method, net, config, reference, eval_batches, accelerator.device),
        log_metrics=log_metrics, checkpoint_dir=checkpoint_dir,
    )


class PairObjective(Objective):
    """`method`'s loss (its batch mean, from posttrain/losses/) summed over a micro-batch's
    pairs; the held-out loss and metrics, means over pairs."""

    evaluates = True

    def __init__(self, method: str, net, config: DPOConfig | ORPOConfig | SimPOConfig | CPOConfig,
                 reference, eval_batches: list[dict], device: torch.device):
        self.method, self.net, self.config, self.reference = method, net, config, reference
        self.eval_batches, self.device = eval_batches, device

    def terms(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The batch-mean loss and metrics."""
        if self.method == "dpo":
            return _dpo_terms(self.net, batch, self.config, self.reference)
        return REFERENCE_FREE[self.method](self.net, batch, self.config)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        loss, m = self.terms(batch)
        return sums_from_means(loss, m, self.count(batch))

    def evaluate(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        n_total = 0
        for batch in self.eval_batches:
            batch = to_device(batch, self.device)
            loss, m = self.terms(batch)
            n = self.count(batch)
            n_total += n
            for k, v in {"loss": loss, **m}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
        return {f"eval_{k}": v / max(n_total, 1) for k, v in totals.items()}
