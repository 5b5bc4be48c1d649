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

GROUP_METHODS = ("grpo", "rloo")  # trained by posttrain.recipes.grpo
SCORED_METHODS = (*GROUP_METHODS, "online_dpo")  # scored by reward functions


def reward_function_name(path: str) -> str:
    """The name a reward function is logged under: its last dotted component."""
    return path if path == "reward_model" else path.replace(":", ".").rsplit(".", 1)[-1]


def _reward_functions(stage: GRPOConfig | RLOOConfig | OnlineDPOConfig, reward_manifest: dict | None, tokenizer,
                      accelerator):
    """{name: function} and {name: weight} from the stage's reward_functions; a reward model
    is placed on the accelerator's device."""
    from posttrain.reward_functions import load_reward_function, reward_model_function
    from posttrain.rewards import load_reward_model
    from posttrain.training import place

    fns, weights = {}, {}
    for path, weight in stage.reward_functions.items():
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
    from posttrain.data.formats import prompt_rows

    src = source_of(cfg, stage, data_manifest)
    name = f"{stage.data}_{split}.jsonl"
    return prompt_rows(read_jsonl(Path(src["dir"]) / name), src["format"], name)


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
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed try may have moved weights
            policy = load_policy(cfg, inputs)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            kw = {"log_metrics": logger, "accelerator": accelerator,
                  "checkpoint_dir": checkpoint_dir(cfg, s, key)}
            if s.method in SCORED_METHODS:
                fns, weights = _reward_functions(s, reward_manifest, tokenizer, accelerator)
                held = prompts(cfg, stage, inputs["data"], "eval")
                # one recipe for GRPO and RLOO (GRPO's, with RLOO's advantage and loss)
                recipe = online_dpo if s.method == "online_dpo" else grpo
                final = recipe.train(policy, tokenizer, train, held, s, reward_fns=fns,
                                     weights=weights, **kw)
            else:
                rm_dir = Path(reward_manifest["path"]) / "model"
                final = ppo.train(policy, load_reward_model(rm_dir), load_reward_model(rm_dir),
                                  tokenizer, train, s, **kw)
            return policy, accelerator, final

        try:
            if stage.method in SCORED_METHODS:  # micro-batches can shrink; PPO's batch IS the rollout
                policy, accelerator, final = with_oom_backoff(
                    attempt, stage, record_oom_backoff(out, run_id))
            else:
                policy, accelerator, final = attempt(stage)
        finally:
            logger.flush()
        save_trained(accelerator, policy, tokenizer, out.dir / "model")
        return {**final, "train_prompts": len(train)}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)
