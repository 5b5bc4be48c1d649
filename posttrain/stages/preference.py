"""Preference stages: DPO, ORPO and KTO, each starting from the SFT artifact."""

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
    load_policy,
    record_oom_backoff,
    run_stage,
    save_trained,
)
from posttrain.stages.reward import tokenize_pairs

METHODS = ("dpo", "orpo", "kto")


def _params(cfg: PipelineConfig, method: str) -> dict:
    return {method: dump(getattr(cfg, method)), "lora": dump(cfg.model)["lora"],
            "dtype": cfg.model.dtype, "max_drop_fraction": cfg.data.max_drop_fraction,
            "launch": launch_params(cfg)}


def method_stage_key(cfg: PipelineConfig, method: str, data_manifest: dict,
                     sft_manifest: dict) -> str:
    return artifacts.stage_key(
        method, _params(cfg, method),
        upstream={"data": digest(data_manifest), "sft": digest(sft_manifest)},
    )


def _kto_examples(cfg: PipelineConfig, data_dir: Path, split: str, tokenizer):
    from posttrain.data.preference import tokenize_unpaired_rows

    name = f"kto_{split}.jsonl"
    return tokenize_unpaired_rows(
        read_jsonl(data_dir / name), tokenizer, max_length=cfg.kto.max_length,
        truncation=cfg.kto.truncation, source=name, max_bad_fraction=cfg.data.max_drop_fraction,
    )


def run_method_stage(cfg: PipelineConfig, method: str, data_manifest: dict, sft_manifest: dict,
                     *, parent_run_id: str | None = None) -> dict:
    """Train the SFT model further with `method` ('dpo', 'orpo' or 'kto')."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    key = method_stage_key(cfg, method, data_manifest, sft_manifest)
    stage_cfg = getattr(cfg, method)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import load_trained_tokenizer
        from posttrain.recipes import kto, preference
        from posttrain.training import make_accelerator, with_oom_backoff

        sft_dir = Path(sft_manifest["path"]) / "model"
        data_dir = Path(data_manifest["path"])
        tokenizer = load_trained_tokenizer(sft_dir)
        if method == "kto":
            train, report = _kto_examples(cfg, data_dir, "train", tokenizer)
            held, _ = _kto_examples(cfg, data_dir, "eval", tokenizer)
        else:
            train, report = tokenize_pairs(cfg, data_dir, "train", tokenizer, stage_cfg)
            held, _ = tokenize_pairs(cfg, data_dir, "eval", tokenizer, stage_cfg)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            policy = load_policy(cfg, sft_dir)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            kw = {"pad_token_id": tokenizer.pad_token_id, "log_metrics": logger,
                  "accelerator": accelerator,
                  "checkpoint_dir": Path(cfg.artifacts_root) / method / f"{key}.checkpoints"}
            if method == "kto":
                return policy, accelerator, kto.train(policy, train, held, s, **kw)
            return policy, accelerator, preference.train(method, policy, train, held, s, **kw)

        try:
            policy, accelerator, final = with_oom_backoff(
                attempt, stage_cfg, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, policy, tokenizer, out.dir / "model")
        return {**final, "train_examples": len(train),
                "dropped_examples": sum(report["dropped"].values())}

    return run_stage(cfg, method, key, _params(cfg, method), body, parent_run_id=parent_run_id,
                     data_parallel=True)
