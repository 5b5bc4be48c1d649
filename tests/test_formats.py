"""Prompts and held-out rows from every data format, on rows shaped like well-known datasets'
public schemas (formats detected as the pipeline detects them)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from posttrain.data import preference
from posttrain.data.formats import eval_rows, prompt_rows, split_implicit
from posttrain.data.loading import DataError
from posttrain.data.validation import (
    LANGUAGE_MODELING,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    UNPAIRED_PREFERENCE,
    detect_format,
)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


# trl-lib/ultrafeedback_binarized: chosen / rejected conversations, the prompt implicit.
ULTRAFEEDBACK = [
    {
        "chosen": [_user("What is 2+2?"), _assistant("2+2 is 4.")],
        "rejected": [_user("What is 2+2?"), _assistant("It is 5.")],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
    {
        "chosen": [{"role": "system", "content": "Be brief."}, _user("Capital of France?"),
                   _assistant("Paris.")],
        "rejected": [{"role": "system", "content": "Be brief."}, _user("Capital of France?"),
                     _assistant("Lyon.")],
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    },
]

# Anthropic/hh-rlhf: whole transcripts as strings sharing the "\n\nHuman: ...\n\nAssistant:"
# prefix.
HH = [
    {
        "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.",
        "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No idea.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: Why?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No.",
    },
]

# HuggingFaceH4/ultrachat_200k: a string `prompt`, a `prompt_id` and the multi-turn `messages`.
ULTRACHAT = [
    {
        "prompt": "Name a prime.",
        "prompt_id": "abc123",
        "messages": [_user("Name a prime."), _assistant("7."), _user("Another?"),
                     _assistant("11.")],
    }
]

# openai/gsm8k made prompt-only for GRPO: the question as `prompt`, the answer as `solution`.
GSM8K = [
    {"prompt": [_user("Natalia sold 48 clips in April and half as many in May. Total?")],
     "solution": "72"},
    {"prompt": [_user("Weng earns $12 an hour. She worked 50 minutes. Earnings?")],
     "solution": "10"},
]

# trl-lib/kto-mix-14k: conversational prompt and completion, bool label.
KTO_MIX = [
    {"prompt": [_user("Say hi")], "completion": [_assistant("Hi!")], "label": True},
    {"prompt": [_user("Say bye")], "completion": [_assistant("Whatever.")], "label": False},
]

# Plain prompt-completion and explicit preference, standard strings, with an extra column.
SFT = [{"prompt": "3+4=", "completion": " 7", "task": "add"}]
EXPLICIT = [{"prompt": "rev abcd", "chosen": " dcba", "rejected": " abcd", "task": "reverse"}]


def _both(rows):
    fmt = detect_format(rows, "test data")
    return fmt, prompt_rows(rows, fmt, "test data"), eval_rows(rows, fmt, "test data")


def test_ultrafeedback_implicit_prompt_is_the_shared_messages():
    fmt, prompts, held = _both(ULTRAFEEDBACK)
    assert fmt == PREFERENCE_IMPLICIT
    assert prompts == [
        {"prompt": [_user("What is 2+2?")], "score_chosen": 8.0, "score_rejected": 3.0},
        {"prompt": [{"role": "system", "content": "Be brief."}, _user("Capital of France?")],
         "score_chosen": 9.0, "score_rejected": 1.0},
    ]
    assert held[0] == {"prompt": [_user("What is 2+2?")], "completion": [_assistant("2+2 is 4.")],
                       "score_chosen": 8.0, "score_rejected": 3.0}
    assert held[1]["completion"] == [_assistant("Paris.")]


def test_hh_strings_split_at_the_common_character_prefix():
    """The responses start differently ("Put" / "No", "Why" / "No"), so the prompt ends exactly
    after "Assistant: "; the multi-turn one keeps the earlier turns in the prompt."""
    fmt, prompts, held = _both(HH)
    assert fmt == PREFERENCE_IMPLICIT
    assert prompts[0] == {"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant: "}
    assert prompts[1]["prompt"] == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: "
    )
    assert held[0]["completion"] == "Put it in boiling water."
    assert held[1]["completion"] == "Why?"
    # The documented limit of a character split: shared first characters go to the prompt.
    same_start = {"chosen": "\n\nHuman: Q\n\nAssistant: I think so",
                  "rejected": "\n\nHuman: Q\n\nAssistant: I know"}
    assert prompt_rows([same_start], PREFERENCE_IMPLICIT, "hh")[0]["prompt"].endswith(": I ")


def test_implicit_split_is_the_one_preference_tokenization_uses():
    assert preference._split_raw is split_implicit
    for row in ULTRAFEEDBACK + HH:
        converted = preference.pairs_to_unpaired([row])[0]
        assert converted["prompt"] == prompt_rows([row], PREFERENCE_IMPLICIT, "x")[0]["prompt"]


def test_ultrachat_messages_prompt_is_the_conversation_before_the_last_assistant_turn():
    fmt, prompts, held = _both(ULTRACHAT)
    assert fmt == LANGUAGE_MODELING
    before = [_user("Name a prime."), _assistant("7."), _user("Another?")]
    # The dataset's own string `prompt` column is replaced by the derived conversation.
    assert prompts == [{"prompt": before, "prompt_id": "abc123"}]
    assert held == [{"prompt": before, "completion": [_assistant("11.")], "prompt_id": "abc123"}]


def test_messages_after_the_last_assistant_turn_are_left_out():
    rows = [{"messages": [_user("a"), _assistant("b"), _user("c")]}]
    assert eval_rows(rows, LANGUAGE_MODELING, "chat") == [
        {"prompt": [_user("a")], "completion": [_assistant("b")]}
    ]


def test_gsm8k_prompt_only_keeps_the_solution_column_and_has_no_reference():
    fmt, prompts, held = _both(GSM8K)
    assert fmt == PROMPT_ONLY
    assert prompts == GSM8K and held == GSM8K
    assert all("completion" not in r for r in held)


def test_kto_mix_reference_only_for_desirable_completions():
    fmt, prompts, held = _both(KTO_MIX)
    assert fmt == UNPAIRED_PREFERENCE
    assert prompts == [{"prompt": [_user("Say hi")]}, {"prompt": [_user("Say bye")]}]
    assert held == [{"prompt": [_user("Say hi")], "completion": [_assistant("Hi!")]},
                    {"prompt": [_user("Say bye")]}]


def test_prompt_completion_and_explicit_preference():
    fmt, prompts, held = _both(SFT)
    assert fmt == PROMPT_COMPLETION
    assert prompts == [{"prompt": "3+4=", "task": "add"}]
    assert held == SFT
    fmt, prompts, held = _both(EXPLICIT)
    assert fmt == PREFERENCE
    assert prompts == [{"prompt": "rev abcd", "task": "reverse"}]
    assert held == [{"prompt": "rev abcd", "completion": " dcba", "task": "reverse"}]


def test_text_rows_have_no_prompt():
    rows = [{"text": "Once upon a time"}]
    for fn in (prompt_rows, eval_rows):
        with pytest.raises(DataError) as info:
            fn(rows, detect_format(rows, "data/books.jsonl"), "data/books.jsonl")
        message = str(info.value)
        assert "data/books.jsonl" in message and "`text`" in message
        assert PROMPT_ONLY in message and PREFERENCE_IMPLICIT in message and "messages" in message


@pytest.mark.parametrize(
    "rows, fmt, message",
    [
        ([{"messages": [_user("only a question")]}], LANGUAGE_MODELING, "row 1: .*no assistant"),
        ([{"chosen": "abc", "rejected": "xyz"}], PREFERENCE_IMPLICIT, "row 1: .*share no"),
        ([{"chosen": "abc", "rejected": [_assistant("x")]}], PREFERENCE_IMPLICIT, "both be strings"),
        ([SFT[0], {"prompt": "1+1="}], PROMPT_COMPLETION, r"row 2: .*\['completion'\]"),
        (SFT, "no_such_format", "unknown format 'no_such_format'"),
    ],
)
def test_bad_rows_name_the_source_and_row(rows, fmt, message):
    with pytest.raises(DataError, match=message) as info:
        prompt_rows(rows, fmt, "data/x.jsonl")
    assert "data/x.jsonl" in str(info.value)


def test_derived_rows_share_nothing_with_the_input():
    rows = copy.deepcopy(ULTRACHAT)
    original = copy.deepcopy(rows)
    held = eval_rows(rows, LANGUAGE_MODELING, "x")
    held[0]["prompt"][0]["content"] = "edited"
    held[0]["completion"][0]["content"] = "edited"
    assert rows == original


def test_module_imports_no_torch():
    code = "import sys, posttrain.data.formats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
