"""The model every stage starts from (a hub id, a folder or the built-in tiny model), LoRA."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from posttrain.config.base import _Frozen, _word


class TinyModelConfig(_Frozen):
    """A small Qwen2-style causal LM built from scratch (no download)."""

    hidden_size: int = Field(64, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads per layer.")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads per layer (GQA).")
    intermediate_size: int = Field(256, ge=8, description="Width of the MLP.")
    max_position_embeddings: int = Field(128, ge=16, description="Longest supported sequence.")
    seed: int = Field(0, description="Seed of the random initialization.")


class TinyVisionConfig(_Frozen):
    """The vision side of the built-in tiny vision-language model (name_or_path='tiny-vlm'): a
    CLIP vision tower whose patch features a projector maps into the tiny language model
    (transformers' Llava architecture), built from scratch."""

    image_size: int = Field(32, ge=8, description="Side of the square input images, in pixels.")
    patch_size: int = Field(8, ge=2, description="Side of one patch; (image_size / patch_size)^2 "
                            "image tokens per image.")
    hidden_size: int = Field(64, ge=8, description="Width of the vision tower.")
    num_hidden_layers: int = Field(2, ge=1, description="Vision transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Heads per vision block.")
    intermediate_size: int = Field(128, ge=8, description="Width of the vision MLP.")

    @model_validator(mode="after")
    def _patches_tile_the_image(self) -> TinyVisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        return self


class LoraConfig(_Frozen):
    """Low-rank adapters through peft."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] | _word("all-linear") = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelConfig(_Frozen):
    """Which model to start from and how to load it."""

    name_or_path: str = Field(
        "tiny",
        description="'tiny' builds the built-in model and tokenizer, 'tiny-vlm' the built-in "
        "vision-language model and its processor; otherwise a hub model id or a local directory "
        "(a vision-language model is recognized by its config and loads with AutoProcessor and "
        "AutoModelForImageTextToText).",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype; float32 is the right choice on CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub; off unless you trust the repository."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel passed to transformers. Packed SFT rows keep their "
        "examples apart with flash-attention's varlen kernels (flash_attention_2) or a "
        "FlexAttention block mask (flex_attention, on a GPU); sdpa and eager (and flex_attention "
        "on CPU, which has no FlexAttention backward) use a dense (B, 1, T, T) mask.",
    )
    tiny: TinyModelConfig = Field(
        TinyModelConfig(), description="Architecture of the built-in model (name_or_path='tiny')."
    )
    vision: TinyVisionConfig = Field(
        TinyVisionConfig(),
        description="Vision tower of the built-in vision-language model (name_or_path='tiny-vlm').",
    )
    train_vision_tower: bool = Field(
        False,
        description="Vision-language models: also train the vision tower (frozen by default; "
        "the language model, and without LoRA the projector, train).",
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters instead of all weights when set (on a "
        "vision-language model: on the language model's layers only)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast of the training forward (accelerate): 'auto' is bf16 on a GPU "
        "that supports it, fp16 on an older GPU and 'no' (fp32) on CPU.",
    )
    gradient_checkpointing: bool | _word("auto") = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory; 'auto' turns it "
        "on with a GPU and off on CPU (where memory is rarely the limit and it costs time).",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template replacing the tokenizer's own; part of every "
        "downstream stage's cache key.",
    )

    @model_validator(mode="after")
    def _remote_code_is_pinned(self) -> ModelConfig:
        # Remote code runs on load: it must be an explicit choice AND the exact code reviewed,
        # so a moving branch name is refused.
        local = Path(self.name_or_path).is_dir()
        pinned = self.revision is not None and re.fullmatch(r"[0-9a-f]{40}", self.revision)
        if self.trust_remote_code and not local and not pinned:
            raise ValueError(
                "trust_remote_code=true needs revision pinned to a full 40-character commit "
                f"hash (got {self.revision!r})"
            )
        return self
