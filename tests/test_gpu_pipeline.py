"""benchmarks/gpu.sh `pipeline` (issue 16, item 1), tried here before any device time is spent:
`--smoke` runs conf/gpu-pipeline.yaml through `posttrain run` at a tiny shape on CPU; every stage
the GPU run has (packed SFT, reward, DPO with a reference copy, ORPO, KTO, GRPO with beta > 0,
PPO, evaluation, promotion) runs, and a failing stage fails the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(["bash", "benchmarks/gpu.sh", "pipeline", "--smoke", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_the_gpu_pipeline_script_runs_every_stage_and_fails_loudly(tmp_path):
    done = _smoke(tmp_path / "ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = {line.split("│")[1].strip() for line in done.stdout.splitlines()
           if line.count("│") > 3 and "ran" in line.split("│")[2]}
    assert ran == {"data", "sft", "reward", "dpo", "orpo", "kto", "grpo", "ppo", "evaluate"}
    assert "promoted" in done.stdout and (tmp_path / "ok" / "gpu-pipeline.log").is_file()
    failed = _smoke(tmp_path / "bad", "stages.dpo.max_length=8")  # no pair fits: dpo fails
    assert failed.returncode != 0
