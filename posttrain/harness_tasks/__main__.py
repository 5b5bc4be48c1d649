"""Rewrite posttrain_demo.{yaml,jsonl} from conf/demo.yaml's demo settings."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.config import DemoTaskConfig
from posttrain.harness_local import DEMO_TASK, LOCAL_TASKS, demo_rows, task_config

# conf/demo.yaml's `demo:` block (the held-out split depends on tasks, num_eval and seed only).
DEMO = DemoTaskConfig(tasks=("add", "reverse", "sort"), num_eval=200, conversational=True, seed=0)


def write_shipped(folder: Path = LOCAL_TASKS) -> None:
    rows = demo_rows(DEMO)
    (folder / f"{DEMO_TASK}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{DEMO_TASK}.yaml").write_text(task_config(DEMO_TASK, f"{DEMO_TASK}.jsonl"))


if __name__ == "__main__":
    write_shipped()
