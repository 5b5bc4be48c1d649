"""Reward functions for GRPO/PPO: rule-based ones named by dotted path, and a reward model.

Calling convention (TRL's): `fn(prompts, completions, **columns) -> list[float | None]`, one value
per completion. `prompts` are the dataset's prompts (strings or message lists, one per completion,
so a prompt sampled G times appears G times), `completions` the generated texts, and `columns` the
dataset's other columns as lists aligned with them (e.g. `task=[...]`); a function takes what it
needs and ignores the rest through `**_`.

None means "no opinion" (e.g. a math checker given a prompt that is not math): it adds 0 to the
weighted sum of that completion's reward and is left out of the function's mean. This matches
TRL's NaN + nansum; a row where every function abstains gets reward 0.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch

from posttrain.data import demo
from posttrain.data.tokenize import tokenize_prompt
from posttrain.rewards import RewardScorer

RewardFunction = Callable[..., list]


def load_reward_function(path: str) -> RewardFunction:
    """The callable named by "package.module:function" or "package.module.function".

    The colon form also reaches attributes of attributes ("pkg.mod:Class.method"). Any failure
    (module not importable, no such attribute, not callable) is a ValueError naming `path`.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure means the path is unusable
        raise ValueError(
            f"reward function {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as exc:
        raise ValueError(f"reward function {path!r}: {module_name!r} has no {attr!r}") from exc
    if not callable(fn):
        # A config value naming the wrong thing: ValueError, like every other bad path.
        raise ValueError(  # noqa: TRY004
            f"reward function {path!r} is a {type(fn).__name__}, not callable"
        )
    return fn


def demo_checker(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion is the right answer to the built-in demo prompt, else 0.0."""
    return [1.0 if demo.check(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def _checked_values(name: str, values: Any, n: int) -> list[float]:
    """A function's output as floats (NaN for None), or a ValueError naming the function."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(
            f"reward function {name!r} must return {n} values (one per completion), got {got}"
        )
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, Real):
            out.append(float(v))
        else:
            raise ValueError(
                f"reward function {name!r} returned {v!r}; values must be numbers or None"
            )
    return out


def combine_rewards(
    fns: Mapping[str, RewardFunction],
    weights: Mapping[str, float],
    prompts: list,
    completions: list[str],
    columns: Mapping[str, list] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (N,), per_fn {name: (N,)}): total = Σ_fn weight·value with None counted as 0.

    A function missing from `weights` has weight 1.0 (TRL's default); a weight for an unknown
    function is an error. `per_fn` holds each function's raw values with NaN where it returned
    None, so `torch.nanmean(per_fn[name])` is its mean over the completions it judged (the
    `rewards/<fn>/mean` metric) and NaN when it judged none.
    """
    unknown = set(weights) - set(fns)
    if unknown:
        raise ValueError(f"weights given for unknown reward functions: {sorted(unknown)}")
    columns = dict(columns or {})
    n = len(completions)
    per_fn: dict[str, torch.Tensor] = {}
    total = torch.zeros(n)
    for name, fn in fns.items():
        values = torch.tensor(_checked_values(name, fn(prompts, completions, **columns), n))
        per_fn[name] = values
        total += float(weights.get(name, 1.0)) * torch.nan_to_num(values, nan=0.0)
    return total, per_fn


def reward_model_function(
    model: torch.nn.Module,
    tokenizer: Any,
    pad_token_id: int,
    *,
    batch_size: int = 32,
) -> RewardFunction:
    """A reward function scoring prompt + completion with a one-output sequence classifier.

    Each pair is tokenized as in training: the prompt with `tokenize_prompt` (chat template for
    message lists), the completion with `tokenizer(text, add_special_tokens=False)` plus EOS;
    `RewardScorer` reads the score at the last real token. The model is put in eval mode.
    """
    scorer = RewardScorer(model).eval()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the reward tokenizer has no eos_token; completions need one to end")

    @torch.no_grad()
    def score(prompts: list, completions: list[str], **_: Any) -> list[float]:
        device = next(model.parameters()).device
        sequences = [
            tokenize_prompt(p, tokenizer)
            + list(tokenizer(c, add_special_tokens=False)["input_ids"])
            + [eos]
            for p, c in zip(prompts, completions, strict=True)
        ]
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            scores.extend(scorer(ids.to(device), mask.to(device)).tolist())
        return scores

    return score
