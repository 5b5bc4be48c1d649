"""Packed rows compute what each example alone computes, on every attention path this machine
has: the dense block-diagonal mask (sdpa, eager), FlexAttention's document BlockMask (forward
only: no FlexAttention backward on CPU) and the flattened varlen layout that flash-attention
reads its boundaries from; the recipe picks a path, trains with it and says which."""

from __future__ import annotations

import logging

import pytest
import torch

from posttrain.config import ModelConfig, SFTConfig, TinyModelConfig
from posttrain.data.packing import collate_packed
from posttrain.logprobs import SelectedLogits, shift_targets
from posttrain.losses.sft import sft_loss
from posttrain.models import build_tiny_model, load_causal_lm, packed_attention
from posttrain.recipes import sft
from posttrain.recipes.sft import attention_mask

V = 40


def _model(attn: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn).eval()


def _bins() -> list[list[dict]]:
    """Two rows of 16: examples of 5, 3, 6 tokens (2 padding) and of 7, 4 (5 padding)."""
    g = torch.Generator().manual_seed(0)

    def example(n):
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": ids}

    return [[example(5), example(3), example(6)], [example(7), example(4)]]


def _uncompiled_flex(monkeypatch) -> None:
    """transformers compiles flex_attention on first use; on this CPU that takes ~90 s. The
    recipe never runs flex on CPU (no backward there), so the kernel's compilation is torch's
    business; what is checked here is our BlockMask and its way through transformers."""
    import transformers.integrations.flex_attention as integration
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(integration.WrappedFlexAttention, "__call__", lambda self: flex_attention)


