"""Data: named sources (local files, hub datasets, the demo) and the demo's task family."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from posttrain.config.base import _Frozen


class DemoTaskConfig(_Frozen):
    """The built-in synthetic task family (see posttrain.data.demo)."""

    tasks: tuple[Literal["add", "reverse", "sort"], ...] = Field(
        ("add", "reverse", "sort"), description="Which task kinds the generator mixes."
    )
    num_train: int = Field(4000, ge=1, description="Number of training prompts generated.")
    num_eval: int = Field(200, ge=1, description="Number of held-out prompts generated.")
    bug_rate: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Share of SFT demonstrations inside each task's 'bug region' that carry the "
        "task's systematic mistake; above 0.5 the SFT model learns the mistake, which leaves "
        "preference optimization measurable room.",
    )
    conversational: bool = Field(
        True, description="Emit chat messages (rendered by the chat template) instead of strings."
    )
    seed: int = Field(0, description="Seed of the generator (which prompts, which mistakes).")


class VisionDemoConfig(_Frozen):
    """The built-in image task (see posttrain.vision.demo): name the colour of the square."""

    num_train: int = Field(2000, ge=1, description="Number of training images generated.")
    num_eval: int = Field(120, ge=1, description="Number of held-out images generated.")
    bug_rate: float = Field(
        0.8, ge=0.0, le=1.0,
        description="Share of SFT demonstrations of the task's 'bug colour' that name the wrong "
        "colour; above 0.5 the SFT model learns the mistake, which DPO's pairs then correct.",
    )
    image_size: int = Field(32, ge=8, description="Side of the generated images, in pixels.")
    seed: int = Field(0, description="Seed of the generator (which images, which mistakes).")


DEMO_SOURCES = ("demo:sft", "demo:preference", "demo:kto", "demo:prompts")
VISION_DEMO_SOURCES = ("demo:vision-sft", "demo:vision-preference")


class DatasetSource(_Frozen):
    """One named dataset: where it comes from and how its rows are checked and split."""

    path: str = Field(
        description="A local .jsonl/.json/.parquet/.csv file, a Hugging Face hub dataset id, or "
        "the built-in synthetic data: 'demo:sft' (prompt-completion), 'demo:preference' "
        "(prompt/chosen/rejected), 'demo:kto' (prompt/completion/label) or 'demo:prompts' "
        "(prompt-only); 'demo:vision-sft' and 'demo:vision-preference' are the built-in image "
        "task's (rows with an `images` column)."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name, if any.")
    revision: str | None = Field(None, description="Hub dataset revision (commit or tag).")
    eval_path: str | None = Field(
        None,
        description="Separate held-out file or hub split name; when unset, eval_fraction of the "
        "rows is held out.",
    )
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of rows held out when no eval_path is given."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows (after shuffling)."
    )
    on_bad_rows: Literal["error", "drop"] = Field(
        "error",
        description="'error' stops at the first invalid row; 'drop' removes invalid rows, counts "
        "and reports them.",
    )
    max_drop_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="With on_bad_rows='drop', fail when more than this share of rows is dropped "
        "(also the share of pairs a preference stage may drop while tokenizing).",
    )
    seed: int = Field(0, description="Seed of the train/eval split and of KTO's pair shuffle.")

    @model_validator(mode="after")
    def _demo_names_its_kind(self) -> DatasetSource:
        if self.path == "demo" or (self.path.startswith("demo:")
                                   and self.path not in DEMO_SOURCES + VISION_DEMO_SOURCES):
            raise ValueError(
                f"path {self.path!r}: the built-in data is one of "
                f"{', '.join(DEMO_SOURCES + VISION_DEMO_SOURCES)}"
            )
        return self

    @property
    def is_demo(self) -> bool:
        return self.path in DEMO_SOURCES + VISION_DEMO_SOURCES
