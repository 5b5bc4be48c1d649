"""lm-evaluation-harness (the `lm-eval` package) as an evaluation backend.

`run_tasks` runs harness tasks on one model with the harness's Hugging Face backend (`HFLM`) and
returns flat metrics named `lm_eval/<task>/<metric>` (the harness's "none" filter dropped, any
other filter appended: `lm_eval/gsm8k/exact_match/strict-match`). The offline preflight of the
tasks (`check_tasks`, `fingerprint`) is posttrain/harness_preflight.py.

Identical decoding to posttrain's own evaluation (`posttrain.evaluate.greedy_completions`): the harness
gets an `HFLM` built around the model and tokenizer posttrain loaded (`load_trained`,
`load_trained_tokenizer`), not `pretrained=<folder>`, so dtype, device, pad token, chat template
and generation config are exactly those of the checker's run; HFLM then decodes greedily
(`do_sample=False`), left-pads, stops at the tokenizer's EOS and at the model's generation-config
EOS (the same stop set as `posttrain.models.stop_token_ids`), and decodes without special tokens.
Chat prompts: with `apply_chat_template=True` the harness renders [system?, user] with the
tokenizer's template and the generation prompt, and it is told not to add special tokens to that
text (`add_bos_token=False`), as `apply_chat_template(tokenize=True)` does in posttrain.

The local tasks (`posttrain_demo` and those `write_task` writes over held-out rows) are
posttrain/harness_local.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The local tasks' YAML names their reader `posttrain.harness.load_docs`: it stays importable here.
from posttrain.harness_local import load_docs  # noqa: F401
from posttrain.harness_preflight import check_tasks, leaf_configs, task_manager

# Lazy imports: posttrain.models and lm_eval (torch) load only to run a task; the flows and
# preflight import this module to name and check the tasks.

PREFIX = "lm_eval"
# MLflow metric names allow these characters; anything else becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ :]")


# ------------------------------------------------------------------------------ metric names


def metric_key(task: str, harness_metric: str) -> str | None:
    """`lm_eval/<task>/<metric>` for one harness result key ("exact_match,none"), with a
    non-"none" filter appended ("exact_match,strict-match" -> ".../exact_match/strict-match");
    None for what is not a metric (alias, sample counts, stderr)."""
    metric, _, filt = harness_metric.partition(",")
    if not filt or metric.endswith("_stderr") or metric in {"alias", "samples"}:
        return None
    parts = [task, metric] + ([] if filt == "none" else [filt])
    return "/".join([PREFIX, *(_UNSAFE.sub("_", p) for p in parts)])


def flatten_results(results: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stderrs) from a `simple_evaluate` result: every numeric metric of every task
    and group under `metric_key`; stderrs keyed like their metric with "_stderr" appended."""
    metrics: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for name, value in values.items():
                if not _is_number(value):
                    continue
                metric, _, filt = name.partition(",")
                if metric.endswith("_stderr"):
                    key = metric_key(task, f"{metric[: -len('_stderr')]},{filt}")
                    if key is not None:
                        stderrs[f"{key}_stderr"] = float(value)
                    continue
                key = metric_key(task, name)
                if key is not None:
                    metrics[key] = float(value)
    return metrics, stderrs


def directions(results: dict, metrics: Iterable[str]) -> dict[str, str]:
    """"max" or "min" for each flattened metric whose task says whether higher is better (the
    harness's `higher_is_better`), for promotion metrics and guards."""
    out = {}
    for key in metrics:
        parts = key.split("/")
        if len(parts) < 3:
            continue
        task, metric = parts[1], parts[2]
        better = (results.get("higher_is_better") or {}).get(task, {}).get(metric)
        if isinstance(better, bool):
            out[key] = "max" if better else "min"
    return out


