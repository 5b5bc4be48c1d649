"""PPO for RLHF with a learned reward model.

Ouyang et al. (2022), "Training language models to follow instructions with human feedback",
eq. 2, optimized with PPO (Schulman et al., 2017) as in Ziegler et al. (2019): the reward of a
completion is the reward model's score minus a per-token KL penalty against the frozen
reference; advantages by GAE (Schulman et al., 2016) over a learned value model, whitened;
clipped policy and value losses over several epochs of minibatches.

Choices and departures:
- The value model starts from the reward model (its body and scalar head), as TRL does; it reads
  a value at every position that predicts a completion token.
- The score is read on the completion truncated at its EOS; an optional penalty is subtracted
  from completions that never produced one.
- Policy and value share one AdamW; the loss is policy loss + vf_coef · value loss.
- `max_steps` counts rollout batches; the learning-rate schedule counts optimizer steps
  (max_steps · num_ppo_epochs · num_mini_batches).
- π_old and V_old are not the log-probs recorded while sampling (eval mode, outside the
  training forward's autocast): they come from a no-gradient pass of the training forward over
  the first epoch's minibatches, before any update, so the first minibatch's ratio is exactly 1
  and its values equal V_old. Dropout is off in the policy and the value model for the whole
  run ("The N implementation details of RLHF with PPO", Huang et al. 2024).
- Every model is on the accelerator's device: policy and value through `accelerator.prepare`,
  the reward model and the reference copy through `training.place`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import checkpoints
from posttrain.advantages import gae, whiten
from posttrain.best import best_state
from posttrain.config import PPOConfig
from posttrain.logprobs import SelectedLogits, position_ids_from_mask
from posttrain.losses.ppo import kl_penalized_rewards, ppo_policy_loss, ppo_value_loss
from posttrain.models import stop_token_ids
from posttrain.progress import TrainingProgress
from posttrain.recipes.online_common import (
    Checker,
    MetricFn,
    evaluate_due,
    finish,
    held_out,
    log_due,
    prompt_batches,
    prompt_rows,
    reference_logps,
    restore_position,
)
from posttrain.reward_functions import reward_model_function
from posttrain.rewards import RewardScorer
from posttrain.rollout import Rollout, completion_logps, generate, rollout_seed
from posttrain.training import (
    NonFiniteGuard,
    build_optimizer,
    disable_dropout,
    global_sum,
    make_accelerator,
    optimizer_step,
    place,
    reference_runner,
)


class PolicyAndValue(torch.nn.Module):
    """Both trained modules under one parent, so one optimizer and one DDP wrapper cover them."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy = SelectedLogits(policy)
        self.value_model = value_model

    def forward(self, rollout: Rollout, rows: slice, temperature: float):
        logps = completion_logps(
            self.policy, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
            rollout.completion_ids[rows], rollout.completion_mask[rows], temperature=temperature,
        )
        values = token_values(self.value_model, rollout, rows)
        return logps, values


def token_values(value_model, rollout: Rollout, rows: slice = slice(None)) -> torch.Tensor:
    """V at every position that predicts a completion token: (B, C), 0 on padding."""
    prompt_ids, completion_ids = rollout.prompt_ids[rows], rollout.completion_ids[rows]
    completion_mask = rollout.completion_mask[rows]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask[rows], completion_mask], dim=1)
    hidden = value_model.base_model(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).last_hidden_state  # (B, P + C, H)
    width = prompt_ids.shape[1]
    values = value_model.score(hidden[:, width - 1 : width - 1 + completion_ids.shape[1]])
    return values.squeeze(-1).float() * completion_mask  # (B, C)


@torch.no_grad()
def score_completions(reward_model, rollout: Rollout) -> torch.Tensor:
    """Reward-model score of prompt + completion (the completion ends at its EOS): (B,)."""
    input_ids, mask, _ = rollout.sequences()
    return RewardScorer(reward_model)(input_ids, mask)


