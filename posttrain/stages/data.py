"""Data preparation: load each configured dataset, validate it, split it, store it as JSONL.

The stage's key hashes the data config and the CONTENT of every source (file bytes, or a hub id
pinned by revision), so one changed row re-runs everything downstream and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import DatasetSource, PipelineConfig
from posttrain.data import demo
from posttrain.data.loading import (
    DataError,
    fingerprint_file,
    fingerprint_rows,
    load_rows,
    split_rows,
    write_jsonl,
)
from posttrain.data.validation import detect_format, validate_rows
from posttrain.stages.common import dump, run_stage

FORMATS = {
    "sft": ("language_modeling", "prompt_completion"),
    "preference": ("preference", "preference_implicit"),
    "kto": ("unpaired_preference",),
    "prompts": ("prompt_only",),
}
_DEMO = {"sft": demo.generate_sft, "preference": demo.generate_preference,
         "kto": demo.generate_kto, "prompts": demo.generate_prompts}
ONLINE = ("grpo", "ppo")


def sources(cfg: PipelineConfig) -> dict[str, DatasetSource]:
    """The datasets this pipeline needs, by kind."""
    out = {"sft": cfg.data.sft}
    if cfg.data.preference is not None:
        out["preference"] = cfg.data.preference
    if "kto" in cfg.methods and cfg.data.kto is not None:
        out["kto"] = cfg.data.kto
    if any(m in cfg.methods for m in ONLINE) and cfg.data.prompts is not None:
        out["prompts"] = cfg.data.prompts
    return out


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
    fingerprints = {kind: source_fingerprint(src) for kind, src in sources(cfg).items()}
    config = {"data": dump(cfg.data), "kto_converted": "kto" in cfg.methods,
              "prompts_from_sft": any(m in cfg.methods for m in ONLINE)}
    return artifacts.stage_key("data", config, data_fingerprint=artifacts.hash_json(fingerprints))


def _load_eval_source(src: DatasetSource) -> list[dict]:
    """eval_path is a local file, or else the name of another split of the same hub dataset."""
    if Path(src.eval_path).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        return load_rows(src.eval_path)
    return load_rows(src.path, split=src.eval_path, subset=src.subset, revision=src.revision)


def _raw(cfg: PipelineConfig, kind: str, src: DatasetSource) -> list[tuple[str, list[dict]]]:
    """(name, rows) of a source: one entry to split, or separate train and eval entries."""
    d = cfg.data
    if src.path == "demo":
        return [(f"demo:{kind}/{split}", _DEMO[kind](d.demo, d.seed, split))
                for split in ("train", "eval")]
    rows = load_rows(src.path, split=src.split, subset=src.subset, revision=src.revision)
    rows = rows[: d.max_rows] if d.max_rows else rows
    if src.eval_path:
        return [(src.path, rows), (src.eval_path, _load_eval_source(src))]
    return [(src.path, rows)]


def load_dataset(cfg: PipelineConfig, kind: str, src: DatasetSource):
    """Validated train and eval rows of one dataset, and a report of what was dropped."""
    d = cfg.data
    report: dict = {}
    validated = []
    for name, rows in _raw(cfg, kind, src):
        if not rows:
            raise DataError(f"{name}: no rows")
        fmt = detect_format(rows, name)
        good, rep = validate_rows(
            rows, fmt, source=name, on_bad_rows=d.on_bad_rows,
            max_drop_fraction=d.max_drop_fraction, allowed_formats=FORMATS[kind],
        )
        report[name] = {**rep, "format": fmt}
        validated.append(good)
    if len(validated) == 1:
        train, held = split_rows(validated[0], d.eval_fraction, d.seed)
    else:
        train, held = validated
    return train, held, report


def _convert_pairs(train: list[dict], held: list[dict], seed: int):
    """KTO rows from preference pairs, shuffled so a batch rarely holds both halves of a pair."""
    import random

    from posttrain.data.preference import pairs_to_unpaired  # imports torch

    out = []
    for i, rows in enumerate((train, held)):
        unpaired = pairs_to_unpaired(rows)
        random.Random(seed + i).shuffle(unpaired)
        out.append(unpaired)
    return out


def _prompts_from_sft(train: list[dict], held: list[dict]) -> list[list[dict]]:
    """Prompt-only rows (prompt plus extra columns) from prompt-completion SFT rows."""
    out = []
    for rows in (train, held):
        if rows and "prompt" not in rows[0]:
            raise DataError(
                "GRPO/PPO need prompts: set data.prompts, or use prompt-completion SFT data "
                "(the SFT dataset has no 'prompt' column)"
            )
        out.append([{k: v for k, v in r.items() if k != "completion"} for r in rows])
    return out


def run_data_stage(cfg: PipelineConfig, *, parent_run_id: str | None = None) -> dict:
    """Load, validate and split every dataset; store them as `<kind>_{train,eval}.jsonl`."""
    key = data_stage_key(cfg)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        datasets, reports, metrics = {}, {}, {}
        splits = {}
        for kind, src in sources(cfg).items():
            train, held, reports[kind] = load_dataset(cfg, kind, src)
            splits[kind] = (train, held, src.path)
        if "kto" in cfg.methods and "kto" not in splits:
            train, held, path = splits["preference"]
            splits["kto"] = (*_convert_pairs(train, held, cfg.data.seed), f"{path} (converted)")
        if any(m in cfg.methods for m in ONLINE) and "prompts" not in splits:
            train, held, path = splits["sft"]
            splits["prompts"] = (*_prompts_from_sft(train, held), f"{path} (prompts)")
        for kind, (train, held, path) in splits.items():
            write_jsonl(train, out.dir / f"{kind}_train.jsonl")
            write_jsonl(held, out.dir / f"{kind}_eval.jsonl")
            fingerprint = fingerprint_rows(train + held)
            datasets[kind] = {"train_rows": len(train), "eval_rows": len(held),
                              "fingerprint": fingerprint, "source": path}
            metrics[f"{kind}_train_rows"] = len(train)
            metrics[f"{kind}_eval_rows"] = len(held)
            for context, rows in (("training", train), ("evaluation", held)):
                tracking.log_dataset(run_id, rows, name=f"{kind}-{context}", source=path,
                                     digest=fingerprint, context=context)
        (out.dir / "report.json").write_text(json.dumps(reports, indent=2))
        out.meta["datasets"] = datasets
        out.meta["checker"] = "demo" if cfg.data.sft.path == "demo" else None
        metrics["dropped_rows"] = sum(
            r.get("rows_in", 0) - r.get("rows_out", 0)
            for kind_report in reports.values() for r in kind_report.values()
        )
        return metrics

    return run_stage(cfg, "data", key, {"data": dump(cfg.data)}, body,
                     parent_run_id=parent_run_id)
