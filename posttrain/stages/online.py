"""Online stages: GRPO, RLOO and online DPO (reward functions, optionally a reward stage's model)
and PPO (a reward stage's model), each from the model its `start` names, on the prompts of its data
source."""

from __future__ import annotations

from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import (
    GRPOConfig,
    OnlineDPOConfig,
    PipelineConfig,
    PPOConfig,
    RLOOConfig,
)
from posttrain.data import demo
from posttrain.data.formats import prompt_rows
from posttrain.data.loading import read_jsonl
from posttrain.stages.common import (
    checkpoint_dir,
    load_policy,
    record_oom_backoff,
    run_params,
    run_stage,
    save_trained,
    source_of,
    start_tokenizer,
    training_key,
)

# Lazy imports: the recipes, models and training (torch, transformers) load inside the
# stage's body; the flows, the CLI and preflight import this module without them.

GROUP_METHODS = ("grpo", "rloo")  # trained by posttrain.recipes.grpo
SCORED_METHODS = (*GROUP_METHODS, "online_dpo")  # scored by reward functions


def reward_function_name(path: str) -> str:
    """The name a reward function is logged under: its last dotted component."""
    return path if path == "reward_model" else path.replace(":", ".").rsplit(".", 1)[-1]


def _reward_functions(stage, reward_manifest: dict | None, tokenizer, accelerator,
                      functions: dict[str, float] | None = None):
    """{name: function} and {name: weight} from `functions` (default: the stage's
    reward_functions); a reward model is placed on the accelerator's device."""
    from posttrain.reward_functions import load_reward_function, reward_model_function
    from posttrain.rewards import load_reward_model
    from posttrain.training import place

    fns, weights = {}, {}
    for path, weight in (stage.reward_functions if functions is None else functions).items():
        name = reward_function_name(path)
        if path == "reward_model":
            model = place(load_reward_model(Path(reward_manifest["path"]) / "model"),
                          accelerator, frozen=True)
            fns[name] = reward_model_function(model, tokenizer, tokenizer.pad_token_id)
        else:
            fns[name] = load_reward_function(path)
        weights[name] = weight
    return fns, weights


def prompts(cfg: PipelineConfig, stage, data_manifest: dict, split: str) -> list[dict]:
    """Prompt rows (prompt plus the extra columns reward functions read) of the stage's source,
    whatever its format."""
    src = source_of(cfg, stage, data_manifest)
    name = f"{stage.data}_{split}.jsonl"
    return prompt_rows(read_jsonl(Path(src["dir"]) / name), src["format"], name)


def _checker(data_manifest: dict, source: str):
    """The checker of the stage's source (`checker(prompt, completion_text)`), or None."""
    if data_manifest["datasets"][source].get("checker") != "demo":
        return None
    return lambda prompt, completion: demo.check(demo.prompt_text(prompt), completion)


def check_select_best(stage, held: list[dict], checker) -> None:
    """Refuse, before any training, a select_best that the stage's evaluation cannot give:
    no held-out prompts, or eval/checker_accuracy on data without a checker."""
    if stage.select_best is None:
        return
    if not held:
        raise ValueError(f"stage {stage.name!r}: select_best: {stage.select_best} needs "
                         f"held-out prompts, and data source {stage.data!r} has none")
    if stage.select_best == "eval/checker_accuracy" and checker is None:
        raise ValueError(f"stage {stage.name!r}: select_best: eval/checker_accuracy, but data "
                         f"source {stage.data!r} has no checker (choose eval/reward or "
                         "eval/rewards/<fn>/mean)")


def _record_best(out: artifacts.StageOutput, run_id: str | None, stage, final: dict) -> None:
    """The selected step in the manifest and as the run's `best_step` tag."""
    if stage.select_best is None or "best_step" not in final:
        return
    out.meta["select_best"] = {"metric": stage.select_best, "mode": stage.best_mode,
                               "step": int(final["best_step"]),
                               "value": final[f"best/{stage.select_best}"]}
    if run_id:
        tracking.client().set_tag(run_id, "best_step", str(int(final["best_step"])))


def run_online_stage(cfg: PipelineConfig,
                     stage: GRPOConfig | RLOOConfig | OnlineDPOConfig | PPOConfig,
                     inputs: dict, *, parent_run_id: str | None = None) -> dict:
    """Train the start model further with GRPO, RLOO, online DPO or PPO on the prompts of the
    stage's source."""
    key = training_key(cfg, stage, inputs)
    reward_manifest = inputs.get("reward")

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.recipes import grpo, online_dpo, ppo
        from posttrain.rewards import load_reward_model
        from posttrain.training import make_accelerator, with_oom_backoff

        tokenizer = start_tokenizer(cfg, inputs)
        train = prompts(cfg, stage, inputs["data"], "train")
        held = prompts(cfg, stage, inputs["data"], "eval")
        checker = _checker(inputs["data"], stage.data)
        check_select_best(stage, held, checker)
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed try may have moved weights
            policy = load_policy(cfg, inputs)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            kw = {"log_metrics": logger, "accelerator": accelerator,
                  "checkpoint_dir": checkpoint_dir(cfg, s, key), "checker": checker}
            if s.eval_reward_functions is not None:
                kw["eval_reward_fns"], kw["eval_weights"] = _reward_functions(
                    s, reward_manifest, tokenizer, accelerator, s.eval_reward_functions)
            if s.method in SCORED_METHODS:
                fns, weights = _reward_functions(s, reward_manifest, tokenizer, accelerator)
                # one recipe for GRPO and RLOO (GRPO's, with RLOO's advantage and loss)
                recipe = online_dpo if s.method == "online_dpo" else grpo
                if getattr(s, "environment", None) is not None and run_id:  # sample episodes
                    kw["log_table"] = lambda rows, name: tracking.log_table(run_id, rows, name)
                final = recipe.train(policy, tokenizer, train, held, s, reward_fns=fns,
                                     weights=weights, **kw)
            else:
                rm_dir = Path(reward_manifest["path"]) / "model"
                final = ppo.train(policy, load_reward_model(rm_dir), load_reward_model(rm_dir),
                                  tokenizer, train, s, eval_prompts=held, **kw)
            return policy, accelerator, final

        try:
            if stage.method in SCORED_METHODS:  # micro-batches can shrink; PPO's batch IS the rollout
                group = stage.num_generations if isinstance(stage, (GRPOConfig, RLOOConfig)) else 1
                policy, accelerator, final = with_oom_backoff(
                    attempt, stage, record_oom_backoff(out, run_id), group=group)
            else:
                policy, accelerator, final = attempt(stage)
        finally:
            logger.flush()
        _record_best(out, run_id, stage, final)
        save_trained(accelerator, policy, tokenizer, out.dir / "model")
        return {**final, "train_prompts": len(train)}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)
