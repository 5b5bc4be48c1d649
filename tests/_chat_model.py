"""A local chat model folder the way users bring one: a Qwen2-architecture model (random
weights, safetensors) with a byte-level BPE tokenizer trained here and Qwen's ChatML template,
saved as `AutoTokenizer`/`AutoModelForCausalLM` expect. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5's way with tools, shortened: the tools' JSON schemas in a system turn, tool results as
# a user turn of <tool_response> blocks (consecutive ones grouped), calls as <tool_call> JSON.
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools>\nCall one with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user\n"
    "{% endif %}<tool_response>\n{{ m['content'] }}\n</tool_response>\n"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind on the harbor wall.",
    "Explain photosynthesis briefly. Plants turn light, water and carbon dioxide into sugar.",
    "How many legs does a spider have? A spider has eight legs.",
    "Translate 'good morning' to Spanish. Buenos dias.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "#### 72  The answer is 72 because 48 + 24 = 72.",
] * 20
# Extra text for the tools template's tokenizer (the default tokenizer stays as it was).
_TOOL_CORPUS = [
    '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>',
    "<tool_response>\n42\n</tool_response> error: unknown tool",
] * 20


def build_chat_model(folder: Path, *, hidden_size: int = 32, seed: int = 0,
                     chat_template: str = CHATML) -> Path:
    """Train a 400-token byte-level BPE on a small corpus, build a 2-layer Qwen2 around it, and
    save both (safetensors) into `folder`. `CHATML_TOOLS` gives a template with tools."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = _CORPUS + (_TOOL_CORPUS if chat_template == CHATML_TOOLS else [])
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
