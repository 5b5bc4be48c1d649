"""Group Relative Policy Optimization, and REINFORCE Leave-One-Out on the same machinery.

GRPO: Shao et al. (2024), "DeepSeekMath", §4.1, eq. 3: for each prompt sample G completions,
score them, use the group-normalized reward as every token's advantage, and maximize the clipped
importance-weighted objective, minus β·KL to a reference (k3 estimator, eq. 4).
RLOO: Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs": the same sampling and scoring, but each completion's
advantage is its reward minus the mean reward of the other k − 1 completions of its prompt, the
KL to the reference is subtracted from the reward (β·Σ_t (log π_old − log π_ref), before the
baseline) unless `kl_placement='loss'`, and the objective is per completion: a clipped
sequence-level ratio, averaged over completions (posttrain/losses/rloo.py), as TRL's
RLOOTrainer. The KL in the reward needs log π_old before the first optimizer pass: one extra
no-grad forward of the policy over the generation batch (TRL runs the same forward).

Choices and departures:
- Batch sizes count completions: a micro-batch of `per_device_batch_size` holds
  per_device_batch_size / G whole groups, and one generation batch feeds `grad_accum`
  micro-batches and `num_iterations` optimizer steps (μ of the paper).
- π_old is the policy that sampled, but its log-probs are not the ones recorded while sampling
  (eval mode, outside the training forward's autocast: in bf16 they differ from the training
  forward by ~1e-2): on the first pass over a generation batch π_old is the detached log-prob of
  the training forward itself, so the ratio is exactly 1 on-policy (as in TRL), and those
  detached values are π_old of the later passes (μ > 1), with no extra forward. Dropout is off
  in the policy during the whole run (policy, π_old and sampling are one distribution).
- Loss normalizations `grpo` (the paper), `bnpo`, `dr_grpo` (Liu et al., 2025) and `dapo` (Yu et
  al., 2025) per ALGORITHMS.md; the clip can be asymmetric (ε_high, DAPO's clip-higher).
- With β = 0 (default) no reference model is loaded at all.
- `mask_truncated_completions` (TRL's, off by default) leaves completions that ran out of
  tokens without a stop token out of the loss and of dapo's token count, but not out of the
  rewards, the baselines or the metrics; `use_bias_correction_kl` (GRPO) weights the KL term by
  the importance ratio (posttrain/losses/grpo.py).
- `entropy` is logged as the mean negative log-prob of the sampled tokens, a Monte-Carlo estimate
  of the policy's entropy that needs no full-vocabulary pass.
- With an `environment` (posttrain/multiturn.py) a "completion" is a whole episode: the model's
  turns with the tool results and environment messages between them. Advantages stay one per
  episode; the loss, the KL and every token count (dapo's included) cover only the tokens the
  model wrote (completion_mask · tool_mask), dr_grpo divides by environment.max_episode_tokens,
  and the reward is the environment's episode reward (times environment.reward_weight) plus the
  reward functions', which get the episode's messages after the first ones as `completions`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import checkpoints
from posttrain.advantages import group_advantages, leave_one_out_advantages
from posttrain.best import best_state
from posttrain.config import GRPOConfig, RLOOConfig
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.rloo import rloo_loss, sequence_kl
from posttrain.models import stop_token_ids
from posttrain.multiturn import Agent, episode_table, generate_episodes
from posttrain.progress import TrainingProgress
from posttrain.recipes.online_common import (
    Checker,
    MetricFn,
    RewardFns,
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
    global_sum,
    make_accelerator,
    optimizer_step,
    reference_runner,
)

TableFn = Callable[[list[dict], str], None]  # (rows, artifact file) -> logged as an MLflow table


def _sample_episodes(policy, rows, config: GRPOConfig | RLOOConfig, tokenizer, generator,
                     shard: tuple[int, int], agent: Agent) -> Rollout:
    """`_sample` for multi-turn episodes (`generate_episodes`), sharded the same way."""
    rank, world = shard
    return generate_episodes(
        policy, tokenizer, rows, agent.make_env, tools=agent.tools,
        num_samples=config.num_generations, limits=agent.limits,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        eos_token_ids=stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id,
        generator=generator, prompt_offset=rank * len(rows), global_prompts=world * len(rows))


def _sample(policy, rows, config: GRPOConfig | RLOOConfig, tokenizer, generator,
            shard: tuple[int, int] = (0, 1)) -> Rollout:
    """`shard` (rank, world size): this process's prompts are shard `rank` of a global batch of
    world × len(rows) prompts, sampled with the global batch's noise (`generate`)."""
    rank, world = shard
    return generate(
        policy, [r["prompt_ids"] for r in rows], num_samples=config.num_generations,
        max_new_tokens=config.max_completion_length, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, eos_token_ids=stop_token_ids(policy, tokenizer),
        pad_token_id=tokenizer.pad_token_id, generator=generator,
        backend=config.generation_backend, prompt_offset=rank * len(rows),
        global_prompts=world * len(rows),
    )


