"""Dataset formats: detect which one a dataset is in, and check every row before training.

Formats (ALGORITHMS.md, "Data formats"); each value is either standard (a string) or
conversational (a list of {"role", "content"} messages), never both within one row:

    language_modeling      text | messages                SFT
    prompt_completion      prompt, completion             SFT
    preference             prompt, chosen, rejected       RM, DPO, ORPO
    preference_implicit    chosen, rejected               RM, DPO, ORPO
    unpaired_preference    prompt, completion, label      KTO
    prompt_only            prompt (+ any extra columns)   GRPO, PPO

A bad row found after an hour of tokenization or training is expensive, so validation runs over
all rows up front and either stops at the first bad one or drops and counts them — never silently.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.loading import DataError

LANGUAGE_MODELING = "language_modeling"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
PREFERENCE_IMPLICIT = "preference_implicit"
UNPAIRED_PREFERENCE = "unpaired_preference"
PROMPT_ONLY = "prompt_only"

# Detection order matters: the first format whose columns are all present wins, so formats with
# more columns come before the ones whose columns they contain.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PREFERENCE_IMPLICIT: ("chosen", "rejected"),
    UNPAIRED_PREFERENCE: ("prompt", "completion", "label"),
    PROMPT_COMPLETION: ("prompt", "completion"),
    LANGUAGE_MODELING: ("text",),  # or ("messages",), handled in detect_format
    PROMPT_ONLY: ("prompt",),
}
FORMATS = tuple(FORMAT_COLUMNS)
ROLES = ("system", "user", "assistant", "tool")

# Fields whose content is a model output: they may not be empty.
_OUTPUT_FIELDS = ("completion", "chosen", "rejected")
_MAX_EXAMPLES = 5


def detect_format(rows: list[dict], source: str) -> str:
    """The format whose columns the first row has; DataError listing the columns otherwise."""
    if not rows:
        raise DataError(f"{source}: no rows")
    first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{source} row 1: expected an object, got {type(first).__name__}")
    columns = set(first)
    for fmt, needed in FORMAT_COLUMNS.items():
        if set(needed) <= columns:
            return fmt
        if fmt == LANGUAGE_MODELING and "messages" in columns:
            return fmt
    known = "; ".join(
        f"{f}: {', '.join(c)}" + (" (or messages)" if f == LANGUAGE_MODELING else "")
        for f, c in FORMAT_COLUMNS.items()
    )
    raise DataError(
        f"{source}: cannot tell the dataset format from its columns {sorted(columns)}; "
        f"expected one of {known}"
    )


def validate_rows(
    rows: list[dict],
    fmt: str,
    *,
    source: str,
    on_bad_rows: str = "error",
    max_drop_fraction: float = 0.1,
    allowed_formats: tuple[str, ...] | None = None,
) -> tuple[list[dict], dict]:
    """Check every row of a dataset in format `fmt`; return (good rows, report).

    on_bad_rows="error" raises at the first bad row ("<source> row 17, field 'completion':
    empty completion"); "drop" removes bad rows and fails only when more than
    max_drop_fraction of them went. The report {"rows_in", "rows_out", "dropped": {reason:
    count}, "examples": [...]} is always returned so the caller can log what happened.
    """
    if fmt not in FORMAT_COLUMNS:
        raise DataError(f"{source}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if allowed_formats is not None and fmt not in allowed_formats:
        raise DataError(
            f"{source}: data in format {fmt!r} cannot be used here; this stage accepts "
            f"{', '.join(allowed_formats)}"
        )
    if on_bad_rows not in ("error", "drop"):
        raise ValueError(f"on_bad_rows must be 'error' or 'drop', got {on_bad_rows!r}")
    if not rows:
        raise DataError(f"{source}: no rows")
    kept: list[dict] = []
    dropped: dict[str, int] = {}
    examples: list[str] = []
    for i, row in enumerate(rows, start=1):
        problem = check_row(row, fmt)
        if problem is None:
            kept.append(row)
            continue
        field, reason, detail = problem
        where = f"row {i}, field {field!r}: {detail}"
        if on_bad_rows == "error":
            raise DataError(f"{source} {where}")
        dropped[reason] = dropped.get(reason, 0) + 1
        if len(examples) < _MAX_EXAMPLES:
            examples.append(where)
    report = {"rows_in": len(rows), "rows_out": len(kept), "dropped": dropped, "examples": examples}
    n_dropped = len(rows) - len(kept)
    if n_dropped / len(rows) > max_drop_fraction or not kept:
        raise DataError(
            f"{source}: {n_dropped} of {len(rows)} rows are invalid "
            f"({n_dropped / len(rows):.1%} > max_drop_fraction {max_drop_fraction:.1%}); "
            f"reasons {dropped}; e.g. {'; '.join(examples)}"
        )
    return kept, report


# ---------------------------------------------------------------------------------- row checks

Problem = tuple[str, str, str]  # (field, reason used for counting, detail shown to the user)


def check_row(row: Any, fmt: str) -> Problem | None:
    """The first problem of one row as (field, reason, detail), or None when the row is valid."""
    if not isinstance(row, dict):
        return "<row>", "not an object", f"expected an object, got {type(row).__name__}"
    fields = _fields_of(row, fmt)
    styles: dict[str, str] = {}
    for field in fields:
        if field not in row:
            return field, "missing column", "missing column"
        problem = _check_value(row[field], field, fmt)
        if problem is not None:
            return (field, *problem)
        styles[field] = "standard" if isinstance(row[field], str) else "conversational"
    if len(set(styles.values())) > 1:
        first = styles[fields[0]]
        odd = next(f for f in fields if styles[f] != first)
        return odd, "mixed standard and conversational", (
            f"is {styles[odd]} while {fields[0]!r} is {first}; a row must be all strings or all "
            "message lists"
        )
    if fmt == UNPAIRED_PREFERENCE:
        if "label" not in row:
            return "label", "missing column", "missing column"
        if row["label"] is None:
            return "label", "missing value", "missing value (null)"
        if type(row["label"]) is not bool:  # 0/1 or "true" are refused: bool(x) would guess
            return "label", "wrong type", (
                f"expected a bool (true/false), got {type(row['label']).__name__}"
            )
    if "chosen" in fields and row["chosen"] == row["rejected"]:
        return "rejected", "identical chosen and rejected", "identical chosen and rejected"
    return None


def _fields_of(row: dict, fmt: str) -> tuple[str, ...]:
    """The row's text fields (strings or message lists); KTO's label is checked apart."""
    if fmt == LANGUAGE_MODELING:
        return ("text",) if "text" in row or "messages" not in row else ("messages",)
    return tuple(f for f in FORMAT_COLUMNS[fmt] if f != "label")


def _check_value(value: Any, field: str, fmt: str) -> tuple[str, str] | None:
    """(reason, detail) for a bad text-or-messages value, None when it is fine."""
    if value is None:
        return "missing value", "missing value (null)"
    if field == "text" and not isinstance(value, str):
        return "wrong type", f"expected a string, got {type(value).__name__}"
    if field == "messages" and not isinstance(value, list):
        return "wrong type", f"expected a list of messages, got {type(value).__name__}"
    if isinstance(value, str):
        if value.strip():
            return None
        kind = "empty completion" if field in _OUTPUT_FIELDS else f"empty {field}"
        return kind, f"{kind} (empty or whitespace-only string)"
    if not isinstance(value, list):
        return "wrong type", (
            f"expected a string or a list of messages, got {type(value).__name__}"
        )
    problem = _check_messages(value)
    if problem is not None:
        return problem
    if field in _OUTPUT_FIELDS:
        return _check_assistant_output(value, implicit=fmt == PREFERENCE_IMPLICIT)
    return None


def _check_messages(messages: list) -> tuple[str, str] | None:
    if not messages:
        return "empty messages", "empty list of messages"
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "bad message", f"message {j} is not a {{'role', 'content'}} object: {m!r:.80}"
        if m["role"] not in ROLES:
            return "bad role", f"message {j} has role {m['role']!r}; expected one of {ROLES}"
        content = m["content"]
        if isinstance(content, list):  # parts: {"type": "text", "text": ...} / {"type": "image"}
            problem = _check_parts(content, j)
            if problem is not None:
                return problem
        elif not isinstance(content, str):
            return "wrong type", (
                f"message {j} content: expected a string or a list of parts, got "
                f"{type(content).__name__}"
            )
    return None


def _check_parts(parts: list, j: int) -> tuple[str, str] | None:
    """Content given as parts (vision-language data): text parts hold a string, image parts
    stand for the row's next entry of `images` (checked by the data stage)."""
    for k, p in enumerate(parts, start=1):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            continue
        if kind != "image":
            return "bad message", (f"message {j} content part {k}: expected {{'type': 'text', "
                                   f"'text': ...}} or {{'type': 'image'}}, got {p!r:.60}")
    return None


def content_text(content: str | list) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def _check_assistant_output(messages: list, implicit: bool) -> tuple[str, str] | None:
    """A conversational output needs assistant messages, none of them empty.

    With an explicit prompt the output is only the assistant's turn(s); an implicit-prompt
    preference row holds the whole conversation, whose last message is the answer compared.
    """
    assistant = [m for m in messages if m["role"] == "assistant"]
    if implicit and messages[-1]["role"] != "assistant":
        return "empty completion", "last message is not from the assistant"
    if not assistant:
        return "empty completion", "no assistant message"
    if any(not content_text(m["content"]).strip() for m in assistant):
        return "empty completion", "empty assistant content"
    return None
