"""Tokenizers and causal LMs: the built-in tiny preset, hub/local loading, LoRA, saving.

The tiny preset (a character-level tokenizer and a small Qwen2 model) is built offline from a
config, so the demo pipeline needs no download. Real models load through the same functions from a
hub id or a local directory.

Weights are only ever read as safetensors (`use_safetensors=True`): a pickled `pytorch_model.bin`
can run arbitrary code when loaded, so such a directory is refused.

A stage that trained LoRA adapters saves the MERGED full model in its directory (and the adapter
alone under `adapter/`), so every downstream stage loads a plain model directory with
`load_trained` and never needs to know whether the upstream stage used LoRA.
"""

from __future__ import annotations

import copy
import json
import logging
import string
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from posttrain.config import LoraConfig, ModelConfig, TinyModelConfig

# Lazy imports: peft (apply_lora, is_peft), seconds of start-up that only LoRA stages need.

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, *ROLE_TOKENS, EOS_TOKEN)
# Printable ASCII plus tab and newline: a superset of what the demo tasks use, so that any
# everyday ASCII text (test fixtures, user files) round-trips without <unk>.
TINY_CHARS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


# ---------------------------------------------------------------------------------- tokenizers


def _byte_symbols(text: str) -> str:
    """`text` as byte-level BPE writes it: each UTF-8 byte as one printable symbol (GPT-2's
    table: " " is "Ġ", "\\n" is "Ċ", printable ASCII stays itself)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode())


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with chat special tokens, built offline.

    One id per character keeps the demo tasks trivially tokenizable (digits are never merged), and
    `decode` gives back the exact text. Special tokens are added tokens, matched before
    pre-tokenization, so "<|end|>" in text is one id, not seven characters. Encoding adds no
    special tokens: the chat template and the tokenization code decide where they go.

    It is a `Qwen2Tokenizer` (byte-level BPE) whose vocabulary holds one symbol per character
    and no merges: the tiny model is a Qwen2 model, and transformers' AutoTokenizer builds a
    Qwen2Tokenizer for every folder whose config.json says model_type "qwen2", whatever
    tokenizer_class the folder declares. Being that class already, the saved folder loads with
    plain `AutoTokenizer.from_pretrained` (and tokenizer.json with the `tokenizers` library) to
    the very ids training used. The ids are those of the earlier word-level tokenizer: specials
    0-5, then TINY_CHARS in order. Characters outside TINY_CHARS have no id and are left out
    (byte-level BPE without byte fallback, as Qwen2Tokenizer builds it); the demo data is ASCII.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in TINY_CHARS:
        vocab[_byte_symbols(char)] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad token; many base models ship without one, so reuse EOS (masked)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    model_cfg: ModelConfig, *, path: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of `path` (a saved stage), else of the configured model ('tiny' builds it)."""
    if path is not None:
        tokenizer = load_trained_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
    elif model_cfg.name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer()
    elif Path(model_cfg.name_or_path).is_dir():
        tokenizer = load_trained_tokenizer(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.name_or_path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    if model_cfg.chat_template is not None:
        tokenizer.chat_template = model_cfg.chat_template
    return _ensure_pad_token(tokenizer)


# Classes that mean "the pipeline is exactly what tokenizer.json says".
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_trained_tokenizer(
    path: str | Path, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local directory (a stage output or a local model).

    transformers 5's AutoTokenizer ignores a generic `tokenizer_class` when the config.json next
    to it has model_type "qwen2" and builds Qwen2Tokenizer, whose hard-coded byte-level BPE
    pre-tokenizer silently breaks a word-level tokenizer (spaces vanish). The pipeline's own
    folders load with AutoTokenizer (the tiny tokenizer is a Qwen2Tokenizer); files that declare
    the generic class (older stage folders, other tools' folders) are loaded as written.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in _GENERIC_TOKENIZER_CLASSES:
            return _ensure_pad_token(PreTrainedTokenizerFast.from_pretrained(str(path)))
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return _ensure_pad_token(tokenizer)


# -------------------------------------------------------------------------------------- models


def build_tiny_model(
    cfg: TinyModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:
    """A randomly initialized Qwen2 causal LM sized by `cfg`, deterministic from `cfg.seed`.

    Tied embeddings keep the parameter count small (the vocabulary is ~100 characters anyway).
    Pad and EOS ids go into both the model and the generation config, so `generate` stops at
    "<|end|>" and pads with "<pad>". The global RNG is left as it was.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=_torch_dtype(dtype)
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def load_causal_lm(model_cfg: ModelConfig, *, path: str | Path | None = None) -> PreTrainedModel:
    """The starting policy: the model in `path` (a saved stage) if given, else the configured one.

    'tiny' without a path builds the built-in model; anything else loads from the hub or a local
    directory, safetensors only.
    """
    if path is None and model_cfg.name_or_path == "tiny":
        return build_tiny_model(
            model_cfg.tiny,
            build_tiny_tokenizer(),
            attn_implementation=loadable_attention(model_cfg.attn_implementation),
            dtype=model_cfg.dtype,
        )
    source = str(path) if path is not None else model_cfg.name_or_path
    return AutoModelForCausalLM.from_pretrained(
        source,
        revision=None if path is not None else model_cfg.revision,
        dtype=_torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=loadable_attention(model_cfg.attn_implementation),
        use_safetensors=True,
    )


def load_trained(
    path: str | Path,
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A causal LM saved by `save_model` (a plain, merged model directory), safetensors only."""
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=_torch_dtype(dtype),
        attn_implementation=loadable_attention(attn_implementation),
        use_safetensors=True,
    )


# ------------------------------------------------------------------------------ LoRA and saving


def is_peft(model: object) -> bool:
    """Whether `model` is a peft model. peft is imported where LoRA is applied, not with this
    module (it costs seconds of start-up to every command, most of which never use it): a
    process that never imported it holds no peft model."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig):
    """Wrap `model` with LoRA adapters (a peft PeftModel); only adapter weights stay
    trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = lora_cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target if target == "all-linear" else list(target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """Save a stage's model and tokenizer as a plain model directory (safetensors).

    A PeftModel is merged on a deep copy (the caller's model keeps its adapters; the copy costs one
    extra model in memory), so downstream stages load it like any model; the adapter alone is also
    kept under `out_dir/adapter` for whoever wants to ship just that.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        model = copy.deepcopy(model).merge_and_unload()
    # transformers 5 always writes safetensors (4.x defaults to it); ties are saved once.
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS plus the model's own stop ids: chat models often end a turn with a token that is not
    the tokenizer's EOS (Qwen's <|im_end|>), and generation must stop there too."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------- attention for packed rows


def loadable_attention(implementation: str) -> str:
    """The implementation to load a model with: flex_attention only where CUDA is available
    (torch 2.13 has no FlexAttention backward on CPU, and its CPU forward compiles for minutes),
    else sdpa, with a warning (on this module's logger, not posttrain.progress: that one carries
    the metric lines)."""
    if implementation == "flex_attention" and not torch.cuda.is_available():
        log.warning("model: flex_attention needs a CUDA device here (no FlexAttention backward "
                    "on CPU); loading with sdpa")
        return "sdpa"
    return implementation


def packed_attention(implementation: str, device_type: str,
                     packing: bool = True) -> tuple[str, str, str]:
    """How SFT rows keep packed examples apart, for a model loaded with `implementation`
    training on `device_type`: (layout, implementation to train with, reason in words).

    The layout is one of posttrain.data.packing.PACKED_LAYOUTS, or "padded" without packing:
    - flash_attention_2 -> "varlen": flash's variable-length kernels, boundaries from the
      restarting position ids of the rows flattened into one sequence (no mask at all);
    - flex_attention on CUDA -> "flex_attention": a block-sparse document BlockMask;
    - flex_attention elsewhere -> sdpa (and "dense_mask"): torch 2.13's FlexAttention has no
      backward pass on CPU ("FlexAttention does not support backward on CPU"), padded or not;
    - sdpa, eager -> "dense_mask": they need the (B, 1, T, T) block-diagonal float mask, so the
      reason names the implementations that avoid it.
    """
    if implementation == "flex_attention" and device_type != "cuda":
        why = (f"FlexAttention has no backward pass on {device_type}: sdpa"
               + (" with a dense (B, 1, T, T) block-diagonal mask" if packing else "")
               + " instead")
        return ("dense_mask" if packing else "padded"), "sdpa", why
    if not packing:
        return "padded", implementation, "no packing: one example a row, 2D padding mask"
    if implementation == "flash_attention_2":
        why = ("flash-attention varlen kernels: boundaries from the restarting position ids, "
               "rows flattened into one sequence, no mask")
        return "varlen", implementation, why
    if implementation == "flex_attention":
        why = "FlexAttention with a block-sparse document BlockMask, no (T, T) mask"
        return "flex_attention", implementation, why
    why = (f"{implementation} takes a dense (B, 1, T, T) block-diagonal mask; "
           "model.attn_implementation flex_attention or flash_attention_2 avoids it on a GPU")
    return "dense_mask", implementation, why


def set_attention(model: torch.nn.Module, implementation: str) -> str:
    """Switch a transformers model (or a peft model around one) to `implementation`; return
    the one it had, so the caller can switch back."""
    base = model.get_base_model() if is_peft(model) else model
    before = base.config._attn_implementation
    if implementation != before:
        base.set_attn_implementation(implementation)
    return before
