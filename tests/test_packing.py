"""Best-fit-decreasing packing, collators, and packed rows computing what each example alone does."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.packing import (
    block_causal_mask,
    collate_packed,
    collate_padded,
    pack_bfd,
)

X = -100
NEG = torch.finfo(torch.float32).min


def _bfd_simple(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook O(n * bins) version: scan all bins for the tightest fit."""
    bins: list[list[int]] = []
    rooms: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
        else:
            b = len(bins)
            bins.append([])
            rooms.append(capacity)
        bins[b].append(i)
        rooms[b] -= lengths[i]
    return bins


def test_pack_bfd_hand_example() -> None:
    """Capacity 10, lengths [7, 5, 4, 3, 2, 1]:
    7 -> new A (room 3); 5 -> new B (room 5); 4 -> B (room 1); 3 -> A (room 0);
    2 -> new C (room 8); 1 -> B (room 1 is tighter than C's 8, room 0)."""
    assert pack_bfd([7, 5, 4, 3, 2, 1], 10) == [[0, 3], [1, 2, 5], [4]]


def test_pack_bfd_ties_are_stable() -> None:
    """Equal lengths go in index order; equal rooms go to the earliest bin.
    [3, 3, 3, 3], capacity 7: #0 -> A (4), #1 -> A (1), #2 -> B (4), #3 -> B (1)."""
    assert pack_bfd([3, 3, 3, 3], 7) == [[0, 1], [2, 3]]
    # rooms tie: A and B both have room 2 after [5, 5]; the 2 goes to A, the next 2 to B
    assert pack_bfd([5, 5, 2, 2], 7) == [[0, 2], [1, 3]]


def test_pack_bfd_agrees_with_the_simple_version() -> None:
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 60))]
        assert pack_bfd(lengths, capacity) == _bfd_simple(lengths, capacity)


def test_pack_bfd_is_complete_on_a_large_input() -> None:
    # Its speed is a benchmark's question, not a test's (a time limit failed under load).
    rng = random.Random(1)
    lengths = [rng.randint(1, 128) for _ in range(100_000)]
    bins = pack_bfd(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each index once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # mean length ~64.5: BFD fills bins almost completely
    assert len(bins) < 1.03 * sum(lengths) / 128


def test_pack_bfd_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="example 1 has length 11"):
        pack_bfd([3, 11], 10)
    with pytest.raises(ValueError, match="example 0 has length 0"):
        pack_bfd([0], 10)
    assert pack_bfd([], 10) == []


def test_collate_padded() -> None:
    batch = collate_padded(
        [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packed_by_hand() -> None:
    """Row: example 0 = [5 6 7] (labels X 6 7), example 1 = [8 9] (labels 8 9), padded to 6."""
    bins = [[{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]]
    batch = collate_packed(bins, pad_token_id=0, length=6)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0]]
    # 8 is example 1's first token: it must not be predicted from example 0's last token
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1, -1]]
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only: no all-masked softmax row
    ]
    assert set(mask.unique().tolist()) == {0.0, NEG}


def test_collate_packed_length_and_dtype() -> None:
    bins = [[{"input_ids": [1, 2], "labels": [1, 2]}], [{"input_ids": [3], "labels": [3]}]]
    batch = collate_packed(bins, pad_token_id=0, dtype=torch.bfloat16)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]  # default length: longest row
    assert batch["attention_mask"].dtype == torch.bfloat16
    assert batch["attention_mask"].min().item() == torch.finfo(torch.bfloat16).min
    with pytest.raises(ValueError, match="more than length=1"):
        collate_packed(bins, pad_token_id=0, length=1)


def test_block_causal_mask_matches_a_loop() -> None:
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    mask = block_causal_mask(seq_ids)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                s = seq_ids[b].tolist()
                ok = i == j or (s[i] >= 0 and s[i] == s[j] and j <= i)
                assert (mask[b, 0, i, j].item() == 0.0) == ok, (b, i, j)


# ------------------------------------------------------------------------- the model check


def _tiny_qwen2(attn: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def _three_examples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1, 40, (n,), generator=g).tolist(), "labels": [0] * n}
        for n in (5, 3, 6)
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_examples_run_alone(attn: str) -> None:
    model = _tiny_qwen2(attn)
    examples = _three_examples()
    batch = collate_packed([examples], pad_token_id=0, length=16)  # 14 tokens + 2 padding
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[0]  # (T, V)
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]  # (n, V)
            n = len(e["input_ids"])
            assert (packed[start : start + n] - alone).abs().max().item() < 1e-5
            start += n
    assert torch.isfinite(packed).all()  # padding rows are not NaN


def test_restarting_position_ids_alone_does_not_isolate_examples() -> None:
    """Why the 4D mask exists: with sdpa and a 2D mask, later examples see earlier ones."""
    model = _tiny_qwen2("sdpa")
    examples = _three_examples()
    batch = collate_packed([examples], pad_token_id=0, length=16)
    mask_2d = (batch["seq_ids"] >= 0).long()  # (B, T)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=mask_2d, position_ids=batch["position_ids"]
        ).logits[0]
        second = examples[1]["input_ids"]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    diff = (packed[5:8] - alone).abs().max().item()
    assert diff > 1e-3, diff
