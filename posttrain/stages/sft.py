"""Supervised fine-tuning stage: base model + prepared SFT data -> fine-tuned weights."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig
from posttrain.data.loading import DataError, read_jsonl
from posttrain.stages.common import (
    digest,
    dump,
    launch_params,
    record_oom_backoff,
    run_stage,
    save_trained,
)


def sft_stage_key(cfg: PipelineConfig, data_manifest: dict) -> str:
    return artifacts.stage_key(
        "sft", {"model": dump(cfg.model), "sft": dump(cfg.sft), "launch": launch_params(cfg)},
        upstream={"data": digest(data_manifest)},
    )


def _tokenize(rows: list[dict], tokenizer, source: str, s) -> tuple[list[dict], dict]:
    """Tokenized examples plus a report of truncated/dropped rows (counted, never silent)."""
    from posttrain.data.tokenize import tokenize_sft_rows

    examples, report = tokenize_sft_rows(
        rows, tokenizer, max_length=s.max_length, truncation=s.truncation,
        completion_only_loss=s.completion_only_loss, source=source,
    )
    if not examples:
        raise DataError(f"{source}: no row fits in max_length={s.max_length} tokens ({report})")
    return examples, report


def run_sft_stage(cfg: PipelineConfig, data_manifest: dict, *,
                  parent_run_id: str | None = None) -> dict:
    """Fine-tune the base model on the prepared SFT data; save weights as safetensors."""
    key = sft_stage_key(cfg, data_manifest)
    params = {"model": dump(cfg.model), "sft": dump(cfg.sft)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import apply_lora, load_causal_lm, load_tokenizer
        from posttrain.recipes import sft
        from posttrain.training import (
            enable_gradient_checkpointing,
            make_accelerator,
            with_oom_backoff,
        )

        data_dir = Path(data_manifest["path"])
        tokenizer = load_tokenizer(cfg.model)
        s = cfg.sft
        train, report = _tokenize(read_jsonl(data_dir / "sft_train.jsonl"), tokenizer,
                                  "sft_train.jsonl", s)
        held, _ = _tokenize(read_jsonl(data_dir / "sft_eval.jsonl"), tokenizer, "sft_eval.jsonl", s)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)
        ckpt = Path(cfg.artifacts_root) / "sft" / f"{key}.checkpoints"

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            model = load_causal_lm(cfg.model)
            enable_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
            if cfg.model.lora is not None:
                model = apply_lora(model, cfg.model.lora)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            final = sft.train(model, train, held, s, pad_token_id=tokenizer.pad_token_id,
                              log_metrics=logger, checkpoint_dir=ckpt, accelerator=accelerator)
            return model, accelerator, final

        try:
            model, accelerator, final = with_oom_backoff(
                attempt, s, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, model, tokenizer, out.dir / "model")
        out.meta["base_model"] = cfg.model.name_or_path
        dropped = report["dropped_too_long"] + report["dropped_no_loss"]
        return {**final, "train_examples": len(train), "dropped_for_length": dropped}

    return run_stage(cfg, "sft", key, params, body, parent_run_id=parent_run_id,
                     data_parallel=True)
