"""The evaluation stage's lm-evaluation-harness side: which metrics the configured tasks give,
their fingerprint (cache key and ground), their preflight, and the runner that adds their
results to each model's evaluation (the local `posttrain_demo` written over the held-out rows).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain import harness, harness_local, harness_preflight
from posttrain.config import PipelineConfig
from posttrain.data import demo

# Lazy imports: bootstrap (numpy) loads only when the tasks run; the flows, promotion and
# preflight import this module without it.


def harness_metrics(cfg: PipelineConfig) -> dict[str, str]:
    """The `lm_eval/...` metrics the configured harness tasks will give, as far as their task
    configs say in advance (metric_list x filter_list; `posttrain_demo`: exact_match), each
    with its direction ("max"/"min"); {} without tasks."""
    e = cfg.evaluate
    if not e.tasks:
        return {}
    return harness.expected_metrics(e.tasks, include_path=e.include_path or None)


def harness_fingerprint(cfg: PipelineConfig) -> str | None:
    """`harness_preflight.fingerprint` of the configured tasks and harness settings (lm-eval's
    version, the task configs, local data), for the cache key and the ground; None without
    tasks. The local `posttrain_demo` is written over the held-out rows, which the key and the
    ground hold already."""
    e = cfg.evaluate
    if not e.tasks:
        return None
    return harness_preflight.fingerprint(e.tasks, include_path=e.include_path or None,
                                         **harness_settings(cfg))


def harness_settings(cfg: PipelineConfig) -> dict:
    e = cfg.evaluate
    return {"limit": e.limit, "num_fewshot": e.num_fewshot,
            "max_gen_toks": e.harness_max_gen_toks, "gen_kwargs": dict(e.gen_kwargs),
            "apply_chat_template": e.apply_chat_template,
            "demo_max_gen_toks": e.harness_max_gen_toks or e.max_new_tokens}


def demo_task_rows(rows: list[dict], checker: str | None) -> list[dict]:
    """The harness rows of the local `posttrain_demo` task over the evaluation's held-out
    rows: the checker's answer as the target when the source has the demo checker, else the
    reference completion. ValueError when the rows cannot make the task."""
    out = harness_local.task_rows(rows, answer=demo.correct_answer if checker == "demo" else None)
    if len({r.get("system") for r in out}) > 1:
        raise ValueError("the held-out prompts carry different system messages; the harness "
                         "task has one description")
    return out


def check_harness(cfg: PipelineConfig, rows: list[dict] | None = None,
                  checker: str | None = None) -> list[str]:
    """Why the configured harness tasks cannot run (unknown tasks, hub data offline or
    unreachable, held-out rows the local task cannot use), or []."""
    e = cfg.evaluate
    if not e.tasks:
        return []
    problems = [f"evaluate.tasks: {p}" for p in
                harness_preflight.check_tasks(e.tasks, include_path=e.include_path or None)]
    if harness_local.DEMO_TASK in e.tasks and rows is not None:
        try:
            demo_task_rows(rows, checker)
        except (ValueError, KeyError) as err:
            problems.append(f"evaluate.tasks: {harness_local.DEMO_TASK} over data."
                            f"{cfg.eval_source}'s held-out rows: {err}")
    return problems


def point_task_at(task_dir: Path, written: Path, final: Path) -> None:
    """The harness task written into the stage's temporary folder names its JSONL there; once
    the folder is renamed into place the record names it where it will lie, so the task can be
    run again from the stage folder (`include_path=<stage>/harness_tasks`)."""
    for yaml_path in task_dir.glob("*.yaml") if task_dir.is_dir() else []:
        text = yaml_path.read_text()
        yaml_path.write_text(text.replace(json.dumps(str(written.resolve()))[1:-1],
                                          json.dumps(str(final.resolve()))[1:-1]))


def harness_runner(cfg: PipelineConfig, data_manifest: dict, rows: list[dict],
                    task_dir: Path | None):
    """None without `evaluate.tasks`; else a function (model, tokenizer, Evaluation) that runs
    the tasks on the placed model and merges the results into the Evaluation. Checks the tasks
    first (TaskError naming every problem) and writes `posttrain_demo` over `rows`."""
    from posttrain import bootstrap

    e = cfg.evaluate
    if not e.tasks:
        return None
    checker = data_manifest["datasets"][cfg.eval_source].get("checker")
    include = list(e.include_path)
    if harness_local.DEMO_TASK in e.tasks:
        if task_dir is None:
            raise ValueError(f"{harness_local.DEMO_TASK} needs a folder to write its task into")
        harness_local.write_task(task_dir, demo_task_rows(rows, checker),
                                 max_gen_toks=e.harness_max_gen_toks or e.max_new_tokens)
        include.append(str(task_dir))  # last: it overrides the shipped posttrain_demo
    problems = [f"evaluate.tasks: {p}"
                for p in harness_preflight.check_tasks(e.tasks, include_path=include or None)]
    if problems:
        raise harness.TaskError("; ".join(problems))
    chat = e.apply_chat_template if e.apply_chat_template is not None else \
        bool(rows) and not isinstance(rows[0]["prompt"], str)
    demo_prefix = f"{harness.PREFIX}/{harness_local.DEMO_TASK}/"

    def run(model, tokenizer, result) -> None:
        clock = time.perf_counter()
        h = harness.evaluate_tasks(
            None, list(e.tasks), model=model, tokenizer=tokenizer, include_path=include or None,
            limit=e.limit, num_fewshot=e.num_fewshot, batch_size=e.batch_size,
            max_gen_toks=e.harness_max_gen_toks, gen_kwargs=dict(e.gen_kwargs) or None,
            apply_chat_template=chat, bootstrap_iters=0, preflight=False)
        result.metrics.update(h.metrics)
        for key, values in h.per_item.items():
            # the demo task's items are the held-out prompts, in order (paired with the
            # checker's); another task's items are its own documents
            group = "prompts" if key.startswith(demo_prefix) else key.split("/")[1]
            result.per_prompt[key] = bootstrap.per_item(values, group=group)
        for task, secs in h.seconds.items():
            result.seconds[f"lm_eval/{task}"] = secs
        result.seconds["lm_eval"] = time.perf_counter() - clock  # the harness's set-up too

    return run
