"""Out-of-memory back-off: half the micro-batch, twice the accumulation, recorded."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.training import halve_micro_batch, is_out_of_memory, with_oom_backoff


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_backoff_keeps_the_effective_batch_and_records_each_change():
    seen, changes = [], []

    def run(cfg):
        seen.append((cfg.per_device_batch_size, cfg.grad_accum))
        if cfg.per_device_batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "trained"

    cfg = SFTConfig(per_device_batch_size=32, grad_accum=1)
    out = with_oom_backoff(run, cfg, lambda old, new: changes.append(
        (old.per_device_batch_size, new.per_device_batch_size, new.grad_accum)))
    assert out == "trained"
    assert seen == [(32, 1), (16, 2), (8, 4)]
    assert all(b * g == 32 for b, g in seen)
    assert changes == [(32, 16, 2), (16, 8, 4)]


def test_backoff_gives_up_at_one_and_never_hides_other_errors():
    def always_oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        with_oom_backoff(always_oom, SFTConfig(per_device_batch_size=2), lambda o, n: None)
    assert halve_micro_batch(SFTConfig(per_device_batch_size=1)) is None

    def bug(cfg):
        raise KeyError("not memory")

    with pytest.raises(KeyError):
        with_oom_backoff(bug, SFTConfig(per_device_batch_size=8), lambda o, n: None)


def test_sft_stage_backs_off_after_an_oom_and_records_it(tmp_path, monkeypatch):
    import json

    from posttrain import stages, tracking
    from posttrain.config import PipelineConfig, validate
    from posttrain.recipes import sft
    from tests.conftest import SFT_STAGE, tiny_pipeline_values

    real = sft.train
    sizes = []

    def small_gpu(model, train, held, cfg, **kw):
        sizes.append((cfg.per_device_batch_size, cfg.grad_accum))
        if cfg.per_device_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, train, held, cfg, **kw)

    monkeypatch.setattr(sft, "train", small_gpu)
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, stages=[{**SFT_STAGE, "per_device_batch_size": 8}]))
    data = stages.run_data_stage(cfg)
    manifest = stages.run_training_stage(cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))
    assert sizes == [(8, 1), (4, 2), (2, 4)]
    assert manifest["oom_backoff"][-1] == {"per_device_batch_size": [4, 2], "grad_accum": [2, 4]}
    run = tracking.client().get_run(manifest["mlflow_run_id"])
    assert json.loads(run.data.tags["posttrain.oom_backoff"])[0]["per_device_batch_size"] == [8, 4]


def test_grpo_micro_batches_only_shrink_to_whole_groups():
    from posttrain.config import GRPOConfig

    cfg = GRPOConfig(per_device_batch_size=32, num_generations=8)
    smaller = halve_micro_batch(cfg, cfg.num_generations)
    assert (smaller.per_device_batch_size, smaller.grad_accum) == (16, 2)
    assert halve_micro_batch(halve_micro_batch(smaller, 8), 8) is None  # 8 -> 4 splits a group
    assert halve_micro_batch(halve_micro_batch(smaller, 1), 1).per_device_batch_size == 4
