"""lm-evaluation-harness (the `lm-eval` package) as an evaluation backend.

`run_tasks` runs harness tasks on one model with the harness's Hugging Face backend (`HFLM`) and
returns flat metrics named `lm_eval/<task>/<metric>` (the harness's "none" filter dropped, any
other filter appended: `lm_eval/gsm8k/exact_match/strict-match`). `check_tasks` is the offline
preflight: it names every requested task that is unknown, or whose data would need the Hugging
Face Hub when the hub is unreachable or offline mode is on, before any model is loaded.

Identical decoding to posttrain's own evaluation (`posttrain.evaluate.greedy_completions`): the harness
gets an `HFLM` built around the model and tokenizer posttrain loaded (`load_trained`,
`load_trained_tokenizer`), not `pretrained=<folder>`, so dtype, device, pad token, chat template
and generation config are exactly those of the checker's run; HFLM then decodes greedily
(`do_sample=False`), left-pads, stops at the tokenizer's EOS and at the model's generation-config
EOS (the same stop set as `posttrain.models.stop_token_ids`), and decodes without special tokens.
Chat prompts: with `apply_chat_template=True` the harness renders [system?, user] with the
tokenizer's template and the generation prompt, and it is told not to add special tokens to that
text (`add_bos_token=False`), as `apply_chat_template(tokenize=True)` does in posttrain.

The local task `posttrain_demo` (posttrain/harness_tasks/) runs over a JSONL of {prompt, answer}
rows: `generate_until`, exact match after stripping surrounding whitespace, as `demo.check` does.
`write_task` writes the same task over any held-out rows (e.g. the evaluation stage's own, so the
harness and the checker see the very same prompts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data import demo

# Lazy imports: posttrain.models and lm_eval (torch) load only to run a task; the flows and
# preflight import this module to name and check the tasks.

LOCAL_TASKS = Path(__file__).resolve().parent / "harness_tasks"
DEMO_TASK = "posttrain_demo"
PREFIX = "lm_eval"
# Builders of the `datasets` library that read local files (no hub download when data_files are
# local paths).
_FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})
_TRUTHY = frozenset({"1", "true", "yes", "on"})
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
        for leaf, cfg in _leaf_configs(manager, name):
            filters = [f.get("name", "none") for f in cfg.get("filter_list") or []] or ["none"]
            for m in cfg.get("metric_list") or []:
                for filt in filters:
                    add(leaf, m.get("metric"), filt, m.get("higher_is_better"))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


# ------------------------------------------------------------------------------ local tasks


def load_docs(data_file: str | None = None, **_metadata: Any):
    """The `custom_dataset` of the local tasks: a JSONL of {prompt, answer, ...} rows as the
    task's test split, read into memory (nothing written to the datasets cache, no download).
    A relative `data_file` is relative to posttrain/harness_tasks/."""
    import datasets

    if not data_file:
        raise ValueError("a posttrain harness task needs dataset_kwargs.data_file (a JSONL)")
    path = Path(data_file)
    path = path if path.is_absolute() else LOCAL_TASKS / path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def task_rows(rows: Iterable[dict], answer: Callable[[Any], str] | None = None) -> list[dict]:
    """Harness rows {prompt, answer} (plus `task` where the row has it) from held-out rows with
    a `prompt` (a string, or [user] / [system, user] messages).

    `answer(prompt)` gives the exact-match target (for the demo, `demo.correct_answer`, the
    checker's answer); without it the row's reference completion is the target.
    """
    out = []
    for i, row in enumerate(rows):
        system, text = _split_prompt(row["prompt"], i)
        if answer is not None:
            target = answer(row["prompt"])
        elif "completion" in row:
            target = _completion_text(row["completion"]).strip()
        else:
            raise ValueError(f"row {i}: no completion to match and no answer function")
        item = {"prompt": text, "answer": target}
        if system is not None:
            item["system"] = system
        if "task" in row:
            item["task"] = row["task"]
        out.append(item)
    return out


def _split_prompt(prompt: Any, i: int) -> tuple[str | None, str]:
    """(system message or None, user text): the harness renders one user turn (after the
    task description as the system message), so longer conversations cannot be evaluated."""
    if isinstance(prompt, str):
        return None, prompt
    roles = [m.get("role") for m in prompt]
    if roles == ["user"]:
        return None, prompt[0]["content"]
    if roles == ["system", "user"]:
        return prompt[0]["content"], prompt[1]["content"]
    raise ValueError(
        f"row {i}: the harness renders a prompt as [system, user] or [user]; roles {roles}")


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def task_config(name: str, data_file: str | Path, *, max_gen_toks: int = 16,
                system: str | None = None) -> str:
    """The YAML of a local exact-match task over `data_file`."""
    lines = [
        "# A posttrain local task: generate until EOS, exact match against the checker's",
        "# answer (surrounding whitespace ignored, as posttrain.data.demo.check does).",
        f"task: {name}",
        "custom_dataset: !function posttrain.harness.load_docs",
        "dataset_kwargs:",
        f"  data_file: {json.dumps(str(data_file))}",
        "output_type: generate_until",
        "test_split: test",
        "fewshot_split: test  # few-shot examples: other held-out rows (the doc itself excluded)",
        "doc_to_text: prompt",
        "doc_to_target: answer",
        "target_delimiter: ' '",
    ]
    if system is not None:
        lines.append(f"description: {json.dumps(system)}  # the system message (chat)")
    lines += [
        "generation_kwargs:",
        "  until: []  # the tokenizer's EOS is always added",
        "  do_sample: false",
        f"  max_gen_toks: {max_gen_toks}",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "    regexes_to_ignore: ['^\\s+|\\s+$']",
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def write_task(folder: str | Path, rows: list[dict], *, name: str = DEMO_TASK,
               max_gen_toks: int = 16) -> Path:
    """Write `<name>.yaml` and `<name>.jsonl` (harness rows from `task_rows`) into `folder`;
    returns the YAML's path. Pass `folder` to `run_tasks(include_path=...)`. Every row must
    carry the same system message (or none): it becomes the task's description."""
    if not rows:
        raise ValueError("no rows for the harness task")
    systems = {r.get("system") for r in rows}
    if len(systems) > 1:
        raise ValueError("the rows carry different system messages; a task has one description")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "system"}) + "\n" for r in rows))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(task_config(name, data.resolve(), max_gen_toks=max_gen_toks,
                                     system=systems.pop()))
    return yaml_path


