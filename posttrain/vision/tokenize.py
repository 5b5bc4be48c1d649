"""Rows with images into model inputs: token ids (the processor expands each image part into the
model's image tokens), labels on assistant text only, and the image tensors of each example.

An example is {"input_ids", "labels"} (SFT) or {"prompt_ids", "chosen_ids", "rejected_ids"}
(pairs) as for text, plus "image_inputs": the processor's image tensors of that row
(pixel_values, and image_grid_thw or image_sizes where the family has them). The collate
functions concatenate those along the first axis, which is how transformers' processors batch
them. Spans are found by encoding the chat template's prefixes with their own images and
checking that each is a prefix of the whole, so a template that tokenizes differently in
pieces is an error, not a shifted mask. Image tokens never carry a loss; a row longer than
max_length is dropped and counted, or with `truncation: error` stops the run (cutting through an
image's tokens would break it, so the cutting modes are refused by preflight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data.loading import DataError
from posttrain.data.packing import IGNORE_INDEX
from posttrain.vision.images import IMAGES, image_parts, open_image

TEXT_KEYS = ("input_ids", "attention_mask")


def tokenize_sft_rows(rows: list[dict], processor, data_dir: Path, *, max_length: int,
                      source: str, truncation: str = "drop") -> tuple[list[dict], dict]:
    """SFT examples of prompt-completion or messages rows with images; (examples, report)
    with the report keys of text SFT (posttrain.data.tokenize.tokenize_sft_rows)."""
    examples, too_long, no_loss = [], 0, 0
    for i, row in enumerate(rows, start=1):
        where = f"{source} row {i}"
        messages, first_reply = _conversation(row, where)
        images = [open_image(data_dir, n) for n in row.get(IMAGES) or []]
        ids, image_inputs = _encode(processor, messages, images, where)
        labels = [IGNORE_INDEX] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant" or k < first_reply:
                continue
            start = len(_prefix_ids(processor, messages[:k], images, ids, where, True))
            end = len(_prefix_ids(processor, messages[: k + 1], images, ids, where, False))
            labels[start:end] = ids[start:end]
        image_token = _image_token_id(processor)
        labels = [IGNORE_INDEX if t == image_token else lab for t, lab in zip(ids, labels)]
        if len(ids) > max_length:
            _too_long(where, len(ids), max_length, truncation)
            too_long += 1
            continue
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            no_loss += 1
            continue
        examples.append({"input_ids": ids, "labels": labels, "image_inputs": image_inputs})
    return examples, {"rows_in": len(rows), "rows_out": len(examples), "truncated": 0,
                      "dropped_too_long": too_long, "dropped_no_loss": no_loss}


def tokenize_pair_rows(rows: list[dict], processor, data_dir: Path, *, max_length: int,
                       source: str, truncation: str = "drop", max_bad_fraction: float = 0.1
                       ) -> tuple[list[dict], dict]:
    """Preference pairs (prompt/chosen/rejected conversations, images in the prompt) as
    {"prompt_ids", "chosen_ids", "rejected_ids", "image_inputs"}; pairs longer than
    max_length are dropped and counted, with an error above `max_bad_fraction`."""
    examples, dropped = [], {}
    for i, row in enumerate(rows, start=1):
        where = f"{source} row {i}"
        prompt = row.get("prompt")
        if not isinstance(prompt, list):
            raise DataError(f"{where}, field 'prompt': image pairs need a conversational prompt "
                            "(a list of messages holding the image parts)")
        images = [open_image(data_dir, n) for n in row.get(IMAGES) or []]
        if image_parts({"chosen": row["chosen"], "rejected": row["rejected"]}):
            raise DataError(f"{where}: images belong in the prompt, not in chosen or rejected")
        prompt_ids, image_inputs = _encode(processor, prompt, images, where, generation=True)
        sides = {}
        for side in ("chosen", "rejected"):
            full, _ = _encode(processor, prompt + _as_messages(row[side]), images, where)
            if full[: len(prompt_ids)] != prompt_ids:
                raise DataError(f"{where}, field {side!r}: the chat template's prompt does not "
                                "tokenize to a prefix of prompt + response")
            sides[side] = full[len(prompt_ids):]
        longest = len(prompt_ids) + max(len(sides["chosen"]), len(sides["rejected"]))
        if longest > max_length:
            _too_long(where, longest, max_length, truncation)
            dropped["too long"] = dropped.get("too long", 0) + 1
            continue
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": sides["chosen"],
                         "rejected_ids": sides["rejected"], "image_inputs": image_inputs})
    n_bad = len(rows) - len(examples)
    if rows and (n_bad / len(rows) > max_bad_fraction or not examples):
        raise DataError(f"{source}: {n_bad} of {len(rows)} pairs are longer than max_length="
                        f"{max_length} tokens (> max_drop_fraction {max_bad_fraction:.1%}); "
                        "raise max_length")
    return examples, {"rows_in": len(rows), "rows_out": len(examples), "truncated": 0,
                      "dropped": dropped, "examples": []}


def _too_long(where: str, length: int, max_length: int, truncation: str) -> None:
    if truncation == "error":
        raise DataError(f"{where}: {length} tokens (its image tokens included) > max_length="
                        f"{max_length}; raise max_length or set truncation: drop")


def prompt_inputs(processor, prompt: list[dict], images: list) -> dict:
    """A generation prompt's processor inputs (input_ids, attention_mask and image tensors,
    batch of one), for `generate`."""
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt",
                     add_special_tokens=False)


def _conversation(row: dict, where: str) -> tuple[list[dict], int]:
    """The row's messages and the index of the first one that carries a loss (the completion's
    first message; every assistant message of a `messages` row)."""
    if "messages" in row:
        return row["messages"], 0
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, list):
        raise DataError(f"{where}, field 'prompt': image rows need a conversational prompt (a "
                        "list of messages holding the image parts)")
    return prompt + _as_messages(completion), len(prompt)


def _as_messages(value: Any) -> list[dict]:
    return value if isinstance(value, list) else [{"role": "assistant", "content": value}]


def _encode(processor, messages: list[dict], images: list, where: str, *,
            generation: bool = False) -> tuple[list[int], dict]:
    text = processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)
    try:
        out = processor(text=[text], images=images or None, return_tensors="pt",
                        add_special_tokens=False)
    except ValueError as e:  # the processor's own count check
        raise DataError(f"{where}, field 'images': {e}") from None
    return out["input_ids"][0].tolist(), {k: v for k, v in out.items() if k not in TEXT_KEYS}


def _prefix_ids(processor, messages: list[dict], images: list, ids: list[int], where: str,
                generation: bool) -> list[int]:
    """The ids of a prefix of the conversation (with the images its messages hold), checked to
    be a prefix of the whole conversation's `ids`."""
    n = image_parts({"messages": messages})
    prefix, _ = _encode(processor, messages, images[:n], where, generation=generation)
    if ids[: len(prefix)] != prefix:
        raise DataError(f"{where}: the chat template does not tokenize a conversation's turns "
                        "to prefixes of the whole; assistant spans cannot be found")
    return prefix


def _image_token_id(processor) -> int | None:
    token = getattr(processor, "image_token", None)
    return processor.tokenizer.convert_tokens_to_ids(token) if token else None