@torch.no_grad()
def _policy_logps(net, rollout: Rollout, config: RLOOConfig) -> torch.Tensor:
    """Per-token log π_old (N, C) of a rollout through the training forward, micro-batched."""
    size = config.per_device_batch_size
    return torch.cat([
        completion_logps(net, rollout.prompt_ids[i:i + size], rollout.prompt_mask[i:i + size],
                         rollout.completion_ids[i:i + size], rollout.completion_mask[i:i + size],
                         temperature=config.temperature)
        for i in range(0, rollout.completion_ids.shape[0], size)])


def _advantages(net, rollout: Rollout, total, ref_logps, config) -> tuple[torch.Tensor, dict]:
    """Advantages (N,) and their metrics. GRPO: group-normalized rewards. RLOO: leave-one-out
    baselines of the rewards, with β·(sequence KL of π_old to π_ref) subtracted first when the
    KL is in the reward (`kl` logged: its per-token mean, as TRL logs it)."""
    if config.method == "grpo":
        return group_advantages(total, config.num_generations, scale=config.scale_rewards), {}
    metrics = {}
    if ref_logps is not None and config.kl_placement == "reward":
        old = _policy_logps(net, rollout, config)
        mask = loss_mask(rollout, config)  # as TRL: a masked truncated completion has no KL
        total = total - config.beta * sequence_kl(old, ref_logps, mask)
        metrics["kl"] = float(((old - ref_logps) * mask).sum() / mask.sum().clamp(min=1))
    advantages = leave_one_out_advantages(total, config.num_generations,
                                          normalize=config.normalize_advantages)
    return advantages, metrics


def _loss(logps, old_logps, advantages, mask, ref_logps, config, num_items):
    """The method's loss of one micro-batch: GRPO's per-token loss, or RLOO's per-completion
    one (with the KL term only when it is in the loss)."""
    if config.method == "rloo":
        in_loss = config.kl_placement == "loss"
        return rloo_loss(logps, old_logps, advantages, mask, epsilon=config.epsilon,
                         epsilon_high=config.epsilon_high, beta=config.beta if in_loss else 0.0,
                         ref_logps=ref_logps if in_loss else None)
    return grpo_loss(
        logps, old_logps, advantages, mask, epsilon=config.epsilon,
        epsilon_high=config.epsilon_high, beta=config.beta, ref_logps=ref_logps,
        loss_type=config.loss_type, max_completion_length=completion_budget(config),
        num_items_in_batch=num_items, use_bias_correction_kl=config.use_bias_correction_kl,
    )


def completion_budget(config) -> int:
    """The most completion tokens a row can have: max_completion_length, or with an
    environment its max_episode_tokens (dr_grpo's denominator)."""
    env = getattr(config, "environment", None)
    return config.max_completion_length if env is None else env.max_episode_tokens


def loss_mask(rollout: Rollout, config: GRPOConfig | RLOOConfig) -> torch.Tensor:
    """The tokens that carry a loss (N, C): the completion tokens the model wrote (not tool
    results or environment messages), minus every token of a truncated completion with
    `mask_truncated_completions`."""
    mask = rollout.model_mask
    if config.mask_truncated_completions:
        mask = mask * (~rollout.truncated.bool()).to(mask.dtype)[:, None]
    return mask


