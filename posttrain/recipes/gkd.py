"""On-policy distillation: Agarwal et al. (2024), "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes" (GKD).

A student learns a frozen teacher's next-token distributions. Each micro-batch is, with
probability `lmbda`, on-policy: the student samples its own completions of the batch's prompts
(posttrain/rollout.py `generate`, at `temperature`, up to `max_new_tokens`); otherwise it keeps
the data's completions (supervised distillation). Both models then score the same tokens and the
loss is the generalized Jensen-Shannon divergence between their distributions at every
completion position (posttrain/losses/gkd.py: beta 0 forward KL, 1 reverse KL), a token mean
over the completion tokens of the whole accumulated batch (the shared offline loop,
posttrain.training.fit, with `GKDObjective`: checkpoints, select_best, the non-finite guard).

Choices (TRL's GKDTrainer does the same unless said):
- The on-policy draw is per micro-batch, from random.Random(seed) (every process draws the
  same), so `lmbda` = 0 never generates and 1 always does.
- Dropout is off in the student (TRL's disable_dropout); the teacher runs in eval mode, frozen,
  on the accelerator's device (posttrain.training.place), inside its autocast.
- The student's and the teacher's tokenizers must be the same (a refusal otherwise): the
  divergence compares the two distributions token id by token id.
- Not implemented: TRL's `seq_kd` (teacher-generated sequences; off by default there).
- Both models' logits are full (B, T, V) tensors: fine for small vocabularies; for large ones
  use a small per_device_batch_size.
- A resumed run regenerates the on-policy batches it skips to its data position (same draws,
  other samples: the student's weights at those steps are gone).

Metrics: `loss` (= `jsd`, the per-token divergence), `on_policy_fraction` (share of the step's
micro-batches the student sampled), `completions/mean_length` of on-policy micro-batches, and at
evaluations `eval_jsd` (= `eval_loss`) on the held-out data's completions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import GKDConfig
from posttrain.data.packing import collate_padded
from posttrain.losses.gkd import gkd_loss
from posttrain.models import stop_token_ids
from posttrain.rollout import generate
from posttrain.training import (
    Metrics,
    Objective,
    build_optimizer,
    disable_dropout,
    endless_batches,
    fit,
    make_accelerator,
    place,
    prepare,
)

MetricFn = Callable[[dict[str, float], int], None]
IGNORE = -100


def check_tokenizers(student_tokenizer, teacher_tokenizer, student=None, teacher=None) -> None:
    """Refuse a teacher whose tokenizer (or logit width) differs from the student's."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s != t:
        differ = len(set(s.items()) ^ set(t.items()))
        raise ValueError(
            f"teacher: its tokenizer differs from the student's ({len(t)} vs {len(s)} tokens, "
            f"{differ} (token, id) entries differ); GKD compares the two models' distributions "
            "token id by token id, so both must use the same tokenizer")
    if student is not None and teacher is not None:
        vs, vt = student.get_output_embeddings().weight.shape[0], \
            teacher.get_output_embeddings().weight.shape[0]
        if vs != vt:
            raise ValueError(f"teacher: its output layer has {vt} logits, the student's {vs}; "
                             "both must score the same vocabulary")


def prompt_length(example: dict) -> int:
    """Tokens before the first completion token of a tokenized example ({input_ids, labels})."""
    for i, label in enumerate(example["labels"]):
        if label != IGNORE:
            return i
    return len(example["labels"])


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the positions whose next token is a completion token (logits[:, :-1])."""
    return labels[:, 1:] != IGNORE


def on_policy_examples(student, examples: list[dict], config: GKDConfig, *, tokenizer,
                       generator: torch.Generator | None) -> list[dict]:
    """The examples with their completions replaced by the student's own samples."""
    prompts = [list(e["input_ids"][: prompt_length(e)]) for e in examples]
    room = config.max_length - max(len(p) for p in prompts)
    rollout = generate(
        student, prompts, num_samples=1, max_new_tokens=max(1, min(config.max_new_tokens, room)),
        temperature=config.temperature, eos_token_ids=stop_token_ids(student, tokenizer),
        pad_token_id=tokenizer.pad_token_id, generator=generator,
        backend=config.generation_backend)
    out = []
    for prompt, ids, n in zip(prompts, rollout.completion_ids.tolist(),
                              rollout.lengths.tolist(), strict=True):
        completion = ids[:n]
        out.append({"input_ids": prompt + completion,
                    "labels": [IGNORE] * len(prompt) + completion})
    return out


