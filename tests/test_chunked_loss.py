"""The SFT loss from the LM head run in row chunks (posttrain/logprobs.py) equals the loss from
full logits, gradients included, and never creates an (N, V) tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.data.packing import collate_padded
from posttrain.logprobs import SelectedLogits, shift_targets
from posttrain.losses.sft import sft_loss
from posttrain.recipes.sft import evaluate_loss

V, H = 3000, 16


def _model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")


def _batch() -> dict[str, torch.Tensor]:
    """Three examples of 40, 25 and 33 tokens; the first 5 of each are a prompt (no loss)."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (40, 25, 33):
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return collate_padded(examples, pad_token_id=0)  # 35 + 20 + 28 = 83 loss tokens


def _reference_loss(model, batch) -> torch.Tensor:
    """Token-mean cross-entropy from transformers' full (B, T, V) logits, the plain way."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def _chunked_loss(model, batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    select, targets = shift_targets(batch["labels"])
    logps, correct = SelectedLogits(model)(batch["input_ids"], batch["attention_mask"], select,
                                           targets=targets, chunk_size=chunk_size)
    loss, _ = sft_loss(logps, targets.numel())
    return loss, correct


def test_chunked_loss_and_gradients_equal_the_full_logits_loss():
    """83 loss tokens in chunks of 10 (8 full chunks and a ragged one of 3), recomputed in the
    backward pass: loss within 1e-6 of the full-logits cross-entropy, every gradient equal."""
    model = _model()
    batch = _batch()
    reference = _reference_loss(model, batch)
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    ours, correct = _chunked_loss(model, batch, chunk_size=10)
    grads = torch.autograd.grad(ours, list(model.parameters()))
    assert correct.shape == (83,) and correct.dtype == torch.bool
    assert abs(ours.item() - reference.item()) < 1e-6
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-8), name


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_rows_by_the_vocabulary_exists_forward_or_backward():
    """With chunks of 10 rows, the biggest tensor of forward + backward is the LM head's weight
    or its gradient (V x H = 48k elements), never the 83 x 3000 = 249k logits; the full-logits
    loss does create them (which shows the watcher sees the backward pass too)."""
    model = _model()
    batch = _batch()
    with _LargestTensor() as watch:
        loss, _ = _chunked_loss(model, batch, chunk_size=10)
        loss.backward()
    assert watch.largest <= V * H, watch.largest
    with _LargestTensor() as watch:
        _reference_loss(model, batch).backward()
    assert watch.largest >= 83 * V


def test_held_out_loss_goes_through_the_chunks():
    """evaluate_loss (the SFT held-out loss, and evaluation's perplexity) equals the full-logits
    token mean, without creating an (N, V) tensor (default chunk: 2**24 // 3000 = 5592 rows, so
    force small ones through the library default's constant)."""
    from posttrain import logprobs

    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        reference = _reference_loss(model, batch).item()
    old = logprobs.CHUNK_ELEMENTS
    logprobs.CHUNK_ELEMENTS = 10 * V  # 10 rows a chunk
    try:
        with _LargestTensor() as watch:
            out = evaluate_loss(SelectedLogits(model), [batch], torch.device("cpu"))
    finally:
        logprobs.CHUNK_ELEMENTS = old
    assert abs(out["eval_loss"] - reference) < 1e-6
    assert watch.largest <= V * H
