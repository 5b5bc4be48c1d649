"""Reward-model stage: the start model's body with a fresh one-output head, trained on pairs."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig, RewardConfig
from posttrain.data.loading import read_jsonl
from posttrain.stages.common import (
    checkpoint_dir,
    record_oom_backoff,
    run_params,
    run_stage,
    save_trained,
    start_dir,
    start_tokenizer,
    training_key,
)

# Lazy imports: the recipes, models and training (torch, transformers) load inside the
# stage's body; the flows, the CLI and preflight import this module without them.


def tokenize_pairs(data_dir: Path, source: str, split: str, tokenizer, *, max_length: int,
                   truncation: str, max_bad_fraction: float):
    """Tokenized preference pairs of `<source>_<split>.jsonl`; bad pairs counted, and an error
    above the allowed share."""
    from posttrain.data.preference import tokenize_preference_rows

    name = f"{source}_{split}.jsonl"
    return tokenize_preference_rows(
        read_jsonl(data_dir / name), tokenizer, max_length=max_length, truncation=truncation,
        source=name, max_bad_fraction=max_bad_fraction,
    )


@contextmanager
def _body_folder(cfg: PipelineConfig, inputs: dict):
    """A folder (or hub id) holding the causal LM whose body the reward model reuses. The
    built-in base model exists only as a config, so it is saved to a temporary folder first."""
    folder = start_dir(inputs)
    if folder is not None:
        yield str(folder)
    elif cfg.model.name_or_path != "tiny":
        yield cfg.model.name_or_path
    else:
        from posttrain.models import build_tiny_tokenizer, load_causal_lm, save_model

        with tempfile.TemporaryDirectory(prefix="posttrain-base-") as tmp:
            save_model(load_causal_lm(cfg.model), build_tiny_tokenizer(), tmp)
            yield tmp


def run_reward_stage(cfg: PipelineConfig, stage: RewardConfig, inputs: dict, *,
                     parent_run_id: str | None = None) -> dict:
    """Train a Bradley-Terry reward model starting from the stage's start model."""
    key = training_key(cfg, stage, inputs)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.recipes import reward
        from posttrain.rewards import load_reward_model
        from posttrain.training import (
            enable_gradient_checkpointing,
            make_accelerator,
            with_oom_backoff,
        )

        data_dir = Path(inputs["data"]["path"])
        tokenizer = start_tokenizer(cfg, inputs)
        opts = {"max_length": stage.max_length, "truncation": stage.truncation,
                "max_bad_fraction": cfg.data[stage.data].max_drop_fraction}
        train, report = tokenize_pairs(data_dir, stage.data, "train", tokenizer, **opts)
        held, _ = tokenize_pairs(data_dir, stage.data, "eval", tokenizer, **opts)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            with _body_folder(cfg, inputs) as folder:
                model = load_reward_model(folder, new_head=True, seed=s.seed,
                                          trust_remote_code=cfg.model.trust_remote_code,
                                          head_init=s.head_init)
            model.config.pad_token_id = tokenizer.pad_token_id
            enable_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            final = reward.train(
                model, train, held, s, pad_token_id=tokenizer.pad_token_id, log_metrics=logger,
                accelerator=accelerator, checkpoint_dir=checkpoint_dir(cfg, stage, key))
            return model, accelerator, final

        try:
            model, accelerator, final = with_oom_backoff(
                attempt, stage, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, model, tokenizer, out.dir / "model")
        return {**final, "train_pairs": len(train), "dropped_pairs": sum(report["dropped"].values())}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)