PATHS = [
    pytest.param("dense_mask", "sdpa", id="dense_mask-sdpa"),
    pytest.param("dense_mask", "eager", id="dense_mask-eager"),
    # ~6 s: torch's flex machinery loads and traces the mask once
    pytest.param("flex_attention", "flex_attention", id="flex_attention", marks=pytest.mark.slow),
    pytest.param("varlen", "sdpa", id="varlen-sdpa"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex without torch.compile says so
@pytest.mark.parametrize(("layout", "attn"), PATHS)
def test_packed_logits_equal_each_example_alone(layout, attn, monkeypatch):
    """Through the recipe's own pieces (collate_packed's layout, attention_mask, SelectedLogits).
    varlen on sdpa: with no mask, transformers derives the block mask from the same restarting
    position ids flash-attention turns into cu_seqlens."""
    if attn == "flex_attention":
        _uncompiled_flex(monkeypatch)
    model = _model(attn)
    bins = _bins()
    batch = collate_packed(bins, pad_token_id=0, length=16, attention=layout)
    assert ("attention_mask" in batch) == (layout == "dense_mask")
    select = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        packed = SelectedLogits(model)(batch["input_ids"], attention_mask(batch, layout), select,
                                       batch["position_ids"]).reshape(2, 16, V)
        assert torch.isfinite(packed).all()  # padding rows are not NaN
        for r, examples in enumerate(bins):
            start = 0
            for e in examples:
                n = len(e["input_ids"])
                alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]  # (n, V)
                diff = (packed[r, start : start + n] - alone).abs().max().item()
                assert diff < 1e-5, (r, start, diff)
                start += n


def test_varlen_layout_is_what_flash_attention_reads():
    """transformers' flash path treats a (1, L) batch without a mask as packed when its position
    ids restart, with cu_seqlens at every 0: rows [5 3 6 | 2 pads] and [7 4 | 5 pads] give
    boundaries 0 5 8 14 15 16 | 23 27 28 29 30 31 32 (each pad a sequence of one)."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    batch = collate_packed(_bins(), pad_token_id=0, length=16, attention="varlen")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (1, 32), "labels": (1, 32), "position_ids": (1, 32), "seq_ids": (1, 32)}
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == [0, 5, 8, 14, 15, 16, 23, 27, 28, 29, 30, 31, 32] == cu_k.tolist()
    assert int(max_q) == 7
    # no row's last token predicts the next row's first: that label is -100 (an example start)
    assert batch["labels"][0, 16].item() == -100


def test_loss_and_gradients_are_the_same_for_dense_and_varlen_layouts():
    """One training forward + backward of the SFT loss in both layouts (sdpa): same loss, same
    gradients, so the varlen layout trains what the dense mask trains."""
    results = {}
    for layout in ("dense_mask", "varlen"):
        model = _model("sdpa").train()
        batch = collate_packed(_bins(), pad_token_id=0, length=16, attention=layout)
        select, targets = shift_targets(batch["labels"])
        logps, _ = SelectedLogits(model)(batch["input_ids"], attention_mask(batch, layout),
                                         select, batch["position_ids"], targets=targets)
        loss, _ = sft_loss(logps, targets.numel())
        loss.backward()
        results[layout] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    (dense, g_dense), (varlen, g_varlen) = results["dense_mask"], results["varlen"]
    assert abs(dense - varlen) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_dense, g_varlen))


def test_the_path_for_each_implementation_and_device():
    assert packed_attention("flash_attention_2", "cuda")[:2] == ("varlen", "flash_attention_2")
    assert packed_attention("flex_attention", "cuda")[:2] == ("flex_attention", "flex_attention")
    layout, implementation, why = packed_attention("flex_attention", "cpu")
    assert (layout, implementation) == ("dense_mask", "sdpa") and "no backward" in why
    assert packed_attention("flex_attention", "cpu", packing=False)[:2] == ("padded", "sdpa")
    for attn in ("sdpa", "eager"):
        assert packed_attention(attn, "cuda")[:2] == ("dense_mask", attn)
        assert packed_attention(attn, "cpu", packing=False)[:2] == ("padded", attn)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_recipe_trains_on_the_chosen_path_and_says_which(attn, tokenizer, caplog):
    """flex_attention on CPU trains with sdpa and the dense mask (FlexAttention has no backward
    here) and gets its own implementation back afterwards; the path is in the final metrics
    (so in the stage's metrics.json and manifest) and in the recipe's log, not on
    posttrain.progress (the metric lines only: a Prefect task run's log shows those)."""
    from posttrain.data import demo
    from posttrain.data.tokenize import tokenize_sft_rows

    rows = demo.generate_sft(demo.DemoTaskConfig(num_train=64, num_eval=4), 0, "train")
    examples, _ = tokenize_sft_rows(rows, tokenizer, max_length=48)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer,
                             attn_implementation=attn)
    cfg = SFTConfig(max_steps=2, per_device_batch_size=2, warmup_steps=0, max_length=48,
                    eval_every=2)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        final = sft.train(model, examples, examples[:4], cfg, pad_token_id=tokenizer.pad_token_id)
    assert final["attention"] == "dense_mask"
    assert model.config._attn_implementation == attn
    said = [r for r in caplog.records if "attention path 'dense_mask'" in r.getMessage()]
    assert [r.name for r in said] == ["posttrain.recipes.sft"], caplog.text
    progress_lines = [r.getMessage() for r in caplog.records if r.name == "posttrain.progress"]
    assert all(line.startswith("step ") for line in progress_lines), progress_lines
    padded = sft.train(model, examples, examples[:4], cfg.model_copy(update={"packing": False}),
                       pad_token_id=tokenizer.pad_token_id)
    assert padded["attention"] == "padded"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_flex_attention_loads_as_sdpa_without_cuda():
    """Every stage loads through load_causal_lm: without CUDA a flex_attention model would fail
    at its first backward pass, so it loads with sdpa."""
    cfg = ModelConfig(attn_implementation="flex_attention",
                      tiny=TinyModelConfig(hidden_size=32, intermediate_size=64))
    assert load_causal_lm(cfg).config._attn_implementation == "sdpa"
