"""Preference stages: DPO, ORPO, SimPO, CPO and KTO, each from the model its `start` names."""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig
from posttrain.data.loading import read_jsonl
from posttrain.data.validation import UNPAIRED_PREFERENCE
from posttrain.stages.common import (
    checkpoint_dir,
    load_policy,
    record_oom_backoff,
    run_params,
    run_stage,
    save_trained,
    source_of,
    start_processor,
    start_tokenizer,
    training_key,
)
from posttrain.stages.reward import tokenize_pairs
from posttrain.vision.models import is_vision_model

# Lazy imports: the recipes, models and training (torch, transformers) load inside the
# stage's body; the flows, the CLI and preflight import this module without them.


def _kto_examples(cfg: PipelineConfig, stage, data_manifest: dict, split: str, tokenizer):
    """Tokenized unpaired examples; preference pairs are converted (chosen -> desirable,
    rejected -> undesirable) and shuffled so that a batch rarely holds both halves of a pair."""
    from posttrain.data.preference import pairs_to_unpaired, tokenize_unpaired_rows

    src = source_of(cfg, stage, data_manifest)
    name = f"{stage.data}_{split}.jsonl"
    rows = read_jsonl(Path(src["dir"]) / name)
    if src["format"] != UNPAIRED_PREFERENCE:
        rows = pairs_to_unpaired(rows)
        random.Random(cfg.data[stage.data].seed + (split == "eval")).shuffle(rows)
    return tokenize_unpaired_rows(
        rows, tokenizer, max_length=stage.max_length, truncation=stage.truncation, source=name,
        max_bad_fraction=cfg.data[stage.data].max_drop_fraction,
    )


def _image_pairs(cfg: PipelineConfig, stage, inputs: dict, split: str, processor):
    """Tokenized preference pairs with images (posttrain.vision.tokenize)."""
    from posttrain.vision.tokenize import tokenize_pair_rows

    data_dir = Path(inputs["data"]["path"])
    name = f"{stage.data}_{split}.jsonl"
    return tokenize_pair_rows(read_jsonl(data_dir / name), processor, data_dir,
                              max_length=stage.max_length, truncation=stage.truncation,
                              source=name,
                              max_bad_fraction=cfg.data[stage.data].max_drop_fraction)


def run_method_stage(cfg: PipelineConfig, stage, inputs: dict, *,
                     parent_run_id: str | None = None) -> dict:
    """Train the start model further with the stage's method (DPO, ORPO, SimPO, CPO or KTO)."""
    key = training_key(cfg, stage, inputs)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.recipes import kto, preference
        from posttrain.training import make_accelerator, with_oom_backoff

        vision = is_vision_model(cfg.model)
        saved = start_processor(cfg, inputs) if vision else start_tokenizer(cfg, inputs)
        tokenizer = saved.tokenizer if vision else saved
        if vision:
            train, report = _image_pairs(cfg, stage, inputs, "train", saved)
            held, _ = _image_pairs(cfg, stage, inputs, "eval", saved)
        elif stage.method == "kto":
            train, report = _kto_examples(cfg, stage, inputs["data"], "train", tokenizer)
            held, _ = _kto_examples(cfg, stage, inputs["data"], "eval", tokenizer)
        else:
            opts = {"max_length": stage.max_length, "truncation": stage.truncation,
                    "max_bad_fraction": cfg.data[stage.data].max_drop_fraction}
            data_dir = Path(inputs["data"]["path"])
            train, report = tokenize_pairs(data_dir, stage.data, "train", tokenizer, **opts)
            held, _ = tokenize_pairs(data_dir, stage.data, "eval", tokenizer, **opts)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)

        def attempt(s):  # from scratch each time: a failed attempt may have moved the weights
            policy = load_policy(cfg, inputs)
            accelerator = make_accelerator(cfg.model.mixed_precision)
            kw = {"pad_token_id": tokenizer.pad_token_id, "log_metrics": logger,
                  "accelerator": accelerator, "checkpoint_dir": checkpoint_dir(cfg, s, key)}
            if s.method == "kto":
                return policy, accelerator, kto.train(policy, train, held, s, **kw)
            return policy, accelerator, preference.train(s.method, policy, train, held, s, **kw)

        try:
            policy, accelerator, final = with_oom_backoff(
                attempt, stage, record_oom_backoff(out, run_id))
        finally:
            logger.flush()
        save_trained(accelerator, policy, saved, out.dir / "model")
        return {**final, "train_examples": len(train),
                "dropped_examples": sum(report["dropped"].values())}

    return run_stage(cfg, stage.name, key, run_params(cfg, stage), body,
                     parent_run_id=parent_run_id, data_parallel=True)