@torch.no_grad()
def _experience(rollout, policy_value, reward_model, reference, config: PPOConfig,
                order: list[int], accelerator=None):
    """Old log-probs, values, rewards, advantages and returns of one rollout batch.

    π_old and V_old come from the training forward (the prepared `policy_value`) over the
    minibatches of the first epoch (`order`), so that the first update's forward repeats one
    of these exactly.
    """
    mask = rollout.completion_mask
    old_logps = torch.zeros(mask.shape, device=mask.device)
    values = torch.zeros(mask.shape, device=mask.device)
    size = mask.shape[0] // config.num_mini_batches
    for start in range(0, mask.shape[0], size):
        rows = torch.tensor(order[start : start + size])
        logps, v = policy_value(_take(rollout, rows), slice(None), config.temperature)
        old_logps[rows.to(mask.device)] = logps.float()
        values[rows.to(mask.device)] = v.float()
    ref_logps = reference_logps(reference, rollout, config.temperature)
    scores = score_completions(reward_model, rollout)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * rollout.truncated.float()
    rewards = kl_penalized_rewards(old_logps, ref_logps, scores, mask, kl_coef=config.kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    advantages = _whiten_global(accelerator, advantages, mask)
    kl = ((old_logps - ref_logps) * mask).sum(-1)  # (B,) sequence KL estimate
    stats = {
        "objective/kl": kl.mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores - config.kl_coef * kl).mean().item(),
        "completions/mean_length": mask.sum(-1).float().mean().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
    }
    return old_logps, values, advantages, returns, stats


