"""Non-finite guard: a NaN/inf loss or gradient skips the step; after N in a row the stage fails,
its MLflow run is FAILED with the reason, and no NaN weights are saved."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import stages, tracking
from posttrain.config import DemoTaskConfig, PipelineConfig, SFTConfig, TinyModelConfig, validate
from posttrain.data import demo
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.recipes import sft
from posttrain.training import NonFiniteError, NonFiniteGuard
from tests.conftest import SFT_STAGE, tiny_pipeline_values


def test_guard_skips_then_fails_after_n_in_a_row():
    guard = NonFiniteGuard(3)
    assert guard.allows(1.0, 2.0)
    assert not guard.allows(math.nan, 1.0)
    assert not guard.allows(1.0, math.inf)
    assert guard.allows(0.5, 0.5)  # a finite step resets the run of bad ones
    assert not guard.allows(math.nan, 0.0) and not guard.allows(math.nan, 0.0)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        guard.allows(math.nan, 0.0)
    assert guard.skipped == 5


def _nan_on(calls: set[int]):
    real = sft.sft_loss
    count = {"n": 0}

    def loss(*args):
        count["n"] += 1
        out, m = real(*args)
        if count["n"] in calls:
            return out * math.nan, {**m, "loss_sum": m["loss_sum"] * math.nan}
        return out, m

    return loss


def test_a_nan_step_is_skipped_and_changes_nothing(monkeypatch):
    tok = build_tiny_tokenizer()
    rows = demo.generate_sft(DemoTaskConfig(), 0, "train")[:64]
    examples, _ = tokenize_sft_rows(rows, tok, max_length=48)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok)
    snapshots = []
    monkeypatch.setattr(sft, "sft_loss", _nan_on({2}))
    cfg = SFTConfig(max_steps=3, per_device_batch_size=4, warmup_steps=0, max_length=48,
                    eval_every=100, log_every=1, packing=False)
    history = []

    def log(metrics, step):
        history.append(metrics)
        snapshots.append([p.detach().clone() for p in model.parameters()])

    sft.train(model, examples, examples[:4], cfg, pad_token_id=tok.pad_token_id, log_metrics=log)
    assert [m["skipped_steps"] for m in history] == [0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2: no-op
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_diverged_stage_fails_saves_nothing_and_marks_mlflow(tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "sft_loss", _nan_on(set(range(1, 10_000))))
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, stages=[{**SFT_STAGE, "max_nonfinite_steps": 2}]))
    data = stages.run_data_stage(cfg)
    with pytest.raises(NonFiniteError):
        stages.run_training_stage(cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))
    assert not list((tmp_path / "artifacts").glob("sft/*/manifest.json"))  # nothing saved
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    run = c.search_runs([exp.experiment_id], "tags.`posttrain.stage` = 'sft'")[0]
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["posttrain.failure"]
