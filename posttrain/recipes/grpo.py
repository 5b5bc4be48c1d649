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

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import checkpoints
from posttrain.advantages import group_advantages, leave_one_out_advantages
from posttrain.best import best_state
from posttrain.config import GRPOConfig, RLOOConfig
from posttrain.data.tokenize import tokenize_prompt
from posttrain.logprobs import SelectedLogits
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.rloo import rloo_loss, sequence_kl
from posttrain.models import stop_token_ids
from posttrain.multiturn import Agent, episode_metrics, episode_table, generate_episodes
from posttrain.progress import TrainingProgress
from posttrain.reward_functions import as_completions, combine_rewards
from posttrain.rollout import Rollout, completion_logps, generate, rollout_seed
from posttrain.training import (
    NonFiniteGuard,
    build_optimizer,
    disable_dropout,
    endless_batches,
    global_sum,
    make_accelerator,
    optimizer_step,
    reference_runner,
)

MetricFn = Callable[[dict[str, float], int], None]
TableFn = Callable[[list[dict], str], None]  # (rows, artifact file) -> logged as an MLflow table
RewardFns = dict[str, Callable]
Checker = Callable[[object, str], bool]
# Row keys that are not dataset columns for reward functions: the prompt (passed as `prompts`)
# and what prepare_prompts adds.
INTERNAL_COLUMNS = ("prompt", "prompt_ids")


def prepare_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """Rows with `prompt_ids` (cut from the left to fit) next to their original columns."""
    out = []
    for row in rows:
        ids = tokenize_prompt(row["prompt"], tokenizer)
        out.append({**row, "prompt_ids": ids[-max_prompt_length:]})
    return out


def decode_completions(rollout: Rollout, tokenizer) -> list[str]:
    texts = []
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def score_rollout(rows, rollout, tokenizer, reward_fns: RewardFns, weights, group: int,
                  env_weight: float = 1.0):
    """Total reward per completion (N,) and the per-function rewards, for rows repeated G times.

    Reward functions are called as TRL calls them (posttrain/reward_functions.py): keyword
    arguments `prompts`, `completions` (assistant message lists for conversational prompts) and
    every dataset column but `prompt` and the internal `prompt_ids`, by its name. A multi-turn
    rollout is scored per episode (`_score_episodes`).
    """
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in INTERNAL_COLUMNS]
    columns = {k: [r.get(k) for r in rows for _ in range(group)] for k in extra}
    if rollout.episodes is not None:
        return _score_episodes(rollout.episodes, reward_fns, weights, columns, env_weight)
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    completions = as_completions(prompts, decode_completions(rollout, tokenizer))
    return combine_rewards(reward_fns, weights, prompts, completions, columns)


def _score_episodes(episodes, reward_fns, weights, columns, env_weight: float):
    """Episode rewards: reward functions on (first messages, later messages), plus the
    environment's reward (`rewards/environment/mean`; None, i.e. NaN, adds 0)."""
    prompts = [e.prompt for e in episodes]
    completions = [e.completion for e in episodes]
    total, per_fn = combine_rewards(reward_fns, weights, prompts, completions, columns)
    env = torch.tensor([math.nan if e.reward is None else e.reward for e in episodes])
    if not bool(env.isnan().all()):
        per_fn["environment"] = env
        total = total + env_weight * torch.nan_to_num(env, nan=0.0)
    return total, per_fn


def rollout_metrics(total: torch.Tensor, per_fn: dict, rollout: Rollout, group: int) -> dict:
    grouped = total.view(-1, group)  # (P, G)
    lengths = rollout.model_mask.sum(-1).float()  # the model's tokens (multi-turn: all turns)
    mask = rollout.model_mask.bool()
    metrics = {
        "reward": total.mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
        "entropy": (-rollout.logps[mask]).mean().item() if mask.any() else 0.0,
    }
    for name, values in per_fn.items():
        metrics[f"rewards/{name}/mean"] = torch.nanmean(values).item()
    if rollout.episodes is not None:
        metrics.update(episode_metrics(rollout.episodes))
    return metrics


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


