"""Online DPO: Guo et al. (2024), "Direct Language Model Alignment from Online AI Feedback".

Each optimizer step samples two completions of every prompt of its batch from the current
policy, scores them with the stage's reward functions (or a reward stage's model, the name
'reward_model'), takes the higher-scored one as chosen, and minimizes the DPO loss of those
fresh pairs against a frozen reference (posttrain/losses/online_dpo.py). Metrics and defaults
are TRL's OnlineDPOTrainer's (learning rate 5e-7, beta 0.1, temperature 0.9, 64 new tokens).

Choices:
- Sampling, scoring and the reference come from GRPO's machinery (posttrain/rollout.py,
  recipes/online_common.py): generation with a KV cache, reward functions called as TRL calls them.
- Batch sizes count pairs, one per prompt: a step samples per_device_batch_size x grad_accum
  prompts twice each, then trains on them in grad_accum micro-batches of per_device_batch_size
  pairs, the loss averaged over the micro-batches.
- `missing_eos_penalty` is subtracted from the reward of a completion without a stop token
  before the ranking, as TRL does.
- Dropout is off in the policy (sampling and update are one distribution), as in GRPO.
- The reference is a frozen copy of the starting policy, or the policy with its LoRA adapter
  disabled; there is nothing to precompute, the completions are new each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import checkpoints
from posttrain.best import best_state
from posttrain.config import OnlineDPOConfig
from posttrain.losses.online_dpo import online_dpo_loss
from posttrain.models import stop_token_ids
from posttrain.progress import TrainingProgress
from posttrain.recipes.online_common import (
    Checker,
    MetricFn,
    evaluate_due,
    evaluation_of,
    finish,
    log_due,
    prepare_policy,
    prompt_batches,
    prompt_rows,
    reference_logps,
    restore_position,
    rollout_metrics,
    score_rollout,
)
from posttrain.rollout import Rollout, completion_logps, generate, rollout_seed
from posttrain.training import (
    NonFiniteGuard,
    disable_dropout,
    make_accelerator,
    optimizer_step,
    reference_runner,
)


def scored_pairs(rows, rollout: Rollout, tokenizer, reward_fns, weights,
                 config: OnlineDPOConfig) -> tuple[torch.Tensor, dict, dict]:
    """Rewards (2P,) of a rollout of two completions per prompt (after the missing-EOS
    penalty), the per-function rewards and the sampling metrics."""
    total, per_fn = score_rollout(rows, rollout, tokenizer, reward_fns, weights, 2)
    if config.missing_eos_penalty is not None:
        total = total - config.missing_eos_penalty * rollout.truncated.to(total.dtype)
    sampled = rollout_metrics(total, per_fn, rollout, 2)
    sampled["val/contain_eos_token"] = (~rollout.truncated.bool()).float().mean().item()
    return total, per_fn, sampled


def _sample_pairs(policy, rows, config: OnlineDPOConfig, tokenizer, generator,
                  accelerator) -> Rollout:
    """Two completions of each of this process's prompts, shard `process_index` of the global
    batch, sampled with the global batch's noise (`generate`)."""
    return generate(
        policy, [r["prompt_ids"] for r in rows], num_samples=2,
        max_new_tokens=config.max_completion_length,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        eos_token_ids=stop_token_ids(policy, tokenizer),
        pad_token_id=tokenizer.pad_token_id, generator=generator,
        backend=config.generation_backend,
        prompt_offset=accelerator.process_index * len(rows),
        global_prompts=accelerator.num_processes * len(rows))


