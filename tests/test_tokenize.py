"""SFT tokenization: loss masks token by token, truncation modes, the chat-template prefix check.

The tokenizer is one token per character (tests/_tiny_tok.py): <eos>=1 <|user|>=2
<|assistant|>=3 <|end|>=5, a=6 b=7 c=8 d=9 e=10 f=11 ... h=13 i=14 o=20 y=30, <bos>=50.
"""

from __future__ import annotations

import pytest
from _tiny_tok import build_tiny_tokenizer

from posttrain.data.loading import DataError
from posttrain.data.tokenize import (
    chat_template_ids,
    tokenize_prompt,
    tokenize_sft_example,
    tokenize_sft_rows,
)

X = -100
TOK = build_tiny_tokenizer()
U = [{"role": "user", "content": "ab"}]
A = [{"role": "assistant", "content": "cd"}]


def tok(row: dict, **kw) -> dict | None:
    kw.setdefault("max_length", 64)
    return tokenize_sft_example(row, TOK, **kw)


def test_standard_prompt_completion_masks_the_prompt() -> None:
    """"ab" + "cd" -> a b | c d <eos>; loss on c d <eos> only."""
    out = tok({"prompt": "ab", "completion": "cd"})
    assert out == {"input_ids": [6, 7, 8, 9, 1], "labels": [X, X, 8, 9, 1]}


def test_completion_only_loss_off_trains_on_everything() -> None:
    out = tok({"prompt": "ab", "completion": "cd"}, completion_only_loss=False)
    assert out == {"input_ids": [6, 7, 8, 9, 1], "labels": [6, 7, 8, 9, 1]}


def test_bos_goes_on_the_prompt_only() -> None:
    """A Llama-like tokenizer adds <bos> to the prompt; the completion gets no second <bos>."""
    bos_tok = build_tiny_tokenizer(add_bos=True)
    out = tokenize_sft_example({"prompt": "ab", "completion": "cd"}, bos_tok, max_length=64)
    assert out == {"input_ids": [50, 6, 7, 8, 9, 1], "labels": [X, X, X, 8, 9, 1]}
    assert tokenize_prompt("ab", bos_tok) == [50, 6, 7]


def test_conversational_prompt_completion() -> None:
    """<|user|> a b <|end|> <|assistant|> | c d <|end|>: the template's <|end|> closes the turn."""
    out = tok({"prompt": U, "completion": A})
    assert out == {"input_ids": [2, 6, 7, 5, 3, 8, 9, 5], "labels": [X] * 5 + [8, 9, 5]}


def test_prompt_ids_match_the_training_prefix() -> None:
    """Evaluation prompts the model exactly as training did."""
    for row in ({"prompt": "ab", "completion": "cd"}, {"prompt": U, "completion": A}):
        out = tok(row)
        prompt_ids = tokenize_prompt(row, TOK)
        n = out["labels"].index(next(x for x in out["labels"] if x != X))
        assert out["input_ids"][:n] == prompt_ids
    assert tokenize_prompt(U, TOK) == [2, 6, 7, 5, 3]
    assert tokenize_prompt("ab", TOK) == [6, 7]


def test_language_modeling_text_and_messages() -> None:
    assert tok({"text": "ab"}) == {"input_ids": [6, 7, 1], "labels": [6, 7, 1]}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = [2, 13, 14, 5, 3, 30, 20, 5]
    assert tok({"messages": msgs}) == {"input_ids": expected, "labels": expected}
    # completion_only_loss does not apply: there is no prompt
    assert tok({"text": "ab"}, completion_only_loss=True)["labels"] == [6, 7, 1]


