"""Reward functions: loading by dotted path, the demo checker, combining, and the reward model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from posttrain.config import TinyModelConfig
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.reward_functions import (
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
    def matches(prompts, completions, answer, **_):
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
