"""SFT recipe smoke tests on the tiny model: the loss falls, parameters move, LoRA trains only
its adapter, and the selected-position LM head agrees with the plain full-logits loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import DemoTaskConfig, LoraConfig, SFTConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.packing import collate_padded
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.logprobs import SelectedLogits, shift_targets
from posttrain.losses.sft import sft_loss
from posttrain.models import apply_lora, build_tiny_model
from posttrain.recipes import sft

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = demo.generate_sft(DemoTaskConfig(num_train=400, num_eval=20), 0, "train")
    ex, report = tokenize_sft_rows(rows, tokenizer, max_length=48)
    assert report["rows_out"] == len(rows)
    return ex


def _train(model, examples, tokenizer, **overrides):
    cfg = SFTConfig(**{"max_steps": 40, "per_device_batch_size": 4, "learning_rate": 3e-3,
                       "warmup_steps": 2, "max_length": 48, "eval_every": 20, "log_every": 1,
                       **overrides})
    history: list[tuple[int, dict]] = []
    final = sft.train(model, examples, examples[:16], cfg, pad_token_id=tokenizer.pad_token_id,
                      log_metrics=lambda m, s: history.append((s, dict(m))))
    return final, history


@pytest.mark.parametrize("packing", [True, False])
def test_full_finetune_loss_falls_and_parameters_change(tokenizer, examples, packing):
    model = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    final, history = _train(model, examples, tokenizer, packing=packing)
    losses = [m["loss"] for _, m in history]
    assert [s for s, _ in history] == list(range(1, 41))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert all(
        k in final for k in ("loss", "mean_token_accuracy", "num_tokens", "learning_rate",
                             "grad_norm", "tokens_per_second", "eval_loss")
    )
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_lora_trains_the_adapter_and_freezes_the_base(tokenizer, examples):
    model = apply_lora(build_tiny_model(TINY, tokenizer), LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, examples, tokenizer, max_steps=8, eval_every=8)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"adapter {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"


def test_selected_logits_loss_equals_full_logits_loss(tokenizer, examples):
    """The fast path (LM head on loss positions only, in chunks of 7 rows) equals transformers'
    own causal-LM loss."""
    model = build_tiny_model(TINY, tokenizer).eval()
    batch = collate_padded(examples[:6], tokenizer.pad_token_id)
    select, targets = shift_targets(batch["labels"])
    logps, _ = SelectedLogits(model)(batch["input_ids"], batch["attention_mask"], select,
                                     targets=targets, chunk_size=7)
    ours, _ = sft_loss(logps, targets.numel())
    reference = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_too_few_examples_for_one_batch_is_a_clear_error(tokenizer, examples):
    model = build_tiny_model(TINY, tokenizer)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        _train(model, examples[:3], tokenizer, packing=False, max_steps=1, warmup_steps=0)


def test_recipe_runs_without_prefect(tmp_path, monkeypatch):
    """`python -m posttrain.recipes.sft --config ...` (whose `__main__` block calls
    `command_line("sft")`) trains and writes a loadable artifact."""
    from posttrain.models import load_trained
    from posttrain.stages.graph import command_line

    monkeypatch.chdir(tmp_path)
    command_line("sft", ["--config", str(ROOT / "conf/demo.yaml"), "stages.sft.max_steps=3",
                        "stages.sft.warmup_steps=0", "stages.sft.eval_every=3",
                        "demo.num_train=200", "demo.num_eval=20", f"artifacts_root={tmp_path / 'a'}",
                        "tracking.experiment=recipe-main"])
    weights = list((tmp_path / "a" / "sft").glob("*/model/model.safetensors"))
    assert len(weights) == 1
    assert load_trained(weights[0].parent).config.vocab_size == 103


def test_library_never_imports_prefect():
    """The layering rule of DESIGN.md: posttrain/ is usable without Prefect."""
    import subprocess
    import sys

    code = (
        "import sys, posttrain.stages, posttrain.recipes.sft, posttrain.evaluate; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_periodic_checkpoints_hold_safetensors_weights(tokenizer, examples, tmp_path):
    model = build_tiny_model(TINY, tokenizer)
    cfg = SFTConfig(max_steps=4, per_device_batch_size=4, warmup_steps=0, max_length=48,
                    eval_every=4, checkpoint_every=2)
    sft.train(model, examples, examples[:8], cfg, pad_token_id=tokenizer.pad_token_id,
              checkpoint_dir=tmp_path / "ckpt")
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["step-000002", "step-000004"]
    assert list((tmp_path / "ckpt" / "step-000004").glob("*.safetensors"))


def test_the_stage_records_its_attention_path_on_its_run(tmp_path):
    """The SFT stage says how packed rows kept their examples apart in its manifest and as a tag
    of its MLflow run (not as a line on posttrain.progress, whose lines are the metric lines a
    Prefect task run shows)."""
    from posttrain import stages, tracking
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import tiny_pipeline_values

    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path))
    data = stages.run_data_stage(cfg)
    manifest = stages.run_training_stage(cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))
    assert manifest["attention"] == "dense_mask" and manifest["metrics"]["attention"] == "dense_mask"
    run = tracking.client().get_run(manifest["mlflow_run_id"])
    assert run.data.tags["posttrain.attention"] == "dense_mask"
