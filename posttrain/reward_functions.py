"""Reward functions for GRPO/PPO: rule-based ones named by dotted path, and a reward model.

Calling convention (TRL's, so that functions written for TRL work unchanged): every function is
called with KEYWORD arguments only,

    fn(prompts=prompts, completions=completions, **columns) -> list[float | None]

one value per completion. `prompts` are the dataset's prompts (strings or message lists, one per
completion, so a prompt sampled G times appears G times). `completions` follow the prompts' form:
strings for string prompts, and for conversational prompts (lists of {"role", "content"}
messages) one-message lists `[{"role": "assistant", "content": text}]`. `columns` are the
dataset's other columns by their names (every column except `prompt` and internal ones such as
`prompt_ids`), as lists aligned with the completions. So `def accuracy(completions, solution,
**kwargs)` receives the `solution` column; a function names the columns it needs and takes the
rest through `**kwargs`. `check_reward_function` checks a function against this convention
before any training, so a mismatch is a clear error up front rather than a TypeError at step 1.

None means "no opinion" (e.g. a math checker given a prompt that is not math): it adds 0 to the
weighted sum of that completion's reward and is left out of the function's mean. This matches
TRL's NaN + nansum; a row where every function abstains gets reward 0.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from posttrain.data import demo
from posttrain.data.tokenize import _split_ids, tokenize_prompt
from posttrain.rewards import RewardScorer

RewardFunction = Callable[..., list]

# The two arguments every reward function receives; dataset columns come next to them by name.
CALL_ARGUMENTS = ("prompts", "completions")
CONVENTION = "fn(prompts=..., completions=..., **columns)"


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


def as_completions(prompts: Sequence, texts: Sequence[str]) -> list:
    """Generated texts in the form reward functions get them: a conversational prompt's
    completion is `[{"role": "assistant", "content": text}]` (what TRL passes), a string
    prompt's is the string itself."""
    return [
        [{"role": "assistant", "content": t}] if isinstance(p, list) else t
        for p, t in zip(prompts, texts, strict=True)
    ]


def check_reward_function(path: str, columns: Sequence[str]) -> None:
    """Fail now, not at the first training step, when the function named by `path` cannot be
    called as `fn(prompts=..., completions=..., **columns)` with the dataset's `columns`.

    The function is loaded (`load_reward_function`) but never called: only its signature is
    bound. A ValueError names the path, each parameter the call would miss or not be accepted,
    the columns available, and the convention. A callable whose signature Python cannot inspect
    (some builtins) is let through: nothing can be checked without calling it.
    """
    fn = load_reward_function(path)
    columns = list(columns)
    clash = [c for c in columns if c in CALL_ARGUMENTS]
    if clash:
        raise ValueError(
            f"reward function {path!r}: dataset column(s) {clash} clash with the arguments "
            f"{list(CALL_ARGUMENTS)} of the call {CONVENTION}; rename the column(s)"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    names = {*CALL_ARGUMENTS, *columns}
    try:
        signature.bind(**{name: [] for name in names})
    except TypeError as exc:
        raise ValueError(
            f"reward function {path!r} cannot be called as TRL calls reward functions, "
            f"{CONVENTION}: {_mismatch(signature, names) or exc}; dataset columns available: "
            f"{columns}. Name only `prompts`, `completions` and columns, give other parameters "
            "defaults, and take the columns the function does not use through **kwargs"
        ) from exc


def _mismatch(signature: inspect.Signature, names: set[str]) -> str:
    """What keeps `signature` from binding keyword arguments `names`, in words."""
    params = signature.parameters.values()
    by_keyword = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    problems = []
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and (p.kind is p.POSITIONAL_ONLY or (p.name in by_keyword and p.name not in names))
    ]
    if missing:
        problems.append(
            "it requires parameter(s) " + ", ".join(repr(m) for m in missing)
            + " that the call does not pass (not `prompts`, `completions` or a dataset column)"
        )
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unexpected = sorted(names - by_keyword)
        if unexpected:
            problems.append(
                "it does not accept " + ", ".join(repr(u) for u in unexpected)
                + " (no parameter of that name and no **kwargs)"
            )
    return "; ".join(problems)


def demo_checker(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 where the completion is the right answer to the built-in demo prompt, else 0.0.

    Completions may be strings or assistant message lists (`demo.check` reads both), so the
    checker works on standard and conversational demo data alike.
    """
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
    completions: list,
    columns: Mapping[str, list] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (N,), per_fn {name: (N,)}): total = Σ_fn weight·value with None counted as 0.

    Each function is called `fn(prompts=prompts, completions=completions, **columns)` (module
    docstring); `completions` are passed as given (see `as_completions` for their form), and
    `columns` are the dataset's extra columns aligned with them.

    A function missing from `weights` has weight 1.0 (TRL's default); a weight for an unknown
    function is an error. `per_fn` holds each function's raw values with NaN where it returned
    None, so `torch.nanmean(per_fn[name])` is its mean over the completions it judged (the
    `rewards/<fn>/mean` metric) and NaN when it judged none.
    """
    unknown = set(weights) - set(fns)
    if unknown:
        raise ValueError(f"weights given for unknown reward functions: {sorted(unknown)}")
    columns = dict(columns or {})
    clash = sorted(set(columns) & set(CALL_ARGUMENTS))
    if clash:
        raise ValueError(f"dataset columns {clash} clash with the arguments of {CONVENTION}")
    n = len(completions)
    per_fn: dict[str, torch.Tensor] = {}
    total = torch.zeros(n)
    for name, fn in fns.items():
        values = fn(prompts=prompts, completions=completions, **columns)
        values = torch.tensor(_checked_values(name, values, n))
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

    Each pair is tokenized as the reward model was trained (posttrain/data/preference.py): a
    message-list completion after a conversational prompt goes through the chat template (the
    completion is what the template renders after the prompt, ending with its end-of-turn
    token); otherwise the prompt with `tokenize_prompt` and the completion text with
    `tokenizer(text, add_special_tokens=False)` plus EOS. `RewardScorer` reads the score at the
    last real token. The model is put in eval mode.
    """
    scorer = RewardScorer(model).eval()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the reward tokenizer has no eos_token; completions need one to end")

    def sequence(prompt: Any, completion: Any) -> list[int]:
        if isinstance(prompt, list) and isinstance(completion, list):
            p_ids, c_ids, _ = _split_ids({"prompt": prompt, "completion": completion}, tokenizer,
                                         "reward model: ")
            return p_ids + c_ids
        text = completion if isinstance(completion, str) else "".join(
            m.get("content", "") for m in completion if m.get("role") == "assistant")
        return (tokenize_prompt(prompt, tokenizer)
                + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos])

    @torch.no_grad()
    def score(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        device = next(model.parameters()).device
        sequences = [sequence(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            scores.extend(scorer(ids.to(device), mask.to(device)).tolist())
        return scores

    return score