def metric_direction(key: str) -> str | None:
    """"max"/"min" for a flattened metric name by the harness's registry of metric names
    (`higher_is_better` of exact_match, acc, word_perplexity, ...), None when it does not
    know the metric."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    try:
        from lm_eval.api.registry import is_higher_better

        with _quiet_harness():
            better = is_higher_better(parts[2])
    except Exception:  # noqa: BLE001 - unknown to the registry
        return None
    return None if better is None else ("max" if better else "min")


def expected_metrics(tasks: Iterable[str], *, include_path=None, manager=None) -> dict[str, str]:
    """The flattened metrics (-> "max"/"min") that running `tasks` will give, as far as their
    configs say before anything runs: each leaf task's metric_list under each of its filters,
    and each group's aggregate_metric_list. A metric a task leaves to its output type's
    defaults (no metric_list) is not known in advance and is left out; unknown tasks too."""
    tasks = list(tasks)
    if not tasks:
        return {}
    with _quiet_harness():
        manager = manager or task_manager(tasks, include_path)
    out: dict[str, str] = {}

    def add(task: str, metric: Any, filt: str, better: Any) -> None:
        if not isinstance(metric, str):
            return  # a metric given as a function: its name is known only when it runs
        key = metric_key(task, f"{metric},{filt}")
        if key is None:
            return
        direction = ("max" if better else "min") if isinstance(better, bool) \
            else metric_direction(key)
        out[key] = direction or "max"

    for name in tasks:
        if name not in manager.all_tasks:
            continue
        entry = manager.task_index.get(name)
        for agg in ((entry.cfg or {}).get("aggregate_metric_list") or []) if entry else []:
            filters = agg.get("filter_list", "none")
            for filt in [filters] if isinstance(filters, str) else filters:
                add(name, agg.get("metric"), filt, agg.get("higher_is_better"))
        for leaf, cfg in leaf_configs(manager, name):
            filters = [f.get("name", "none") for f in cfg.get("filter_list") or []] or ["none"]
            for m in cfg.get("metric_list") or []:
                for filt in filters:
                    add(leaf, m.get("metric"), filt, m.get("higher_is_better"))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


# ------------------------------------------------------------------------------ running


@dataclass
class HarnessResult:
    """One model's harness results: flat metrics, whether each is better high ("max") or low
    ("min"), the harness's own standard errors, per-item
    values of each metric in document order (for bootstrap intervals and pairing), each
    document's target and filtered response, and the seconds each requested task took (model
    loading aside)."""

    metrics: dict[str, float]
    directions: dict[str, str] = field(default_factory=dict)  # metric -> "max" | "min"
    stderrs: dict[str, float] = field(default_factory=dict)
    per_item: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class TaskError(RuntimeError):
    """A requested task cannot run (check_tasks found problems)."""


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """simple_evaluate seeds random, numpy and torch globally; the caller's streams stay."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """lm-eval logs every setting at INFO/WARNING (e.g. that a pre-built model is used); keep
    errors only while it runs."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_environment_report() -> Iterator[None]:
    """simple_evaluate records the environment on every call: `git describe` in the working
    directory (printing "fatal: not a git repository" outside one) and torch's collect_env
    (several subprocesses). The results here are the metrics; both are skipped."""
    from unittest import mock

    from lm_eval import evaluator

    with mock.patch.object(evaluator, "get_git_commit_hash", lambda: None), \
            mock.patch.object(evaluator, "add_env_info", lambda storage: None):
        yield


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """lm-eval draws a progress bar per task for building its requests and one for answering
    them: two bars per model and task in the middle of posttrain's own output. Off."""
    from unittest import mock

    from lm_eval.api import task as task_module
    from lm_eval.models import huggingface
    from tqdm import tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    with mock.patch.object(task_module, "tqdm", quiet), \
            mock.patch.object(huggingface, "tqdm", quiet):
        yield


