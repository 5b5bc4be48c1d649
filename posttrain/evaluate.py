"""The shared evaluation suite: held-out loss and perplexity, checker accuracy, completion
length, and a table of sample generations.

Generation is greedy and batched (left-padded, KV-cached through `model.generate`), so a score is
a property of the model, not of sampling luck.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.data.packing import collate_padded
from posttrain.data.tokenize import tokenize_prompt, tokenize_sft_example
from posttrain.logprobs import SelectedLogits
from posttrain.models import stop_token_ids
from posttrain.recipes.sft import evaluate_loss

Checker = Callable[[object, str], bool]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[dict]:
    """Greedy completions for prompts (strings or message lists): [{text, num_tokens, eos}]."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_token_ids(model, tokenizer)
    out: list[dict] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenize_prompt(p, tokenizer) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        # Left padding keeps every prompt's last token at the same position for generation.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=sorted(stop_ids),
        )[:, width:]  # (B, new)
        for row in generated.tolist():
            end = next((i for i, t in enumerate(row) if t in stop_ids), None)
            ended = end is not None
            tokens = row[:end] if ended else row
            tokens = [t for t in tokens if t != pad_id]
            out.append(
                {
                    "text": tokenizer.decode(tokens, skip_special_tokens=True),
                    "num_tokens": len(tokens) + int(ended),
                    "eos": ended,
                    "prompt_ids": encoded[len(out) - start],
                    "completion_ids": row[: end + 1] if ended else tokens,
                }
            )
    return out


def completion_text(completion) -> str:
    """The assistant text of a completion (a string or a message list)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt if m.get("role") != "assistant")


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    num_samples: int,
    checker: Checker | None = None,
    reward_model: torch.nn.Module | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Metrics and a sample table for held-out prompt-completion rows.

    `checker(prompt, completion_text)` says whether a completion is correct; without one (data
    with no verifiable answer) `checker_accuracy` is left out rather than guessed. With a
    `reward_model`, every (prompt, completion) is scored: `reward_score` is the mean.
    """
    examples = [
        e
        for e in (
            tokenize_sft_example(r, tokenizer, max_length=max_length, truncation="drop")
            for r in rows
        )
        if e is not None
    ]
    batches = [
        collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]
    device = next(model.parameters()).device
    losses = evaluate_loss(SelectedLogits(model), batches, device) if batches else {}
    completions = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    metrics: dict[str, float] = {
        "eval_loss": losses.get("eval_loss", math.nan),
        "perplexity": losses.get("eval_perplexity", math.nan),
        "mean_completion_length": sum(c["num_tokens"] for c in completions) / len(completions),
        "eos_rate": sum(c["eos"] for c in completions) / len(completions),
    }
    scores: list[float | None] = [None] * len(rows)
    if reward_model is not None:
        scores = score_completions(reward_model, completions, tokenizer.pad_token_id, batch_size)
        metrics["reward_score"] = sum(scores) / len(scores)
    correct: list[bool | None] = [None] * len(rows)
    if checker is not None:
        correct = [bool(checker(r["prompt"], c["text"])) for r, c in zip(rows, completions)]
        metrics["checker_accuracy"] = sum(correct) / len(correct)
    samples = [
        {
            "prompt": prompt_text(r["prompt"]),
            "completion": c["text"],
            "reference": completion_text(r.get("completion", "")),
            "correct": ok,
            "reward": score,
        }
        for r, c, ok, score in list(zip(rows, completions, correct, scores))[:num_samples]
    ]
    return metrics, samples


@torch.no_grad()
def score_completions(
    reward_model: torch.nn.Module, completions: list[dict], pad_token_id: int, batch_size: int
) -> list[float]:
    """Reward-model scores of generated (prompt_ids + completion_ids) sequences."""
    from posttrain.data.packing import collate_padded
    from posttrain.rewards import score_texts

    sequences = [
        {"input_ids": c["prompt_ids"] + c["completion_ids"],
         "labels": c["prompt_ids"] + c["completion_ids"]}
        for c in completions
    ]
    batches = [
        collate_padded(sequences[i : i + batch_size], pad_token_id)
        for i in range(0, len(sequences), batch_size)
    ]
    return score_texts(reward_model, batches).tolist()
