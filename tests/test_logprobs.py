"""Chunked token log-probs and masked sequence log-probs agree with the naive full-vocab versions."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.logprobs import (
    SelectedLogits,
    position_ids_from_mask,
    sequence_logps,
    token_logps,
)
from posttrain.models import build_tiny_model, build_tiny_tokenizer

PAIRS = [("What is 2+3? ", "5<|end|>"), ("Hi", " there, friend"), ("abc", "d")]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer)
    return model.eval(), tokenizer


def _padded(tokenizer, left: bool):
    """input_ids, attention_mask, completion_mask (B, T) of PAIRS, padded on one side."""
    rows = [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in PAIRS]
    width = max(len(p) + len(c) for p, c in rows)
    ids, attn, comp = [], [], []
    for p, c in rows:
        pad = width - len(p) - len(c)
        parts = [
            (p + c, [tokenizer.pad_token_id] * pad),
            ([1] * (len(p) + len(c)), [0] * pad),
            ([0] * len(p) + [1] * len(c), [0] * pad),
        ]
        for out, (real, padding) in zip((ids, attn, comp), parts, strict=True):
            out.append(padding + real if left else real + padding)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp)


def _naive(model, ids, attn, comp):
    """Full (B, T, V) logits, log_softmax, gather next tokens, mask, sum."""
    logits = model(ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * comp[:, 1:]).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_token_logps_matches_log_softmax_gather(chunk_size):
    """10 rows in chunks of 1, 3 (3+3+3+1: a ragged last chunk) or all at once; values and
    gradients (through the custom backward) equal the plain log_softmax version."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 17)).requires_grad_()
    targets = torch.randint(0, 17, (2, 5))
    weights = torch.randn(2, 5)
    fast = token_logps(logits, targets, chunk_size=chunk_size)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), logits)
    slow = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    (g_slow,) = torch.autograd.grad((slow * weights).sum(), logits)
    assert fast.shape == (2, 5) and fast.dtype == torch.float32
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(g_fast, g_slow, atol=1e-5)


def test_token_logps_bf16_upcasts():
    """bf16 logits: the result is float32, computed from the float32 upcast of each chunk, and
    the gradient comes back in bf16."""
    torch.manual_seed(0)
    logits = torch.randn(6, 11).bfloat16().requires_grad_()
    targets = torch.randint(0, 11, (6,))
    fast = token_logps(logits, targets, chunk_size=4)
    slow = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    assert fast.dtype == torch.float32 and torch.allclose(fast, slow, atol=1e-5)
    weights = torch.randn(6)
    (fast * weights).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # The gradient is computed in float32 and rounded once: within one bf16 step (2^-8,
    # relative) of the float32 reference; computed in bf16 it is off by up to ~2% here.
    upcast = logits.detach().float().requires_grad_()
    ref = torch.log_softmax(upcast, -1).gather(-1, targets[:, None])[:, 0]
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad.float(), upcast.grad, atol=1e-6, rtol=2**-8)


def test_position_ids_from_mask():
    """Left padding starts counting at the first real token; pads get 0."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("left", [False, True])
def test_sequence_logps_matches_naive(tiny, left):
    model, tokenizer = tiny
    ids, attn, comp = _padded(tokenizer, left)
    logps, num_tokens = sequence_logps(model, ids, attn, comp)
    with torch.no_grad():
        want = _naive(model, ids, attn, comp)
    assert torch.allclose(logps, want, atol=1e-5)
    assert num_tokens.tolist() == [len(tokenizer.encode(c)) for _, c in PAIRS]


def test_left_and_right_padding_agree(tiny):
    model, tokenizer = tiny
    right, _ = sequence_logps(model, *_padded(tokenizer, left=False))
    left, _ = sequence_logps(model, *_padded(tokenizer, left=True))
    assert torch.allclose(right, left, atol=1e-5)


def test_average_and_wrapped_model(tiny):
    """average=True is sum / count; a SelectedLogits-wrapped model gives the same numbers."""
    model, tokenizer = tiny
    batch = _padded(tokenizer, left=False)
    summed, counts = sequence_logps(model, *batch)
    averaged, counts_avg = sequence_logps(SelectedLogits(model), *batch, average=True)
    assert torch.equal(counts, counts_avg)
    assert torch.allclose(averaged, summed / counts, atol=1e-6)


def test_gradients_flow(tiny):
    """Backward through the selected-position LM head and the chunked log-probs reaches every
    parameter and matches the naive version's gradient (left padding, the harder case)."""
    model, tokenizer = tiny
    batch = _padded(tokenizer, left=True)
    logps, _ = sequence_logps(model, *batch, chunk_size=5)
    fast = torch.autograd.grad(logps.sum(), list(model.parameters()))
    slow = torch.autograd.grad(_naive(model, *batch).sum(), list(model.parameters()))
    for g_fast, g_slow in zip(fast, slow, strict=True):
        assert torch.isfinite(g_fast).all()
        assert torch.allclose(g_fast, g_slow, atol=1e-4)
    assert any(g.abs().sum() > 0 for g in fast)
