"""The shared evaluation suite: held-out loss and perplexity (over the rows that have a reference
completion), checker accuracy, completion length, reward-model score, perplexity on chosen
preference responses, and a table of sample generations; plus the pairwise numbers against a
reference model (the SFT model): win rate judged by the reward model and a KL estimate on the
candidate's own completions.

Held-out rows come from `posttrain.data.formats.eval_rows`, so any data format can be evaluated:
rows without a reference (prompt-only data) still get generation metrics. Generation is greedy
and batched (left-padded, KV-cached through `model.generate`), so a score is a property of the
model, not of sampling luck.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from posttrain import bootstrap
from posttrain.data.loading import DataError
from posttrain.data.packing import collate_padded
from posttrain.data.preference import tokenize_preference_rows
from posttrain.data.tokenize import IGNORE_INDEX, tokenize_prompt, tokenize_sft_example
from posttrain.logprobs import (
    SelectedLogits,
    position_ids_from_mask,
    shift_targets,
    token_logps,
)
from posttrain.models import stop_token_ids
from posttrain.rewards import score_texts
from posttrain.training.batches import to_device

Checker = Callable[[object, str], bool]


@torch.no_grad()
def greedy_completions(
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


@dataclass
class Evaluation:
    """One model's results: metrics, the sample table, and per-prompt details for pairwise
    metrics (completions with their token ids, reward scores or None); `per_prompt` holds each
    metric's per-item values (`posttrain.bootstrap.per_item`) for its confidence interval and
    for pairing with another model on the same prompts; `seconds` the time each part took."""

    metrics: dict[str, float]
    samples: list[dict]
    completions: list[dict] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    per_prompt: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate_candidate(
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
    preference_rows: list[dict] | None = None,
) -> Evaluation:
    """Metrics, samples and per-prompt details for held-out rows (`posttrain.data.formats.
    eval_rows`): a `prompt` each and, where the data has one, a reference `completion`.

    `eval_loss` and `perplexity` are over the rows with a completion only, and absent (not NaN)
    when none has one or none fits in max_length: a prompt-only dataset has no reference to
    score, and a NaN would read as a diverged model. `checker(prompt, completion_text)` says
    whether a completion is correct; without one (data with no verifiable answer)
    `checker_accuracy` is left out rather than guessed. With a `reward_model`, every (prompt,
    completion) is scored: `reward_score` is the mean. With held-out `preference_rows`,
    `chosen_perplexity` is the perplexity of the chosen responses. A sample's "reference" is ""
    for a row without a completion.

    `per_prompt` has every metric's per-row values (None for a row without one), loss and
    perplexity as (loss sum, token count) per row, so that sum / count over the rows is the
    metric and a bootstrap over rows weighs them by tokens.
    """
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    scored, batches = _reference_batches(rows, tokenizer, max_length=max_length,
                                         batch_size=batch_size)
    completions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds["generate"], clock = time.perf_counter() - clock, time.perf_counter()
    metrics: dict[str, float] = {}
    per_prompt: dict[str, dict] = {}
    if batches:
        add_reference_loss(metrics, per_prompt, model, scored, batches, len(rows))
        seconds["loss"], clock = time.perf_counter() - clock, time.perf_counter()
    _add_completion_shape(metrics, per_prompt, completions)
    scores: list[float | None] = [None] * len(rows)
    if reward_model is not None:
        scores = reward_model_scores(reward_model, completions, tokenizer.pad_token_id, batch_size)
        metrics["reward_score"] = sum(scores) / len(scores)
        per_prompt["reward_score"] = bootstrap.per_item(scores)
        seconds["reward"], clock = time.perf_counter() - clock, time.perf_counter()
    correct: list[bool | None] = [None] * len(rows)
    if checker is not None:
        correct = [bool(checker(r["prompt"], c["text"])) for r, c in zip(rows, completions)]
        metrics["checker_accuracy"] = sum(correct) / len(correct)
        per_prompt["checker_accuracy"] = bootstrap.per_item([float(c) for c in correct])
    samples = [
        {"prompt": prompt_text(r["prompt"]), "completion": c["text"],
         "reference": completion_text(r.get("completion") or ""), "correct": ok, "reward": score}
        for r, c, ok, score in list(zip(rows, completions, correct, scores))[:num_samples]
    ]
    if preference_rows:
        chosen = chosen_pair_losses(model, tokenizer, preference_rows, max_length=max_length,
                                    batch_size=batch_size)
        if chosen is not None:
            per_prompt["chosen_perplexity"] = chosen
            metrics["chosen_perplexity"] = bootstrap.value(chosen)
        seconds["chosen_perplexity"] = time.perf_counter() - clock
    return Evaluation(metrics, samples, completions, scores, per_prompt, seconds)


def _reference_batches(rows: list[dict], tokenizer, *, max_length: int, batch_size: int
                       ) -> tuple[list[tuple[int, dict]], list[dict[str, torch.Tensor]]]:
    """The rows with a reference completion that fits in max_length, tokenized (with their row
    index), and their padded batches."""
    scored = [
        (i, e)
        for i, e in (
            (i, tokenize_sft_example(
                {"prompt": r["prompt"], "completion": r["completion"]}, tokenizer,
                max_length=max_length, truncation="drop",
            ))
            for i, r in enumerate(rows)
            if r.get("completion") is not None
        )
        if e is not None
    ]
    examples = [e for _, e in scored]
    batches = [
        collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]
    return scored, batches


def add_reference_loss(metrics: dict, per_prompt: dict, model: torch.nn.Module,
                        scored: list[tuple[int, dict]], batches: list, num_rows: int) -> None:
    """eval_loss and perplexity over the reference completions: per row (loss sum, token
    count), None for a row without one; the metric is sum / count over all rows."""
    device = next(model.parameters()).device
    sums: list[float | None] = [None] * num_rows
    counts: list[int | None] = [None] * num_rows
    for (i, _), (s, n) in zip(scored, row_losses(model, batches, device)):
        sums[i], counts[i] = s, n
    per_prompt["eval_loss"] = bootstrap.per_item(sums, counts)
    per_prompt["perplexity"] = bootstrap.per_item(sums, counts, transform="exp")
    mean = sum(s for s in sums if s is not None) / max(sum(n for n in counts if n), 1)
    metrics["eval_loss"] = mean
    metrics["perplexity"] = math.exp(min(mean, bootstrap.MAX_LOG))


def _add_completion_shape(metrics: dict, per_prompt: dict, completions: list[dict]) -> None:
    """mean_completion_length (tokens, the stop token included) and eos_rate."""
    per_prompt["mean_completion_length"] = bootstrap.per_item([c["num_tokens"]
                                                               for c in completions])
    metrics["mean_completion_length"] = (
        sum(c["num_tokens"] for c in completions) / len(completions)
    )
    per_prompt["eos_rate"] = bootstrap.per_item([float(c["eos"]) for c in completions])
    metrics["eos_rate"] = sum(c["eos"] for c in completions) / len(completions)


@torch.no_grad()
def row_losses(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
               device: torch.device) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) of each row of the batches, in order, over its
    labelled tokens: the token-mean loss of any set of rows is the sum of their sums over the
    sum of their counts (as `posttrain.recipes.sft.evaluate_loss` over all of them)."""
    was_training = model.training
    model.eval()
    net = SelectedLogits(model)
    out: list[tuple[float, int]] = []
    for batch in batches:
        batch = to_device(batch, device)
        select, targets = shift_targets(batch["labels"])  # (B, T), (N,)
        logits = net(batch["input_ids"], batch["attention_mask"], select,
                     batch.get("position_ids"), image_inputs=batch.get("image_inputs"))  # (N, V)
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        per_row = select.sum(dim=1).tolist()  # tokens of each row, in select's row-major order
        for part, n in zip(token_loss.split(per_row), per_row):
            out.append((float(part.sum()), int(n)))
    model.train(was_training)
    return out


