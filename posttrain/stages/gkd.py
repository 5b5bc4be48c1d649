"""On-policy distillation stage (GKD): a frozen teacher + the student it starts from (or its
`student` model section) + a prompt-completion source -> the student's weights.

The teacher is an earlier language-model stage (its manifest is an input of this stage, its
digest part of the cache key) or a model folder (its content in the key, as a local base
model's). Where the caller's inputs lack the teacher stage's manifest (a runner that knows only
`start` and `reward`), `posttrain.stages.graph.run_training_stage` fills it in before this
stage runs (`with_teacher`).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import GKDConfig, PipelineConfig
from posttrain.data.loading import DataError, read_jsonl
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.stages.common import (
    checkpoint_dir,
    load_policy,
    record_oom_backoff,
    run_params,
    run_stage,
    save_trained,
    start_tokenizer,
    training_key,
)

# Lazy imports: the recipes, models and training (torch, transformers) load inside the
# stage's body; the flows, the CLI and preflight import this module without them.


def teacher_dir(stage: GKDConfig, inputs: dict) -> Path:
    """The teacher's model folder."""
    if inputs.get("teacher") is not None:
        return Path(inputs["teacher"]["path"]) / "model"
    return Path(stage.teacher)


def student_tokenizer(cfg: PipelineConfig, stage: GKDConfig, inputs: dict):
    from posttrain.models import load_tokenizer

    if stage.student is not None:
        return load_tokenizer(stage.student)
    return start_tokenizer(cfg, inputs)


def load_student(cfg: PipelineConfig, stage: GKDConfig, inputs: dict):
    """The student: built from `student` when set (with its own LoRA and checkpointing
    settings), else the model the stage starts from (load_policy)."""
    if stage.student is None:
        return load_policy(cfg, inputs)
    from posttrain.models import apply_lora, load_causal_lm
    from posttrain.training import enable_gradient_checkpointing

    student = load_causal_lm(stage.student)
    enable_gradient_checkpointing(student, stage.student.gradient_checkpointing)
    if stage.student.lora is not None:
        student = apply_lora(student, stage.student.lora)
    return student


def _tokenize(rows: list[dict], tokenizer, source: str, s: GKDConfig) -> tuple[list[dict], dict]:
    examples, report = tokenize_sft_rows(rows, tokenizer, max_length=s.max_length,
                                         truncation=s.truncation, completion_only_loss=True,
                                         source=source)
    if not examples:
        raise DataError(f"{source}: no row fits in max_length={s.max_length} tokens ({report})")
    return examples, report


def run_gkd_stage(cfg: PipelineConfig, stage: GKDConfig, inputs: dict, *,
                  parent_run_id: str | None = None) -> dict:
    """Distil the teacher into the student on the stage's data source; save the student."""
    key = training_key(cfg, stage, inputs)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import load_trained, load_trained_tokenizer
        from posttrain.recipes import gkd
        from posttrain.training import make_accelerator, with_oom_backoff

        folder = teacher_dir(stage, inputs)
        tokenizer = student_tokenizer(cfg, stage, inputs)
        gkd.check_tokenizers(tokenizer, load_trained_tokenizer(folder))
        data_dir = Path(inputs["data"]["path"])
        train, report = _tokenize(read_jsonl(data_dir / f"{stage.data}_train.jsonl"), tokenizer,
                                  f"{stage.data}_train.jsonl", stage)
        held, _ = _tokenize(read_jsonl(data_dir / f"{stage.data}_eval.jsonl"), tokenizer,
                            f"{stage.data}_eval.jsonl", stage)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)
        precision = (stage.student or cfg.model).mixed_precision

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            student = load_student(cfg, stage, inputs)
            teacher = load_trained(folder, dtype=cfg.model.dtype,
                                   attn_implementation=cfg.model.attn_implementation)
            gkd.check_tokenizers(tokenizer, tokenizer, student, teacher)
            accelerator = make_accelerator(precision)
            final = gkd.train(student, teacher, train, held, s, tokenizer=tokenizer,
                              log_metrics=logger, checkpoint_dir=checkpoint_dir(cfg, stage, key),
                              accelerator=accelerator)
            return student, accelerator, final

        try:
            student, accelerator, final = with_oom_backoff(
                attempt, stage, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, student, tokenizer, out.dir / "model")
        out.meta["base_model"] = (stage.student or cfg.model).name_or_path
        out.meta["teacher"] = (inputs["teacher"]["path"] if inputs.get("teacher")
                               else str(folder))
        return {**final, "train_examples": len(train)}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)
