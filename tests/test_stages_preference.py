"""Preference stages without Prefect: bad pairs are counted, dropped where allowed, and fail the
stage above the configured share, leaving no partial artifact and a FAILED MLflow run."""

from __future__ import annotations

import json

import pytest

from posttrain import stages, tracking
from posttrain.config import PipelineConfig, validate
from posttrain.data import demo
from posttrain.data.loading import DataError, split_rows, write_jsonl
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

SMALL = {"max_steps": 2, "per_device_batch_size": 4, "warmup_steps": 0, "max_length": 48,
         "eval_every": 2}


def _pairs(n: int) -> list[dict]:
    rows = demo.generate_preference(validate(PipelineConfig, {}).demo, 0, "train")[:n]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def _cfg(tmp_path, path, **source):
    values = tiny_pipeline_values(
        tmp_path, [SFT_STAGE, stage("dpo", **SMALL)],
        data={"preference": {"path": str(path), "on_bad_rows": "drop", **source}},
    )
    return validate(PipelineConfig, values)


def _bad(rows: list[dict], identical: int, empty: int) -> list[dict]:
    rows = [dict(r) for r in rows]
    for r in rows[:identical]:
        r["rejected"] = r["chosen"]
    for r in rows[identical : identical + empty]:
        r["chosen"] = [{"role": "assistant", "content": ""}]
    return rows


def test_bad_pairs_below_the_share_are_dropped_and_reported(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(_bad(_pairs(40), identical=2, empty=1), path)
    cfg = _cfg(tmp_path, path, max_drop_fraction=0.1)
    data = stages.run_data_stage(cfg)
    report = json.loads((tmp_path / "artifacts" / "data" / data["key"] / "report.json").read_text())
    dropped = report["preference"][str(path)]["dropped"]
    assert sum(dropped.values()) == 3, dropped
    assert data["metrics"]["dropped_rows"] == 3
    assert data["datasets"]["preference"]["train_rows"] + \
        data["datasets"]["preference"]["eval_rows"] == 37


def test_bad_pairs_above_the_share_fail_the_stage_and_leave_nothing(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(_bad(_pairs(20), identical=4, empty=2), path)
    cfg = _cfg(tmp_path, path, max_drop_fraction=0.1)
    with pytest.raises(DataError) as err:
        stages.run_data_stage(cfg)
    message = str(err.value)
    assert str(path) in message and "row" in message
    data_dir = tmp_path / "artifacts" / "data"
    assert not data_dir.exists() or list(data_dir.iterdir()) == []  # no partial artifact
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = c.search_runs([exp.experiment_id], "tags.`posttrain.stage` = 'data'")
    assert runs[0].info.status == "FAILED"
    assert "DataError" in runs[0].data.tags["posttrain.failure"]


def test_over_length_pairs_are_counted_by_the_training_stage(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = _pairs(40)
    train, _ = split_rows(rows, 0.05, 0)  # the stage's own split: make a TRAINING pair too long
    i = rows.index(train[0])
    rows[i] = {**rows[i], "chosen": [{"role": "assistant", "content": "9" * 80}]}
    write_jsonl(rows, path)
    cfg = _cfg(tmp_path, path)
    dpo = stages.run_all(cfg, ["dpo"])["dpo"]
    report = json.loads((tmp_path / "artifacts" / "dpo" / dpo["key"] / "tokenization.json")
                        .read_text())
    assert report["dropped"] == {"over-length": 1}
    assert dpo["metrics"]["dropped_examples"] == 1