def _optimize(net, optimizer, scheduler, params, rollout, advantages, ref_logps, old_logps,
              config, accelerator, guard: NonFiniteGuard) -> tuple[dict[str, float], torch.Tensor]:
    """One optimizer step over the generation batch split into `grad_accum` micro-batches.

    `old_logps` (N, C): π_old, or None on the first pass over the batch, where π_old is the
    detached log-prob of this very forward (ratio exactly 1). Returns the metrics and π_old.
    """
    n = rollout.completion_ids.shape[0]
    size = config.per_device_batch_size
    mask = loss_mask(rollout, config)
    num_items = max(global_sum(accelerator, float(mask.sum())), 1.0)  # every one masked: 0 loss
    sums: dict[str, float] = {}
    chunks = list(range(0, n, size))
    olds = []
    for i, start in enumerate(chunks):
        sl = slice(start, start + size)
        sync = accelerator.no_sync(net) if i < len(chunks) - 1 else nullcontext()
        with sync:
            logps = completion_logps(
                net, rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.completion_ids[sl],
                rollout.completion_mask[sl], temperature=config.temperature,
            )
            olds.append(logps.detach() if old_logps is None else old_logps[sl])
            loss, m = _loss(logps, olds[-1], advantages[sl], mask[sl],
                            None if ref_logps is None else ref_logps[sl], config,
                            num_items / accelerator.num_processes)
            # dapo already divides by the global token count; the others (RLOO's included) are
            # per-micro-batch means, averaged over the accumulated micro-batches.
            dapo = getattr(config, "loss_type", None) == "dapo"
            scale = 1.0 if dapo else 1.0 / len(chunks)
            accelerator.backward(loss * scale)
        for k, v in {"loss": loss.detach(), **m}.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(chunks)
    sums["grad_norm"] = optimizer_step(accelerator, optimizer, scheduler, params,
                                       config.max_grad_norm, guard, sums["loss"])
    sums["skipped_steps"] = guard.skipped
    sums["learning_rate"] = scheduler.get_last_lr()[0]
    return sums, torch.cat(olds)


def train(
    policy: torch.nn.Module,
    tokenizer,
    prompts: list[dict],
    eval_prompts: list[dict],
    config: GRPOConfig | RLOOConfig,
    *,
    reward_fns: RewardFns,
    weights: dict[str, float],
    log_metrics: MetricFn | None = None,
    accelerator: Accelerator | None = None,
    checkpoint_dir: Path | None = None,
    eval_reward_fns: RewardFns | None = None,
    eval_weights: dict[str, float] | None = None,
    checker: Checker | None = None,
    log_table: TableFn | None = None,
) -> dict[str, float]:
    """Train `policy` in place on prompt rows ({prompt, ...extra columns}) with GRPO or RLOO
    (`config.method`); with `config.environment`, on multi-turn episodes (module docstring),
    a few of which go to `log_table` at the first step and every `eval_every` steps.

    Every `eval_every` steps and at the last, `evaluate_held_out` scores greedy completions of
    the first `max_eval_rows` `eval_prompts` with `eval_reward_fns` (default: the training
    ones) and `checker`; with `config.select_best` the policy of the best evaluated step is
    put back at the end (posttrain/best.py) and `best_step` is in the returned metrics.

    With `checkpoint_dir`, resumes from the newest valid checkpoint (policy, optimizer,
    scheduler, sampling RNG, prompt position, the best step so far); checkpoints fall on
    generation-batch boundaries.
    """
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    agent = Agent.from_config(getattr(config, "environment", None),
                              config.max_completion_length, config.max_length)
    rows, held = prompt_rows(prompts, eval_prompts, tokenizer,
                             config.max_length - config.max_completion_length,
                             config.max_eval_rows)
    disable_dropout(policy)  # before the reference copy: the reference runs in eval mode anyway
    reference = _reference(policy, config, accelerator)
    net, params, optimizer, scheduler = prepare_policy(policy, config, accelerator)
    per_generation = config.per_device_batch_size * config.grad_accum // config.num_generations
    batches = prompt_batches(rows, per_generation, config.seed, accelerator)  # of prompts
    final: dict[str, float] = {}
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    accelerator.register_for_checkpointing(scheduler, checkpoints.GeneratorState(generator))
    best = best_state(policy, config, accelerator)
    evaluation = evaluation_of(held, reward_fns, weights, eval_reward_fns, eval_weights,
                               checker, best, agent)
    step = restore_position(accelerator, checkpoint_dir, batches, config.num_iterations)
    with TrainingProgress(config.method, config.max_steps,
                          enabled=accelerator.is_main_process) as bar:
        while step < config.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            rollout, total, advantages, ref_logps, sampled = _experience(
                policy, net, batch, config, tokenizer, generator, accelerator, agent,
                reward_fns, weights, reference, step + 1)
            if accelerator.is_main_process:
                _log_episodes(log_table, agent, rollout, total, step + 1, config)
            old_logps = None  # the first pass sets π_old
            for _ in range(config.num_iterations):
                if step >= config.max_steps:
                    break
                step += 1
                optimized, old_logps = _optimize(net, optimizer, scheduler, params, rollout,
                                                 advantages, ref_logps, old_logps, config,
                                                 accelerator, guard)
                metrics = {**sampled, **optimized, "seconds_per_step": time.perf_counter() - t0}
                evaluated = evaluate_due(policy, evaluation, config, tokenizer, accelerator,
                                         step, best)
                metrics.update(evaluated)
                log_due(log_metrics, metrics, step, evaluated, log_every=config.log_every,
                        max_steps=config.max_steps, is_main_process=accelerator.is_main_process)
                bar.update(step, {"loss": metrics["loss"]})
                final.update(metrics)
            checkpoints.after_step(accelerator, checkpoint_dir, step,
                                   every=config.checkpoint_every, keep=config.checkpoint_keep,
                                   can_save=step % config.num_iterations == 0)
    return finish(best, final)


