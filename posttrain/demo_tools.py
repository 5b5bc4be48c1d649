"""The built-in demo's environment with a tool: a calculator for sums and products.

`calculator` parses integer arithmetic (+, -, *, parentheses) with a small recursive-descent
parser; nothing the model writes is evaluated as Python. `CalculatorEnv` starts from the demo
prompt, lets the model call the calculator, and ends at the first turn without a tool call,
rewarding 1.0 when that turn is the right result and 0.0 otherwise. `demo_data` makes two-digit
products with tool-using demonstrations for conf/agentic-calculator.yaml
(`python -m posttrain.demo_tools data/agentic` writes them).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

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
    """An arithmetic prompt ("3+4=", "37*45="), the calculator as a tool, reward 1.0 for the
    right final answer."""

    tools = (calculator,)

    def step(self, messages: list[dict]) -> Step:
        last = next(m for m in reversed(messages) if m["role"] == "assistant")
        if last.get("tool_calls"):
            return Step()
        prompt = next(m for m in messages if m["role"] == "user")["content"]
        return Step(done=True, reward=1.0 if last["content"].strip() == answer(prompt) else 0.0)


def answer(prompt: str) -> str:
    """The right answer to an arithmetic prompt such as the demo's "3+4=" or "37*45="."""
    return calculator(prompt.strip().removesuffix("="))


# ------------------------------------------------------------- tool-use demonstrations


def _call_text(a: int, b: int) -> str:
    arguments = {"expression": f"{a}*{b}"}
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": arguments}) + \
        "</tool_call>"


def product_row(a: int, b: int, use_tool: bool) -> dict:
    """A prompt-completion row for "a*b=": a calculator call, its result and the answer, or the
    answer alone."""
    prompt = [{"role": "user", "content": f"{a}*{b}="}]
    if not use_tool:
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": str(a * b)}]}
    return {"prompt": prompt, "completion": [
        {"role": "assistant", "content": _call_text(a, b)},
        {"role": "tool", "name": "calculator", "content": str(a * b)},
        {"role": "assistant", "content": str(a * b)}]}


def demo_data(seed: int = 0, num_sft: int = 3000, num_prompts: int = 2000, num_eval: int = 100,
              tool_share: float = 0.3) -> dict[str, list[dict]]:
    """Two-digit products: SFT demonstrations of which `tool_share` call the calculator (the
    others answer directly, which a tiny model does not learn to do right in minutes; it does
    learn two-digit sums), prompts for GRPO, and held-out rows; train and held-out products
    are disjoint."""
    rng = random.Random(f"demo_tools:{seed}")
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held, sft, prompts = (pairs[:num_eval], pairs[num_eval:num_eval + num_sft],
                          pairs[num_eval + num_sft:num_eval + num_sft + num_prompts])
    return {
        "sft_train": [product_row(a, b, rng.random() < tool_share) for a, b in sft],
        "sft_eval": [product_row(a, b, True) for a, b in held],
        "prompts_train": [{"prompt": product_row(a, b, False)["prompt"]} for a, b in prompts],
        "prompts_eval": [{"prompt": product_row(a, b, False)["prompt"]} for a, b in held],
    }


def write_demo_data(folder: str | Path, seed: int = 0) -> Path:
    """The `demo_data` files as JSON lines in `folder` (what conf/agentic-calculator.yaml
    reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in demo_data(seed).items():
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


if __name__ == "__main__":  # python -m posttrain.demo_tools [folder]
    print(write_demo_data(sys.argv[1] if len(sys.argv) > 1 else "data/agentic"))
