"""Supervised fine-tuning stage: the model it starts from + a prepared SFT source -> weights."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig, SFTConfig
from posttrain.data.loading import DataError, read_jsonl
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.stages.common import (
    checkpoint_dir,
    load_policy,
    record_oom_backoff,
    run_params,
    run_stage,
    save_trained,
    start_processor,
    start_tokenizer,
    training_key,
)
from posttrain.vision.models import is_vision_model

# Lazy imports: the recipes, models and training (torch, transformers) load inside the
# stage's body; the flows, the CLI and preflight import this module without them.


def _tokenize(rows: list[dict], *, tokenizer, source: str, s: SFTConfig
              ) -> tuple[list[dict], dict]:
    """Tokenized examples plus a report of truncated/dropped rows (counted, never silent)."""
    examples, report = tokenize_sft_rows(
        rows, tokenizer, max_length=s.max_length, truncation=s.truncation,
        completion_only_loss=s.completion_only_loss, source=source,
    )
    if not examples:
        raise DataError(f"{source}: no row fits in max_length={s.max_length} tokens ({report})")
    return examples, report


def _tokenize_images(processor, data_dir: Path, rows: list[dict], *, source: str,
                     s: SFTConfig) -> tuple[list[dict], dict]:
    """Tokenized examples of rows with images (posttrain.vision.tokenize); packing refused."""
    from posttrain.vision.tokenize import tokenize_sft_rows as tokenize_image_rows

    if s.packing:
        raise DataError(f"stages.{s.name}: packing is not supported for vision-language data; "
                        "set packing: false")
    examples, report = tokenize_image_rows(rows, processor, data_dir, max_length=s.max_length,
                                           source=source, truncation=s.truncation)
    if not examples:
        raise DataError(f"{source}: no row fits in max_length={s.max_length} tokens ({report})")
    return examples, report


def run_sft_stage(cfg: PipelineConfig, stage: SFTConfig, inputs: dict, *,
                  parent_run_id: str | None = None) -> dict:
    """Fine-tune the start model on the stage's data source; save weights as safetensors."""
    key = training_key(cfg, stage, inputs)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.recipes import sft
        from posttrain.training import make_accelerator, with_oom_backoff

        data_dir = Path(inputs["data"]["path"])
        vision = is_vision_model(cfg.model)
        # A vision-language model's processor is saved with it (AutoProcessor loads it back).
        saved = start_processor(cfg, inputs) if vision else start_tokenizer(cfg, inputs)
        tokenizer = saved.tokenizer if vision else saved
        tokenize = partial(_tokenize_images, saved, data_dir) if vision else \
            partial(_tokenize, tokenizer=tokenizer)
        train, report = tokenize(read_jsonl(data_dir / f"{stage.data}_train.jsonl"),
                                 source=f"{stage.data}_train.jsonl", s=stage)
        held, _ = tokenize(read_jsonl(data_dir / f"{stage.data}_eval.jsonl"),
                           source=f"{stage.data}_eval.jsonl", s=stage)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            model = load_policy(cfg, inputs)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            final = sft.train(model, train, held, s, pad_token_id=tokenizer.pad_token_id,
                              log_metrics=logger, checkpoint_dir=checkpoint_dir(cfg, stage, key),
                              accelerator=accelerator)
            return model, accelerator, final

        try:
            model, accelerator, final = with_oom_backoff(
                attempt, stage, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        # How packed examples were kept apart (posttrain.models.packed_attention): in the
        # manifest and as a tag of the stage's MLflow run, where the run's page shows it.
        out.meta["attention"] = final["attention"]
        if run_id:
            tracking.client().set_tag(run_id, "posttrain.attention", final["attention"])
        save_trained(accelerator, model, saved, out.dir / "model")
        out.meta["base_model"] = cfg.model.name_or_path
        dropped = report["dropped_too_long"] + report["dropped_no_loss"]
        return {**final, "train_examples": len(train), "dropped_for_length": dropped}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)