def _step(net, optimizer, scheduler, params, rollout: Rollout, rewards, ref_logps,
          config: OnlineDPOConfig, accelerator, guard: NonFiniteGuard) -> dict[str, float]:
    """One optimizer step over the sampled pairs, in grad_accum micro-batches of pairs."""
    rows = 2 * config.per_device_batch_size
    chunks = list(range(0, rollout.completion_ids.shape[0], rows))
    sums: dict[str, float] = {}
    for i, start in enumerate(chunks):
        sl = slice(start, start + rows)
        sync = accelerator.no_sync(net) if i < len(chunks) - 1 else nullcontext()
        with sync:
            logps = completion_logps(
                net, rollout.prompt_ids[sl], rollout.prompt_mask[sl],
                rollout.completion_ids[sl], rollout.completion_mask[sl],
                temperature=config.temperature)
            loss, m = online_dpo_loss(logps, ref_logps[sl], rollout.completion_mask[sl],
                                      rewards[sl], beta=config.beta, loss_type=config.loss_type)
            accelerator.backward(loss / len(chunks))
        for k, v in {"loss": loss.detach(), **m}.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(chunks)
    sums["grad_norm"] = optimizer_step(accelerator, optimizer, scheduler, params,
                                       config.max_grad_norm, guard, sums["loss"])
    sums["skipped_steps"] = guard.skipped
    sums["learning_rate"] = scheduler.get_last_lr()[0]
    return sums


def train(
    policy: torch.nn.Module,
    tokenizer,
    prompts: list[dict],
    eval_prompts: list[dict],
    config: OnlineDPOConfig,
    *,
    reward_fns: dict[str, Callable],
    weights: dict[str, float],
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
    eval_reward_fns: dict[str, Callable] | None = None,
    eval_weights: dict[str, float] | None = None,
    checker: Checker | None = None,
) -> dict[str, float]:
    """Train `policy` in place with online DPO on prompt rows ({prompt, ...extra columns}).

    The evaluation during training and `select_best` are GRPO's (`grpo.train`).
    With `checkpoint_dir`, resumes from the newest valid checkpoint (policy, optimizer,
    scheduler, sampling RNG, prompt position, the best step so far).
    """
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    rows, held = prompt_rows(prompts, eval_prompts, tokenizer,
                             config.max_length - config.max_completion_length,
                             config.max_eval_rows)
    disable_dropout(policy)
    reference = reference_runner(config.reference, policy, accelerator)
    net, params, optimizer, scheduler = prepare_policy(policy, config, accelerator)
    batches = prompt_batches(rows, config.per_device_batch_size * config.grad_accum,
                             config.seed, accelerator)
    final: dict[str, float] = {}
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    accelerator.register_for_checkpointing(scheduler, checkpoints.GeneratorState(generator))
    best = best_state(policy, config, accelerator)
    evaluation = evaluation_of(held, reward_fns, weights, eval_reward_fns, eval_weights,
                               checker, best)
    step = restore_position(accelerator, checkpoint_dir, batches)
    with TrainingProgress("online_dpo", config.max_steps,
                          enabled=accelerator.is_main_process) as bar:
        while step < config.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            generator.manual_seed(rollout_seed(config.seed, step + 1))
            with accelerator.autocast():
                rollout = _sample_pairs(policy, batch, config, tokenizer, generator,
                                        accelerator)
                rewards, _, sampled = scored_pairs(batch, rollout, tokenizer, reward_fns,
                                                   weights, config)
            ref_logps = reference_logps(reference, rollout, config.temperature)
            step += 1
            metrics = {**sampled, **_step(net, optimizer, scheduler, params, rollout, rewards,
                                          ref_logps, config, accelerator, guard),
                       "seconds_per_step": time.perf_counter() - t0}
            evaluated = evaluate_due(policy, evaluation, config, tokenizer, accelerator, step,
                                     best)
            metrics.update(evaluated)
            log_due(log_metrics, metrics, step, evaluated, log_every=config.log_every,
                    max_steps=config.max_steps, is_main_process=accelerator.is_main_process)
            bar.update(step, {"loss": metrics["loss"]})
            final.update(metrics)
            checkpoints.after_step(accelerator, checkpoint_dir, step,
                                   every=config.checkpoint_every, keep=config.checkpoint_keep)
    return finish(best, final)
