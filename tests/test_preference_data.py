"""Preference data: pair/unpaired tokenization, bad-pair accounting, and the collators.

Hand-checked with the one-token-per-character tokenizer of tests/_tiny_tok.py:
<pad>=0 <eos>=1 <|user|>=2 <|assistant|>=3 <|system|>=4 <|end|>=5, a=6 b=7 c=8 d=9 e=10 f=11
g=12 h=13 i=14 ... x=29 y=30, <bos>=50.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_tok import build_tiny_tokenizer

from posttrain.config import DemoTaskConfig
from posttrain.data.demo import generate_kto, generate_preference
from posttrain.data.loading import DataError
from posttrain.data.preference import (
    collate_pairs,
    collate_unpaired,
    pairs_to_unpaired,
    tokenize_preference_rows,
    tokenize_unpaired_rows,
)
from posttrain.data.preference_pairs import BadPairError, tokenize_pair, tokenize_unpaired
from posttrain.data.tokenize import tokenize_prompt
from posttrain.models import build_tiny_tokenizer as build_project_tokenizer

TOK = build_tiny_tokenizer()
EOS, END = 1, 5


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def pair(row: dict, tok=TOK, **kw) -> dict | None:
    kw.setdefault("max_length", 64)
    return tokenize_pair(row, tok, **kw)


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------ prompt / response split


def test_standard_explicit_pair() -> None:
    """ "ab" | "cd"+<eos> vs "ef"+<eos>: the response ids exclude the prompt."""
    assert pair({"prompt": "ab", "chosen": "cd", "rejected": "ef"}) == {
        "prompt_ids": [6, 7],
        "chosen_ids": [8, 9, EOS],
        "rejected_ids": [10, 11, EOS],
    }


@pytest.mark.parametrize("add_bos", [False, True])
def test_standard_implicit_prompt_gives_the_explicit_split(add_bos: bool) -> None:
    """The common token prefix of "abcd"/"abef" is the prompt "ab" (with <bos> when the
    tokenizer adds one), exactly as if the prompt had been given."""
    tok = build_tiny_tokenizer(add_bos=add_bos)
    explicit = pair({"prompt": "ab", "chosen": "cd", "rejected": "ef"}, tok)
    implicit = pair({"chosen": "abcd", "rejected": "abef"}, tok)
    assert implicit == explicit
    assert explicit["prompt_ids"] == ([50] if add_bos else []) + [6, 7]
    assert explicit["prompt_ids"] == tokenize_prompt("ab", tok)  # as evaluation prompts it


def test_conversational_explicit_and_implicit_give_the_same_split() -> None:
    """<|user|>ab<|end|><|assistant|> | cd<|end|> vs ef<|end|>."""
    explicit = pair(
        {"prompt": [user("ab")], "chosen": [assistant("cd")], "rejected": [assistant("ef")]}
    )
    assert explicit == {
        "prompt_ids": [2, 6, 7, END, 3],
        "chosen_ids": [8, 9, END],
        "rejected_ids": [10, 11, END],
    }
    implicit = pair(
        {"chosen": [user("ab"), assistant("cd")], "rejected": [user("ab"), assistant("ef")]}
    )
    assert implicit == explicit


def test_multi_turn_implicit_prompt_is_all_shared_messages() -> None:
    shared = [{"role": "system", "content": "s"}, user("a"), assistant("b"), user("c")]
    implicit = pair({"chosen": shared + [assistant("d")], "rejected": shared + [assistant("e")]})
    explicit = pair({"prompt": shared, "chosen": [assistant("d")], "rejected": [assistant("e")]})
    assert implicit == explicit
    # <|system|>s<|end|> <|user|>a<|end|> <|assistant|>b<|end|> <|user|>c<|end|> <|assistant|>
    assert implicit["prompt_ids"] == [4, 24, END, 2, 6, END, 3, 7, END, 2, 8, END, 3]
    assert implicit["chosen_ids"] == [9, END]


def test_implicit_conversation_that_differs_before_the_answer_is_refused() -> None:
    row = {
        "chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
        "rejected": [user("a"), assistant("b"), user("x"), assistant("d")],
    }
    with pytest.raises(BadPairError, match="row 4: chosen and rejected differ before") as e:
        pair(row, where="f.jsonl row 4")
    assert e.value.reason == "chosen and rejected differ before the assistant's turn"


def test_margin_is_carried_and_collated() -> None:
    ex = pair({"prompt": "ab", "chosen": "c", "rejected": "d", "margin": 2})
    assert ex["margin"] == 2.0
    batch = collate_pairs([ex, {**ex, "margin": 0.5}], pad_token_id=0)
    assert batch["margin"].tolist() == [2.0, 0.5]
    no_margin = {k: v for k, v in ex.items() if k != "margin"}
    with pytest.raises(ValueError, match="'margin'"):
        collate_pairs([ex, no_margin], pad_token_id=0)


# -------------------------------------------------------------------------------- collate

# Two pairs: "ab" | "c" / "de"  and  "f" | "gh" / "i"
P1 = {"prompt_ids": [6, 7], "chosen_ids": [8, EOS], "rejected_ids": [9, 10, EOS]}
P2 = {"prompt_ids": [11], "chosen_ids": [12, 13, EOS], "rejected_ids": [14, EOS]}


def test_tokenized_hand_example_matches_the_fixtures() -> None:
    assert pair({"prompt": "ab", "chosen": "c", "rejected": "de"}) == P1
    assert pair({"prompt": "f", "chosen": "gh", "rejected": "i"}) == P2


def test_collate_pairs_right_padding_token_by_token() -> None:
    """Rows: chosen of pair 1, chosen of pair 2, then rejected of pair 1, rejected of pair 2."""
    b = collate_pairs([P1, P2], pad_token_id=0)
    assert torch.equal(
        b["input_ids"],
        t([[6, 7, 8, 1, 0], [11, 12, 13, 1, 0], [6, 7, 9, 10, 1], [11, 14, 1, 0, 0]]),
    )
    assert torch.equal(
        b["attention_mask"], t([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    )
    assert torch.equal(
        b["completion_mask"],
        t([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]),
    )
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].shape == (4, 5)


def test_collate_pairs_order_is_all_chosen_then_all_rejected() -> None:
    pairs = [
        pair({"prompt": p, "chosen": c, "rejected": r})
        for p, c, r in (("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i"))
    ]
    b = collate_pairs(pairs, pad_token_id=0)
    firsts = b["input_ids"][:, 1].tolist()  # the first response token of each row
    assert firsts == [7, 10, 13, 8, 11, 14]  # b e h | c f i
    assert b["input_ids"][:, 0].tolist() == [6, 9, 12, 6, 9, 12]  # prompts repeat in order


def test_masks_come_from_lengths_when_pad_is_eos() -> None:
    """Padding with the EOS id: the attention mask still covers each row's real tokens, its
    EOS included (a search for the first pad token would stop at the real EOS of row 4)."""
    b = collate_pairs([P1, P2], pad_token_id=EOS)
    assert torch.equal(
        b["input_ids"],
        t([[6, 7, 8, 1, 1], [11, 12, 13, 1, 1], [6, 7, 9, 10, 1], [11, 14, 1, 1, 1]]),
    )
    assert b["attention_mask"].sum(1).tolist() == [4, 4, 5, 3]
    assert torch.equal(
        b["completion_mask"],
        t([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]),
    )


@pytest.mark.parametrize("pad", [0, EOS])
def test_collate_pairs_left_padding(pad: int) -> None:
    b = collate_pairs([P1, P2], pad_token_id=pad, padding_side="left")
    assert torch.equal(
        b["input_ids"],
        t([[pad, 6, 7, 8, 1], [pad, 11, 12, 13, 1], [6, 7, 9, 10, 1], [pad, pad, 11, 14, 1]]),
    )
    assert torch.equal(
        b["attention_mask"], t([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    )
    assert torch.equal(
        b["completion_mask"],
        t([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]),
    )


def test_collate_rejects_an_unknown_padding_side() -> None:
    with pytest.raises(ValueError, match="padding_side"):
        collate_pairs([P1], pad_token_id=0, padding_side="middle")


# ------------------------------------------------------------------------------ truncation

LONG = {"prompt": "abcd", "chosen": "ef", "rejected": "g"}  # 4 + max(3, 2) = 7 tokens


def test_pair_within_max_length_is_kept_whole() -> None:
    assert pair(LONG, max_length=7) == {
        "prompt_ids": [6, 7, 8, 9],
        "chosen_ids": [10, 11, EOS],
        "rejected_ids": [12, EOS],
    }


def test_truncation_drop_and_error() -> None:
    assert pair(LONG, max_length=6, truncation="drop") is None
    with pytest.raises(DataError, match=r"f row 2: pair has 7 tokens .*max_length=6"):
        pair(LONG, max_length=6, truncation="error", where="f row 2")


def test_truncate_prompt_cuts_from_the_left() -> None:
    out = pair(LONG, max_length=5, truncation="truncate_prompt")
    assert out == {"prompt_ids": [8, 9], "chosen_ids": [10, 11, EOS], "rejected_ids": [12, EOS]}
    # one prompt token must remain: 3 response tokens leave none at max_length=3
    assert pair(LONG, max_length=4, truncation="truncate_prompt")["prompt_ids"] == [9]
    assert pair(LONG, max_length=3, truncation="truncate_prompt") is None


def test_truncate_right_cuts_both_responses() -> None:
    out = pair(LONG, max_length=5, truncation="truncate_right")
    assert out == {"prompt_ids": [6, 7, 8, 9], "chosen_ids": [10], "rejected_ids": [12]}
    assert pair(LONG, max_length=4, truncation="truncate_right") is None  # no room left
    # responses that only differ past the cut would become identical: dropped
    same_start = {"prompt": "abcd", "chosen": "ex", "rejected": "ey"}
    assert pair(same_start, max_length=5, truncation="truncate_right") is None


def test_unknown_truncation_mode() -> None:
    with pytest.raises(ValueError, match="truncation"):
        pair(LONG, truncation="cut")


def test_unpaired_truncation() -> None:
    row = {"prompt": "abcd", "completion": "ef", "label": True}  # 4 + 3 tokens
    kw = {"max_length": 5}
    assert tokenize_unpaired(row, TOK, max_length=7) == {
        "prompt_ids": [6, 7, 8, 9],
        "completion_ids": [10, 11, EOS],
        "label": True,
    }
    assert tokenize_unpaired(row, TOK, **kw) is None
    with pytest.raises(DataError, match="7 tokens"):
        tokenize_unpaired(row, TOK, truncation="error", **kw)
    assert tokenize_unpaired(row, TOK, truncation="truncate_prompt", **kw)["prompt_ids"] == [8, 9]
    assert tokenize_unpaired(row, TOK, truncation="truncate_right", **kw)["completion_ids"] == [10]


# ------------------------------------------------------------------------------ bad pairs


def bad_dataset() -> list[dict]:
    good = {"prompt": "ab", "chosen": "cd", "rejected": "ef"}
    return [
        dict(good),  # 1
        {"prompt": "ab", "chosen": "cd", "rejected": "cd"},  # 2 identical
        dict(good),  # 3
        {"prompt": "ab", "chosen": "  ", "rejected": "ef"},  # 4 empty response
        {"prompt": None, "chosen": "cd", "rejected": "ef"},  # 5 missing prompt
        {"prompt": "ab", "chosen": "cdefghijk", "rejected": "e"},  # 6 over-length (2 + 10)
        {"chosen": "abcd", "rejected": "abef"},  # 7 missing prompt (no key)
        dict(good),  # 8
        {"prompt": "", "chosen": "cd", "rejected": "ef"},  # 9 missing prompt (empty)
        dict(good),  # 10
    ]


EXPECTED_DROPS = {
    "identical chosen and rejected": 1,
    "empty response": 1,
    "missing prompt": 3,
    "over-length": 1,
}


def test_bad_pairs_are_counted_by_reason_below_the_threshold() -> None:
    examples, report = tokenize_preference_rows(
        bad_dataset(), TOK, max_length=8, source="prefs.jsonl", max_bad_fraction=0.6
    )
    assert report["rows_in"] == 10 and report["rows_out"] == 4 == len(examples)
    assert report["dropped"] == EXPECTED_DROPS
    assert report["examples"] == [
        "row 2: identical chosen and rejected",
        "row 4: empty response",
        "row 5: missing prompt",
        "row 6: over-length",
        "row 7: missing prompt",
    ]
    assert report["truncated"] == 0
    assert all(e["prompt_ids"] == [6, 7] for e in examples)


def test_bad_pairs_above_the_threshold_raise_with_source_counts_and_rows() -> None:
    with pytest.raises(DataError) as e:
        tokenize_preference_rows(
            bad_dataset(), TOK, max_length=8, source="prefs.jsonl", max_bad_fraction=0.5
        )
    msg = str(e.value)
    assert msg.startswith("prefs.jsonl: 6 of 10 preference pairs dropped")
    for reason, n in EXPECTED_DROPS.items():
        assert f"{reason}: {n}" in msg
    for row in ("row 2:", "row 4:", "row 5:", "row 6:", "row 7:"):
        assert row in msg


def test_exactly_at_the_threshold_passes() -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 9 + [
        {"prompt": "a", "chosen": "b", "rejected": "b"}
    ]
    _, report = tokenize_preference_rows(rows, TOK, max_length=8, max_bad_fraction=0.1)
    assert report["dropped"] == {"identical chosen and rejected": 1}
    with pytest.raises(DataError, match="data: 1 of 10 .*row 10: identical"):
        tokenize_preference_rows(rows, TOK, max_length=8, max_bad_fraction=0.05)


def test_every_row_bad_fails_even_at_fraction_one() -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "b"}]
    with pytest.raises(DataError, match="1 of 1"):
        tokenize_preference_rows(rows, TOK, max_length=8, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="no rows"):
        tokenize_preference_rows([], TOK, max_length=8)


def test_bad_conversational_pairs() -> None:
    """Identical / empty assistant turns in messages, and implicit rows with nothing shared."""
    u = [user("ab")]
    rows = [
        {"prompt": u, "chosen": [assistant("cd")], "rejected": [assistant("cd")]},
        {"prompt": u, "chosen": [assistant(" ")], "rejected": [assistant("cd")]},
        {"prompt": [], "chosen": [assistant("c")], "rejected": [assistant("d")]},
    ]
    _, report = tokenize_preference_rows(
        rows + [{"prompt": u, "chosen": [assistant("c")], "rejected": [assistant("d")]}],
        TOK,
        max_length=32,
        max_bad_fraction=0.8,
    )
    assert report["dropped"] == {
        "identical chosen and rejected": 1,
        "empty response": 1,
        "missing prompt": 1,
    }
    implicit = [
        {"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("d")]},
        {"chosen": [user("a"), assistant("c")], "rejected": [user("a"), assistant("c")]},
        {"chosen": "xabc", "rejected": "yabc"},  # no shared leading text
        {"chosen": "ab", "rejected": "abc"},  # the chosen response would be only <eos>
        {"chosen": "abc", "rejected": "abd"},
    ]
    _, report = tokenize_preference_rows(implicit, TOK, max_length=32, max_bad_fraction=0.8)
    assert report["dropped"] == {
        "missing prompt": 2,
        "identical chosen and rejected": 1,
        "empty response": 1,
    }


def test_tokenize_pair_raises_bad_pair_errors_with_the_reason() -> None:
    with pytest.raises(BadPairError, match="^d row 3: identical chosen and rejected") as e:
        pair({"prompt": "a", "chosen": "b", "rejected": "b"}, where="d row 3")
    assert isinstance(e.value, DataError) and e.value.reason == "identical chosen and rejected"
    with pytest.raises(DataError, match="both be strings or both messages"):
        pair({"prompt": "a", "chosen": [assistant("b")], "rejected": [assistant("c")]})


def test_unpaired_bad_rows() -> None:
    rows = [
        {"prompt": "ab", "completion": "c", "label": True},
        {"prompt": "ab", "completion": "", "label": True},  # empty response
        {"prompt": None, "completion": "c", "label": False},  # missing prompt
        {"prompt": "ab", "completion": "c", "label": 1},  # not a bool
        {"prompt": "ab", "completion": "cdefghij", "label": False},  # over-length
        {"prompt": "ab", "completion": "d", "label": False},
    ]
    examples, report = tokenize_unpaired_rows(
        rows, TOK, max_length=6, source="kto.jsonl", max_bad_fraction=0.7
    )
    assert report["dropped"] == {
        "empty response": 1,
        "missing prompt": 1,
        "missing or non-bool label": 1,
        "over-length": 1,
    }
    assert [e["label"] for e in examples] == [True, False]
    assert (report["desirable"], report["undesirable"]) == (1, 1)
    with pytest.raises(DataError, match=r"kto.jsonl: 4 of 6 rows dropped.*row 2: empty"):
        tokenize_unpaired_rows(rows, TOK, max_length=6, source="kto.jsonl")


# ------------------------------------------------------------------------ pairs -> unpaired


def test_pairs_to_unpaired_explicit() -> None:
    rows = [
        {
            "prompt": [user("ab")],
            "chosen": [assistant("c")],
            "rejected": [assistant("d")],
            "task": "t1",
        },
        {"prompt": "ef", "chosen": "g", "rejected": "h", "task": "t2"},
    ]
    out = pairs_to_unpaired(rows)
    assert [(r["task"], r["label"]) for r in out] == [
        ("t1", True),
        ("t1", False),
        ("t2", True),
        ("t2", False),
    ]
    assert out[0] == {
        "prompt": [user("ab")],
        "completion": [assistant("c")],
        "label": True,
        "task": "t1",
    }
    assert out[3] == {"prompt": "ef", "completion": "h", "label": False, "task": "t2"}
    out[0]["prompt"][0]["content"] = "changed"  # rows share no lists with each other or the input
    assert out[1]["prompt"][0]["content"] == "ab" and rows[0]["prompt"][0]["content"] == "ab"


def test_pairs_to_unpaired_implicit_splits_the_shared_prefix() -> None:
    conv = {"chosen": [user("ab"), assistant("c")], "rejected": [user("ab"), assistant("d")]}
    std = {"chosen": "abcd", "rejected": "abef"}
    out = pairs_to_unpaired([conv, std])
    assert out[0] == {"prompt": [user("ab")], "completion": [assistant("c")], "label": True}
    assert out[1] == {"prompt": [user("ab")], "completion": [assistant("d")], "label": False}
    assert out[2] == {"prompt": "ab", "completion": "cd", "label": True}
    assert out[3] == {"prompt": "ab", "completion": "ef", "label": False}
    # the unpaired prompt tokenizes exactly as tokenize_pair's implicit prompt
    for src, (c, r) in ((conv, out[:2]), (std, out[2:])):
        p = pair(src)
        assert tokenize_unpaired(c, TOK, max_length=64)["completion_ids"] == p["chosen_ids"]
        assert tokenize_unpaired(r, TOK, max_length=64)["prompt_ids"] == p["prompt_ids"]


# -------------------------------------------------------------------------- collate unpaired

K = [
    {"prompt_ids": [6], "completion_ids": [7, EOS], "label": True},
    {"prompt_ids": [8, 9], "completion_ids": [10, EOS], "label": False},
    {"prompt_ids": [11], "completion_ids": [12, 13, EOS], "label": True},
]


def test_collate_unpaired_pads_rows_and_keeps_labels() -> None:
    b = collate_unpaired(K, pad_token_id=0)
    assert torch.equal(b["input_ids"], t([[6, 7, 1, 0], [8, 9, 10, 1], [11, 12, 13, 1]]))
    assert torch.equal(b["completion_mask"], t([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]]))
    assert torch.equal(b["attention_mask"], t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    assert b["labels"].dtype == torch.bool and b["labels"].tolist() == [True, False, True]
    assert "kl_input_ids" not in b  # KL rows: recipes.kto.collate pairs and pads them
    left = collate_unpaired(K[:1], pad_token_id=EOS, padding_side="left")
    assert left["input_ids"].tolist() == [[6, 7, 1]]


# ------------------------------------------------------------------------------- demo data


@pytest.mark.parametrize("conversational", [True, False])
def test_demo_rows_tokenize_without_drops(conversational: bool) -> None:
    tok = build_project_tokenizer()
    cfg = DemoTaskConfig(num_train=60, num_eval=12, conversational=conversational)
    prefs = generate_preference(cfg, seed=0, split="train")
    examples, report = tokenize_preference_rows(
        prefs, tok, max_length=48, max_bad_fraction=0.0, source="demo"
    )
    assert report["rows_out"] == report["rows_in"] == len(prefs) and report["dropped"] == {}
    for row, ex in zip(prefs, examples):
        assert ex["prompt_ids"] == tokenize_prompt(row, tok)
        assert ex["chosen_ids"][-1] == tok.eos_token_id == ex["rejected_ids"][-1]
    batch = collate_pairs(examples[:8], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 16

    kto = generate_kto(cfg, seed=0, split="eval")
    examples, report = tokenize_unpaired_rows(kto, tok, max_length=48, max_bad_fraction=0.0)
    assert report["rows_out"] == len(kto) and report["dropped"] == {}
    assert report["desirable"] == report["undesirable"] == len(kto) // 2
    # converting the pairs ourselves gives the same examples as generate_kto's rows do
    converted, _ = tokenize_unpaired_rows(
        pairs_to_unpaired(prefs), tok, max_length=48, max_bad_fraction=0.0
    )
    assert len(converted) == 2 * len(prefs)
    assert converted[0]["prompt_ids"] == tokenize_prompt(prefs[0], tok)
