"""Format detection and row validation: every bad-row kind names source, row and field."""

from __future__ import annotations

import pytest

from posttrain.data.loading import DataError
from posttrain.data.validation import check_row, detect_format, validate_rows

SRC = "data/train.jsonl"
U = [{"role": "user", "content": "hi"}]
A = [{"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"text": "abc"}, "language_modeling"),
        ({"messages": U + A}, "language_modeling"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"prompt": U, "completion": A}, "prompt_completion"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": "q a", "rejected": "q b"}, "preference_implicit"),
        ({"prompt": "q", "completion": "a", "label": True}, "unpaired_preference"),
        ({"prompt": "q", "answer": "42"}, "prompt_only"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0}, "preference"),
    ],
)
def test_detect_format(row: dict, fmt: str) -> None:
    assert detect_format([row], SRC) == fmt
    _, report = validate_rows([row], fmt, source=SRC)  # every example row is also valid
    assert report == {"rows_in": 1, "rows_out": 1, "dropped": {}, "examples": []}


def test_detect_format_names_source_and_columns() -> None:
    with pytest.raises(DataError, match=r"data/train\.jsonl.*\['answer', 'question'\]"):
        detect_format([{"question": "q", "answer": "a"}], SRC)
    with pytest.raises(DataError, match="no rows"):
        detect_format([], SRC)


GOOD_PC = {"prompt": "q", "completion": "a"}

# (format, bad row, field named, text in the message, reason counted in drop mode)
BAD_ROWS = [
    ("prompt_completion", {"prompt": "q"}, "completion", "missing column", "missing column"),
    ("prompt_completion", {"prompt": "q", "completion": None}, "completion", "null",
     "missing value"),
    ("prompt_completion", {"prompt": "q", "completion": 7}, "completion",
     "expected a string or a list of messages, got int", "wrong type"),
    ("prompt_completion", {"prompt": "q", "completion": " \n"}, "completion",
     "empty completion", "empty completion"),
    ("prompt_completion", {"prompt": "", "completion": "a"}, "prompt", "empty prompt",
     "empty prompt"),
    ("prompt_completion", {"prompt": U, "completion": [{"role": "assistant", "content": " "}]},
     "completion", "empty assistant content", "empty completion"),
    ("prompt_completion", {"prompt": U, "completion": [{"role": "user", "content": "x"}]},
     "completion", "no assistant message", "empty completion"),
    ("prompt_completion", {"prompt": U, "completion": []}, "completion", "empty list",
     "empty messages"),
    ("prompt_completion", {"prompt": [{"role": "human", "content": "hi"}], "completion": A},
     "prompt", "role 'human'", "bad role"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": 3}], "completion": A},
     "prompt", "message 1 content: expected a string or a list of parts, got int", "wrong type"),
    ("prompt_completion", {"prompt": [{"role": "user"}], "completion": A}, "prompt",
     "message 1 is not a", "bad message"),
    ("prompt_completion", {"prompt": U, "completion": "a"}, "completion",
     "standard while 'prompt' is conversational", "mixed standard and conversational"),
    ("language_modeling", {"text": ["a"]}, "text", "expected a string, got list", "wrong type"),
    ("language_modeling", {"text": ""}, "text", "empty text", "empty text"),
    ("language_modeling", {"messages": "hi"}, "messages", "expected a list of messages",
     "wrong type"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected",
     "identical chosen and rejected", "identical chosen and rejected"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": ""}, "rejected",
     "empty completion", "empty completion"),
    ("preference_implicit", {"chosen": A + U, "rejected": U + A}, "chosen",
     "last message is not from the assistant", "empty completion"),
    ("unpaired_preference", {"prompt": "q", "completion": "a", "label": 1}, "label",
     "expected a bool (true/false), got int", "wrong type"),
    ("unpaired_preference", {"prompt": "q", "completion": "a"}, "label", "missing column",
     "missing column"),
    ("prompt_only", {"prompt": "  "}, "prompt", "empty prompt", "empty prompt"),
]


@pytest.mark.parametrize(("fmt", "bad", "field", "text", "reason"), BAD_ROWS)
def test_bad_row_raises_with_source_row_and_field(
    fmt: str, bad: dict, field: str, text: str, reason: str
) -> None:
    good = {
        "prompt_completion": GOOD_PC,
        "language_modeling": {"text": "abc"},
        "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "preference_implicit": {"chosen": U + A, "rejected": U + [{"role": "assistant",
                                                                   "content": "no"}]},
        "unpaired_preference": {"prompt": "q", "completion": "a", "label": False},
        "prompt_only": {"prompt": "q"},
    }[fmt]
    assert check_row(good, fmt) is None
    rows = [good, good, bad, good]
    with pytest.raises(DataError) as err:
        validate_rows(rows, fmt, source=SRC)
    msg = str(err.value)
    assert msg.startswith(f"{SRC} row 3, field {field!r}: "), msg
    assert text in msg
    assert check_row(bad, fmt)[1] == reason


def test_drop_mode_counts_reasons_and_keeps_good_rows() -> None:
    bad_empty = {"prompt": "q", "completion": ""}
    bad_type = {"prompt": "q", "completion": 3}
    rows = [GOOD_PC] * 17 + [bad_empty, bad_type, bad_empty]  # 3 bad of 20 = 15%
    kept, report = validate_rows(
        rows, "prompt_completion", source=SRC, on_bad_rows="drop", max_drop_fraction=0.15
    )
    assert kept == [GOOD_PC] * 17
    assert report["rows_in"] == 20 and report["rows_out"] == 17
    assert report["dropped"] == {"empty completion": 2, "wrong type": 1}
    assert report["examples"][0] == (
        "row 18, field 'completion': empty completion (empty or whitespace-only string)"
    )
    assert report["examples"][1].startswith("row 19, field 'completion': expected a string")


def test_drop_mode_fails_above_max_drop_fraction() -> None:
    rows = [GOOD_PC] * 8 + [{"prompt": "q", "completion": ""}] * 2  # 20% > 10%
    with pytest.raises(DataError, match=r"data/train\.jsonl: 2 of 10 rows are invalid.*20\.0%"):
        validate_rows(rows, "prompt_completion", source=SRC, on_bad_rows="drop")
    # exactly at the threshold is allowed: 1 of 10 = 10%, not more than 10%
    kept, report = validate_rows([GOOD_PC] * 9 + rows[-1:], "prompt_completion", source=SRC,
                                 on_bad_rows="drop")
    assert len(kept) == 9 and report["dropped"] == {"empty completion": 1}


def test_drop_mode_with_every_row_bad_fails_even_at_fraction_one() -> None:
    with pytest.raises(DataError, match="1 of 1 rows are invalid"):
        validate_rows([{"prompt": "q", "completion": ""}], "prompt_completion", source=SRC,
                      on_bad_rows="drop", max_drop_fraction=1.0)


def test_allowed_formats() -> None:
    with pytest.raises(DataError, match=r"'preference'.*accepts language_modeling, "
                                        r"prompt_completion"):
        validate_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}], "preference",
                      source=SRC, allowed_formats=("language_modeling", "prompt_completion"))


def test_unknown_format_and_no_rows() -> None:
    with pytest.raises(DataError, match="unknown format 'chat'"):
        validate_rows([GOOD_PC], "chat", source=SRC)
    with pytest.raises(DataError, match="no rows"):
        validate_rows([], "prompt_completion", source=SRC)


def test_extra_message_keys_and_tool_role_are_fine() -> None:
    prompt = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": "42"},
    ]
    assert check_row({"prompt": prompt, "completion": A}, "prompt_completion") is None
