"""Tokenize SFT rows into input ids and labels, with -100 on tokens that carry no loss.

Rules (the same ones evaluation uses for prompts, via `tokenize_prompt`, so that a model is
prompted exactly as it was trained):

- standard prompt-completion: prompt = tokenizer(prompt) with the tokenizer's own special tokens
  (e.g. BOS); completion = tokenizer(completion, add_special_tokens=False) + [EOS]. Tokenizing the
  two parts separately keeps the boundary exact: the first completion token is never merged with
  the end of the prompt.
- conversational prompt-completion: prompt = chat template of the prompt messages with the
  generation prompt; full = chat template of prompt + completion messages; the completion is what
  follows the prompt. The template must render the prompt as a prefix of the full conversation
  (some templates rewrite earlier turns, e.g. strip reasoning), otherwise the mask would be wrong,
  so that is checked. No EOS is appended: the template's end-of-turn token ends the completion.
- language modeling: `text` -> ids + [EOS]; `messages` -> chat template; loss on every token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posttrain.data.loading import DataError

IGNORE_INDEX = -100
TRUNCATION_MODES = ("error", "drop", "truncate_prompt", "truncate_right")


def tokenize_sft_example(
    row: dict,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    completion_only_loss: bool = True,
    where: str = "",
) -> dict | None:
    """{"input_ids", "labels"} for one SFT row, or None when it is dropped.

    Over-length rows (more than max_length tokens): "drop" -> None; "error" -> DataError;
    "truncate_right" cuts the end; "truncate_prompt" cuts the prompt from the left and keeps
    the whole completion (dropped when the completion leaves no room for one prompt token;
    language-modeling rows have no prompt and are cut at the end). A row left with no loss token
    after truncation is dropped too: it would only dilute the batch. `where` (e.g.
    "data/train.jsonl row 17") prefixes error messages.
    """
    example, _ = tokenize_sft_example_with_status(
        row,
        tokenizer,
        max_length=max_length,
        truncation=truncation,
        completion_only_loss=completion_only_loss,
        where=where,
    )
    return example


def tokenize_sft_example_with_status(
    row: dict,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    completion_only_loss: bool = True,
    where: str = "",
) -> tuple[dict | None, str]:
    """Like tokenize_sft_example, plus what happened: "ok", "truncated", "too_long", "no_loss"."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    prefix = f"{where}: " if where else ""
    prompt_ids, completion_ids, has_prompt = _split_ids(row, tokenizer, prefix)
    if has_prompt and completion_only_loss:
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids)
    else:
        prompt_labels = list(prompt_ids)
    ids = prompt_ids + completion_ids
    labels = prompt_labels + list(completion_ids)
    status = "ok"
    if len(ids) > max_length:
        if truncation == "drop":
            return None, "too_long"
        if truncation == "error":
            raise DataError(
                f"{prefix}example has {len(ids)} tokens, more than max_length={max_length} "
                "(set truncation to 'drop', 'truncate_prompt' or 'truncate_right' to allow it)"
            )
        status = "truncated"
        if truncation == "truncate_prompt" and has_prompt:
            keep = max_length - len(completion_ids)
            if keep < 1:  # the completion alone does not fit after at least one prompt token
                return None, "too_long"
            ids = prompt_ids[-keep:] + completion_ids
            labels = prompt_labels[-keep:] + list(completion_ids)
        else:
            ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_loss"
    return {"input_ids": ids, "labels": labels}, status


def tokenize_sft_rows(
    rows: list[dict],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "drop",
    completion_only_loss: bool = True,
    source: str = "data",
) -> tuple[list[dict], dict]:
    """Tokenize a dataset; return (examples, report) with counts of truncated and dropped rows.

    Error messages name `source` and the 1-based row, matching validation's messages.
    """
    examples: list[dict] = []
    counts = {"ok": 0, "truncated": 0, "too_long": 0, "no_loss": 0}
    for i, row in enumerate(rows, start=1):
        example, status = tokenize_sft_example_with_status(
            row,
            tokenizer,
            max_length=max_length,
            truncation=truncation,
            completion_only_loss=completion_only_loss,
            where=f"{source} row {i}",
        )
        counts[status] += 1
        if example is not None:
            examples.append(example)
    report = {
        "rows_in": len(rows),
        "rows_out": len(examples),
        "truncated": counts["truncated"],
        "dropped_too_long": counts["too_long"],
        "dropped_no_loss": counts["no_loss"],
    }
    return examples, report


def tokenize_prompt(row_or_prompt: dict | str | list, tokenizer: Any) -> list[int]:
    """Generation prompt ids, tokenized exactly as the prompt of an SFT example.

    Accepts a row with a `prompt` column, a string, or a list of messages (rendered with the
    generation prompt, e.g. "<|assistant|>", so the model continues as the assistant).
    """
    prompt = row_or_prompt["prompt"] if isinstance(row_or_prompt, dict) else row_or_prompt
    if isinstance(prompt, str):
        return _text_ids(tokenizer, prompt, add_special_tokens=True)
    if isinstance(prompt, list):
        return chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
    raise DataError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")


# ------------------------------------------------------------------------------------ helpers


def _split_ids(row: dict, tokenizer: Any, prefix: str) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids, has a prompt) for any SFT row format."""
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = _text_ids(tokenizer, prompt, add_special_tokens=True)
            completion_ids = _text_ids(tokenizer, completion, add_special_tokens=False)
            return prompt_ids, completion_ids + [_eos_id(tokenizer)], True
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt_ids = chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
            full_ids = chat_template_ids(tokenizer, prompt + completion)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    f"{prefix}chat template does not render the prompt as a prefix of the full "
                    "conversation, so the completion cannot be located for the loss mask"
                )
            return prompt_ids, full_ids[len(prompt_ids) :], True
        raise DataError(f"{prefix}prompt and completion must both be strings or both messages")
    if isinstance(row.get("text"), str):
        ids = _text_ids(tokenizer, row["text"], add_special_tokens=True)
        eos = _eos_id(tokenizer)
        return [], ids if ids and ids[-1] == eos else ids + [eos], False
    if isinstance(row.get("messages"), list):
        return [], chat_template_ids(tokenizer, row["messages"]), False
    raise DataError(
        f"{prefix}not an SFT row: expected 'prompt'+'completion', 'text' or 'messages', "
        f"got columns {sorted(row)}"
    )


def _text_ids(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; completions need one to end")
    return int(eos)


def chat_template_ids(
    tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of messages rendered by the tokenizer's chat template, as a flat list.

    transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) unless
    return_dict=False; older versions return a list. Both (and tensors) are normalised here.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational data needs a tokenizer with a chat template; it has none")
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=False,
        )
    except TypeError:  # a tokenizer whose apply_chat_template has no return_dict
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one conversation
        out = out[0]
    return [int(t) for t in out]