def demo_rows(demo_cfg, seed: int | None = None) -> list[dict]:
    """The harness rows of the demo's held-out prompts (`demo.generate_sft(..., "eval")`), the
    target being the checker's answer."""
    seed = demo_cfg.seed if seed is None else seed
    return task_rows(demo.generate_sft(demo_cfg, seed, "eval"), answer=demo.correct_answer)


# ------------------------------------------------------------------------------ preflight


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _include_paths(include_path: str | Path | Iterable[str | Path] | None) -> list[Path]:
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    return [LOCAL_TASKS, *(Path(p) for p in extra)]


def task_manager(tasks: Iterable[str] = (), include_path=None):
    """A harness TaskManager knowing posttrain's local tasks (and `include_path`); lm-eval's
    own ~14k task configs are indexed only when a requested name is not a local one (indexing
    them takes seconds). The full index is kept for the process (keyed by the include folders
    and the YAML files in them, name, size and mtime), so preflight, the cache key and each
    model's run do not index it again."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in _include_paths(include_path)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    key = (tuple(paths), _yaml_signature(paths))
    if key not in _FULL_MANAGERS:
        if len(_FULL_MANAGERS) >= 4:
            _FULL_MANAGERS.pop(next(iter(_FULL_MANAGERS)))
        _FULL_MANAGERS[key] = TaskManager(include_path=paths)
    return _FULL_MANAGERS[key]


_FULL_MANAGERS: dict[tuple, Any] = {}


def _yaml_signature(paths: list[str]) -> tuple:
    out = []
    for folder in paths:
        for f in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_tasks(tasks: Iterable[str], *, include_path=None, manager=None) -> list[str]:
    """Problems that would stop `run_tasks` on `tasks`, found without loading a model or any
    data: unknown task names, local data files that are missing, and hub datasets that cannot
    be had (offline mode on and not in the local cache, or the hub unreachable). Empty: go."""
    tasks = list(tasks)
    if not tasks:
        return []
    manager = manager or task_manager(tasks, include_path)
    problems: list[str] = []
    hub_ok: dict[str, str | None] = {}
    for name in tasks:
        if name not in manager.all_tasks:
            problems.append(
                f"lm-eval task {name!r} is unknown: not one of lm-eval's tasks nor a local task "
                f"in {', '.join(str(p) for p in _include_paths(include_path))}")
            continue
        for leaf, cfg in _leaf_configs(manager, name):
            problem = _data_problem(leaf, cfg, hub_ok)
            if problem:
                problems.append(problem if leaf == name else f"{problem} (in {name!r})")
    return problems


def _leaf_configs(manager, name: str, seen: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(task name, raw YAML config) of every task a task/group/tag name stands for."""
    from lm_eval.tasks._index import Kind

    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return
    cfg = entry.cfg or {}
    if entry.kind is Kind.TAG:
        for other, e in manager.task_index.items():
            if name in e.tags and e.kind in (Kind.TASK, Kind.PY_TASK):
                yield from _leaf_configs(manager, other, seen)
    elif entry.kind is Kind.GROUP:
        children = cfg.get("task") or []
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, str):
                yield from _leaf_configs(manager, child, seen)
            elif isinstance(child, dict):
                base = manager.task_index.get(child.get("task", ""))
                merged = {**((base.cfg or {}) if base else {}), **child}
                yield str(child.get("task")), merged
    else:
        yield name, cfg


