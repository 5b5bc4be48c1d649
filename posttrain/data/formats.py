"""Prompts and held-out rows from any dataset format, so that every stage can use any data.

GRPO/PPO need prompts and evaluation needs prompts with, where there is one, a reference
completion; a user's dataset may be in any format of ALGORITHMS.md "Data formats". Rather than
asking for a second, prompt-only copy of the data, the two views are derived here:

    format                  prompt_rows: prompt is          eval_rows: completion is
    prompt_only             the prompt                      (none)
    prompt_completion       the prompt                      the completion
    unpaired_preference     the prompt                      the completion when label is True
    preference              the prompt                      chosen
    preference_implicit     shared prefix of chosen and     the rest of chosen
                            rejected
    language_modeling       messages up to the last         the last assistant message, as
      (messages)            assistant turn                  [{"role": "assistant", ...}]
    language_modeling       (no prompt: DataError)          (DataError)
      (text)

Every other column (e.g. `task`, `solution`) is kept by its name: reward functions receive them
(posttrain/reward_functions.py). Format columns that are not a prompt or a completion
(`chosen`, `rejected`, `label`, `messages`) are dropped. Rows never share mutable values with
the input, so a caller may edit them.

Implicit-prompt pairs are split as posttrain/data/preference.py splits them (it imports the split
from here): conversational pairs at their shared leading messages; standard strings at their
longest common CHARACTER prefix, as TRL's `extract_prompt` does. For strings that prefix also
takes any characters both responses begin with (Anthropic HH's "...\\n\\nAssistant: I think" vs
"...\\n\\nAssistant: I know" gives a prompt ending in "I "): give such data an explicit `prompt`
column, or use messages, when the prompt must end exactly at the assistant's turn.

Pure Python (no torch), so a preflight can call it before anything heavy is imported.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from posttrain.data.loading import DataError
from posttrain.data.validation import (
    FORMAT_COLUMNS,
    FORMATS,
    LANGUAGE_MODELING,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    UNPAIRED_PREFERENCE,
)

# Formats whose rows give a prompt (language modeling only with `messages`, not `text`).
PROMPT_FORMATS = (PROMPT_ONLY, PROMPT_COMPLETION, UNPAIRED_PREFERENCE, PREFERENCE,
                  PREFERENCE_IMPLICIT, LANGUAGE_MODELING)
# Each format's own columns; all others are extra columns, kept by name. (Language-modeling
# rows give prompts only through `messages`.)
_FORMAT_FIELDS = {**FORMAT_COLUMNS, LANGUAGE_MODELING: ("messages",)}


def prompt_rows(rows: list[dict], fmt: str, source: str) -> list[dict]:
    """Rows {"prompt": str | messages, **extra columns} for GRPO/PPO, from rows in format `fmt`.

    Raises DataError naming `source` (and the 1-based row where one row is at fault) when the
    data gives no prompt: language modeling `text` rows, a conversation without an assistant
    turn after its first message, an implicit pair that shares no prefix.
    """
    _check_format(fmt, source)
    return [
        {"prompt": _prompt_and_reference(row, fmt, source, i)[0], **_extra(row, fmt)}
        for i, row in enumerate(rows, start=1)
    ]


def eval_rows(rows: list[dict], fmt: str, source: str) -> list[dict]:
    """Held-out rows {"prompt", ["completion"], **extra columns} for evaluation.

    `completion` (the reference, in the prompt's form: a string, or assistant messages for a
    conversational prompt) is there only where the format has one (module docstring); the
    evaluation computes held-out loss over those rows alone. Errors as for `prompt_rows`.
    """
    _check_format(fmt, source)
    out = []
    for i, row in enumerate(rows, start=1):
        prompt, reference = _prompt_and_reference(row, fmt, source, i)
        new: dict[str, Any] = {"prompt": prompt}
        if reference is not None:
            new["completion"] = reference
        new.update(_extra(row, fmt))
        out.append(new)
    return out


# -------------------------------------------------------------------- implicit-prompt pairs


def shared_messages(a: list, b: list) -> int:
    """How many leading messages two conversations share."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen response, rejected response) of an implicit-prompt pair.

    Conversations split at their shared leading messages, strings at their common character
    prefix (module docstring). Malformed pairs (mixed or other types) give prompt None, for the
    caller to report.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = shared_messages(chosen, rejected)
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        return chosen[:n], chosen[n:], rejected[n:]
    return None, chosen, rejected


# ---------------------------------------------------------------------------------- helpers


def _check_format(fmt: str, source: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")


def _extra(row: dict, fmt: str) -> dict:
    """The row's columns other than the format's own (e.g. `task`, `solution`), deep-copied.

    `prompt` and `completion` are never extra: a derived one replaces a column of that name
    (HuggingFaceH4/ultrachat_200k has a string `prompt` next to its `messages`).
    """
    own = {*_FORMAT_FIELDS[fmt], "prompt", "completion"}
    return {k: copy.deepcopy(v) for k, v in row.items() if k not in own}


def _prompt_and_reference(row: Any, fmt: str, source: str, i: int) -> tuple[Any, Any]:
    """(prompt, reference completion or None) of one row, deep-copied."""
    where = f"{source} row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if fmt == LANGUAGE_MODELING:
        prompt, reference = _split_conversation(row, source, where)
    elif fmt == PREFERENCE_IMPLICIT:
        _require(row, ("chosen", "rejected"), fmt, where)
        prompt, chosen, _ = split_implicit(row["chosen"], row["rejected"])
        if prompt is None:
            raise DataError(
                f"{where}: chosen and rejected must both be strings or both lists of messages"
            )
        if not prompt:
            raise DataError(
                f"{where}: chosen and rejected share no leading text or messages, so there is no "
                "implicit prompt; add a `prompt` column"
            )
        reference = chosen
    else:
        _require(row, ("prompt",), fmt, where)
        prompt, reference = row["prompt"], None
        if fmt == PROMPT_COMPLETION:
            _require(row, ("completion",), fmt, where)
            reference = row["completion"]
        elif fmt == PREFERENCE:
            _require(row, ("chosen",), fmt, where)
            reference = row["chosen"]
        elif fmt == UNPAIRED_PREFERENCE:
            _require(row, ("completion", "label"), fmt, where)
            # Only a desirable completion is a reference; 1 or "true" are not guessed to be True.
            reference = row["completion"] if row["label"] is True else None
    return copy.deepcopy(prompt), copy.deepcopy(reference)


def _split_conversation(row: dict, source: str, where: str) -> tuple[list, list]:
    """(messages before the last assistant turn, [that turn]) of a language-modeling row."""
    if "messages" not in row:
        kind = "`text`" if "text" in row else f"columns {sorted(row)}"
        raise DataError(
            f"{source}: language-modeling rows with {kind} have no prompt to generate from; "
            f"prompts come from these formats: {', '.join(PROMPT_FORMATS)} (with `messages`)"
        )
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: messages must be a list, got {type(messages).__name__}")
    last = next(
        (j for j in range(len(messages) - 1, -1, -1)
         if isinstance(messages[j], dict) and messages[j].get("role") == "assistant"),
        None,
    )
    if last is None or last == 0:
        raise DataError(
            f"{where}: the conversation has no assistant turn after a first message, so no "
            "prompt can be cut from it"
        )
    return messages[:last], [messages[last]]


def _require(row: dict, fields: tuple[str, ...], fmt: str, where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: a {fmt} row needs column(s) {missing}; it has {sorted(row)}")