def train(
    policy: torch.nn.Module,
    value_model: torch.nn.Module,
    reward_model: torch.nn.Module,
    tokenizer,
    prompts: list[dict],
    config: PPOConfig,
    *,
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
    eval_prompts: list[dict] = (),
    eval_reward_fns: dict[str, Callable] | None = None,
    eval_weights: dict[str, float] | None = None,
    checker: Checker | None = None,
) -> dict[str, float]:
    """Train `policy` (and `value_model`) in place against the frozen `reward_model`.

    Every `eval_every` rollout batches and at the last, greedy completions of the first
    `max_eval_rows` `eval_prompts` are scored as GRPO scores them (`online_common.evaluate_held_out`)
    with `eval_reward_fns` (default: `reward_model`, under the name 'reward_model') and
    `checker`; with `config.select_best` the policy of the best evaluated step is put back at
    the end (the value model stays the last one: it is not part of the artifact).

    With `checkpoint_dir`, resumes from the newest valid checkpoint (policy and value weights,
    the shared optimizer, scheduler, sampling RNG, prompt position, the best step so far); one
    is saved after every `checkpoint_every` rollout batches.
    """
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    rows, held = prompt_rows(prompts, eval_prompts, tokenizer,
                             config.max_length - config.max_completion_length,
                             config.max_eval_rows)
    disable_dropout(policy)
    disable_dropout(value_model)
    reference = reference_runner(config.reference, policy, accelerator)
    reward_model = place(reward_model, accelerator, frozen=True)
    policy_value, params, optimizer, scheduler = _prepare(policy, value_model, config,
                                                          accelerator)
    batches = prompt_batches(rows, config.per_device_batch_size, config.seed, accelerator)
    final: dict[str, float] = {}
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    # The reference was copied above from the starting policy, before any restore: it stays
    # the SFT model, as in the uninterrupted run.
    accelerator.register_for_checkpointing(scheduler, checkpoints.GeneratorState(generator))
    best = best_state(policy, config, accelerator)
    if eval_reward_fns is None:  # the reward model scores the held-out completions too
        eval_reward_fns, eval_weights = _reward_model_scoring(reward_model, tokenizer)
    evaluation = held_out(held, eval_reward_fns, eval_weights or {}, checker, best)
    start = restore_position(accelerator, checkpoint_dir, batches)
    with TrainingProgress("ppo", config.max_steps, enabled=accelerator.is_main_process) as bar:
        for step in range(start + 1, config.max_steps + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            generator.manual_seed(rollout_seed(config.seed, step))
            with accelerator.autocast():  # sampling and scoring in the training precision
                rollout = _sample(policy, batch, config, tokenizer, generator, accelerator)
                order = _minibatch_order(rollout, generator)  # the first epoch's
                old_logps, old_values, adv, returns, stats = _experience(
                    rollout, policy_value, reward_model, reference, config, order, accelerator)
            sums = _ppo_epochs(policy_value, optimizer, scheduler, params, rollout, old_logps,
                               old_values, adv, returns, config, accelerator, generator, guard,
                               order)
            metrics = {**stats, **sums, "learning_rate": scheduler.get_last_lr()[0],
                       "seconds_per_step": time.perf_counter() - t0}
            evaluated = evaluate_due(policy, evaluation, config, tokenizer, accelerator, step,
                                     best)
            metrics.update(evaluated)
            log_due(log_metrics, metrics, step, evaluated, log_every=config.log_every,
                    max_steps=config.max_steps, is_main_process=accelerator.is_main_process)
            bar.update(step, {"loss": metrics["loss/policy_avg"]})
            final.update(metrics)
            checkpoints.after_step(accelerator, checkpoint_dir, step,
                                   every=config.checkpoint_every, keep=config.checkpoint_keep)
    return finish(best, final)


def _prepare(policy, value_model, config: PPOConfig, accelerator) -> tuple:
    """Policy and value model under one prepared parent with their shared optimizer and
    scheduler: (policy_value, params, optimizer, scheduler)."""
    policy_value = PolicyAndValue(policy, value_model)
    params = [p for p in policy_value.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(
        params, config, updates_per_step=config.num_ppo_epochs * config.num_mini_batches)
    policy_value, optimizer = accelerator.prepare(policy_value, optimizer)
    policy_value.train()  # a loaded model comes in eval mode (dropout is off either way)
    return policy_value, params, optimizer, scheduler


def _reward_model_scoring(reward_model, tokenizer) -> tuple[dict[str, Callable], dict]:
    """The reward model as the held-out evaluation's one reward function, 'reward_model'."""
    return ({"reward_model": reward_model_function(reward_model, tokenizer,
                                                   tokenizer.pad_token_id)},
            {"reward_model": 1.0})


def _sample(policy, rows, config: PPOConfig, tokenizer, generator, accelerator) -> Rollout:
    """One completion of each of this process's prompts, shard `process_index` of the global
    batch, sampled with the global batch's noise (`generate`)."""
    return generate(
        policy, [r["prompt_ids"] for r in rows],
        max_new_tokens=config.max_completion_length, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k,
        eos_token_ids=stop_token_ids(policy, tokenizer),
        pad_token_id=tokenizer.pad_token_id, generator=generator,
        backend=config.generation_backend,
        prompt_offset=accelerator.process_index * len(rows),
        global_prompts=accelerator.num_processes * len(rows),
    )


def _minibatch_order(rollout: Rollout, generator: torch.Generator) -> list[int]:
    n = rollout.completion_ids.shape[0]
    return torch.randperm(n, generator=generator, device=generator.device).tolist()


def _ppo_epochs(policy_value, optimizer, scheduler, params, rollout, old_logps, old_values, adv,
                returns, config: PPOConfig, accelerator, generator,
                guard: NonFiniteGuard, first_order: list[int]) -> dict[str, float]:
    """num_ppo_epochs passes of num_mini_batches clipped updates; metrics averaged over them.
    The first epoch visits rows in `first_order` (the order π_old was computed in)."""
    n = rollout.completion_ids.shape[0]
    size = n // config.num_mini_batches
    mask = rollout.completion_mask
    sums: dict[str, float] = {}
    count = 0
    for epoch in range(config.num_ppo_epochs):
        order = first_order if epoch == 0 else _minibatch_order(rollout, generator)
        for start in range(0, n, size):
            rows = torch.tensor(order[start : start + size])
            logps, values = policy_value(_take(rollout, rows), slice(None), config.temperature)
            pg, m1 = ppo_policy_loss(logps, old_logps[rows], adv[rows], mask[rows],
                                     clip=config.cliprange)
            vf, m2 = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows],
                                    clip=config.cliprange_value)
            loss = pg + config.vf_coef * vf
            accelerator.backward(loss * _token_share(accelerator, mask[rows]))
            grad_norm = optimizer_step(accelerator, optimizer, scheduler, params,
                                       config.max_grad_norm, guard, float(loss.detach()))
            for k, v in {**m1, **m2, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    return {k: v / count for k, v in sums.items()}


def _whiten_global(accelerator, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`whiten` over the masked entries of every process's rollout (one process: `whiten`
    itself): the mean and unbiased variance of the global batch, from all-reduced sums, so that
    each shard's advantages are those one process whitening the whole batch computes."""
    if accelerator is None or accelerator.num_processes == 1:
        return whiten(x, mask)
    m = mask.float()
    count = global_sum(accelerator, float(m.sum()))
    if count < 2:
        raise ValueError("whitening needs at least two valid entries")
    mean = global_sum(accelerator, float((x * m).sum())) / count
    var = global_sum(accelerator, float((((x - mean) ** 2) * m).sum())) / (count - 1)
    return (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, dtype=x.dtype)) * m


def _token_share(accelerator, mask: torch.Tensor) -> float:
    """world × (this process's minibatch tokens) / (every process's): the losses are token
    means over this process's minibatch, and scaled by this the gradient averaged over the
    processes is the one of the token mean over the whole global minibatch (1 on one process)."""
    if accelerator.num_processes == 1:
        return 1.0
    local = float(mask.sum())
    total = global_sum(accelerator, local)
    return accelerator.num_processes * local / total if total > 0 else 1.0


def _take(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rows of a rollout (a minibatch), as a Rollout."""
    from dataclasses import fields, replace

    return replace(rollout, **{f.name: getattr(rollout, f.name)[rows] for f in fields(rollout)
                               if getattr(rollout, f.name) is not None})  # multi-turn's unset
