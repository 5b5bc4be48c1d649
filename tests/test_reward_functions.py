"""Reward functions: loading by dotted path, the demo checker, combining, and the reward model."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from posttrain.config import TinyModelConfig
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.reward_functions import (
    as_completions,
    check_reward_function,
    combine_rewards,
    demo_checker,
    load_reward_function,
    reward_model_function,
)
from posttrain.rewards import RewardScorer


def test_load_by_colon_or_dot_path():
    assert load_reward_function("posttrain.reward_functions:demo_checker") is demo_checker
    assert load_reward_function("posttrain.reward_functions.demo_checker") is demo_checker
    assert load_reward_function("math:sqrt") is math.sqrt
    assert load_reward_function("pathlib:Path.cwd")  # attribute of an attribute


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("posttrain.reward_functions:nope", "has no 'nope'"),
        ("math.pi", "not callable"),
        ("demo_checker", "expected 'package.module:function'"),
    ],
)
def test_load_errors_name_the_path(path, message):
    with pytest.raises(ValueError, match=message) as info:
        load_reward_function(path)
    assert repr(path) in str(info.value)


def test_demo_checker_standard_and_conversational():
    prompts = ["3+4=", "3+4=", [{"role": "user", "content": "rev abcd"}], "sort 3120"]
    completions = [" 7", " 8", "dcba", "0123\n"]
    assert demo_checker(prompts, completions, task=["add"] * 4) == [1.0, 0.0, 1.0, 1.0]
    # As GRPO calls it: keywords only, message-list completions for the conversational prompt.
    completions = as_completions(prompts, completions)
    assert completions[2] == [{"role": "assistant", "content": "dcba"}]
    assert completions[0] == " 7"
    assert demo_checker(prompts=prompts, completions=completions, task=["add"] * 4) == [
        1.0, 0.0, 1.0, 1.0
    ]


def _fixed(values):
    return lambda prompts, completions, **_: list(values)


def test_combine_rewards_by_hand():
    """a = (1, 0, None, 1) weight 2, b = (0.5, None, None, 2) weight 0.5; None counts 0:
    total = (2 + 0.25, 0 + 0, 0 + 0, 2 + 1) = (2.25, 0, 0, 3).
    Means skip None: a (1 + 0 + 1)/3 = 0.666667, b (0.5 + 2)/2 = 1.25."""
    fns = {"a": _fixed([1, 0, None, 1]), "b": _fixed([0.5, None, None, 2.0])}
    total, per_fn = combine_rewards(fns, {"a": 2.0, "b": 0.5}, ["p"] * 4, ["c"] * 4)
    torch.testing.assert_close(total, torch.tensor([2.25, 0.0, 0.0, 3.0]))
    assert torch.nanmean(per_fn["a"]).item() == pytest.approx(2 / 3)
    assert torch.nanmean(per_fn["b"]).item() == pytest.approx(1.25)
    assert torch.isnan(per_fn["b"][1:3]).all()


def test_combine_rewards_passes_columns_and_defaults_weights_to_1():
    def matches(completions, answer, **_):  # no `prompts`: only keyword arguments are passed
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    total, per_fn = combine_rewards(
        {"match": matches, "checker": demo_checker},
        {},
        ["1+1=", "1+1="],
        [" 2", " 3"],
        {"answer": ["2", "2"], "task": ["add", "add"]},
    )
    assert total.tolist() == [2.0, 0.0]
    assert per_fn["checker"].tolist() == [1.0, 0.0]


def test_combine_rewards_validates_outputs():
    with pytest.raises(ValueError, match="'short' must return 3 values"):
        combine_rewards({"short": _fixed([1.0])}, {}, ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match="'texty' returned 'yes'"):
        combine_rewards({"texty": _fixed(["yes", 1, 1])}, {}, ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match="unknown reward functions: \\['typo'\\]"):
        combine_rewards({"a": _fixed([1.0])}, {"typo": 1.0}, ["p"], ["c"])
    with pytest.raises(ValueError, match="columns \\['completions'\\] clash"):
        combine_rewards({"a": _fixed([1.0])}, {}, ["p"], ["c"], {"completions": ["x"]})


# A reward module as TRL users write it (TRL's docs: `def accuracy(completions, solution,
# **kwargs)`): it names the column it needs and takes the rest through **kwargs.
_USER_MODULE = textwrap.dedent('''
    def accuracy(completions, solution, **kwargs):
        return [1.0 if c[0]["content"] == s else 0.0 for c, s in zip(completions, solution)]


    def accuracy_text(completions, solution, **kwargs):
        return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]


    def length_bonus(prompts, completions, **kwargs):
        return [None if kwargs["task"][i] == "skip" else 0.5 for i in range(len(prompts))]


    def positional(x):
        return [0.0]


    def strict(prompts, completions, solution):
        return [0.0] * len(prompts)
''')


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_xyz.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_xyz"


def test_trl_style_function_with_conversational_prompts(user_rewards):
    """accuracy = (1, 0, 1); length_bonus = (0.5, 0.5, None) weight 2 -> (1, 1, 0);
    total = (2, 1, 1)."""
    prompts = [[{"role": "user", "content": q}] for q in ("2+2?", "3+3?", "1+1?")]
    completions = [[{"role": "assistant", "content": a}] for a in ("4", "7", "2")]
    columns = {"solution": ["4", "6", "2"], "task": ["math", "math", "skip"]}
    fns = {"accuracy": load_reward_function(f"{user_rewards}:accuracy"),
           "length_bonus": load_reward_function(f"{user_rewards}:length_bonus")}
    total, per_fn = combine_rewards(fns, {"length_bonus": 2.0}, prompts, completions, columns)
    assert total.tolist() == [2.0, 1.0, 1.0]
    assert per_fn["accuracy"].tolist() == [1.0, 0.0, 1.0]


def test_trl_style_function_with_string_prompts(user_rewards):
    """" 4" and "6\n" match after strip, "7" does not: (1, 0, 1)."""
    fn = load_reward_function(f"{user_rewards}.accuracy_text")
    total, _ = combine_rewards({"acc": fn}, {}, ["2+2=", "3+4=", "3+3="], [" 4", "7", "6\n"],
                               {"solution": ["4", "6", "6"]})
    assert total.tolist() == [1.0, 0.0, 1.0]


def test_check_reward_function_accepts_the_documented_call(user_rewards):
    check_reward_function(f"{user_rewards}:accuracy", ["solution"])
    check_reward_function(f"{user_rewards}:accuracy", ["solution", "task", "level"])
    check_reward_function(f"{user_rewards}:length_bonus", [])
    check_reward_function(f"{user_rewards}:strict", ["solution"])
    check_reward_function("posttrain.reward_functions:demo_checker", ["task"])


def test_check_reward_function_names_a_missing_column(user_rewards):
    path = f"{user_rewards}:accuracy"
    with pytest.raises(ValueError) as info:
        check_reward_function(path, [])
    message = str(info.value)
    assert repr(path) in message
    assert "'solution'" in message
    assert "columns available: []" in message
    assert "fn(prompts=..., completions=..., **columns)" in message


def test_check_reward_function_refuses_other_signatures(user_rewards):
    with pytest.raises(ValueError) as info:
        check_reward_function(f"{user_rewards}:positional", ["solution"])
    message = str(info.value)
    assert "requires parameter(s) 'x'" in message
    assert "does not accept 'completions', 'prompts', 'solution'" in message
    assert "columns available: ['solution']" in message
    # No **kwargs: a column it does not name is refused.
    with pytest.raises(ValueError, match="does not accept 'task'"):
        check_reward_function(f"{user_rewards}:strict", ["solution", "task"])
    with pytest.raises(ValueError, match="clash"):
        check_reward_function(f"{user_rewards}:accuracy", ["solution", "prompts"])
    with pytest.raises(ValueError, match="cannot import module"):
        check_reward_function("no_such_module_xyz:f", [])


def test_reward_model_function_scores_prompt_plus_completion_with_eos():
    """Batched, right-padded scoring equals scoring each hand-built sequence alone:
    "3+4=" + " 7" + <|end|> is the 6 character ids of "3+4= 7" then the EOS id; the
    conversational prompt goes through the chat template ("<|user|>rev abcd<|end|><|assistant|>")."""
    tok = build_tiny_tokenizer()
    config = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok).config
    config.num_labels = 1
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    fn = reward_model_function(model, tok, tok.pad_token_id, batch_size=2)
    prompts = ["3+4=", [{"role": "user", "content": "rev abcd"}], "sort 9012"]
    completions = [" 7", "dcba", " 0129 and more"]
    scores = fn(prompts, completions, task=["add", "reverse", "sort"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)

    texts = ["3+4= 7", "<|user|>rev abcd<|end|><|assistant|>dcba", "sort 9012 0129 and more"]
    by_hand = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert len(by_hand[0]) == 7 and len(by_hand[1]) == 3 + 8 + 4 + 1
    scorer = RewardScorer(model).eval()
    with torch.no_grad():
        alone = [scorer(torch.tensor([ids]), torch.ones(1, len(ids))).item() for ids in by_hand]
    assert scores == pytest.approx(alone, abs=1e-5)
    # As GRPO passes them (keywords, an assistant message list after a conversational prompt):
    # tokenized through the chat template as the RM was trained, the same ids here.
    as_called = fn(prompts=prompts, completions=as_completions(prompts, completions))
    assert as_called == pytest.approx(alone, abs=1e-5)
