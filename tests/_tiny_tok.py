"""A character-level tokenizer with a chat template, built locally (no hub download).

One token per character, so token counts in tests can be worked out by hand:
"ab" -> 2 tokens, and each special token below is one token.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.,!")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(
    chat_template: str | None = CHAT_TEMPLATE, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """ids: <pad>=0 <eos>=1 <|user|>=2 <|assistant|>=3 <|system|>=4 <|end|>=5, a=6 ... z=31,
    '0'=32 ... '9'=41, ' '=42, '+'=43, '='=44, '?'=45, '.'=46, ','=47, '!'=48, <unk>=49, <bos>=50.

    add_bos: like Llama, plain tokenization prepends <bos> unless add_special_tokens=False.
    """
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + ["<unk>", "<bos>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>" if add_bos else None,
        additional_special_tokens=SPECIALS[2:],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of `text` (specials included) without any added special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]