def chosen_pair_losses(model: torch.nn.Module, tokenizer, rows: list[dict], *,
                       max_length: int, batch_size: int) -> dict | None:
    """Per-pair (loss sum, token count) of the chosen responses of preference pairs (prompt
    tokens carry no loss) as a `bootstrap.per_item` record whose value is their perplexity;
    indexed by the pairs that fit, in order; None when no pair fits in max_length."""
    try:
        pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=max_length,
                                            truncation="drop", source="held-out preference pairs",
                                            max_bad_fraction=1.0)
    except DataError:  # nothing usable left: the metric is absent, not guessed
        return None
    examples = [
        {"input_ids": p["prompt_ids"] + p["chosen_ids"],
         "labels": [IGNORE_INDEX] * len(p["prompt_ids"]) + p["chosen_ids"]}
        for p in pairs
    ]
    batches = [collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), batch_size)]
    if not batches:
        return None
    device = next(model.parameters()).device
    losses = row_losses(model, batches, device)
    return bootstrap.per_item([s for s, _ in losses], [n for _, n in losses], group="pairs",
                              transform="exp")


def chosen_perplexity(model: torch.nn.Module, tokenizer, rows: list[dict], *, max_length: int,
                      batch_size: int) -> float | None:
    """Perplexity of the chosen responses of preference pairs (prompt tokens carry no loss);
    None when no pair fits in max_length."""
    record = chosen_pair_losses(model, tokenizer, rows, max_length=max_length,
                                batch_size=batch_size)
    return None if record is None else bootstrap.value(record)


