"""What every config model shares: frozen, unknown keys refused, and ConfigError."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    WithJsonSchema,
)


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _word(value: str):
    """A one-word alternative of a union (`bool | _word("auto")`). A one-value Literal's JSON
    schema is a `const`, which the Prefect UI's form shows as "cannot be changed" even where the
    other alternatives could be picked; a one-option `enum` is offered as a choice instead."""
    return Annotated[Literal[value], WithJsonSchema({"type": "string", "enum": [value]})]