def load_model(model_dir: str | Path, *, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) of a model folder as posttrain's evaluation loads it."""
    import torch

    from posttrain.models import load_trained, load_trained_tokenizer

    model = load_trained(model_dir, dtype=dtype)
    tokenizer = load_trained_tokenizer(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def evaluate_tasks(
    model_dir: str | Path | None,
    tasks: list[str],
    *,
    model=None,
    tokenizer=None,
    limit: int | float | None = None,  # noqa: PYI041 - an int is a count, a float a share
    num_fewshot: int | None = None,
    batch_size: int = 16,
    max_gen_toks: int | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    include_path: str | Path | list[str | Path] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    bootstrap_iters: int = 1000,
    preflight: bool = True,
) -> HarnessResult:
    """Run harness `tasks` on a model folder (or an already loaded `model` + `tokenizer`) with
    the harness's HF backend; see the module docstring for why the model is passed in built.

    `limit`: at most this many documents per task (a float < 1: that share). `num_fewshot`:
    None keeps each task's own. `max_gen_toks` (None: each task's own) and `gen_kwargs` update
    every generate_until task's generation settings. `apply_chat_template`: render prompts with
    the tokenizer's chat template (chat models, conversational data). Raises TaskError (before
    loading anything) when `check_tasks` finds problems and `preflight` is on.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    with _quiet_harness():  # a written task overriding a shipped one is logged as a warning
        manager = task_manager(tasks, include_path)
    if preflight:
        problems = check_tasks(tasks, include_path=include_path, manager=manager)
        if problems:
            raise TaskError("; ".join(problems))
    if model is None:
        if model_dir is None:
            raise ValueError("run_tasks needs a model folder or a loaded model and tokenizer")
        model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer")
    model.eval()
    with _quiet_harness():  # HFLM warns that a pre-built model skips its loading options
        lm = _hflm(HFLM, model, tokenizer, batch_size, apply_chat_template, max_gen_toks)
    overrides = dict(gen_kwargs or {})
    if max_gen_toks:
        overrides["max_gen_toks"] = max_gen_toks
    result = HarnessResult(metrics={})
    for name in tasks:  # one harness call per requested name: its time is its own
        clock = time.perf_counter()
        with _rng_kept(), _quiet_harness(), _no_environment_report(), _no_progress_bars():
            out = simple_evaluate(
                model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                gen_kwargs=dict(overrides) or None, task_manager=manager,
                apply_chat_template=apply_chat_template,
                system_instruction=system_instruction,
                bootstrap_iters=bootstrap_iters, log_samples=True,
            )
        result.seconds[name] = time.perf_counter() - clock
        metrics, stderrs = flatten_results(out)
        per_item, outputs = _per_item(out)
        result.metrics.update(metrics)
        result.directions.update(directions(out, metrics))
        result.stderrs.update(stderrs)
        result.per_item.update(per_item)
        result.outputs.update(outputs)
    return result


def _hflm(cls, model, tokenizer, batch_size: int, apply_chat_template: bool,
          max_gen_toks: int | None):
    return cls(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
        # chat text already holds the template's special tokens: add none (posttrain's
        # apply_chat_template(tokenize=True)); plain prompts: the tokenizer's default, as
        # posttrain's tokenize_prompt(add_special_tokens=True)
        add_bos_token=False if apply_chat_template else None,
        **({"max_gen_toks": max_gen_toks} if max_gen_toks else {}),
    )


def _per_item(out: dict) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """Per-document metric values (document order) and the filtered outputs of each task."""
    per_item: dict[str, list[float]] = {}
    outputs: dict[str, list[dict]] = {}
    for task, samples in (out.get("samples") or {}).items():
        samples = sorted(samples, key=lambda s: s.get("doc_id", 0))
        filters = {s.get("filter", "none") for s in samples}
        for filt in filters:
            rows = [s for s in samples if s.get("filter", "none") == filt]
            for metric in rows[0].get("metrics", []):
                key = metric_key(task, f"{metric},{filt}")
                values = [r.get(metric) for r in rows]
                if key and all(_is_number(v) for v in values):
                    per_item[key] = [float(v) for v in values]
        outputs[task] = [
            {"doc_id": s.get("doc_id"), "filter": s.get("filter", "none"),
             "target": s.get("target"), "response": _first(s.get("filtered_resps"))}
            for s in samples
        ]
    return per_item, outputs


def _first(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def run_tasks(model_dir: str | Path | None, tasks: list[str], **kwargs: Any) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` -> value for `tasks` on one model (see `evaluate_tasks`)."""
    return evaluate_tasks(model_dir, tasks, **kwargs).metrics
