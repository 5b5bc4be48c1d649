"""Reward-model stage: the SFT model's body with a fresh one-output head, trained on pairs."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig
from posttrain.data.loading import read_jsonl
from posttrain.stages.common import (
    digest,
    dump,
    launch_params,
    record_oom_backoff,
    run_stage,
    save_trained,
)


def reward_stage_key(cfg: PipelineConfig, data_manifest: dict, sft_manifest: dict) -> str:
    return artifacts.stage_key(
        "reward", {"reward": dump(cfg.reward), "dtype": cfg.model.dtype,
                   "max_drop_fraction": cfg.data.max_drop_fraction,
                   "launch": launch_params(cfg)},
        upstream={"data": digest(data_manifest), "sft": digest(sft_manifest)},
    )


def tokenize_pairs(cfg: PipelineConfig, data_dir: Path, split: str, tokenizer, stage_cfg):
    """Tokenized preference pairs; bad pairs counted, and an error above the allowed share."""
    from posttrain.data.preference import tokenize_preference_rows

    name = f"preference_{split}.jsonl"
    return tokenize_preference_rows(
        read_jsonl(data_dir / name), tokenizer, max_length=stage_cfg.max_length,
        truncation=stage_cfg.truncation, source=name,
        max_bad_fraction=cfg.data.max_drop_fraction,
    )


def run_reward_stage(cfg: PipelineConfig, data_manifest: dict, sft_manifest: dict, *,
                     parent_run_id: str | None = None) -> dict:
    """Train a Bradley-Terry reward model starting from the SFT model."""
    key = reward_stage_key(cfg, data_manifest, sft_manifest)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import load_trained_tokenizer
        from posttrain.recipes import reward
        from posttrain.rewards import load_reward_model
        from posttrain.training import (
            enable_gradient_checkpointing,
            make_accelerator,
            with_oom_backoff,
        )

        sft_dir = Path(sft_manifest["path"]) / "model"
        data_dir = Path(data_manifest["path"])
        tokenizer = load_trained_tokenizer(sft_dir)
        train, report = tokenize_pairs(cfg, data_dir, "train", tokenizer, cfg.reward)
        held, _ = tokenize_pairs(cfg, data_dir, "eval", tokenizer, cfg.reward)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            model = load_reward_model(sft_dir, new_head=True, seed=s.seed)
            model.config.pad_token_id = tokenizer.pad_token_id
            enable_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            final = reward.train(
                model, train, held, s, pad_token_id=tokenizer.pad_token_id, log_metrics=logger,
                accelerator=accelerator,
                checkpoint_dir=Path(cfg.artifacts_root) / "reward" / f"{key}.checkpoints")
            return model, accelerator, final

        try:
            model, accelerator, final = with_oom_backoff(
                attempt, cfg.reward, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, model, tokenizer, out.dir / "model")
        return {**final, "train_pairs": len(train), "dropped_pairs": sum(report["dropped"].values())}

    return run_stage(cfg, "reward", key, {"reward": dump(cfg.reward)}, body,
                     parent_run_id=parent_run_id, data_parallel=True)
