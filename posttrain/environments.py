"""Environments of multi-turn rollouts: what answers the model between its turns.

An environment is a class (or any factory) named by dotted path in the stage's
`environment.path`, called with no arguments once per episode, so it may keep per-episode
state. It has

    reset(row: dict) -> list[dict]            the first messages, from a dataset row
    step(messages: list[dict]) -> Step        after every model turn

and optionally `tools`, a list of functions (bound methods too, which then see the episode's
state) that the model may call. `step` gets the whole conversation so far: the first messages,
then per turn the model's assistant message ({"role": "assistant", "content": text} plus
"tool_calls" when it called tools) and the tool results the rollout already appended
({"role": "tool", "name": ..., "content": ...}). It returns the messages to append next (a user
reply, say; may be empty after a tool turn), whether the episode is done, and optionally a
reward; an episode's environment reward is the sum of the rewards its steps return (None when
none did). The rollout itself parses and runs tool calls (posttrain/tools.py) and enforces the
limits (turns, tokens, tool timeouts).

`Environment` is the base to subclass: its `reset` takes the row's `prompt` (a string becomes one
user message), its `step` ends the episode at the first turn without a tool call. With no
`environment.path`, `ToolEnvironment` (that base, as is) runs the configured tools.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from posttrain.tools import load_object

Message = dict


@dataclass
class Step:
    """What follows a model turn: messages to append, whether the episode ends, its reward."""

    messages: list[Message] = field(default_factory=list)
    done: bool = False
    reward: float | None = None


class Environment:
    """The default behaviour: the row's prompt first, done at the first turn without a tool
    call, no reward (reward functions score the episode)."""

    tools: tuple[Callable, ...] = ()

    def reset(self, row: dict) -> list[Message]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [dict(m) for m in prompt]

    def step(self, messages: list[Message]) -> Step:
        last = next(m for m in reversed(messages) if m["role"] == "assistant")
        return Step(done=not last.get("tool_calls"))


class ToolEnvironment(Environment):
    """The environment of a stage that names only `environment.tools`."""


def load_environment(path: str | None, field_name: str = "environment.path") -> Callable:
    """The factory named by `path` (None: ToolEnvironment), checked to build an object with
    `reset` and `step`."""
    if path is None:
        return ToolEnvironment
    factory = load_object(path, field_name)
    if not callable(factory):
        raise ValueError(  # noqa: TRY004 - a bad config value, like every other bad path
            f"{field_name}: {path!r} is a {type(factory).__name__}; name a class or factory "
            "that builds an environment")
    missing = [m for m in ("reset", "step") if not callable(getattr(factory, m, None))]
    if isinstance(factory, type) and missing:
        raise ValueError(f"{field_name}: {path!r} has no {' or '.join(missing)}; an environment "
                         "needs reset(row) -> messages and step(messages) -> Step "
                         "(subclass posttrain.environments.Environment)")
    return factory


def as_step(value: object, where: str) -> Step:
    """An environment's step result as a Step; a tuple (messages, done[, reward]) is accepted."""
    if isinstance(value, Step):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return Step(list(value[0]), bool(value[1]), value[2] if len(value) == 3 else None)
    raise ValueError(f"{where}: step must return a posttrain.environments.Step (messages, done, "
                     f"reward), got {type(value).__name__}")
