"""Tokenize and batch preference data: pairs (RM, DPO, ORPO) and unpaired labelled rows (KTO).

Tokenization follows posttrain/data/tokenize.py exactly, so a preference stage sees its prompts
as the SFT stage trained on them:

- standard strings: prompt = tokenizer(prompt) with the tokenizer's special tokens (e.g. BOS);
  response = tokenizer(response, add_special_tokens=False) + [EOS].
- conversational messages: prompt = chat template of the prompt messages with the generation
  prompt; response = what the template renders after it for prompt + response messages (checked
  to be a prefix; no EOS is appended, the template's end-of-turn token ends the response).

Implicit-prompt pairs (only `chosen` and `rejected`, ALGORITHMS.md "Data formats") get their
prompt from what the two share:

- conversational: the shared leading messages are the prompt, the rest (starting with an
  assistant turn) is the response;
- standard: each text is tokenized whole (+ EOS) and the longest common prefix of the TOKEN IDS is
  the prompt. prompt + response is then exactly the tokenization of each full text (a character
  prefix could cut a BPE token in two). When the two responses start with the same tokens (" 13"
  vs " 12"), those tokens become part of the prompt: they would cancel in DPO's Δ and the RM score
  difference anyway, but they no longer count towards length-normalized losses.

One pair or row is tokenized by posttrain/data/preference_pairs.py (`tokenize_pair`,
`tokenize_unpaired`); this module tokenizes whole datasets and batches them.

Bad pairs are never dropped silently: `tokenize_preference_rows` / `tokenize_unpaired_rows`
count them per reason ("identical chosen and rejected", "empty response", "missing prompt",
"over-length", ...), report the first rows, and raise a `DataError` when more than
max_bad_fraction of the rows went.

Batches: `collate_pairs` puts chosen and rejected into ONE batch (rows 0..B-1 prompt+chosen,
rows B..2B-1 prompt+rejected) so that a single forward scores both; `collate_unpaired` pads
KTO's rows (its KL rows too: the recipe pairs them, posttrain.recipes.kto.assign_partners).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from posttrain.data.formats import split_implicit as _split_raw
from posttrain.data.loading import DataError
from posttrain.data.packing import stack_image_inputs
from posttrain.data.preference_pairs import (
    MISSING_MARGIN,
    MISSING_PROMPT,
    BadPairError,
    pair_with_status,
    unpaired_with_status,
)

PADDING_SIDES = ("right", "left")
_MAX_EXAMPLES = 5  # bad rows a report quotes


# ------------------------------------------------------------------------------- datasets


def tokenize_preference_rows(
    rows: list[dict],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    source: str = "data",
    max_bad_fraction: float = 0.1,
) -> tuple[list[dict], dict]:
    """Tokenize preference rows; return (examples, report).

    The dataset is explicit-prompt when any row has a `prompt` column; then a row whose prompt is
    absent, null or empty is counted as "missing prompt" (it is NOT silently re-read as an
    implicit pair); likewise, when any row has a `margin`, rows without one count as "missing
    margin". Bad pairs are dropped and counted per reason; a DataError naming `source`,
    the counts and the first rows is raised when more than max_bad_fraction of the rows were
    dropped (or none is left). Report: {"rows_in", "rows_out", "truncated", "dropped": {reason:
    count}, "examples": ["row 3: identical chosen and rejected", ...]} (rows are 1-based).
    """
    explicit = any(isinstance(r, dict) and "prompt" in r for r in rows)
    # A margin on some rows only would give batches with and without one: count the others.
    margins = any(isinstance(r, dict) and r.get("margin") is not None for r in rows)

    def one(row: dict, where: str) -> tuple[dict | None, str]:
        if explicit and isinstance(row, dict) and "prompt" not in row:
            raise BadPairError(MISSING_PROMPT, where, "no 'prompt' column")
        if margins and isinstance(row, dict) and row.get("margin") is None:
            raise BadPairError(MISSING_MARGIN, where)
        return pair_with_status(row, tokenizer, max_length, truncation, where)

    return _tokenize_rows(rows, one, "preference pairs", source, max_bad_fraction)


def tokenize_unpaired_rows(
    rows: list[dict],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    source: str = "data",
    max_bad_fraction: float = 0.1,
) -> tuple[list[dict], dict]:
    """Tokenize KTO rows; return (examples, report), with the same rules as
    tokenize_preference_rows. The report also has "desirable" and "undesirable" counts of the
    kept examples (KTO's desirable/undesirable weights should balance them)."""

    def one(row: dict, where: str) -> tuple[dict | None, str]:
        return unpaired_with_status(row, tokenizer, max_length, truncation, where)

    examples, report = _tokenize_rows(rows, one, "rows", source, max_bad_fraction)
    report["desirable"] = sum(1 for e in examples if e["label"])
    report["undesirable"] = len(examples) - report["desirable"]
    return examples, report


def _tokenize_rows(
    rows: list[dict], one: Any, noun: str, source: str, max_bad_fraction: float
) -> tuple[list[dict], dict]:
    if not rows:
        raise DataError(f"{source}: no rows")
    examples: list[dict] = []
    dropped: dict[str, int] = {}
    shown: list[str] = []
    truncated = 0
    for i, row in enumerate(rows, start=1):
        try:
            example, status = one(row, f"{source} row {i}")
        except BadPairError as e:
            example, status = None, e.reason
        if example is not None:
            examples.append(example)
            truncated += status == "truncated"
            continue
        dropped[status] = dropped.get(status, 0) + 1
        if len(shown) < _MAX_EXAMPLES:
            shown.append(f"row {i}: {status}")
    n_in, n_dropped = len(rows), len(rows) - len(examples)
    report = {
        "rows_in": n_in,
        "rows_out": len(examples),
        "truncated": truncated,
        "dropped": dropped,
        "examples": shown,
    }
    if n_dropped / n_in > max_bad_fraction or not examples:
        counts = ", ".join(f"{reason}: {n}" for reason, n in dropped.items())
        raise DataError(
            f"{source}: {n_dropped} of {n_in} {noun} dropped ({n_dropped / n_in:.1%} > "
            f"max_bad_fraction {max_bad_fraction:.1%}); {counts}; first: {'; '.join(shown)}"
        )
    return examples, report


# ------------------------------------------------------------------------- pairs -> unpaired


def pairs_to_unpaired(rows: list[dict]) -> list[dict]:
    """Paired preference rows -> KTO rows: chosen -> label True, rejected -> label False.

    Two rows per pair, chosen first, in the pairs' order (shuffle afterwards so that a batch
    rarely holds both halves of one pair). Other columns (e.g. "task") are kept; rows never
    share mutable values. Implicit-prompt rows are split: conversational ones at their shared
    leading messages, standard ones at their common character prefix (what tokenize_pair does
    with token ids; the same split for a character-level tokenizer). Bad pairs are converted as
    they are and get counted when tokenize_unpaired_rows sees them.
    """
    out: list[dict] = []
    for row in rows:
        extra = {k: copy.deepcopy(v) for k, v in row.items() if k not in ("chosen", "rejected")}
        if "prompt" in row:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        else:
            prompt, chosen, rejected = _split_raw(row["chosen"], row["rejected"])
        for completion, label in ((chosen, True), (rejected, False)):
            new = copy.deepcopy(extra)
            new["prompt"] = copy.deepcopy(prompt)
            new["completion"] = copy.deepcopy(completion)
            new["label"] = label
            out.append(new)
    return out


# ---------------------------------------------------------------------------------- collate


def collate_pairs(
    examples: list[dict], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """One batch holding chosen AND rejected: rows 0..B-1 are prompt+chosen, B..2B-1
    prompt+rejected (same prompt order), padded to the longest of all 2B rows.

    Returns input_ids, attention_mask, completion_mask (1 on response tokens) of shape (2B, T).
    Numeric per-pair columns present in every example (e.g. "margin", precomputed reference
    log-probs) come back as float tensors of shape (B,). Image pairs add "image_inputs"
    (posttrain.data.packing.stack_image_inputs): the images of rows 0..B-1, then again B..2B-1.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [e["prompt_ids"] for e in examples]
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = _pad_rows(prompts + prompts, responses, pad_token_id, padding_side)
    batch.update(_scalar_columns(examples, ("prompt_ids", "chosen_ids", "rejected_ids")))
    batch.update(stack_image_inputs(examples + examples))  # a pair's image in both halves
    return batch


def collate_unpaired(
    examples: list[dict],
    pad_token_id: int,
    *,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """A KTO batch: input_ids, attention_mask, completion_mask (B, T), labels (B,) bool."""
    if not examples:
        raise ValueError("collate_unpaired needs at least one example")
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    batch = _pad_rows(prompts, completions, pad_token_id, padding_side)
    batch["labels"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    batch.update(_scalar_columns(examples, ("prompt_ids", "completion_ids", "label")))
    return batch


def _pad_rows(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """Pad prompt+response rows to one length; masks are built from the lengths, never by
    looking for pad tokens (the pad id may also be the EOS id)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    n = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = 0 if padding_side == "right" else width - lengths[i]
        end = start + lengths[i]
        input_ids[i, start:end] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, start:end] = 1
        completion_mask[i, start + len(p) : end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}


def _scalar_columns(examples: list[dict], skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Numeric columns, as float tensors (B,); ValueError when only some examples have one."""
    keys = dict.fromkeys(k for e in examples for k in e if k not in skip)
    out = {}
    for key in keys:
        values = [e.get(key) for e in examples]
        numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in values]
        if all(numeric):
            out[key] = torch.tensor(values, dtype=torch.float32)
        elif any(numeric):
            missing = numeric.index(False)
            raise ValueError(
                f"column {key!r} is a number in some examples but {values[missing]!r} in "
                f"example {missing}; a batch needs it in all or none"
            )
    return out