def test_chat_template_must_render_the_prompt_as_prefix() -> None:
    """The generation prompt adds a space the assistant turn does not start with."""
    bad = build_tiny_tokenizer(
        chat_template="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    with pytest.raises(DataError, match="^x row 4: chat template does not render the prompt"):
        tokenize_sft_example({"prompt": U, "completion": A}, bad, max_length=64, where="x row 4")


def test_conversational_data_needs_a_chat_template() -> None:
    with pytest.raises(DataError, match="chat template"):
        tokenize_sft_example(
            {"prompt": U, "completion": A}, build_tiny_tokenizer(chat_template=None), max_length=9
        )


LONG = {"prompt": "abcd", "completion": "ef"}  # a b c d | e f <eos> = 7 tokens


def test_truncation_drop_and_error() -> None:
    assert tok(LONG, max_length=7) is not None
    assert tok(LONG, max_length=6, truncation="drop") is None
    with pytest.raises(DataError, match=r"^f row 3: example has 7 tokens, more than max_length=6"):
        tok(LONG, max_length=6, truncation="error", where="f row 3")


def test_truncate_right() -> None:
    assert tok(LONG, max_length=5, truncation="truncate_right") == {
        "input_ids": [6, 7, 8, 9, 10], "labels": [X, X, X, X, 10]
    }
    # cut inside the prompt: no completion token left, nothing to learn -> dropped
    assert tok(LONG, max_length=4, truncation="truncate_right") is None
    assert tok(LONG, max_length=4, truncation="truncate_right", completion_only_loss=False) == {
        "input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]
    }


def test_truncate_prompt_keeps_the_completion() -> None:
    """max_length 5 - completion 3 = 2 prompt tokens kept from the right: c d."""
    assert tok(LONG, max_length=5, truncation="truncate_prompt") == {
        "input_ids": [8, 9, 10, 11, 1], "labels": [X, X, 10, 11, 1]
    }
    # room for 1 prompt token: still kept; for 0: dropped
    assert tok(LONG, max_length=4, truncation="truncate_prompt")["input_ids"] == [9, 10, 11, 1]
    assert tok(LONG, max_length=3, truncation="truncate_prompt") is None


def test_truncate_prompt_on_language_modeling_cuts_the_end() -> None:
    assert tok({"text": "abcdef"}, max_length=4, truncation="truncate_prompt") == {
        "input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]
    }


def test_tokenize_rows_report() -> None:
    rows = [{"prompt": "ab", "completion": "cd"}, LONG, {"prompt": "abcdef", "completion": "g"}]
    examples, report = tokenize_sft_rows(rows, TOK, max_length=6, truncation="truncate_right")
    # row 1: 5 tokens ok; row 2: 7 -> cut to 6 (a b c d e f); row 3: a..f cut, no completion left
    assert [e["input_ids"] for e in examples] == [[6, 7, 8, 9, 1], [6, 7, 8, 9, 10, 11]]
    assert report == {"rows_in": 3, "rows_out": 2, "truncated": 1, "dropped_too_long": 0,
                      "dropped_no_loss": 1}
    with pytest.raises(DataError, match=r"^train\.jsonl row 2: example has 7 tokens"):
        tokenize_sft_rows(rows, TOK, max_length=6, truncation="error", source="train.jsonl")


def test_bad_rows() -> None:
    with pytest.raises(DataError, match="both be strings or both messages"):
        tok({"prompt": U, "completion": "cd"})
    with pytest.raises(DataError, match=r"not an SFT row.*\['chosen', 'rejected'\]"):
        tok({"chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match="truncation must be one of"):
        tok(LONG, truncation="left")


class _FakeTokenizer:
    """apply_chat_template as older/newer transformers versions return it."""

    chat_template = "x"

    def __init__(self, result: object, accepts_return_dict: bool) -> None:
        self.result, self.accepts_return_dict, self.kwargs = result, accepts_return_dict, {}

    def apply_chat_template(self, messages: list, **kwargs: object) -> object:
        if "return_dict" in kwargs and not self.accepts_return_dict:
            raise TypeError("unexpected keyword argument 'return_dict'")
        self.kwargs = kwargs
        return self.result


@pytest.mark.parametrize(
    "result", [[4, 5], {"input_ids": [4, 5], "attention_mask": [1, 1]}, {"input_ids": [[4, 5]]}]
)
@pytest.mark.parametrize("accepts_return_dict", [True, False])
def test_chat_template_ids_normalises_return_types(result: object, accepts_return_dict: bool):
    fake = _FakeTokenizer(result, accepts_return_dict)
    assert chat_template_ids(fake, U, add_generation_prompt=True) == [4, 5]
    assert fake.kwargs["add_generation_prompt"] is True and fake.kwargs["tokenize"] is True


def test_transformers_returns_batch_encoding_without_return_dict_false() -> None:
    """Documents the transformers 5 behaviour chat_template_ids guards against."""
    raw = TOK.apply_chat_template(U, add_generation_prompt=True, tokenize=True)
    raw_ids = raw["input_ids"] if hasattr(raw, "keys") else raw
    assert list(raw_ids) == chat_template_ids(TOK, U, add_generation_prompt=True)
