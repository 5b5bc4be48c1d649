"""YAML files and dotted overrides into a validated PipelineConfig."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from posttrain.config.base import ConfigError
from posttrain.config.pipeline import PipelineConfig

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "demo.yaml"


def _format_validation_error(err: ValidationError, where: str, values: dict) -> str:
    lines = [f"invalid configuration ({where}):"]
    for e in err.errors():
        field = _field_name(e["loc"], values)
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _field_name(loc: tuple, values: dict) -> str:
    """Dotted field path, with a stage's list index replaced by its name: stages.dpo.beta."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = values.get("stages") or []
        stage = stages[loc[1]] if loc[1] < len(stages) else None
        name = stage.get("name") if isinstance(stage, dict) else None
        name = name if isinstance(name, str) else None
        rest = [str(p) for p in loc[2:]]
        if rest and isinstance(stage, dict) and rest[0] == stage.get("method"):
            rest = rest[1:]  # pydantic's union tag: the method, already known from the stage
        parts = ["stages", name or f"[{loc[1]}]", *rest]
    return ".".join(parts) or "<root>"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sft.learning_rate=1e-3` -> (['sft', 'learning_rate'], 0.001). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form field.path=value")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} names no field")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set dotted fields in a nested dict (a copy); unknown fields are caught by validation.

    A stage is addressed by its name: `stages.dpo.beta=0.5`.
    """
    out = copy.deepcopy(values)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            node = _child(node, p, text)
        if isinstance(node, list):
            raise ConfigError(f"override {text!r}: {parts[-2]!r} is a list of stages; name a "
                              "stage and a field, e.g. stages.dpo.beta=0.5")
        node[parts[-1]] = value
    return out


def _child(node: dict | list, part: str, text: str) -> dict | list:
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == part:
                return item
        names = [i.get("name") for i in node if isinstance(i, dict)]
        if not names:
            raise ConfigError(f"override {text!r}: {part!r} indexes a list of values; set the "
                              "whole list instead, e.g. demo.tasks=[add,sort]")
        raise ConfigError(f"override {text!r}: no stage named {part!r} (stages: {names})")
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    elif not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
    return child


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields")
    return values


def validate(model: type[BaseModel], values: dict, where: str = "config") -> Any:
    """`values` as a `model`, or a ConfigError naming every bad field (and, for a pipeline,
    every problem of its graph)."""
    try:
        validated = model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, values)) from None
    return validated.check(where) if isinstance(validated, PipelineConfig) else validated


def load_pipeline_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Read a YAML file (default: the demo, conf/demo.yaml), apply `a.b=value` overrides,
    validate."""
    path = DEMO_CONFIG if path is None else path
    values = apply_overrides(read_yaml(path), list(overrides))
    where = str(path) + (" + overrides" if overrides else "")
    return validate(PipelineConfig, values, where)


def merge(base: dict, update: dict) -> dict:
    """`update` deep-merged onto `base` (a copy): mappings merge key by key, anything else
    (values, lists such as `stages`) replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
