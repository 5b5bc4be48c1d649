"""Smoke test of the benchmark harness: one worker variant in its own process, as run.py runs it.

No timing thresholds (speed is reported by `python -m benchmarks.run`, never asserted): only that
the result has its fields, with positive numbers, and that run.py turns results into ratios and
a table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_grpo_worker_and_rollout_without_cache_in_process():
    """The online-RL worker (posttrain's GRPO with the char-count reward) and the two rollout
    variants, in this process: the no-cache greedy loop gives generate()'s tokens."""
    from benchmarks import worker

    grpo = worker.train_stage(worker.parse_args(
        ["--variant", "grpo", "--generations", "2", "--new-tokens", "4", *TINY[:-2]]))
    assert grpo["steps_timed"] == 1 and grpo["gen_tokens_per_s"] > 0
    assert grpo["work"]["grad_tokens"] > 0 and grpo["work"]["nograd_tokens"] > 0

    small = ["--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab",
             "64", "--sequences", "3", "--new-tokens", "5", "--prompt-len", "2,6"]
    on = worker.rollout(worker.parse_args(["--variant", "rollout", "--kv-cache", "on", *small]))
    off = worker.rollout(worker.parse_args(["--variant", "rollout", "--kv-cache", "off", *small]))
    assert on["tokens"] == off["tokens"] and on["new_tokens"] > 0
    assert off["positions_encoded"] > on["positions_encoded"]


def test_report_tables_for_trl_rollout_and_orchestration():
    base = {"per_device_batch_size": 2, "tokens_per_s": 100.0, "steps_per_s": 1.0,
            "pad_fraction": 0.1, "peak_rss_mb": 500.0, "extra_mb": 100.0, "e2e_s": 2.0,
            "flops_per_s": 1e9, "epoch_grad_tokens": 50}
    stage = "orchestration"
    res = {
        "dpo copy": {**base, "name": "dpo copy", "variant": "dpo"},
        "trl dpo copy": {**base, "name": "trl dpo copy", "variant": "dpo", "flops_per_s": None,
                         "tokens_per_s": 50.0, "peak_rss_mb": 1000.0},
        "rollout kv-cache": {"name": "rollout kv-cache", "variant": "rollout", "seconds": 1.0,
                             "sequences": 4, "max_new_tokens": 8, "new_tokens": 32,
                             "new_tokens_per_s": 32.0, "positions_encoded": 40,
                             "peak_rss_mb": 1.0},
        "rollout no-cache": {"name": "rollout no-cache", "variant": "rollout", "seconds": 10.0,
                             "sequences": 4, "max_new_tokens": 8, "new_tokens": 32,
                             "new_tokens_per_s": 3.2, "positions_encoded": 400,
                             "peak_rss_mb": 1.0, "same_tokens_fraction": 1.0},
        stage: {"name": stage, "variant": stage, "overrides": ["stages.sft.max_steps=1"],
                "cold": {"wall_s": 10.0, "import_s": 1.0, "flow_s": 8.0, "phases": {"start": 1.0},
                         "stages": [{"stage": "sft", "status": "ran", "seconds": 3.0,
                                     "body_s": 2.0}]},
                "cached": {"wall_s": 5.0, "import_s": 1.0, "flow_s": 3.0, "phases": {},
                           "stages": [{"stage": "sft", "status": "cached", "seconds": 0.5,
                                       "body_s": None}]}},
    }
    server = {**res[stage], "name": "orchestration prefect server", "prefect": "server",
              "server_start_s": {"prefect": 9.0},
              "cached": {**res[stage]["cached"], "wall_s": 2.0}}
    res["orchestration prefect server"] = server
    rows = {r["ratio"]: r["value"] for r in ratios(res)}
    assert rows["cached rerun wall time, embedded / prefect server"] == 2.5
    assert rows["ours / TRL, real tokens/s (dpo copy)"] == 2.0
    assert rows["ours / TRL, peak RSS (dpo copy)"] == 0.5
    assert rows["rollout no cache / KV cache, time (4 sequences x 8 new tokens)"] == 10.0
    assert rows["orchestration, cold run: flow seconds / stage-body seconds"] == 4.0
    report = {"date": "2026-11-25", "machine": "test", "torch": "x", "threads": 1,
              "command": "test", "results": list(res.values()), "ratios": ratios(res),
              "calibration": {"gemm_size": 8, "gflops": 1.0, "start": 1.0, "end": 1.0}}
    text = markdown(report)
    assert "Side by side with TRL" in text and "| dpo copy | 100 | 50 | 2.00 |" in text
    assert "| rollout no-cache | 4 | 32 | 10.00 |" in text
    assert "| sft | 3.00 | 2.00 | 1.00 | 0.50 |" in text
    assert "Prefect server, MLflow sqlite; prefect server healthy after 9.0 s" in text


def test_qwen_preset_plans_bf16_workers_with_the_real_shape():
    """--preset qwen0.5b (the GPU MFU run) hands Qwen2.5-0.5B's shape and bf16 to every stage
    worker and to the calibration; explicit flags still win over the preset."""
    from benchmarks.run import parse_args, plan

    args = parse_args(["--preset", "qwen0.5b", "--only", "sft,grpo", "--steps", "8"])
    assert (args.precision, args.gemm_size, args.steps) == ("bf16", 8192, 8)
    variants = {v.name: v.args for v in plan(args)}
    padded = variants["sft padded"]
    flag = {padded[i]: padded[i + 1] for i in range(len(padded) - 1) if padded[i].startswith("--")}
    assert flag["--hidden"] == "896" and flag["--layers"] == "24" and flag["--vocab"] == "151936"
    assert flag["--intermediate"] == "4864" and flag["--precision"] == "bf16"
    assert all("--precision" in a and "bf16" in a for a in variants.values())
    assert parse_args(["--quick"]).precision == "fp32"
    assert parse_args(["--quick"]).gemm_size == 1024
    assert parse_args(["--preset", "qwen0.5b", "--gemm-size", "256"]).gemm_size == 256


def test_trl_table_marks_sampled_stages():
    """GRPO's completions are sampled, so ours and TRL's token counts agree only in
    expectation: the table says so instead of a yes/NO."""
    base = {"per_device_batch_size": 8, "tokens_per_s": 100.0, "steps_per_s": 4.0,
            "pad_fraction": 0.1, "peak_rss_mb": 400.0, "extra_mb": 60.0, "e2e_s": 2.0,
            "flops_per_s": 1e9}
    res = {"grpo": {**base, "name": "grpo", "variant": "grpo", "epoch_grad_tokens": 8577},
           "trl grpo": {**base, "name": "trl grpo", "variant": "grpo", "steps_per_s": 2.0,
                        "peak_rss_mb": 800.0, "flops_per_s": None, "epoch_grad_tokens": 8578}}
    rows = {r["ratio"]: r["value"] for r in ratios(res)}
    assert rows["ours / TRL, steps/s (grpo)"] == 2.0
    assert rows["ours / TRL, peak RSS (grpo)"] == 0.5
    report = {"date": "2026-11-25", "machine": "test", "torch": "x", "threads": 1,
              "command": "test", "results": list(res.values()), "ratios": ratios(res),
              "calibration": {"gemm_size": 8, "gflops": 1.0, "start": 1.0, "end": 1.0}}
    assert "| sampled: 8,577 vs 8,578 |" in markdown(report)


def _report_with_one_training_variant():
    """A report as run.main builds it: one SFT variant (two repeats, the first with per-step
    times), one failed variant, two ratios, calibration numbers."""
    from benchmarks.run import Variant

    ok = {"name": "sft padded", "variant": "sft", "tokens_per_s": 1200.0, "steps_per_s": 3.0,
          "peak_rss_mb": 500.0, "work": {"grad_tokens": 96}, "packing": False,
          "step_seconds": [0.5, 0.25, 0.125]}
    variants = [Variant("sft padded", "sft", ["--variant", "sft", "--hidden", "16", "--packing"],
                        runs=[ok, {**ok, "step_seconds": [9.0]}]),
                Variant("trl sft padded", "sft", ["--variant", "sft"],
                        runs=[{"error": "cannot import trl"}], module="benchmarks.trl_worker")]
    report = {
        "date": "2026-12-01", "machine": "test", "torch": "x", "threads": 1, "command": "test",
        "options": {"label": "unit", "quick": "True"},
        "calibration": {"gemm_size": 8, "gflops": 90.0, "start": 80.0, "end": 100.0},
        "results": [{**ok, "repeats": 2}, {"name": "trl sft padded", "error": "cannot import trl"}],
        "ratios": [
            {"ratio": "ours / TRL, real tokens/s (sft padded)", "value": 2.5,
             "definition": "d", "better": "higher"},
            {"ratio": "log_softmax / token_logps(default, chunk 524), extra memory, V=32000 N=4096",
             "value": 0.8, "definition": "d", "better": "lower"},
        ],
    }
    return report, variants


def test_ratio_chart_one_bar_per_ratio_coloured_by_its_better_side():
    """Bars start at parity (1): 2.5 on the 'higher' side is green and reaches 2.5; 0.8 on the
    'lower' side is green too; flipping 'better' turns both red."""
    from matplotlib.colors import to_hex

    from benchmarks.publish import ratio_chart

    report, _ = _report_with_one_training_variant()
    fig = ratio_chart(report["ratios"], "t")
    bars = fig.axes[0].patches  # drawn bottom-up: the last ratio first
    assert len(bars) == 2
    assert [round(b.get_x() + b.get_width(), 6) for b in bars] == [0.8, 2.5]
    assert {to_hex(b.get_facecolor()) for b in bars} == {"#55a868"}
    flipped = [{**r, "better": {"higher": "lower", "lower": "higher"}[r["better"]]}
               for r in report["ratios"]]
    assert {to_hex(b.get_facecolor()) for b in ratio_chart(flipped, "t").axes[0].patches} \
        == {"#c44e52"}
    assert ratio_chart([], "t") is None


def test_report_logged_to_mlflow_parent_ratios_children_variants(tmp_path):
    """--mlflow: the parent run holds the ratios and calibration as metrics and the report files
    as artifacts; each variant is a child with its worker flags as params, its medians as
    metrics and the first successful repeat's per-step seconds as a curve; a failed variant's
    child run is FAILED with the error."""
    from mlflow.utils.validation import validate_param_and_metric_name

    from benchmarks import publish

    report, variants = _report_with_one_training_variant()
    md = tmp_path / "RESULTS.md"
    md.write_text("# r\n")
    run_id = publish.log_to_mlflow(report, variants, [md], experiment="bench-test")
    c = publish.tracking.client()
    parent = c.get_run(run_id)
    m = parent.data.metrics
    key = "ratio/log_softmax_token_logps_default_chunk_524_extra_memory_V_32000_N_4096"
    assert m["ratio/ours_TRL_real_tokens_s_sft_padded"] == 2.5 and m[key] == 0.8
    assert m["calibration/median_gflops"] == 90.0 and m["calibration/start_gflops"] == 80.0
    assert all(validate_param_and_metric_name(k) for k in m)
    assert parent.data.params["label"] == "unit" and parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(run_id)} == {"RESULTS.md", "ratios.json"}

    children = {r.info.run_name: r for r in c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
    sft = children["sft padded"]
    assert sft.data.params["hidden"] == "16" and sft.data.params["packing"] == "true"
    assert sft.data.metrics["tokens_per_s"] == 1200.0
    assert sft.data.metrics["work.grad_tokens"] == 96.0
    assert "packing" not in sft.data.metrics  # booleans are not metrics
    curve = c.get_metric_history(sft.info.run_id, "step_seconds")
    assert [(p.step, p.value) for p in sorted(curve, key=lambda p: p.step)] == \
        [(0, 0.5), (1, 0.25), (2, 0.125)]
    failed = children["trl sft padded"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["posttrain.failure"] == "cannot import trl"


def test_numeric_leaves_flattens_orchestration_stages():
    from benchmarks.publish import numeric_leaves

    orch = {"cold": {"wall_s": 10.0, "phases": {"start": 1.5},
                     "stages": [{"stage": "sft", "seconds": 3.0, "body_s": None}]},
            "overrides": ["a=1"], "ok": True, "nan": float("nan")}
    assert numeric_leaves(orch) == {"cold.wall_s": 10.0, "cold.phases.start": 1.5,
                                    "cold.stages.sft.seconds": 3.0}


def test_median_result_keeps_counts_integers():
    """Two repeats of 32 sequences report 32, not 32.0; an even count of different ints still
    gives the true median (2.5); errors are left out and counted as missing repeats."""
    runs = [{"sequences": 32, "steps": 2, "seconds": 1.0}, {"sequences": 32, "steps": 3,
            "seconds": 3.0}, {"error": "boom"}]
    out = median_result(runs)
    assert out["sequences"] == 32 and isinstance(out["sequences"], int)
    assert out["steps"] == 2.5 and out["seconds"] == 2.0 and out["repeats"] == 2


def test_wall_dpo_benchmark_prepares_a_pipeline_that_passes_preflight(tmp_path):
    """bench_wall_dpo's two sides read the same model folder and JSONL: the folder loads with
    the Auto classes (as the TRL side loads it), the file holds the asked-for pairs in the
    public prompt/chosen/rejected schema, and the posttrain side's pipeline validates and
    passes preflight (so a timed run cannot fail on its config)."""
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks import bench_wall_dpo
    from posttrain.config import load_pipeline_config
    from posttrain.preflight import plan

    model_dir, data = bench_wall_dpo.prepare(tmp_path, 40, hidden=32, layers=1)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 40 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(isinstance(r["prompt"], str) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    AutoTokenizer.from_pretrained(model_dir)
    args = argparse.Namespace(threads=1, steps=3, batch=4)
    cfg = load_pipeline_config(bench_wall_dpo.write_pipeline(tmp_path, model_dir, data, args),
                               [f"artifacts_root={tmp_path / 'artifacts'}"])
    (dpo,) = cfg.stages
    assert (dpo.method, dpo.start, dpo.max_steps, dpo.reference) == ("dpo", "base", 3,
                                                                       "precomputed")
    assert [(r.stage, r.status) for r in plan(cfg, ["dpo"]).rows] == [("data", "will run"),
                                                             ("dpo", "will run")]


def test_the_trl_side_trains_without_gradient_checkpointing_like_ours():
    """TRL's configs turn gradient checkpointing on by default; the benchmark worker's own
    training never recomputes activations, so the TRL worker turns it off: otherwise the ratios
    compare a recomputing TRL (slower, smaller) with ours. A tiny DPO run through the TRL worker
    reports what its trained model had."""
    pytest.importorskip("trl")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.trl_worker", "--variant", "dpo", "--reference",
         "precomputed", "--steps", "3", "--warmup", "1", "--hidden", "32", "--layers", "1",
         "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--threads", "1",
         "--prompt-len", "4,8", "--completion-len", "4,8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gradient_checkpointing"] is False and result["steps_per_s"] > 0