def reference_logps(reference, rollout: Rollout, temperature: float) -> torch.Tensor | None:
    """Per-token reference log-probs of a rollout (B, C), or None without a reference."""
    if reference is None:
        return None
    return reference(lambda ref: completion_logps(
        ref, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
        rollout.completion_mask, temperature=temperature))


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
    G = config.num_generations
    max_prompt = config.max_length - config.max_completion_length
    agent = Agent.from_config(getattr(config, "environment", None),
                              config.max_completion_length, config.max_length)
    rows = prepare_prompts(prompts, tokenizer, max_prompt)
    held = prepare_prompts(eval_prompts, tokenizer, max_prompt)[: config.max_eval_rows]
    disable_dropout(policy)  # before the reference copy: the reference runs in eval mode anyway
    reference = reference_runner(config.reference, policy, accelerator) if config.beta > 0 \
        else None
    net = SelectedLogits(policy)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer = accelerator.prepare(net, optimizer)
    net.train()  # a loaded model comes in eval mode (dropout is off either way)
    per_generation = config.per_device_batch_size * config.grad_accum // G  # prompts
    batches = endless_batches(rows, per_generation, list, seed=config.seed,
                              rank=accelerator.process_index,
                              world_size=accelerator.num_processes, what="prompts")
    final: dict[str, float] = {}
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    accelerator.register_for_checkpointing(scheduler, checkpoints.GeneratorState(generator))
    best = best_state(policy, config, accelerator)
    evaluation = held_out(held, eval_reward_fns if eval_reward_fns is not None else reward_fns,
                          eval_weights if eval_weights is not None else weights, checker, best,
                          agent=agent)
    step = checkpoints.restore(accelerator, checkpoint_dir) if checkpoint_dir else 0
    for _ in range(step // config.num_iterations):  # prompt batches already trained on
        next(batches)
    with TrainingProgress(config.method, config.max_steps,
                          enabled=accelerator.is_main_process) as bar:
        while step < config.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            with accelerator.autocast():  # sampling and reward models in training's precision
                generator.manual_seed(rollout_seed(config.seed, step + 1))
                shard = (accelerator.process_index, accelerator.num_processes)
                rollout = (_sample_episodes(policy, batch, config, tokenizer, generator, shard,
                                            agent) if agent is not None else
                           _sample(policy, batch, config, tokenizer, generator, shard))
                total, per_fn = score_rollout(batch, rollout, tokenizer, reward_fns, weights, G,
                                              agent.reward_weight if agent else 1.0)
            ref_logps = reference_logps(reference, rollout, config.temperature)
            advantages, kl = _advantages(net, rollout, total, ref_logps, config)  # (N,)
            sampled = {**rollout_metrics(total, per_fn, rollout, G), **kl}
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
                due = step % config.log_every == 0 or step == config.max_steps
                if (due or evaluated) and accelerator.is_main_process and \
                        log_metrics is not None:
                    log_metrics(metrics, step)
                bar.update(step, {"loss": metrics["loss"]})
                final.update(metrics)
            checkpoints.after_step(accelerator, checkpoint_dir, step,
                                   every=config.checkpoint_every, keep=config.checkpoint_keep,
                                   can_save=step % config.num_iterations == 0)
    return finish(best, final)


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


# ------------------------------------------------------------ evaluation during training


@dataclass
class HeldOut:
    """What the evaluation during training scores: prepared held-out prompt rows (with
    `prompt_ids`), the evaluation's reward functions and weights, and the data's checker
    (`checker(prompt, completion_text)`, None where the data has none)."""

    rows: list[dict]
    reward_fns: RewardFns
    weights: dict[str, float]
    checker: Checker | None = None
    agent: Agent | None = None  # multi-turn: greedy episodes, the checker on the final answer


@torch.no_grad()
def evaluate_held_out(policy, held: HeldOut, config, tokenizer) -> dict[str, float]:
    """`eval/...` metrics of greedy completions (the rollout code at temperature 0) of the
    held-out prompts: `eval/reward` (weighted sum of the evaluation's reward functions, mean),
    `eval/rewards/<fn>/mean`, `eval/checker_accuracy` (with a checker),
    `eval/completions/mean_length` (tokens, the stop token included) and
    `eval/completions/clipped_ratio` (no stop token within max_completion_length). With an
    environment: greedy episodes, `eval/episodes/...` too, the environment's reward in
    eval/reward, and the checker on each episode's final answer."""
    if held.agent is not None:
        rollout = generate_episodes(
            policy, tokenizer, held.rows, held.agent.make_env, tools=held.agent.tools,
            limits=held.agent.limits, temperature=0.0,
            eos_token_ids=stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    else:
        rollout = generate(
            policy, [r["prompt_ids"] for r in held.rows], num_samples=1,
            max_new_tokens=config.max_completion_length, temperature=0.0,
            eos_token_ids=stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id,
            backend=config.generation_backend,
        )
    metrics = {
        "eval/completions/mean_length": rollout.model_mask.sum(-1).float().mean().item(),
        "eval/completions/clipped_ratio": rollout.truncated.float().mean().item(),
    }
    if held.agent is not None:
        metrics.update(episode_metrics(rollout.episodes, "eval/"))
    if held.reward_fns or held.agent is not None:
        total, per_fn = score_rollout(held.rows, rollout, tokenizer, held.reward_fns,
                                      held.weights, 1,
                                      held.agent.reward_weight if held.agent else 1.0)
        metrics["eval/reward"] = total.mean().item()
        for name, values in per_fn.items():
            metrics[f"eval/rewards/{name}/mean"] = torch.nanmean(values).item()
    if held.checker is not None:
        texts = ([e.final_answer for e in rollout.episodes] if rollout.episodes is not None
                 else decode_completions(rollout, tokenizer))
        correct = [bool(held.checker(r["prompt"], t)) for r, t in zip(held.rows, texts)]
        metrics["eval/checker_accuracy"] = sum(correct) / len(correct)
    return metrics


def held_out(rows, reward_fns, weights, checker, best, agent: Agent | None = None) -> HeldOut:
    """The HeldOut of a recipe, refused at once when select_best has nothing to evaluate."""
    if best is not None and not rows:
        raise ValueError(f"select_best: {best.metric} needs held-out prompts, and there are "
                         "none")
    if best is not None and best.metric == "eval/checker_accuracy" and checker is None:
        raise ValueError("select_best: eval/checker_accuracy needs a checker, and the held-out "
                         "prompts have none")
    return HeldOut(rows, reward_fns, weights, checker, agent)


def evaluate_due(policy, held: HeldOut, config, tokenizer, accelerator, step: int,
                 best) -> dict[str, float]:
    """The evaluation of step `step` when one is due (every eval_every steps and the last; {}
    otherwise or without held-out prompts), offered to `best` (select_best) when there is one."""
    if not held.rows or not (step % config.eval_every == 0 or step == config.max_steps):
        return {}
    with accelerator.autocast():
        metrics = evaluate_held_out(policy, held, config, tokenizer)
    if best is not None:
        best.update(metrics, step)
    return metrics


def finish(best, final: dict[str, float]) -> dict[str, float]:
    """The end of an online loop: with select_best, the best evaluated step's weights back in
    the policy and `best_step`, `best/<metric>` in the final metrics."""
    if best is None:
        return final
    if best.restore() is None:
        raise RuntimeError(f"select_best: {best.metric} was never logged (no held-out "
                           "prompts were evaluated), so no step can be selected")
    return {**final, **best.summary()}