def mixed_batches(student: Callable[[], torch.nn.Module], examples: list[dict],
                  config: GKDConfig, *, tokenizer, rank: int = 0, world_size: int = 1,
                  generator: torch.Generator | None = None,
                  sample: Callable | None = None) -> Iterator[dict]:
    """Endless padded micro-batches, each on-policy (its completions sampled by `student()`,
    the model as it is when the batch is drawn) with probability lmbda, else the data's.
    `sample` (default on_policy_examples) is the sampler, replaceable in tests."""
    sample = sample or on_policy_examples
    draws = random.Random(config.seed)
    base = endless_batches(examples, config.per_device_batch_size, lambda chosen: chosen,
                           seed=config.seed, rank=rank, world_size=world_size)

    def forever() -> Iterator[dict]:
        for chosen in base:
            on_policy = draws.random() < config.lmbda
            if on_policy:
                chosen = sample(student(), chosen, config, tokenizer=tokenizer,
                                generator=generator)
            batch = collate_padded(chosen, tokenizer.pad_token_id)
            batch["on_policy"] = on_policy
            yield batch

    return forever()


def _divergence(student, teacher, batch: dict, config: GKDConfig, accelerator):
    """(summed divergence, metrics) of one micro-batch; the teacher under no_grad."""
    mask = completion_positions(batch["labels"])
    student_logits = student(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    with torch.no_grad(), accelerator.autocast():
        teacher_logits = teacher(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    return gkd_loss(student_logits, teacher_logits, beta=config.beta,
                    temperature=config.temperature)


@torch.no_grad()
def evaluate_jsd(student, teacher, batches: list[dict], config: GKDConfig,
                 accelerator) -> dict[str, float]:
    """Token-mean divergence to the teacher on held-out completions (the data's)."""
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        _, m = _divergence(student, teacher, batch, config, accelerator)
        total += m["jsd_sum"].item()
        tokens += int(m["num_tokens"])
    mean = total / max(tokens, 1)
    return {"eval_jsd": mean, "eval_loss": mean}


def train(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train_examples: list[dict],
    eval_examples: list[dict],
    config: GKDConfig,
    *,
    tokenizer,
    log_metrics: MetricFn | None = None,
    checkpoint_dir: Path | None = None,
    accelerator: Accelerator | None = None,
    sample: Callable | None = None,
) -> dict[str, float]:
    """Distil `teacher` into `student` (in place) on tokenized prompt-completion examples
    ({input_ids, labels}); return the final metrics."""
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(config.seed)
    disable_dropout(student)
    teacher = place(teacher, accelerator, frozen=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(
        config.seed + accelerator.process_index)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config)
    net, optimizer, params = prepare(accelerator, student, optimizer, config)
    batches = mixed_batches(partial(accelerator.unwrap_model, net), train_examples, config,
                            tokenizer=tokenizer, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, generator=generator,
                            sample=sample)
    size = config.per_device_batch_size
    held = eval_examples[: config.max_eval_rows] if config.max_eval_rows else eval_examples
    eval_batches = [collate_padded(held[i : i + size], tokenizer.pad_token_id)
                    for i in range(0, len(held), size)]

    objective = GKDObjective(net, teacher, eval_batches, config, accelerator)
    return fit(accelerator, net, optimizer, scheduler, params, batches, config, name="gkd",
               objective=objective, log_metrics=log_metrics, checkpoint_dir=checkpoint_dir)


class GKDObjective(Objective):
    """The divergence to the teacher summed over a micro-batch's completion tokens, with the
    share of on-policy micro-batches and their completion length; the held-out divergence."""

    def __init__(self, student, teacher, eval_batches: list[dict], config: GKDConfig,
                 accelerator: Accelerator):
        self.student, self.teacher, self.eval_batches = student, teacher, eval_batches
        self.config, self.accelerator = config, accelerator
        self.evaluates = bool(eval_batches)

    def count(self, batch: dict) -> int:
        return int(completion_positions(batch["labels"]).sum())

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        loss_sum, m = _divergence(self.student, self.teacher, batch, self.config,
                                  self.accelerator)
        metrics: Metrics = {"loss": m["jsd_sum"].item(), "jsd": m["jsd_sum"].item(),
                            "on_policy_fraction": (float(batch["on_policy"]), 1.0)}
        if batch["on_policy"]:
            rows = batch["labels"].shape[0]
            metrics["completions/mean_length"] = (
                float(completion_positions(batch["labels"]).sum()), float(rows))
        return loss_sum, metrics

    def evaluate(self) -> dict[str, float]:
        return evaluate_jsd(self.student, self.teacher, self.eval_batches, self.config,
                            self.accelerator)
