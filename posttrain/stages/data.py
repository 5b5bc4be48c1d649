"""Data preparation: load each data source a stage reads, validate it, split it, store it as
JSONL.

The stage's key hashes the sources' configs and CONTENT (file bytes, or a hub id pinned by
revision). Each training stage's key holds the fingerprint of its own source's rows only, so one
changed row re-runs the stages that read that source and what starts from them, nothing else.
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
from posttrain.data.validation import FORMATS, detect_format, validate_rows
from posttrain.methods import method
from posttrain.stages.common import dump, run_stage
from posttrain.vision import demo as vision_demo
from posttrain.vision.images import has_images, referenced_files, store_images

_DEMO = {"demo:sft": demo.generate_sft, "demo:preference": demo.generate_preference,
         "demo:kto": demo.generate_kto, "demo:prompts": demo.generate_prompts}
_VISION_DEMO = {"demo:vision-sft": "generate_sft", "demo:vision-preference": "generate_preference"}


def checker_of(src: DatasetSource) -> str | None:
    """Which built-in checker scores completions of the source's prompts: 'demo' (the text
    tasks), 'vision-demo' (the image task: the row's `answer`), None (no verifiable answer)."""
    if src.path in _VISION_DEMO:
        return "vision-demo"
    return "demo" if src.is_demo else None


def sources(cfg: PipelineConfig) -> dict[str, DatasetSource]:
    """The data sources some stage or the evaluation reads, by name; nothing else is loaded."""
    return {name: cfg.data[name] for name in cfg.used_sources}


def allowed_formats(cfg: PipelineConfig, name: str) -> tuple[str, ...] | None:
    """The formats every reader of source `name` accepts (the intersection over the stages
    that read it); None when only the evaluation reads it (any format with prompts)."""
    allowed = None
    for s in cfg.stages:
        if s.data == name:
            formats = set(method(s).formats)
            allowed = formats if allowed is None else allowed & formats
    return None if allowed is None else tuple(f for f in FORMATS if f in allowed)


def source_fingerprint(src: DatasetSource) -> str:
    """Content fingerprint of a data source: file bytes, or the hub id pinned by revision.

    The demo's rows are a pure function of its config, which is already part of the key.
    The image files a local file's rows name (an `images` column of paths) count by path,
    size and modification time, so an edited image re-runs the stage without every image being
    read at each start; the data stage then hashes their pixels (posttrain.vision.images).
    """
    if src.is_demo:
        return src.path
    parts = []
    for p in (src.path, src.eval_path):
        if p is None:
            continue
        if Path(p).is_file():
            parts.append([fingerprint_file(p), _image_files(p)])
        else:
            parts.append(artifacts.hash_json([p, src.split, src.subset, src.revision]))
    return artifacts.hash_json(parts)


def _image_files(path: str) -> list | None:
    """(path, size, mtime_ns) of the image files a local data file's rows name; None when its
    rows have no `images` column (text data: the key is what it was before image data)."""
    if Path(path).suffix.lower() not in (".jsonl", ".json"):
        return None  # Parquet holds its images' bytes: the file's own hash covers them
    rows = load_rows(path)
    if not any("images" in r for r in rows):
        return None
    stats = []
    for f in referenced_files(rows, Path(path).parent):
        st = f.stat() if f.is_file() else None
        stats.append([str(f), st.st_size if st else None, st.st_mtime_ns if st else None])
    return stats


def data_stage_key(cfg: PipelineConfig) -> str:
    used = sources(cfg)
    fingerprints = {name: source_fingerprint(src) for name, src in used.items()}
    config = {"data": {name: dump(src) for name, src in used.items()},
              "formats": {name: allowed_formats(cfg, name) for name in used},
              "demo": dump(cfg.demo) if any(src.path in _DEMO for src in used.values())
              else None}
    if any(src.path in _VISION_DEMO for src in used.values()):
        config["vision_demo"] = dump(cfg.vision_demo)
    return artifacts.stage_key("data", config, data_fingerprint=artifacts.hash_json(fingerprints))


def _load_eval_source(src: DatasetSource) -> list[dict]:
    """eval_path is a local file, or else the name of another split of the same hub dataset."""
    if Path(src.eval_path).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        return load_rows(src.eval_path)
    return load_rows(src.path, split=src.eval_path, subset=src.subset, revision=src.revision)


def _raw(cfg: PipelineConfig, name: str, src: DatasetSource) -> list[tuple[str, list[dict]]]:
    """(label, rows) of a source: one entry to split, or separate train and eval entries."""
    if src.path in _VISION_DEMO:
        generate = getattr(vision_demo, _VISION_DEMO[src.path])
        return [(f"{src.path}/{split}", generate(cfg.vision_demo, split))
                for split in ("train", "eval")]
    if src.is_demo:
        return [(f"{src.path}/{split}", _DEMO[src.path](cfg.demo, cfg.demo.seed, split))
                for split in ("train", "eval")]
    rows = load_rows(src.path, split=src.split, subset=src.subset, revision=src.revision)
    rows = rows[: src.max_rows] if src.max_rows else rows
    if src.eval_path:
        return [(src.path, rows), (src.eval_path, _load_eval_source(src))]
    return [(src.path, rows)]


def load_dataset(cfg: PipelineConfig, name: str, src: DatasetSource,
                 image_dir: Path | None = None):
    """Validated train and eval rows of one source, its format, and a report of what was
    dropped. A format that a stage reading the source cannot take is a DataError naming them.
    Rows with images have them checked and named by content (posttrain.vision.images), and
    written to `image_dir` when given (the data stage; preflight only checks)."""
    report: dict = {}
    validated, fmt = [], None
    allowed = allowed_formats(cfg, name)
    for label, rows in _raw(cfg, name, src):
        if not rows:
            raise DataError(f"data.{name} ({label}): no rows")
        fmt = detect_format(rows, label)
        if allowed is not None and fmt not in allowed:
            refusing = [f"{s.name} ({s.method}) takes {' or '.join(method(s).formats)}"
                        for s in cfg.stages if s.data == name and fmt not in method(s).formats]
            raise DataError(
                f"data.{name} ({label}): rows are in the {fmt} format, but stage "
                f"{'; stage '.join(refusing)} (see ALGORITHMS.md, 'Data formats')")
        good, rep = validate_rows(
            rows, fmt, source=label, on_bad_rows=src.on_bad_rows,
            max_drop_fraction=src.max_drop_fraction,
        )
        if has_images(good):
            good, image_report = store_images(
                good, source=label, base_dir=_folder_of(label), out_dir=image_dir,
                on_bad_rows=src.on_bad_rows, max_drop_fraction=src.max_drop_fraction)
            rep = {**rep, "images": image_report}
        report[label] = {**rep, "format": fmt}
        validated.append(good)
    if len(validated) == 1:
        train, held = split_rows(validated[0], src.eval_fraction, src.seed)
    else:
        train, held = validated
    return train, held, fmt, report


def _folder_of(label: str) -> Path | None:
    """The folder relative image paths of a local data file are read from."""
    return Path(label).expanduser().parent if Path(label).expanduser().is_file() else None


def run_data_stage(cfg: PipelineConfig, *, parent_run_id: str | None = None) -> dict:
    """Load, validate and split every source the stages read; store `<name>_{train,eval}.jsonl`
    with each source's format and content fingerprint in the manifest."""
    key = data_stage_key(cfg)

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        datasets, reports, metrics = {}, {}, {}
        for name, src in sources(cfg).items():
            train, held, fmt, reports[name] = load_dataset(cfg, name, src, image_dir=out.dir)
            write_jsonl(train, out.dir / f"{name}_train.jsonl")
            write_jsonl(held, out.dir / f"{name}_eval.jsonl")
            fingerprint = fingerprint_rows(train + held)
            datasets[name] = {"train_rows": len(train), "eval_rows": len(held), "format": fmt,
                              "fingerprint": fingerprint, "source": src.path,
                              "checker": checker_of(src), "images": has_images(train)}
            metrics[f"{name}_train_rows"] = len(train)
            metrics[f"{name}_eval_rows"] = len(held)
            for context, rows in (("training", train), ("evaluation", held)):
                tracking.log_dataset(run_id, rows, name=f"{name}-{context}", source=src.path,
                                     digest=fingerprint, context=context)
        (out.dir / "report.json").write_text(json.dumps(reports, indent=2))
        out.meta["datasets"] = datasets
        metrics["dropped_rows"] = sum(
            r.get("rows_in", 0) - r.get("rows_out", 0)
            for source_report in reports.values() for r in source_report.values()
        )
        return metrics

    params = {name: dump(src) for name, src in sources(cfg).items()}
    return run_stage(cfg, "data", key, params, body, parent_run_id=parent_run_id)
