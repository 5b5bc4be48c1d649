"""The offline preflight of lm-evaluation-harness tasks: `check_tasks` names every requested task
that is unknown, or whose data would need the Hugging Face Hub when the hub is unreachable or
offline mode is on, before any model is loaded; `fingerprint` hashes what a harness result
depends on besides the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from posttrain.harness_local import DEMO_TASK, LOCAL_TASKS

# Builders of the `datasets` library that read local files (no hub download when data_files are
# local paths).
_FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})
_TRUTHY = frozenset({"1", "true", "yes", "on"})


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
        for leaf, cfg in leaf_configs(manager, name):
            problem = _data_problem(leaf, cfg, hub_ok)
            if problem:
                problems.append(problem if leaf == name else f"{problem} (in {name!r})")
    return problems


def leaf_configs(manager, name: str, seen: set[str] | None = None) -> Iterator[tuple[str, dict]]:
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
                yield from leaf_configs(manager, other, seen)
    elif entry.kind is Kind.GROUP:
        children = cfg.get("task") or []
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, str):
                yield from leaf_configs(manager, child, seen)
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
        for leaf, cfg in leaf_configs(manager, name):
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