def summed_logps(per_token: list[torch.Tensor]) -> torch.Tensor:  # (N,)
    """Each completion's log-prob: the sum of its per-token log-probs
    (`completion_token_logps`)."""
    return torch.stack([t.sum() for t in per_token]) if per_token else torch.zeros(0)


def mean_log_ratio(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """Mean of log pi(y) - log pi_ref(y) over completions y drawn from pi: a Monte-Carlo KL(pi ||
    pi_ref) per sequence. Greedy completions are a biased draw (the mode), so read it as a
    distance the evaluation can track, not an exact KL."""
    if policy_logps.numel() == 0:
        return math.nan
    return float((policy_logps - reference_logps).mean())


def win_rate(scores: list[float | None], reference_scores: list[float | None]) -> float:
    """Share of prompts whose completion the reward model scores above the reference's
    completion for the same prompt; a tie counts half (identical completions tie), so a model
    against itself scores 0.5. NaN when no prompt has both scores."""
    pairs = [(a, b) for a, b in zip(scores, reference_scores) if a is not None and b is not None]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def win_items(scores: list[float | None], reference_scores: list[float | None]) -> dict:
    """`win_rate` per prompt (1 win, 0.5 tie, 0 loss; None without both scores), as a
    `bootstrap.per_item` record."""
    return bootstrap.per_item([None if a is None or b is None else
                               1.0 if a > b else 0.5 if a == b else 0.0
                               for a, b in zip(scores, reference_scores)])


def kl_items(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> dict:
    """`kl_estimate` per prompt (log pi(y) - log pi_ref(y)), as a `bootstrap.per_item`
    record."""
    return bootstrap.per_item((policy_logps - reference_logps).tolist())


@torch.no_grad()
def completion_token_logps(model: torch.nn.Module, completions: list[dict], pad_token_id: int,
                           batch_size: int) -> list[torch.Tensor]:
    """Per-token log-probs of each generated completion (given its prompt) under `model`: one
    (len(completion_ids),) float32 tensor per completion, in order (`completion_logps` sums
    them)."""
    model.eval()
    device = next(model.parameters()).device
    net = SelectedLogits(model)
    out: list[torch.Tensor] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        seqs = [c["prompt_ids"] + c["completion_ids"] for c in chunk]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        select = torch.zeros((len(seqs), width), dtype=torch.bool)  # position t scores t+1
        for b, (c, s) in enumerate(zip(chunk, seqs)):
            input_ids[b, : len(s)] = torch.tensor(s)
            attention[b, : len(s)] = 1
            select[b, max(len(c["prompt_ids"]), 1) - 1 : len(s) - 1] = True
        input_ids, attention, select = input_ids.to(device), attention.to(device), \
            select.to(device)
        logits = net(input_ids, attention, select, position_ids_from_mask(attention))
        targets = input_ids[:, 1:][select[:, :-1]]
        per_token = token_logps(logits, targets).cpu()  # (N,) row-major, completion by completion
        out += list(per_token.split(select.sum(-1).tolist()))
    return out


def k3_kl_per_token(policy_token_logps: list[torch.Tensor],
                    reference_token_logps: list[torch.Tensor]) -> float:
    """Mean over every completion token of the k3 estimator of KL(pi || pi_ref) (Schulman 2020):
    e^r - r - 1 with r = log pi_ref(y_t) - log pi(y_t). Every term is >= 0 (e^r >= 1 + r), so
    unlike the summed log-ratio of `kl_estimate` it can never be negative, and on tokens sampled
    from pi it is unbiased per token; on greedy completions read it, like that one, as a
    distance to track. NaN without tokens."""
    record = k3_kl_items(policy_token_logps, reference_token_logps)
    tokens = sum(record["den"])
    return sum(record["num"]) / tokens if tokens else math.nan


def k3_kl_items(policy_token_logps: list[torch.Tensor],
                reference_token_logps: list[torch.Tensor]) -> dict:
    """`k3_kl_per_token` per prompt as a `bootstrap.per_item` record: the k3 sum over the
    completion's tokens and their count (so the bootstrap weighs prompts by tokens, as the
    metric does)."""
    num, den = [], []
    for own, ref in zip(policy_token_logps, reference_token_logps):
        r = ref.double() - own.double()
        num.append(float((torch.exp(r) - r - 1.0).sum()))
        den.append(float(own.numel()))
    return bootstrap.per_item(num, den)


@torch.no_grad()
def reward_model_scores(
    reward_model: torch.nn.Module, completions: list[dict], pad_token_id: int, batch_size: int
) -> list[float]:
    """Reward-model scores of generated (prompt_ids + completion_ids) sequences."""
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
