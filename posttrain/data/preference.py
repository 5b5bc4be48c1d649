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
import os
from typing import Any

import torch

from posttrain.data.formats import shared_messages as _shared_messages
from posttrain.data.formats import split_implicit as _split_raw
from posttrain.data.loading import DataError
from posttrain.data.tokenize import TRUNCATION_MODES, _eos_id, _split_ids, _text_ids

# Reasons under which bad pairs / rows are counted (report["dropped"] keys).
IDENTICAL = "identical chosen and rejected"
EMPTY_RESPONSE = "empty response"
MISSING_PROMPT = "missing prompt"
OVER_LENGTH = "over-length"
DIVERGES_BEFORE_RESPONSE = "chosen and rejected differ before the assistant's turn"
BAD_LABEL = "missing or non-bool label"
MISSING_MARGIN = "missing margin"

_MAX_EXAMPLES = 5
PADDING_SIDES = ("right", "left")


class BadPairError(DataError):
    """A row that cannot be used (identical pair, empty response, missing prompt, ...).

    `reason` is the key under which the *_rows functions count it; standalone callers of
    tokenize_pair / tokenize_unpaired see an ordinary DataError naming the row.
    """

    def __init__(self, reason: str, where: str = "", detail: str = "") -> None:
        self.reason = reason
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{reason}" + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------- tokenization


