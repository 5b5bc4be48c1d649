"""Tools for multi-turn rollouts: plain Python functions the model may call.

A tool is a function with type hints and a Google-style docstring. Its JSON schema comes from
transformers' `get_json_schema` (what `apply_chat_template(tools=[fn])` builds), so the chat
template renders it into the prompt as the model's own template does.

Tool calls are read in the Hermes / Qwen2.5 format that those templates teach:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12+34"}}
    </tool_call>

(several blocks per turn allowed; `arguments` may also be a JSON string, as some models write
it). Nothing the model writes is executed: the text is parsed as JSON and only a named, known
function is called, with the parsed arguments. A call runs in a daemon thread with a timeout; an
exception, a timeout, an unknown name or arguments that do not fit the signature become an
error text for the model (`ToolResult.error`), never an exception out of the rollout. A hung
call's thread cannot be killed in Python: it is abandoned (daemon) and the rollout goes on.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TOOL_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def load_object(path: str, field: str) -> object:
    """The object named by 'package.module:attr' (or 'package.module.attr'); a ValueError naming
    the config `field` and what to do when it cannot be imported."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{field}: {path!r} is not a dotted path; write 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure makes the path unusable
        raise ValueError(f"{field}: cannot import module {module_name!r} of {path!r} ({exc}); "
                         "check the spelling and that the module is on PYTHONPATH") from exc
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError as exc:
        raise ValueError(f"{field}: module {module_name!r} has no {attr!r} (from {path!r})") \
            from exc


def load_tool(path: str, field: str = "environment.tools") -> Callable:
    """A tool function by dotted path, its schema checked (`tool_schema`)."""
    fn = load_object(path, field)
    if not callable(fn):
        raise ValueError(f"{field}: {path!r} is a {type(fn).__name__}, not a function")  # noqa: TRY004
    tool_schema(fn, f"{field}: {path!r}")
    return fn


def tool_schema(fn: Callable, where: str = "tool") -> dict:
    """The JSON schema of `fn` as chat templates get it ({"type": "function", "function": ...}),
    or a ValueError saying what the docstring or type hints lack."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # transformers raises its own DocstringParsingException / TypeHint
        raise ValueError(f"{where}: cannot build its JSON schema ({exc}); a tool needs a type "
                         "hint on every argument and a Google-style docstring with an Args: "
                         "line for each") from exc


def tool_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class ToolCall:
    name: str
    arguments: dict


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """(calls, errors) of a model turn: every <tool_call> block, parsed; a block that is not
    JSON of the form {"name": str, "arguments": object} gives an error text instead."""
    calls, errors = [], []
    for body, closing in TOOL_CALL.findall(text):
        if not closing:
            errors.append("a <tool_call> block was not closed with </tool_call>")
            continue
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            errors.append(f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})")
            continue
        arguments = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(arguments, dict):
            errors.append('a tool call must be {"name": "<tool>", "arguments": {...}}')
            continue
        calls.append(ToolCall(data["name"], arguments))
    return calls, errors


@dataclass
class ToolResult:
    name: str
    content: str
    error: bool  # the call raised, timed out, named no known tool or had unfitting arguments


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def run_tool(tools: dict[str, Callable], call: ToolCall, timeout: float) -> ToolResult:
    """Call `tools[call.name](**call.arguments)` within `timeout` seconds; every failure is an
    error result whose text tells the model what went wrong."""
    fn = tools.get(call.name)
    if fn is None:
        known = ", ".join(sorted(tools)) or "none"
        return ToolResult(call.name, f"error: unknown tool {call.name!r} (tools: {known})", True)
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as exc:
        return ToolResult(call.name, f"error: bad arguments for {call.name}: {exc}", True)
    except ValueError:  # no inspectable signature: let the call itself decide
        pass
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(**call.arguments)
        except BaseException as exc:  # noqa: BLE001 - any failure is the model's error text
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return ToolResult(call.name, f"error: {call.name} timed out after {timeout:g} s", True)
    if "error" in box:
        exc = box["error"]
        return ToolResult(call.name, f"error: {type(exc).__name__}: {exc}", True)
    return ToolResult(call.name, _as_text(box.get("value")), False)


def tools_by_name(tools: Sequence[Callable]) -> dict[str, Callable]:
    """{name: function}; two tools of one name are an error (the model could not tell them
    apart)."""
    out: dict[str, Callable] = {}
    for fn in tools:
        name = tool_name(fn)
        if name in out and out[name] is not fn:
            raise ValueError(f"two tools are named {name!r}; give them different names")
        out[name] = fn
    return out
