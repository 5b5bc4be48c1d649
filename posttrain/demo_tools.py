"""The built-in demo's environment with a tool: a calculator for the demo task's sums.

`calculator` parses integer arithmetic (+, -, *, parentheses) with a small recursive-descent
parser; nothing the model writes is evaluated as Python. `CalculatorEnv` starts from the demo
prompt, lets the model call the calculator, and ends at the first turn without a tool call,
rewarding 1.0 when that turn is the right sum and 0.0 otherwise.
"""

from __future__ import annotations

import re

from posttrain.environments import Environment, Step

_TOKEN = re.compile(r"\s*(\d+|[-+*()])")
MAX_DIGITS = 12  # results beyond this are refused: the model should not drive huge numbers


def calculator(expression: str) -> str:
    """Evaluate integer arithmetic with +, -, * and parentheses.

    Args:
        expression: The arithmetic expression, e.g. "12+30*2".
    """
    tokens = _tokens(expression)
    value, rest = _sum(tokens)
    if rest:
        raise ValueError(f"unexpected {rest[0]!r}")
    if len(str(abs(value))) > MAX_DIGITS:
        raise ValueError("result too large")
    return str(value)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot read {text[pos:]!r}")
        out.append(match.group(1))
        pos = match.end()
    if not out:
        raise ValueError("empty expression")
    return out


def _sum(tokens: list[str]) -> tuple[int, list[str]]:
    value, tokens = _product(tokens)
    while tokens and tokens[0] in "+-":
        op, (right, tokens) = tokens[0], _product(tokens[1:])
        value = value + right if op == "+" else value - right
    return value, tokens


def _product(tokens: list[str]) -> tuple[int, list[str]]:
    value, tokens = _atom(tokens)
    while tokens and tokens[0] == "*":
        right, tokens = _atom(tokens[1:])
        value *= right
    return value, tokens


def _atom(tokens: list[str]) -> tuple[int, list[str]]:
    if not tokens:
        raise ValueError("the expression ends too early")
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        value, rest = _sum(rest)
        if not rest or rest[0] != ")":
            raise ValueError("missing ')'")
        return value, rest[1:]
    if head == "-":
        value, rest = _atom(rest)
        return -value, rest
    if head.isdigit():
        return int(head), rest
    raise ValueError(f"unexpected {head!r}")


class CalculatorEnv(Environment):
    """A demo prompt, the calculator as a tool, reward 1.0 for the right final answer."""

    tools = (calculator,)

    def step(self, messages: list[dict]) -> Step:
        last = next(m for m in reversed(messages) if m["role"] == "assistant")
        if last.get("tool_calls"):
            return Step()
        prompt = next(m for m in messages if m["role"] == "user")["content"]
        return Step(done=True, reward=1.0 if last["content"].strip() == answer(prompt) else 0.0)


def answer(prompt: str) -> str:
    """The right answer to a sum prompt such as the demo's "3+4=" or "37+45="."""
    return calculator(prompt.strip().removesuffix("="))
