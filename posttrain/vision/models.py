"""Vision-language models: recognizing one, loading it with its processor, the built-in tiny one,
and which of its parts train.

A vision-language model is any model transformers loads with AutoModelForImageTextToText (its
config has a vision part); its processor (AutoProcessor) turns an image placeholder of the chat
template into the model's image tokens and the image into pixel values. By default the vision
tower is frozen and the language model trains (fully, with the projector, or through LoRA
adapters on the language model's linear layers only); `model.train_vision_tower` trains the
tower too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config import ModelConfig

# Lazy imports: torch, transformers and peft load inside the functions; preflight imports this
# module (is_vision_model) without them.

TINY_VLM = "tiny-vlm"
IMAGE_TOKEN = "<image>"
# The tiny chat template, with content given as a list of parts: an image part renders as the
# image placeholder that the processor expands into the model's image tokens.
TINY_VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}" + IMAGE_TOKEN
    + "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VISION_PARTS = ("vision_tower", "visual", "vision_model")  # the tower's attribute, by family


def is_vision_model(model_cfg: ModelConfig) -> bool:
    """Whether the configured model is a vision-language model: 'tiny-vlm', or a folder or hub
    model whose config has a vision part (read from config.json; a hub id through AutoConfig,
    which downloads only the config)."""
    name = model_cfg.name_or_path
    if name == TINY_VLM:
        return True
    if name == "tiny":
        return False
    config_file = Path(name) / "config.json"
    if config_file.is_file():
        return "vision_config" in json.loads(config_file.read_text())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    return hasattr(config, "vision_config")


def build_tiny_processor(model_cfg: ModelConfig):
    """The tiny tokenizer with an image placeholder token, and a CLIP image processor sized by
    `model_cfg.vision`, as one transformers LlavaProcessor (saved and loaded by AutoProcessor)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from posttrain.models import build_tiny_tokenizer

    v = model_cfg.vision
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = TINY_VLM_CHAT_TEMPLATE
    images = CLIPImageProcessorPil(
        size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size,
                                                         "width": v.image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=v.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=TINY_VLM_CHAT_TEMPLATE)


def build_tiny_vlm(model_cfg: ModelConfig, processor):
    """A randomly initialized Llava model: a CLIP vision tower sized by `model_cfg.vision`, the
    tiny Qwen2 language model sized by `model_cfg.tiny`; deterministic from `model_cfg.tiny.seed`,
    the global RNG left as it was."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )

    v, t, tokenizer = model_cfg.vision, model_cfg.tiny, processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.hidden_size)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    config = LlavaConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=True,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    import torch

    from posttrain.models import DTYPES, loadable_attention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=loadable_attention(model_cfg.attn_implementation),
            dtype=DTYPES[model_cfg.dtype])
    for gen in (model.generation_config,):
        gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (
            tokenizer.pad_token_id, tokenizer.eos_token_id, None)
    return model


def load_processor(model_cfg: ModelConfig, *, path: str | Path | None = None):
    """The processor of `path` (a saved stage), else of the configured model ('tiny-vlm' builds
    it); a pad token is set where the tokenizer has none (batches need one)."""
    from transformers import AutoProcessor

    if path is None and model_cfg.name_or_path == TINY_VLM:
        processor = build_tiny_processor(model_cfg)
    else:
        source = str(path) if path is not None else model_cfg.name_or_path
        processor = AutoProcessor.from_pretrained(
            source, revision=None if path is not None else model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.chat_template is not None:
        processor.chat_template = model_cfg.chat_template
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_vlm(model_cfg: ModelConfig, *, path: str | Path | None = None):
    """The vision-language model of `path` (a saved stage) if given, else the configured one
    ('tiny-vlm' builds it), safetensors only."""
    from transformers import AutoModelForImageTextToText

    from posttrain.models import DTYPES, loadable_attention

    if path is None and model_cfg.name_or_path == TINY_VLM:
        return build_tiny_vlm(model_cfg, build_tiny_processor(model_cfg))
    source = str(path) if path is not None else model_cfg.name_or_path
    return AutoModelForImageTextToText.from_pretrained(
        source, revision=None if path is not None else model_cfg.revision,
        dtype=DTYPES[model_cfg.dtype], trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=loadable_attention(model_cfg.attn_implementation),
        use_safetensors=True)


def vision_tower(model: Any) -> Any:
    """The vision encoder of a transformers vision-language model (Llava's `vision_tower`,
    Qwen2-VL's `visual`, Idefics3's `vision_model`), found under the model's backbone."""
    backbone = getattr(model, "model", model)
    for name in VISION_PARTS:
        for owner in (backbone, model):
            if hasattr(owner, name):
                return getattr(owner, name)
    raise ValueError(f"{type(model).__name__}: no vision tower found (looked for "
                     f"{', '.join(VISION_PARTS)})")


def language_linear_names(model: Any, wanted: tuple[str, ...] | str) -> list[str]:
    """Full names of the language model's linear layers (the LM head left out), restricted to
    the module names in `wanted` unless it is 'all-linear': LoRA's targets on a VLM."""
    import torch

    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    return [n for n, m in model.named_modules()
            if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)
            and (wanted == "all-linear" or n.rsplit(".", 1)[-1] in wanted)]


def prepare_trainable(model: Any, model_cfg: ModelConfig):
    """The parts of a VLM that train: the vision tower frozen unless `train_vision_tower`; with
    LoRA, adapters on the language model's linear layers only (the tower, trained, then trains
    in full); returns the model, wrapped by peft with LoRA."""
    tower = vision_tower(model)
    if model_cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = model_cfg.lora
        model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=language_linear_names(model, lora.target_modules)))
    tower.requires_grad_(model_cfg.train_vision_tower)
    return model
