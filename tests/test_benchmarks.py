"""Smoke test of the benchmark harness: one worker variant in its own process, as run.py runs it.

No timing thresholds (speed is reported by `python -m benchmarks.run`, never asserted): only that
the result has its fields, with positive numbers, and that run.py turns results into ratios and
a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package; plain `pytest` needs it
    sys.path.insert(0, str(ROOT))

from benchmarks.run import markdown, median_result, ratios, run_worker

TINY = ["--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
        "--steps", "3", "--warmup", "1", "--batch-size", "2", "--prompt-len", "4,8",
        "--completion-len", "4,8", "--threads", "1"]


def test_sft_worker_reports_positive_numbers():
    result = run_worker("benchmarks.worker", ["--variant", "sft", "--name", "sft padded", *TINY],
                        timeout=120)
    assert "error" not in result, result
    for key in ("tokens_per_s", "steps_per_s", "flops_per_s", "mean_tokens_per_s",
                "model_flops", "peak_rss_mb", "seconds", "e2e_s"):
        assert result[key] > 0, key
    assert result["steps_timed"] == 1
    assert result["work"]["grad_tokens"] > 0 and result["work"]["grad_head_rows"] > 0
    assert result["params"]["body"] > 0 and result["params"]["head"] == 64 * 16
    assert 0 <= result["pad_fraction"] < 1

    # run.py's side: medians over repeats, ratios between variants, the markdown table
    packed = {**result, "name": "sft packed", "tokens_per_s": 2 * result["tokens_per_s"]}
    by_name = {"sft padded": median_result([result]), "sft packed": median_result([packed])}
    rows = {r["ratio"]: r["value"] for r in ratios(by_name)}
    assert rows["SFT packing / padding, real tokens/s (synthetic spread)"] == 2.0
    report = {"date": "2026-11-25", "machine": "test", "torch": "x", "threads": 1,
              "command": "test", "results": list(by_name.values()), "ratios": ratios(by_name),
              "calibration": {"gemm_size": 8, "gflops": 1.0, "start": 1.0, "end": 1.0}}
    text = markdown(report)
    assert "| sft padded |" in text and "SFT packing / padding" in text
