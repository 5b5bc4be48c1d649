"""KTO recipe on the tiny model: mismatched partners are a seeded derangement, KL rows pair each
prompt with its partner's completion, the reference modes agree, training moves the weights, and
a batch of one is refused by the stage config and by the pipeline config."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from posttrain.config import (
    ConfigError,
    DemoTaskConfig,
    KTOConfig,
    LoraConfig,
    TinyModelConfig,
    load_pipeline_config,
)
from posttrain.data import demo
from posttrain.data.preference import tokenize_unpaired_rows
from posttrain.losses.kto import kto_loss
from posttrain.models import apply_lora, build_tiny_model
from posttrain.recipes import kto
from posttrain.training import reference_runner

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
LORA = LoraConfig(r=4, alpha=8)


@pytest.fixture(scope="module")
def examples(tokenizer):
    cfg = DemoTaskConfig(num_train=100, num_eval=10)
    out = {}
    for split in ("train", "eval"):
        out[split], report = tokenize_unpaired_rows(
            demo.generate_kto(cfg, 0, split), tokenizer, max_length=48
        )
        assert report["desirable"] == report["undesirable"]
    return out


def _lora_policy(tokenizer):
    """peft draws lora_A from the global RNG: seeding first makes every call build the same one."""
    torch.manual_seed(0)
    return apply_lora(build_tiny_model(TINY, tokenizer), LORA)


# ------------------------------------------------------------------------- partners, collate


def _distinct(n):
    """n examples whose completions identify them: completion of i is [100 + i]."""
    return [{"prompt_ids": [1, i], "completion_ids": [100 + i], "label": i % 2 == 0}
            for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 10, 57])
def test_assign_partners_is_a_seeded_derangement(n):
    examples = _distinct(n)
    out = kto.assign_partners(examples, seed=4)
    partners = [ex["kl_completion_ids"][0] - 100 for ex in out]
    assert all(p != i for i, p in enumerate(partners)), "no example is its own partner"
    assert sorted(partners) == list(range(n)), "every completion serves as a partner once"
    assert [{k: v for k, v in ex.items() if k != "kl_completion_ids"} for ex in out] == examples
    assert "kl_completion_ids" not in examples[0]  # the input rows are not modified
    assert kto.assign_partners(examples, seed=4) == out  # deterministic by seed
    if n >= 10:
        assert kto.assign_partners(examples, seed=5) != out


def test_assign_partners_needs_two_examples():
    with pytest.raises(ValueError, match="at least two examples"):
        kto.assign_partners(_distinct(1), seed=0)


def test_collate_kl_rows_are_prompt_plus_partner_completion(examples, tokenizer):
    pad = tokenizer.pad_token_id
    chunk = kto.assign_partners(examples["train"][:40], seed=0)[:6]
    batch = kto.collate(chunk, pad)
    assert batch["labels"].tolist() == [ex["label"] for ex in chunk]
    for i, ex in enumerate(chunk):
        main = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert main == ex["prompt_ids"] + ex["completion_ids"]
        row = batch["kl_input_ids"][i]
        assert row[batch["kl_attention_mask"][i].bool()].tolist() == (
            ex["prompt_ids"] + ex["kl_completion_ids"]
        )
        assert row[batch["kl_completion_mask"][i].bool()].tolist() == ex["kl_completion_ids"]
    # the partner need not be in the batch: that is what makes the KL rows precomputable
    in_batch = [ex["completion_ids"] for ex in chunk]
    assert any(ex["kl_completion_ids"] not in in_batch for ex in chunk)


# -------------------------------------------------------------------------------- reference


def test_reference_modes_give_the_same_loss(examples, tokenizer):
    """Policy != reference (adapter perturbed after the references were fixed): precomputed,
    frozen-copy and adapter-disabled reference log-probs, main and KL rows, agree, and so does
    the loss."""
    pad = tokenizer.pad_token_id
    policy = _lora_policy(tokenizer)
    chunk = kto.assign_partners(examples["train"][:8], seed=0)
    pre = kto.precompute_reference(policy, chunk, pad_token_id=pad, batch_size=3)
    copy_ref = reference_runner("copy", policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter_ref = reference_runner("adapter", policy)

    batch = kto.collate(pre, pad)
    policy.eval()
    with torch.no_grad():
        refs = {"precomputed": kto._reference_logps(None, batch),
                "copy": kto._reference_logps(copy_ref, batch),
                "adapter": kto._reference_logps(adapter_ref, batch)}
        logps, kl_logps = kto._logps(policy, batch), kto._logps(policy, batch, "kl_")
    losses = {}
    for mode, (ref, kl_ref) in refs.items():
        torch.testing.assert_close(ref, refs["precomputed"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(kl_ref, refs["precomputed"][1], atol=1e-5, rtol=0)
        losses[mode], metrics = kto_loss(logps, ref, batch["labels"], kl_logps, kl_ref)
        assert float(metrics["kl"]) >= 0
    assert float(losses["copy"]) == pytest.approx(float(losses["precomputed"]), abs=1e-6)
    assert float(losses["adapter"]) == pytest.approx(float(losses["precomputed"]), abs=1e-6)
    assert not torch.allclose(logps, refs["precomputed"][0], atol=1e-3), "policy != reference"


def test_precomputed_and_copy_training_trajectories_agree(examples, tokenizer):
    runs = {}
    for mode in ("precomputed", "copy"):
        policy = build_tiny_model(TINY, tokenizer)
        _, history = _train(policy, examples, tokenizer, max_steps=5, eval_every=5,
                            reference=mode)
        runs[mode] = ([m["loss"] for m in history], [m["kl"] for m in history],
                      [p.detach().clone() for p in policy.parameters()])
    (loss_a, kl_a, w_a), (loss_b, kl_b, w_b) = runs["precomputed"], runs["copy"]
    assert loss_a[0] == pytest.approx(0.5, abs=1e-6)  # r = z_ref = 0: 1 - σ(0) for every row
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert kl_b == pytest.approx(kl_a, abs=1e-5)
    assert loss_a[-1] != pytest.approx(0.5, abs=1e-4)
    for a, b in zip(w_a, w_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------- training


def _train(policy, examples, tokenizer, **overrides):
    cfg = KTOConfig(**{"max_steps": 10, "per_device_batch_size": 8, "learning_rate": 3e-3,
                       "warmup_steps": 1, "eval_every": 10, "log_every": 1, **overrides})
    history: list[dict] = []
    final = kto.train(policy, examples["train"], examples["eval"], cfg,
                      pad_token_id=tokenizer.pad_token_id,
                      log_metrics=lambda m, s: history.append(dict(m)))
    return final, history


def test_kto_training_changes_parameters_with_finite_loss(examples, tokenizer):
    policy = build_tiny_model(TINY, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    final, history = _train(policy, examples, tokenizer)
    assert len(history) == 10
    assert all(math.isfinite(m["loss"]) and 0.0 <= m["loss"] <= 1.0 for m in history)
    assert all(m["kl"] >= 0 for m in history)
    assert set(final) >= {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                          "eval_loss", "grad_norm"}
    assert math.isfinite(final["eval_loss"])
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_kto_with_lora_adapter_reference_trains_only_the_adapter(examples, tokenizer):
    policy = _lora_policy(tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _, history = _train(policy, examples, tokenizer, max_steps=3, eval_every=3,
                        reference="adapter")
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, before[name])
        elif "lora_" not in name:
            assert torch.equal(p, before[name])


# ---------------------------------------------------------------------------------- config


def test_batch_of_one_is_refused_by_the_stage_config():
    with pytest.raises(ValidationError, match="per_device_batch_size"):
        KTOConfig(per_device_batch_size=1)
    assert KTOConfig(per_device_batch_size=2).per_device_batch_size == 2


def test_batch_of_one_is_refused_by_the_pipeline_config():
    with pytest.raises(ConfigError, match=r"stages\.kto") as err:
        load_pipeline_config(None, ["stages.kto.per_device_batch_size=1"])
    assert "per_device_batch_size" in str(err.value)
