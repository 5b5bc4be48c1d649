"""The local lm-evaluation-harness tasks posttrain writes and ships: a JSONL of {prompt, answer}
rows, `generate_until`, exact match after stripping surrounding whitespace (as `demo.check`
does). `posttrain_demo` (posttrain/harness_tasks/) is the demo's held-out prompts; `write_task`
writes the same task over any held-out rows (e.g. the evaluation stage's own, so that the
harness and the checker see the very same prompts). The tasks' YAML names their reader
`posttrain.harness.load_docs` (re-exported there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from posttrain.data import demo

LOCAL_TASKS = Path(__file__).resolve().parent / "harness_tasks"
DEMO_TASK = "posttrain_demo"


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
