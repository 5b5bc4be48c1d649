"""What the online recipes (GRPO and RLOO, PPO, online DPO) share: prompt rows, reward scoring
of a rollout, its metrics, reference log-probs, and the evaluation during training on held-out
prompts with select_best (posttrain/best.py).

Reward functions are called as TRL calls them (posttrain/reward_functions.py); a multi-turn
rollout (posttrain/multiturn.py) is scored per episode, with the environment's reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain import checkpoints
from posttrain.data.tokenize import tokenize_prompt
from posttrain.logprobs import SelectedLogits
from posttrain.models import stop_token_ids
from posttrain.multiturn import Agent, episode_metrics, generate_episodes
from posttrain.reward_functions import as_completions, combine_rewards
from posttrain.rollout import Rollout, completion_logps, generate
from posttrain.training import build_optimizer, endless_batches

MetricFn = Callable[[dict[str, float], int], None]
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


def reference_logps(reference, rollout: Rollout, temperature: float) -> torch.Tensor | None:
    """Per-token reference log-probs of a rollout (B, C), or None without a reference."""
    if reference is None:
        return None
    return reference(lambda ref: completion_logps(
        ref, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
        rollout.completion_mask, temperature=temperature))


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


def evaluation_of(held_rows, reward_fns, weights, eval_reward_fns, eval_weights, checker, best,
                  agent: Agent | None = None) -> HeldOut:
    """`held_out` scored by `eval_reward_fns` and `eval_weights`, each the training one
    (`reward_fns`, `weights`) where it is None."""
    return held_out(held_rows, eval_reward_fns if eval_reward_fns is not None else reward_fns,
                    eval_weights if eval_weights is not None else weights, checker, best,
                    agent=agent)


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


# ------------------------------------------------------------ the parts of every online loop


def prompt_rows(prompts: list[dict], eval_prompts: list[dict], tokenizer, max_prompt_length: int,
                max_eval_rows: int) -> tuple[list[dict], list[dict]]:
    """The training prompt rows and the first `max_eval_rows` held-out ones, prepared."""
    rows = prepare_prompts(prompts, tokenizer, max_prompt_length)
    held = prepare_prompts(list(eval_prompts), tokenizer, max_prompt_length)[:max_eval_rows]
    return rows, held


def prepare_policy(policy, config, accelerator) -> tuple:
    """The policy as the training forward (SelectedLogits), prepared with its optimizer and
    scheduler: (net, params, optimizer, scheduler), the net in training mode (a loaded model
    comes in eval mode; dropout is off either way)."""
    net = SelectedLogits(policy)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer = accelerator.prepare(net, optimizer)
    net.train()
    return net, params, optimizer, scheduler


def prompt_batches(rows: list[dict], batch_size: int, seed: int, accelerator):
    """This process's batches of `batch_size` prompt rows, forever (`endless_batches`)."""
    return endless_batches(rows, batch_size, list, seed=seed, rank=accelerator.process_index,
                           world_size=accelerator.num_processes, what="prompts")


def restore_position(accelerator, checkpoint_dir, batches, steps_per_batch: int = 1) -> int:
    """The step to go on from: the newest valid checkpoint's in `checkpoint_dir` (0 without
    one), with `batches` moved past the prompt batches already trained on."""
    step = checkpoints.restore(accelerator, checkpoint_dir) if checkpoint_dir else 0
    for _ in range(step // steps_per_batch):
        next(batches)
    return step


def log_due(log_metrics: MetricFn | None, metrics: dict[str, float], step: int, evaluated: dict,
            *, log_every: int, max_steps: int, is_main_process: bool) -> None:
    """`metrics` to `log_metrics` on the main process, every `log_every` steps, at the last
    and wherever an evaluation ran."""
    due = step % log_every == 0 or step == max_steps
    if (due or evaluated) and is_main_process and log_metrics is not None:
        log_metrics(metrics, step)