def _reference(policy, config: GRPOConfig | RLOOConfig, accelerator):
    """The reference runner; with β = 0 none (no reference model is loaded at all)."""
    return reference_runner(config.reference, policy, accelerator) if config.beta > 0 else None


def _experience(policy, net, batch, config: GRPOConfig | RLOOConfig, tokenizer, generator,
                accelerator, agent: Agent | None, reward_fns: RewardFns, weights, reference,
                step: int):
    """The generation batch of step `step` (the sampling noise's seed): its rollout, rewards
    (N,), advantages (N,), reference log-probs (N, C; None without a reference) and sampling
    metrics."""
    G = config.num_generations
    generator.manual_seed(rollout_seed(config.seed, step))
    with accelerator.autocast():  # sampling and reward models in training's precision
        rollout = _sample_batch(policy, batch, config, tokenizer, generator, accelerator, agent)
        total, per_fn = score_rollout(batch, rollout, tokenizer, reward_fns, weights, G,
                                      agent.reward_weight if agent else 1.0)
    ref_logps = reference_logps(reference, rollout, config.temperature)
    advantages, kl = _advantages(net, rollout, total, ref_logps, config)  # (N,)
    sampled = {**rollout_metrics(total, per_fn, rollout, G), **kl}
    return rollout, total, advantages, ref_logps, sampled


def _sample_batch(policy, rows, config: GRPOConfig | RLOOConfig, tokenizer, generator,
                  accelerator, agent: Agent | None) -> Rollout:
    """This process's rollout of a prompt batch: episodes with an environment, else
    completions (`_sample`)."""
    shard = (accelerator.process_index, accelerator.num_processes)
    if agent is not None:
        return _sample_episodes(policy, rows, config, tokenizer, generator, shard, agent)
    return _sample(policy, rows, config, tokenizer, generator, shard)


def _log_episodes(log_table: TableFn | None, agent: Agent | None, rollout: Rollout, total,
                  step: int, config) -> None:
    """A few episodes of step `step` as an MLflow table, at the first step, every eval_every
    steps and the last."""
    if log_table is None or agent is None or not agent.sample_episodes:
        return
    if step == 1 or step % config.eval_every == 0 or step == config.max_steps:
        rows = episode_table(rollout.episodes, total.tolist(), step, agent.sample_episodes,
                             config.num_generations)
        log_table(rows, f"episodes/step_{step:06d}.json")

