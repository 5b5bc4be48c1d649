"""Tokenization of one preference pair or one unpaired (KTO) row, as posttrain/data/preference.py
describes it (prompt and response token ids, implicit prompts, truncation), and the reasons a
row cannot be used (`BadPairError`), which the dataset-level functions there count.
"""

from __future__ import annotations

import os
from typing import Any

from posttrain.data.formats import shared_messages as _shared_messages
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
    example, _ = pair_with_status(row, tokenizer, max_length, truncation, where)
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
    example, _ = unpaired_with_status(row, tokenizer, max_length, truncation, where)
    return example


def _check_args(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (a prompt and a response token), got {max_length}"
        )


def pair_with_status(
    row: dict, tokenizer: Any, max_length: int, truncation: str, where: str
) -> tuple[dict | None, str]:
    """`tokenize_pair` with how the row went: (example or None, status), status "ok",
    "truncated" or OVER_LENGTH (the dataset-level report in posttrain/data/preference.py counts
    them)."""
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


def unpaired_with_status(
    row: dict, tokenizer: Any, max_length: int, truncation: str, where: str
) -> tuple[dict | None, str]:
    """`tokenize_unpaired` with how the row went: (example or None, status), as
    `pair_with_status`."""
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
