"""Evaluation of vision-language candidates on held-out images: greedy answers through
transformers' `generate` (with each row's images), checker accuracy where the data has a
checker (the built-in image task's `answer` column), completion length, and sample tables whose
rows show the image in MLflow's artifact view.

The results have the text evaluation's shape (posttrain.evaluate.Evaluation): metrics,
per-item values for the bootstrap intervals and the paired differences, samples and seconds.
Win rate, KL and the reward model's score are text-only (the reward model is); the harness too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain import bootstrap
from posttrain.config import PipelineConfig
from posttrain.data.packing import collate_padded
from posttrain.data.validation import content_text
from posttrain.evaluate import Evaluation, add_reference_loss
from posttrain.training import make_accelerator, place
from posttrain.vision import demo
from posttrain.vision.images import IMAGES, open_image
from posttrain.vision.models import load_processor, load_vlm
from posttrain.vision.tokenize import prompt_inputs, tokenize_sft_rows

BASE = "base"


def evaluate_all(cfg: PipelineConfig, data_manifest: dict, rows: list[dict],
                 candidates: dict[str, dict]) -> dict[str, Evaluation]:
    """Every model's Evaluation on the held-out `rows` (eval_rows of the evaluation source):
    the base model, then the candidates in config order."""
    data_dir = Path(data_manifest["path"])
    checked = data_manifest["datasets"][cfg.eval_source].get("checker") == "vision-demo"
    accelerator = make_accelerator(cfg.model.mixed_precision)
    folders = {BASE: None, **{n: Path(m["path"]) / "model" for n, m in candidates.items()}}
    results = {}
    for name, folder in folders.items():
        clock = time.perf_counter()
        processor = load_processor(cfg.model, path=folder)
        model = place(load_vlm(cfg.model, path=folder), accelerator, frozen=True)
        with torch.no_grad():
            texts, lengths = _answers(model, processor, rows, data_dir, cfg.evaluate.max_new_tokens,
                                      accelerator.device)
        results[name] = _evaluation(rows, texts, lengths, checked, cfg.evaluate.num_samples)
        _add_loss(results[name], model, processor, rows, data_dir, cfg.evaluate.max_length,
                  cfg.evaluate.batch_size)
        results[name].seconds = {"generate": time.perf_counter() - clock,
                                 "total": time.perf_counter() - clock}
        del model
    return results


def sample_images(data_dir: Path, samples: list[dict]) -> list[dict]:
    """The sample rows with their first image as a PIL image (MLflow's table shows it)."""
    return [{**s, "image": open_image(data_dir, s["image"])} if s.get("image") else s
            for s in samples]


def _answers(model, processor, rows: list[dict], data_dir: Path, max_new_tokens: int,
             device) -> tuple[list[str], list[int]]:
    """Greedy completions, one row at a time (rows carry different images)."""
    stop = processor.tokenizer.eos_token_id
    texts, lengths = [], []
    for row in rows:
        images = [open_image(data_dir, n) for n in row.get(IMAGES) or []]
        inputs = prompt_inputs(processor, row["prompt"], images).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=processor.tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        new = new[: new.index(stop)] if stop in new else new
        texts.append(processor.tokenizer.decode(new, skip_special_tokens=True))
        lengths.append(len(new))
    return texts, lengths


def _add_loss(result: Evaluation, model, processor, rows: list[dict], data_dir: Path,
              max_length: int, batch_size: int) -> None:
    """eval_loss and perplexity over the rows' reference completions (those that fit in
    max_length), per row for the intervals, as the text evaluation computes them."""
    scored = []
    for i, row in enumerate(rows):
        if row.get("completion") is None:
            continue
        examples, _ = tokenize_sft_rows([row], processor, data_dir, max_length=max_length,
                                        source="held-out")
        scored += [(i, e) for e in examples]
    if not scored:
        return
    examples = [e for _, e in scored]
    batches = [collate_padded(examples[i : i + batch_size], processor.tokenizer.pad_token_id)
               for i in range(0, len(examples), batch_size)]
    add_reference_loss(result.metrics, result.per_prompt, model, scored, batches, len(rows))


def _evaluation(rows: list[dict], texts: list[str], lengths: list[int], checked: bool,
                num_samples: int) -> Evaluation:
    metrics = {"mean_completion_tokens": sum(lengths) / max(len(lengths), 1)}
    per_prompt = {"mean_completion_tokens": bootstrap.per_item([float(n) for n in lengths])}
    correct: list[bool | None] = [None] * len(rows)
    if checked:
        correct = [demo.check(r["answer"], t) for r, t in zip(rows, texts)]
        metrics["checker_accuracy"] = sum(correct) / max(len(correct), 1)
        per_prompt["checker_accuracy"] = bootstrap.per_item([float(c) for c in correct])
    samples = [{"prompt": _prompt_text(r["prompt"]), "completion": t,
                "reference": _reply_text(r.get("completion") or ""), "correct": ok,
                "image": (r.get(IMAGES) or [None])[0]}
               for r, t, ok in list(zip(rows, texts, correct))[:num_samples]]
    return Evaluation(metrics, samples, per_prompt=per_prompt)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(content_text(m["content"]) for m in prompt)


def _reply_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(content_text(m["content"]) for m in completion if m["role"] == "assistant")
