"""Pipeline stages as plain functions: config + upstream manifests -> manifest.

Each stage computes its content key, returns the existing verified artifact when there is one
(idempotent), and otherwise trains/evaluates inside an atomic artifact writer with an MLflow child
run. Prefect is not needed here: `tasks/` wraps these functions with cache keys and locks, and
`python -m posttrain.recipes.sft` calls them directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import DatasetSource, PipelineConfig
from posttrain.data import demo
from posttrain.data.loading import (
    DataError,
    fingerprint_file,
    fingerprint_rows,
    load_rows,
    read_jsonl,
    split_rows,
    write_jsonl,
)
from posttrain.data.validation import detect_format, validate_rows

SFT_FORMATS = ("language_modeling", "prompt_completion")


def _dump(model) -> dict:
    return model.model_dump(mode="json")


def _digest(manifest: dict) -> str:
    return manifest["digest"]


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    key: str,
    params: dict,
    body: Callable[[artifacts.StageOutput, str], dict],
    *,
    parent_run_id: str | None = None,
) -> dict:
    """Return the artifact of (stage, key), producing it with `body(out, run_id)` if needed.

    `body` writes files into `out.dir`, may add JSON facts to `out.meta`, and returns the stage's
    final metrics. The returned manifest carries `cached` (True when nothing ran).
    """
    if cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    existing = artifacts.load_manifest(cfg.artifacts_root, stage, key)
    experiment = cfg.tracking.experiment
    if existing is not None:
        tracking.record_cache_hit(experiment, parent_run_id, stage, existing)
        return {**existing, "cached": True}
    run_id = tracking.start_run(
        experiment,
        stage,
        parent_run_id=parent_run_id,
        params=params,
        tags={tracking.STAGE_TAG: stage, tracking.KEY_TAG: key},
    )
    started = time.time()
    try:
        with artifacts.write_stage(cfg.artifacts_root, stage, key) as out:
            out.meta.update(config=params, mlflow_run_id=run_id)
            metrics = body(out, run_id)
            out.meta["metrics"] = metrics
            out.meta["seconds"] = round(time.time() - started, 3)
            (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracking.log_folder(run_id, out.manifest["path"], cfg.tracking.max_artifact_mb)
        tracking.end_run(run_id)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    return {**out.manifest, "cached": False}


# ----------------------------------------------------------------------------------- data


def source_fingerprint(src: DatasetSource) -> str:
    """Content fingerprint of a data source: file bytes, or the hub id pinned by revision.

    The demo's rows are a pure function of its config, which is already part of the key.
    """
    if src.path == "demo":
        return "demo"
    parts = []
    for p in (src.path, src.eval_path):
        if p is None:
            continue
        parts.append(
            fingerprint_file(p)
            if Path(p).is_file()
            else artifacts.hash_json([p, src.split, src.subset, src.revision])
        )
    return artifacts.hash_json(parts)


def data_stage_key(cfg: PipelineConfig) -> str:
    return artifacts.stage_key(
        "data", _dump(cfg.data), data_fingerprint=source_fingerprint(cfg.data.sft)
    )


def _load_sft_rows(cfg: PipelineConfig) -> tuple[list[dict], list[dict], dict]:
    """Train and eval rows of the SFT dataset, validated; plus a report of what was dropped."""
    d, src = cfg.data, cfg.data.sft
    if src.path == "demo":
        train = demo.generate_sft(d.demo, d.seed, "train")
        held = demo.generate_sft(d.demo, d.seed, "eval")
        sources = [("demo:sft/train", train), ("demo:sft/eval", held)]
    else:
        rows = load_rows(src.path, split=src.split, subset=src.subset, revision=src.revision)
        if d.max_rows:
            rows = rows[: d.max_rows]
        if src.eval_path:
            held = _load_eval_source(src)
            sources = [(src.path, rows), (src.eval_path, held)]
        else:
            sources = [(src.path, rows)]
    report: dict = {}
    validated = []
    for name, rows in sources:
        if not rows:
            raise DataError(f"{name}: no rows")
        fmt = detect_format(rows, name)
        good, rep = validate_rows(
            rows,
            fmt,
            source=name,
            on_bad_rows=d.on_bad_rows,
            max_drop_fraction=d.max_drop_fraction,
            allowed_formats=SFT_FORMATS,
        )
        report[name] = {**rep, "format": fmt}
        validated.append(good)
    if len(validated) == 1:
        train, held = split_rows(validated[0], d.eval_fraction, d.seed)
    else:
        train, held = validated
    return train, held, report


def _load_eval_source(src: DatasetSource) -> list[dict]:
    """eval_path is a local file, or else the name of another split of the same hub dataset."""
    if Path(src.eval_path).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        return load_rows(src.eval_path)
    return load_rows(src.path, split=src.eval_path, subset=src.subset, revision=src.revision)


def run_data_stage(cfg: PipelineConfig, *, parent_run_id: str | None = None) -> dict:
    """Load, validate and split the datasets; store them as JSONL in the data artifact."""
    key = data_stage_key(cfg)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        train, held, report = _load_sft_rows(cfg)
        write_jsonl(train, out.dir / "sft_train.jsonl")
        write_jsonl(held, out.dir / "sft_eval.jsonl")
        (out.dir / "report.json").write_text(json.dumps(report, indent=2))
        fingerprint = fingerprint_rows(train + held)
        out.meta["datasets"] = {
            "sft": {"train_rows": len(train), "eval_rows": len(held), "fingerprint": fingerprint}
        }
        out.meta["checker"] = "demo" if cfg.data.sft.path == "demo" else None
        for context, rows in (("training", train), ("evaluation", held)):
            tracking.log_dataset(
                run_id, rows, name=f"sft-{context}", source=cfg.data.sft.path,
                digest=fingerprint, context=context,
            )
        dropped = sum(r.get("rows_in", 0) - r.get("rows_out", 0) for r in report.values())
        return {"train_rows": len(train), "eval_rows": len(held), "dropped_rows": dropped}

    return run_stage(cfg, "data", key, {"data": _dump(cfg.data)}, body, parent_run_id=parent_run_id)


# ------------------------------------------------------------------------------------ sft


def sft_stage_key(cfg: PipelineConfig, data_manifest: dict) -> str:
    return artifacts.stage_key(
        "sft",
        {"model": _dump(cfg.model), "sft": _dump(cfg.sft)},
        upstream={"data": _digest(data_manifest)},
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
    params = {"model": _dump(cfg.model), "sft": _dump(cfg.sft)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.models import apply_lora, load_causal_lm, load_tokenizer, save_model
        from posttrain.recipes import sft

        data_dir = Path(data_manifest["path"])
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model)
        if cfg.model.lora is not None:
            model = apply_lora(model, cfg.model.lora)
        s = cfg.sft
        train, report = _tokenize(read_jsonl(data_dir / "sft_train.jsonl"), tokenizer,
                                  "sft_train.jsonl", s)
        held, _ = _tokenize(read_jsonl(data_dir / "sft_eval.jsonl"), tokenizer, "sft_eval.jsonl", s)
        (out.dir / "tokenization.json").write_text(json.dumps(report, indent=2))
        logger = tracking.MetricLogger(run_id)
        ckpt = Path(cfg.artifacts_root) / "sft" / f"{key}.checkpoints"
        try:
            final = sft.train(model, train, held, s, pad_token_id=tokenizer.pad_token_id,
                              log_metrics=logger, checkpoint_dir=ckpt)
        finally:
            logger.flush()
        save_model(model, tokenizer, out.dir / "model")
        out.meta["base_model"] = cfg.model.name_or_path
        dropped = report["dropped_too_long"] + report["dropped_no_loss"]
        return {**final, "train_examples": len(train), "dropped_for_length": dropped}

    return run_stage(cfg, "sft", key, params, body, parent_run_id=parent_run_id)


# ------------------------------------------------------------------------------- evaluate


def eval_stage_key(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict]) -> str:
    return artifacts.stage_key(
        "evaluate",
        {"evaluate": _dump(cfg.evaluate), "model": _dump(cfg.model), "max_length": cfg.sft.max_length},
        upstream={"data": _digest(data_manifest),
                  **{name: _digest(m) for name, m in candidates.items()}},
    )


def run_eval_stage(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict], *,
                   parent_run_id: str | None = None) -> dict:
    """Evaluate the base model and every candidate stage on the same held-out prompts."""
    key = eval_stage_key(cfg, data_manifest, candidates)
    params = {"evaluate": _dump(cfg.evaluate), "candidates": sorted(candidates)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.evaluate import evaluate_model
        from posttrain.models import load_causal_lm, load_tokenizer, load_trained

        rows = read_jsonl(Path(data_manifest["path"]) / "sft_eval.jsonl")
        rows = rows[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts else rows
        checker = _checker(data_manifest)
        tokenizer = load_tokenizer(cfg.model)
        models = {"base": lambda: load_causal_lm(cfg.model)}
        for name, m in candidates.items():
            models[name] = lambda m=m: load_trained(Path(m["path"]) / "model")
        results: dict[str, dict] = {}
        for name, load in models.items():
            metrics, samples = evaluate_model(
                load(), tokenizer, rows, max_new_tokens=cfg.evaluate.max_new_tokens,
                batch_size=cfg.evaluate.batch_size, max_length=cfg.sft.max_length,
                num_samples=cfg.evaluate.num_samples, checker=checker,
            )
            results[name] = metrics
            tracking.log_metrics(run_id, {f"{name}/{k}": v for k, v in metrics.items()})
            tracking.log_table(run_id, samples, f"samples/{name}.json")
            (out.dir / f"samples_{name}.json").write_text(json.dumps(samples, indent=2))
        (out.dir / "comparison.json").write_text(json.dumps(results, indent=2))
        out.meta["comparison"] = results
        return {f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}

    return run_stage(cfg, "evaluate", key, params, body, parent_run_id=parent_run_id)


def _checker(data_manifest: dict):
    if data_manifest.get("checker") == "demo":
        return lambda prompt, completion: demo.check(demo.prompt_text(prompt), completion)
    return None
