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

Also here, the message side of an episode, with no torch in it: `Episode` (a conversation and
its counts), `Renderer` (messages to token ids through the chat template, see
posttrain/multiturn.py), `respond` (what follows a model turn) and the episode metrics and table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from posttrain.tools import ToolCall, load_object, parse_tool_calls, run_tool, tool_schema

Message = dict
_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


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


@dataclass
class Episode:
    """One conversation: the first messages, then the model's and the answers' messages."""

    messages: list[dict]
    prompt_messages: int  # how many of `messages` are the first messages
    turns: int = 0
    tool_calls: int = 0
    parse_failures: int = 0
    tool_errors: int = 0
    rewards: list[float] = field(default_factory=list)
    done: bool = False
    truncated: bool = False

    @property
    def prompt(self) -> list[dict]:
        return self.messages[: self.prompt_messages]

    @property
    def completion(self) -> list[dict]:
        return self.messages[self.prompt_messages :]

    @property
    def reward(self) -> float | None:
        """The environment's episode reward: the sum of its steps' rewards, None without any."""
        return sum(self.rewards) if self.rewards else None

    @property
    def final_answer(self) -> str:
        """The content of the model's last turn."""
        turns = [m for m in self.completion if m["role"] == "assistant"]
        return turns[-1]["content"] if turns else ""


# ------------------------------------------------------------------------ messages -> tokens


class Renderer:
    """Token ids of first messages and of observations through the tokenizer's chat template,
    with the tools' JSON schemas passed as `tools=`."""

    def __init__(self, tokenizer, tools: Sequence[Callable] = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("multi-turn rollouts need a tokenizer with a chat template (set "
                             "model.chat_template); it has none")
        self.tokenizer = tokenizer
        self.schemas = [tool_schema(fn, f"tool {getattr(fn, '__name__', fn)!r}")
                        for fn in tools] or None
        self.base = self._render(_BASE)
        self._tails: dict[int, str] = {}

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.schemas, add_generation_prompt=generation_prompt,
            tokenize=False)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._ids(self._render(messages, generation_prompt=True))

    def _tail(self, stop_id: int) -> str:
        """What the template writes after an assistant message's content, minus the text of
        the stop token that ended the model's turn (the model wrote that one)."""
        if stop_id not in self._tails:
            tail = self.base[self.base.rindex("y") + 1 :]
            stop = self.tokenizer.decode([stop_id])
            self._tails[stop_id] = tail[len(stop):] if stop and tail.startswith(stop) else tail
        return self._tails[stop_id]

    def observation_ids(self, messages: list[dict], stop_id: int) -> list[int]:
        full = self._render(_BASE + messages, generation_prompt=True)
        if not full.startswith(self.base):
            raise ValueError("the chat template renders a conversation with more messages as "
                             "something other than the shorter one plus text; multi-turn "
                             "rollouts need a template that only appends (set "
                             "model.chat_template)")
        return self._ids(self._tail(stop_id) + full[len(self.base) :])


# ------------------------------------------------------------------- one turn's answer


def respond(env, tools: dict[str, Callable], episode: Episode, text: str,
            timeout: float) -> tuple[list[dict], bool]:
    """After the model wrote `text`: its message, the tool results and the environment's
    messages appended to the episode; returns (the messages after the model's, done).

    Unparsable tool calls and failing tools become error messages to the model; a turn with
    an unparsable call goes back to the model without asking the environment (so the error is
    seen even where the environment would end a turn without calls). An exception
    from the environment's own `step` is a bug in the environment and is raised, naming it."""
    calls, errors = parse_tool_calls(text)
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [_call_message(c) for c in calls]
    answers = [{"role": "tool", "name": "error", "content": f"error: {e}"} for e in errors]
    for call in calls:
        result = run_tool(tools, call, timeout)
        answers.append({"role": "tool", "name": call.name, "content": result.content})
        episode.tool_errors += result.error
    episode.tool_calls += len(calls)
    episode.parse_failures += len(errors)
    episode.messages += [message, *answers]
    if errors:  # the model gets to see what did not parse and to try again
        return answers, False
    where = f"environment {type(env).__name__}"
    try:
        step = as_step(env.step(list(episode.messages)), where)
    except ValueError:
        raise
    except Exception as exc:
        raise RuntimeError(f"{where}: step raised {type(exc).__name__}: {exc}") from exc
    episode.messages += step.messages
    if step.reward is not None:
        episode.rewards.append(float(step.reward))
    replies = answers + list(step.messages)
    if not step.done and not replies:
        raise ValueError(f"{where}: step returned no messages and done=False after a turn "
                         "without tool calls; return the next messages, or done=True")
    return replies, step.done


def _call_message(call: ToolCall) -> dict:
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}


# ------------------------------------------------------------------------------- metrics


def episode_metrics(episodes: list[Episode], prefix: str = "") -> dict[str, float]:
    """Per-step means over a batch of episodes: turns, tool calls, the share of tool-call
    attempts that did not parse, the share of parsed calls that failed, the environment's
    reward (episodes that got one), the share truncated."""
    n = len(episodes)
    attempts = sum(e.tool_calls + e.parse_failures for e in episodes)
    calls = sum(e.tool_calls for e in episodes)
    rewards = [e.reward for e in episodes if e.reward is not None]
    out = {
        "episodes/turns_mean": sum(e.turns for e in episodes) / n,
        "episodes/tool_calls_mean": calls / n,
        "episodes/tool_call_parse_failure_rate": sum(e.parse_failures for e in episodes)
        / max(attempts, 1),
        "episodes/tool_error_rate": sum(e.tool_errors for e in episodes) / max(calls, 1),
        "episodes/truncated_ratio": sum(e.truncated for e in episodes) / n,
    }
    if rewards:
        out["episodes/reward_mean"] = sum(rewards) / len(rewards)
    return {prefix + k: v for k, v in out.items()}


def episode_table(episodes: list[Episode], rewards: Sequence[float], step: int,
                  limit: int, group: int = 1) -> list[dict]:
    """Rows of the sample-episode table: the conversation as JSON and its counts, for the
    first episode of each of the first `limit` groups of `group` (one per prompt)."""
    picked = list(zip(episodes, rewards))[::group][:limit]
    return [{
        "step": step,
        "prompt": json.dumps(e.prompt),
        "conversation": json.dumps(e.completion),
        "reward": float(r),
        "environment_reward": e.reward,
        "turns": e.turns,
        "tool_calls": e.tool_calls,
        "parse_failures": e.parse_failures,
        "tool_errors": e.tool_errors,
        "truncated": e.truncated,
    } for e, r in picked]
