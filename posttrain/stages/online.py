"""Online stages: GRPO (reward functions, optionally the reward model) and PPO (reward model)."""

from __future__ import annotations

from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig
from posttrain.data.loading import read_jsonl
from posttrain.stages.common import (
    digest,
    dump,
    launch_params,
    load_policy,
    record_oom_backoff,
    run_stage,
    save_trained,
)

ONLINE_METHODS = ("grpo", "ppo")


def _params(cfg: PipelineConfig, method: str) -> dict:
    return {method: dump(getattr(cfg, method)), "lora": dump(cfg.model)["lora"],
            "dtype": cfg.model.dtype, "launch": launch_params(cfg)}


def online_stage_key(cfg: PipelineConfig, method: str, data_manifest: dict, sft_manifest: dict,
                     reward_manifest: dict | None = None) -> str:
    upstream = {"data": digest(data_manifest), "sft": digest(sft_manifest)}
    if reward_manifest is not None:
        upstream["reward"] = digest(reward_manifest)
    return artifacts.stage_key(method, _params(cfg, method), upstream=upstream)


def uses_reward_model(cfg: PipelineConfig, method: str) -> bool:
    return method == "ppo" or "reward_model" in cfg.grpo.reward_functions


def _reward_functions(cfg: PipelineConfig, reward_manifest: dict | None, tokenizer):
    """{name: function} and {name: weight} from grpo.reward_functions."""
    from posttrain.reward_functions import load_reward_function, reward_model_function
    from posttrain.rewards import load_reward_model

    fns, weights = {}, {}
    for path, weight in cfg.grpo.reward_functions.items():
        if path == "reward_model":
            if reward_manifest is None:
                raise ValueError("grpo.reward_functions uses reward_model but no RM stage ran")
            model = load_reward_model(Path(reward_manifest["path"]) / "model")
            fns[path] = reward_model_function(model, tokenizer, tokenizer.pad_token_id)
        else:
            name = path.replace(":", ".").rsplit(".", 1)[-1]
            fns[name] = load_reward_function(path)
            path = name
        weights[path] = weight
    return fns, weights


def run_online_stage(cfg: PipelineConfig, method: str, data_manifest: dict, sft_manifest: dict,
                     reward_manifest: dict | None = None, *,
                     parent_run_id: str | None = None) -> dict:
    """Train the SFT model further with GRPO or PPO on the prepared prompts."""
    if method not in ONLINE_METHODS:
        raise ValueError(f"unknown online method {method!r}; choose from {ONLINE_METHODS}")
    if uses_reward_model(cfg, method) and reward_manifest is None:
        raise ValueError(f"{method} needs the reward-model stage's artifact")
    key = online_stage_key(cfg, method, data_manifest, sft_manifest, reward_manifest)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import load_trained_tokenizer
        from posttrain.recipes import grpo, ppo
        from posttrain.rewards import load_reward_model
        from posttrain.training import make_accelerator, with_oom_backoff

        sft_dir = Path(sft_manifest["path"]) / "model"
        data_dir = Path(data_manifest["path"])
        tokenizer = load_trained_tokenizer(sft_dir)
        prompts = read_jsonl(data_dir / "prompts_train.jsonl")
        logger = tracking.MetricLogger(run_id)

        def attempt(stage_cfg):  # from scratch each time: a failed try may have moved weights
            policy = load_policy(cfg, sft_dir)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            if method == "grpo":
                fns, weights = _reward_functions(cfg, reward_manifest, tokenizer)
                final = grpo.train(policy, tokenizer, prompts,
                                   read_jsonl(data_dir / "prompts_eval.jsonl"), stage_cfg,
                                   reward_fns=fns, weights=weights, log_metrics=logger,
                                   accelerator=accelerator,
                                   checkpoint_dir=Path(cfg.artifacts_root) / method
                                   / f"{key}.checkpoints")
            else:
                rm_dir = Path(reward_manifest["path"]) / "model"
                final = ppo.train(policy, load_reward_model(rm_dir), load_reward_model(rm_dir),
                                  tokenizer, prompts, stage_cfg, log_metrics=logger,
                                  accelerator=accelerator,
                                  checkpoint_dir=Path(cfg.artifacts_root) / method
                                  / f"{key}.checkpoints")
            return policy, accelerator, final

        try:
            if method == "grpo":  # its micro-batches can shrink; PPO's batch IS the rollout
                policy, accelerator, final = with_oom_backoff(
                    attempt, cfg.grpo, record_oom_backoff(out, run_id))
            else:
                policy, accelerator, final = attempt(cfg.ppo)
        finally:
            logger.flush()
        save_trained(accelerator, policy, tokenizer, out.dir / "model")
        return {**final, "train_prompts": len(prompts)}

    return run_stage(cfg, method, key, _params(cfg, method), body, parent_run_id=parent_run_id,
                     data_parallel=True)
