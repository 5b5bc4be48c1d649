"""No double work: two pipeline runs triggered at once train each stage once; the second waits
on the stage lock and then hits the cache."""

from __future__ import annotations

import threading

import pytest

from posttrain.config import PipelineConfig, validate
from tests.conftest import SFT_STAGE, tiny_pipeline_values


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_two_concurrent_runs_train_each_stage_once(tmp_path, monkeypatch):
    from pipelines.flows import pipeline
    from posttrain.recipes import sft

    calls = []
    real = sft.train

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "train", counting)
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, [{**SFT_STAGE, "max_steps": 30}], promotion={"enabled": False}))
    results, errors = [], []

    def trigger():
        try:
            results.append(pipeline(cfg))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and len(results) == 2
    assert len(calls) == 1  # SFT trained once in total
    statuses = sorted(r["stages"][1]["status"] for r in results)
    assert statuses == ["cached", "ran"]