def _data_problem(task: str, cfg: dict, hub_ok: dict[str, str | None]) -> str | None:
    """Why the data of one task config cannot be had offline, or None."""
    if cfg.get("custom_dataset"):
        kwargs = cfg.get("dataset_kwargs") or {}
        data_file = kwargs.get("data_file")
        if data_file:
            path = Path(data_file)
            path = path if path.is_absolute() else LOCAL_TASKS / path
            if not path.is_file():
                return f"lm-eval task {task!r}: its data file {path} does not exist"
        return None
    path = cfg.get("dataset_path")
    if not path:
        return None  # a Python task or a config the harness resolves itself
    if Path(str(path)).expanduser().exists():
        return None
    if path in _FILE_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        missing = [f for f in _flat_files(files) if "://" not in f and not Path(f).exists()]
        remote = [f for f in _flat_files(files) if "://" in f]
        if missing:
            return f"lm-eval task {task!r}: data files not found: {', '.join(missing)}"
        if not remote:
            return None
    if path not in hub_ok:
        hub_ok[path] = _hub_problem(str(path))
    reason = hub_ok[path]
    return f"lm-eval task {task!r} needs dataset {path!r} from the Hugging Face Hub: {reason}" \
        if reason else None


def _flat_files(files: Any) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat_files(v)]
    return [str(f) for f in files]


def _hub_problem(repo: str) -> str | None:
    """None when the dataset can be had: in the local cache under offline mode, or the hub
    answers for it; else why not."""
    if _offline():
        if dataset_cached(repo):
            return None
        return ("not in the local cache and offline mode is on (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE); download it once with the hub reachable, or use a local "
                f"task ({DEMO_TASK}, or a YAML of your own through include_path)")
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=10)
        return None
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the answer
        kind = type(err).__name__
        if "NotFound" in kind or "Gated" in kind:
            return f"the hub refuses it ({kind}: {str(err).splitlines()[0][:200]})"
        if dataset_cached(repo):
            return ("the hub is unreachable; a cached copy exists: set HF_HUB_OFFLINE=1 and "
                    "HF_DATASETS_OFFLINE=1 to use it")
        return (f"the hub is unreachable ({kind}); set HF_HUB_OFFLINE=1 with a cached copy, "
                f"or use a local task ({DEMO_TASK}, or a YAML of your own through "
                "include_path)")


def dataset_cached(repo: str) -> bool:
    """Whether a hub dataset has a copy in the hub cache or in the datasets cache."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "snapshots"
    processed = Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")
    return any(d.is_dir() and any(d.iterdir()) for d in (hub, processed))


def fingerprint(tasks: Iterable[str], *, include_path=None, manager=None,
                **settings: Any) -> str:
    """A hash of what a harness result depends on besides the model: lm-eval's version, each
    leaf task's config (includes resolved), the bytes of local tasks' data files, and the
    run's `settings` (limit, num_fewshot, max_gen_toks, apply_chat_template, ...); not where
    the task files lie. For the evaluation's cache key and for telling whether two results are
    on the same ground."""
    import hashlib
    from importlib.metadata import version

    tasks = list(tasks)
    manager = manager or task_manager(tasks, include_path)
    h = hashlib.sha256()
    h.update(json.dumps({"lm_eval": version("lm_eval"), "tasks": tasks,
                         "settings": settings}, sort_keys=True, default=str).encode())
    for name in tasks:
        for leaf, cfg in _leaf_configs(manager, name):
            data_file = (cfg.get("dataset_kwargs") or {}).get("data_file") \
                if cfg.get("custom_dataset") else None
            if data_file:  # its bytes count, not where it lies
                cfg = {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_file": None}}
            cfg = {k: v for k, v in cfg.items() if k != "custom_dataset"}  # a resolved path
            h.update(json.dumps([leaf, cfg], sort_keys=True, default=str).encode())
            if data_file:
                path = Path(data_file)
                path = path if path.is_absolute() else LOCAL_TASKS / path
                h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


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