def tokenize_pair(
    row: dict,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    where: str = "",
) -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} for one preference row, or None when dropped.

    Explicit rows have `prompt`, `chosen`, `rejected`; a row without a `prompt` key is
    implicit (module docstring). Response ids never include the prompt. A numeric `margin`
    column (reward models) is carried over as "margin".

    Length is len(prompt) + max(len(chosen), len(rejected)); above max_length: "drop" -> None;
    "error" -> DataError; "truncate_prompt" cuts the prompt from the left (None when not even
    one prompt token fits); "truncate_right" cuts both responses at the end (None when the prompt
    alone fills max_length, or when the cut responses become identical).

    Raises BadPairError (a DataError; `.reason` says which) for a missing/empty prompt, an empty
    response, or identical chosen and rejected, and DataError for malformed rows. `where`
    (e.g. "data/train.jsonl row 17") prefixes the messages.
    """
    example, _ = _pair_with_status(row, tokenizer, max_length, truncation, where)
    return example


def tokenize_unpaired(
    row: dict,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    where: str = "",
) -> dict | None:
    """{"prompt_ids", "completion_ids", "label"} for one KTO row (`prompt`, `completion`,
    `label`), or None when dropped for length.

    Over-length (len(prompt) + len(completion) > max_length): "drop" -> None; "error" ->
    DataError; "truncate_prompt" cuts the prompt from the left (keeps >= 1 prompt token, else
    None); "truncate_right" cuts the completion at the end (None when the prompt fills
    max_length). Raises BadPairError for a missing prompt, an empty completion, or a label that
    is not a bool (0/1 and "true" are refused: bool(x) would guess).
    """
    example, _ = _unpaired_with_status(row, tokenizer, max_length, truncation, where)
    return example


def _check_args(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (a prompt and a response token), got {max_length}"
        )


def _pair_with_status(
    row: dict, tokenizer: Any, max_length: int, truncation: str, where: str
) -> tuple[dict | None, str]:
    """(example or None, status): status is "ok", "truncated" or OVER_LENGTH."""
    _check_args(max_length, truncation)
    prefix = f"{where}: " if where else ""
    if not isinstance(row, dict):
        raise DataError(f"{prefix}expected an object, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if field not in row:
            raise DataError(f"{prefix}not a preference row: missing column {field!r}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        if _is_blank(row["prompt"]):
            raise BadPairError(MISSING_PROMPT, where)
        if _is_empty_response(chosen) or _is_empty_response(rejected):
            raise BadPairError(EMPTY_RESPONSE, where, _which_empty(chosen, rejected))
        if chosen == rejected:
            raise BadPairError(IDENTICAL, where)
        prompt_ids, chosen_ids, _ = _split_ids(
            {"prompt": row["prompt"], "completion": chosen}, tokenizer, prefix
        )
        prompt_ids_r, rejected_ids, _ = _split_ids(
            {"prompt": row["prompt"], "completion": rejected}, tokenizer, prefix
        )
        if prompt_ids_r != prompt_ids:  # cannot happen with a sane template; never guess
            raise DataError(f"{prefix}the prompt tokenizes differently for chosen and rejected")
    else:
        prompt_ids, chosen_ids, rejected_ids = _split_implicit(
            chosen, rejected, tokenizer, where, prefix
        )
    if chosen_ids == rejected_ids:  # e.g. strings that differ only in what the tokenizer drops
        raise BadPairError(IDENTICAL, where, "same token ids")

    status = "ok"
    longest = max(len(chosen_ids), len(rejected_ids))
    total = len(prompt_ids) + longest
    if total > max_length:
        if truncation == "drop":
            return None, OVER_LENGTH
        if truncation == "error":
            raise DataError(
                f"{prefix}pair has {total} tokens (prompt {len(prompt_ids)} + longest response "
                f"{longest}), more than max_length={max_length} (set truncation to 'drop', "
                "'truncate_prompt' or 'truncate_right' to allow it)"
            )
        status = "truncated"
        if truncation == "truncate_prompt":
            keep = max_length - longest
            if keep < 1:
                return None, OVER_LENGTH
            prompt_ids = prompt_ids[-keep:]
        else:  # truncate_right
            room = max_length - len(prompt_ids)
            if room < 1:
                return None, OVER_LENGTH
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            if chosen_ids == rejected_ids:  # the responses only differed past the cut
                return None, OVER_LENGTH
    example: dict[str, Any] = {
        "prompt_ids": list(prompt_ids),
        "chosen_ids": list(chosen_ids),
        "rejected_ids": list(rejected_ids),
    }
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{prefix}margin must be a number, got {type(margin).__name__}")
        example["margin"] = float(margin)
    return example, status


def _split_implicit(
    chosen: Any, rejected: Any, tokenizer: Any, where: str, prefix: str
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of an implicit-prompt pair (module docstring)."""
    if _is_empty_response(chosen) or _is_empty_response(rejected):
        raise BadPairError(EMPTY_RESPONSE, where, _which_empty(chosen, rejected))
    if chosen == rejected:
        raise BadPairError(IDENTICAL, where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = _shared_messages(chosen, rejected)
        if k == 0:
            raise BadPairError(MISSING_PROMPT, where, "no shared leading messages")
        rest_c, rest_r = chosen[k:], rejected[k:]
        if not rest_c or not rest_r:
            raise BadPairError(EMPTY_RESPONSE, where, "one conversation is a prefix of the other")
        for rest in (rest_c, rest_r):
            if not isinstance(rest[0], dict) or rest[0].get("role") != "assistant":
                raise BadPairError(
                    DIVERGES_BEFORE_RESPONSE,
                    where,
                    f"message {k + 1} differs and is not an assistant message",
                )
        if _is_empty_response(rest_c) or _is_empty_response(rest_r):
            raise BadPairError(EMPTY_RESPONSE, where, _which_empty(rest_c, rest_r))
        prompt = chosen[:k]
        prompt_ids, chosen_ids, _ = _split_ids(
            {"prompt": prompt, "completion": rest_c}, tokenizer, prefix
        )
        _, rejected_ids, _ = _split_ids({"prompt": prompt, "completion": rest_r}, tokenizer, prefix)
        return prompt_ids, chosen_ids, rejected_ids
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not os.path.commonprefix([chosen, rejected]).strip():
            raise BadPairError(MISSING_PROMPT, where, "chosen and rejected share no leading text")
        eos = _eos_id(tokenizer)
        full_c = _text_ids(tokenizer, chosen, add_special_tokens=True) + [eos]
        full_r = _text_ids(tokenizer, rejected, add_special_tokens=True) + [eos]
        n = len(os.path.commonprefix([full_c, full_r]))
        if n == 0:
            raise BadPairError(MISSING_PROMPT, where, "chosen and rejected share no leading token")
        chosen_ids, rejected_ids = full_c[n:], full_r[n:]
        if chosen_ids in ([], [eos]) or rejected_ids in ([], [eos]):
            raise BadPairError(EMPTY_RESPONSE, where, "one text is a prefix of the other")
        return full_c[:n], chosen_ids, rejected_ids
    raise DataError(f"{prefix}chosen and rejected must both be strings or both lists of messages")


def _unpaired_with_status(
    row: dict, tokenizer: Any, max_length: int, truncation: str, where: str
) -> tuple[dict | None, str]:
    _check_args(max_length, truncation)
    prefix = f"{where}: " if where else ""
    if not isinstance(row, dict):
        raise DataError(f"{prefix}expected an object, got {type(row).__name__}")
    if "completion" not in row:
        raise DataError(f"{prefix}not an unpaired preference row: missing column 'completion'")
    if _is_blank(row.get("prompt")):
        raise BadPairError(MISSING_PROMPT, where)
    if _is_empty_response(row["completion"]):
        raise BadPairError(EMPTY_RESPONSE, where, "empty completion")
    label = row.get("label")
    if type(label) is not bool:
        raise BadPairError(BAD_LABEL, where, f"got {label!r:.40}")
    prompt_ids, completion_ids, _ = _split_ids(
        {"prompt": row["prompt"], "completion": row["completion"]}, tokenizer, prefix
    )
    status = "ok"
    total = len(prompt_ids) + len(completion_ids)
    if total > max_length:
        if truncation == "drop":
            return None, OVER_LENGTH
        if truncation == "error":
            raise DataError(
                f"{prefix}example has {total} tokens, more than max_length={max_length} (set "
                "truncation to 'drop', 'truncate_prompt' or 'truncate_right' to allow it)"
            )
        status = "truncated"
        if truncation == "truncate_prompt":
            keep = max_length - len(completion_ids)
            if keep < 1:
                return None, OVER_LENGTH
            prompt_ids = prompt_ids[-keep:]
        else:
            room = max_length - len(prompt_ids)
            if room < 1:
                return None, OVER_LENGTH
            completion_ids = completion_ids[:room]
    return {
        "prompt_ids": list(prompt_ids),
        "completion_ids": list(completion_ids),
        "label": label,
    }, status


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
        return _pair_with_status(row, tokenizer, max_length, truncation, where)

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
        return _unpaired_with_status(row, tokenizer, max_length, truncation, where)

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
    log-probs) come back as float tensors of shape (B,).
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [e["prompt_ids"] for e in examples]
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = _pad_rows(prompts + prompts, responses, pad_token_id, padding_side)
    batch.update(_scalar_columns(examples, ("prompt_ids", "chosen_ids", "rejected_ids")))
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


# ---------------------------------------------------------------------------------- helpers


def _is_blank(value: Any) -> bool:
    """A prompt that is absent in substance: None, a blank string, an empty message list."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


def _is_empty_response(value: Any) -> bool:
    """None, a blank string, or messages without any non-blank assistant content."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not any(
            isinstance(m, dict)
            and m.get("role") == "assistant"
            and isinstance(m.get("content"), str)
            and m["content"].strip()
            for m in value
        )
    return False  # wrong types are reported by the tokenization as malformed rows


def _which_empty(chosen: Any, rejected: Any) -> str:
    both = _is_empty_response(chosen) and _is_empty_response(rejected)
    return (
        "chosen and rejected" if both else ("chosen" if _is_empty_response(chosen) else "rejected")
    )
