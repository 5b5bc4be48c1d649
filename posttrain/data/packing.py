"""Best-fit-decreasing packing and the collators for padded and packed batches.

Packed rows need two things to be equivalent to running each example alone:
- position ids that restart at 0 for every example (rotary embeddings see the same positions), and
- attention that never crosses from one example into another. How depends on the kernel
  (posttrain.models.packed_attention chooses; the SFT recipe logs the choice):
  - "flex_attention": a FlexAttention BlockMask built from seq_ids (`document_block_mask`), a
    compressed block-sparse description of the document-causal mask: no (T, T) tensor, and the
    kernel skips the blocks no query may see. transformers passes a 4D BlockMask through unchanged.
  - "varlen": flash-attention's variable-length kernels read the boundaries from position ids
    (cu_seqlens where a position restarts at 0), but transformers only does so for a batch of ONE
    row with no attention mask, so the rows are flattened into a single (1, B*T) sequence.
  - "dense_mask" (the fallback, sdpa and eager): an additive (B, 1, T, T) float mask (0 allowed,
    dtype-min blocked), which transformers adds to the attention scores unchanged. Restarting
    position ids alone is NOT enough when a 2D mask is passed (checked in tests/test_packing.py).

Labels are each example's own labels, except that the first token of every example is set to
-100: after the usual shift (logits[:, :-1] vs labels[:, 1:]) that label would be predicted from
the previous example's last token. The first token (BOS or prompt) never carries loss anyway.
That also makes the flattened "varlen" layout safe: the last token of one row never predicts the
first token of the next.
"""

from __future__ import annotations

import bisect
import heapq

import torch

from posttrain.data.tokenize import IGNORE_INDEX


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into bins of `capacity` tokens.

    Items are placed longest first (ties: lower index first); each goes into the open bin with
    the least remaining room that still fits it (ties: the earliest opened bin), or a new bin.
    Bins are returned in opening order, each listing indices in placement order.

    Remaining capacities are integers in [0, capacity], so bins are bucketed by remaining room:
    a sorted list of the distinct non-empty room values (bisect) and a heap of bin ids per value.
    Each placement is O(log n + capacity) in the worst case and O(log n) typically.

    Example (capacity 10, lengths [7, 5, 4, 3, 2, 1]):
        7 (#0) -> new bin A (room 3);  5 (#1) -> new bin B (room 5);
        4 (#2) -> B (room 5 is the only fit, room 1);  3 (#3) -> A (exact fit, room 0);
        2 (#4) -> new bin C (room 8);  1 (#5) -> B (room 1 beats 8, room 0)
        => [[0, 3], [1, 2, 5], [4]]
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if lengths and not 1 <= min(lengths) <= max(lengths) <= capacity:
        i = next(i for i, n in enumerate(lengths) if not 1 <= n <= capacity)
        raise ValueError(
            f"example {i} has length {lengths[i]}; lengths must be in [1, {capacity}]"
        )
    # reverse=True keeps sort stability: equal lengths stay in index order
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining capacities that some open bin has
    by_room: dict[int, list[int]] = {}  # remaining capacity -> heap of bin ids
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[k]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        bins[b].append(i)
        room -= n
        if room > 0:  # a full bin can take nothing more: stop tracking it
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            heapq.heappush(by_room[room], b)
    return bins


def collate_padded(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: input_ids, labels (-100 on padding), attention_mask."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            **stack_image_inputs(examples)}


def stack_image_inputs(examples: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_inputs": the examples' image tensors concatenated along the first axis, as
    transformers' processors batch them} for image examples (posttrain.vision.tokenize);
    {} for text."""
    if not any(e.get("image_inputs") for e in examples):
        return {}
    keys = dict.fromkeys(k for e in examples for k in e["image_inputs"])
    return {"image_inputs": {k: torch.cat([e["image_inputs"][k] for e in examples])
                             for k in keys}}


PACKED_LAYOUTS = ("dense_mask", "flex_attention", "varlen")


def collate_packed(
    bins: list[list[dict]],
    pad_token_id: int,
    length: int | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "dense_mask",
) -> dict[str, torch.Tensor]:
    """One row per bin, its examples concatenated and right-padded to `length` (default: longest).

    Returns input_ids (B, T); labels (B, T), -100 on padding and on each example's first token;
    position_ids (B, T) restarting at 0 per example (0 on padding); seq_ids (B, T), the example's
    index within its row, -1 on padding. The attention layout (module docstring):
    - "dense_mask": also attention_mask (B, 1, T, T) additive in `dtype` (the model's dtype):
      0.0 where query i may attend key j (same example and j <= i), finfo.min elsewhere. A
      padding token attends only to itself, so no softmax row is fully masked (NaN).
    - "flex_attention": no attention_mask; build `document_block_mask(seq_ids)` on the device.
    - "varlen": no attention_mask, and every tensor flattened to (1, B*T); each padding token is
      a sequence of its own (position 0).
    """
    if attention not in PACKED_LAYOUTS:
        raise ValueError(f"attention must be one of {PACKED_LAYOUTS}, got {attention!r}")
    if not bins:
        raise ValueError("cannot collate an empty batch")
    totals = [sum(len(e["input_ids"]) for e in b) for b in bins]
    T = max(totals) if length is None else length
    if max(totals) > T:
        raise ValueError(f"a bin holds {max(totals)} tokens, more than length={T}")
    B = len(bins)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    seq_ids = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
    for r, examples in enumerate(bins):
        start = 0
        for s, e in enumerate(examples):
            n = len(e["input_ids"])
            end = start + n
            input_ids[r, start:end] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[r, start:end] = torch.as_tensor(e["labels"], dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous example
            position_ids[r, start:end] = torch.arange(n)
            seq_ids[r, start:end] = s
            start = end
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "seq_ids": seq_ids}
    if attention == "dense_mask":
        batch["attention_mask"] = block_causal_mask(seq_ids, dtype)
    elif attention == "varlen":
        batch = {k: v.reshape(1, B * T) for k, v in batch.items()}  # (1, B*T)
    return batch


def document_block_mask(seq_ids: torch.Tensor, compile: bool | None = None):
    """FlexAttention BlockMask from seq_ids (B, T): the mask of `block_causal_mask` (causal
    within each example, a padding token attends to itself), built on seq_ids' device without a
    (B, T, T) tensor when compiled (`compile` defaults to True on CUDA; uncompiled, torch
    evaluates the mask densely, fine for small T on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = seq_ids.shape

    def document_causal(b, h, q, k):
        return ((seq_ids[b, q] == seq_ids[b, k]) & (seq_ids[b, q] >= 0) & (k <= q)) | (q == k)

    return create_block_mask(document_causal, B=B, H=None, Q_LEN=T, KV_LEN=T,
                             device=seq_ids.device,
                             _compile=seq_ids.is_cuda if compile is None else compile)


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask from seq_ids (B, T): causal within each example, -1 = padding."""
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T) query i, key j
    real = (seq_ids >= 0)[:, :, None]  # (B, T, 1) the query is a real token
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()  # (T, T) j <= i
    eye = torch.eye(T, dtype=torch.bool, device=seq_ids.device)  # (T, T)
    allowed = (same & real & causal) | eye  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)
