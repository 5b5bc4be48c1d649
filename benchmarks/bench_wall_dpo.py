"""A short DPO run end to end, from process start to exit: `posttrain dpo` against a plain TRL
script (DPOTrainer), on the same model folder, the same JSONL pairs and the same settings.

    .venv/bin/python -m benchmarks.bench_wall_dpo --trl-python .venv-bench/bin/python --repeat 3

What a user waits for, so each side is the whole command: ours is `posttrain dpo pipeline.yaml`
(preflight, the data stage reading and validating the JSONL, the embedded Prefect server, MLflow
tracking in a fresh sqlite store, the reference log-probs precomputed for the rows the run trains
on, training, the content-addressed artifact, exit); TRL's is a script that imports trl, loads the
model and tokenizer with the Auto classes, the pairs with `datasets`, trains with
`precompute_ref_log_probs=True` and saves the model. Every repeat starts from empty output
folders (nothing cached), and the variants alternate; the report gives the medians and the ratio
TRL wall / ours (above 1: ours finishes first). Ours runs in two set-ups: "fresh folder" is a
first run with the defaults (an embedded Prefect server started by the command, a new sqlite
MLflow store created); "servers running" is every later run in the set-up `make ui` gives (a
Prefect server already up via PREFECT_API_URL, an MLflow store already created), still training
from scratch into a new artifacts root.

Same settings on both sides: the model folder (a tiny Qwen2 built offline, the demo's shape),
`--pairs` plain-text demo preference pairs (prompt/chosen/rejected: the public schema), `--steps`
steps of `--batch` pairs, AdamW at a constant 5e-4 without warm-up, clipping 1.0, beta 0.1, the
sigmoid loss, max length 64, one process, `--threads` torch threads, no evaluation during
training, no checkpoints, gradient checkpointing as ours decides it (off on a CPU; TRL's default
is on, which its script ran with before 2026-12-06). Differences that stay: ours holds out 5% of
the pairs as its eval split (it trains on the other 95%) and logs to MLflow; TRL appends an EOS to
each response.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks import orchestration

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("posttrain, fresh folder", "posttrain, servers running", "trl")
SETTINGS = {"learning_rate": 5e-4, "beta": 0.1, "max_length": 64}


def prepare(work: Path, pairs: int, hidden: int, layers: int) -> tuple[Path, Path]:
    """The model folder and the JSONL of pairs both sides read."""
    from posttrain.config import DemoTaskConfig, TinyModelConfig
    from posttrain.data import demo
    from posttrain.models import build_tiny_model, build_tiny_tokenizer

    model_dir = work / "model"
    tokenizer = build_tiny_tokenizer()
    shape = TinyModelConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                            num_key_value_heads=max(hidden // 128, 1), seed=0)
    model = build_tiny_model(shape, tokenizer)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = demo.generate_preference(DemoTaskConfig(num_train=pairs, conversational=False), 0,
                                    "train")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in rows[:pairs]))
    return model_dir, data


def write_pipeline(work: Path, model_dir: Path, data: Path, args) -> Path:
    import yaml

    values = {
        "name": "wall-dpo", "artifacts_root": "artifacts", "cpu_threads": args.threads,
        "data": {"pairs": {"path": str(data)}},
        "model": {"name_or_path": str(model_dir)},
        "stages": [{"name": "dpo", "method": "dpo", "start": "base", "data": "pairs",
                    "max_steps": args.steps, "per_device_batch_size": args.batch,
                    "warmup_steps": 0, "lr_scheduler": "constant", "max_grad_norm": 1.0,
                    "eval_every": 10 * args.steps, "reference": "precomputed",
                    **SETTINGS}],
        "tracking": {"experiment": "wall-dpo"},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def trl_main(argv: list[str]) -> None:
    """The TRL side (run by --trl-python): load, train, save, exit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=SETTINGS["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, beta=SETTINGS["beta"],
        max_length=SETTINGS["max_length"], precompute_ref_log_probs=True, save_strategy="no",
        eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        # What ours does with its default ('auto'): on with a GPU, off on a CPU. TRL's own
        # default is on everywhere.
        gradient_checkpointing=torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.out)


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", required=True, help="an interpreter that has trl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64, help="model width (the demo's: 64)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for RESULTS-<date>-wall-dpo.md/.json; '-' prints only")
    args = parser.parse_args(argv)

    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        work = Path(tmp)
        model_dir, data = prepare(work, args.pairs, args.hidden, args.layers)
        pipeline = write_pipeline(work, model_dir, data, args)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120",
               "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        # The set-up `make ui` gives: a Prefect server already running, an MLflow store in use.
        port = orchestration._free_port()
        servers.enter_context(orchestration._server(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
             "127.0.0.1", "--port", str(port), "--no-ui"],
            f"http://127.0.0.1:{port}/api/health", env, work / "prefect.log"))
        served = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                  "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'shared-mlflow.db'}"}
        warm = work / "warm-up"
        warm.mkdir()
        _timed([sys.executable, "-m", "pipelines.cli", "dpo", str(pipeline)], warm, served)
        for i in range(args.repeat):
            fresh = work / f"fresh-{i}"
            fresh.mkdir()
            walls["posttrain, fresh folder"].append(_timed(
                [sys.executable, "-m", "pipelines.cli", "dpo", str(pipeline)], fresh,
                {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{fresh / 'mlflow.db'}"}))
            walls["trl"].append(_timed(
                [args.trl_python, "-m", "benchmarks.bench_wall_dpo", "--trl-child",
                 "--model", str(model_dir), "--data", str(data), "--out", str(work / f"trl-{i}"),
                 "--steps", str(args.steps), "--batch", str(args.batch),
                 "--threads", str(args.threads)], ROOT, env))
            again = work / f"served-{i}"  # new artifacts root: trains again, nothing cached
            again.mkdir()
            walls["posttrain, servers running"].append(_timed(
                [sys.executable, "-m", "pipelines.cli", "dpo", str(pipeline)], again, served))
            print(f"repeat {i + 1}: " + ", ".join(f"{v} {w[-1]:.1f} s"
                                                  for v, w in walls.items()), flush=True)
    trl_version = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    median = {k: statistics.median(v) for k, v in walls.items()}
    report = {"date": date.today().isoformat(), "trl": trl_version, "settings": vars(args),
              "walls_s": walls, "median_s": median,
              "trl_over_ours": {v: median["trl"] / median[v] for v in VARIANTS if v != "trl"}}
    table = (f"DPO, {args.steps} steps x {args.batch} pairs from {args.pairs} pairs, hidden "
             f"{args.hidden} x {args.layers} layers, {args.threads} thread(s), medians of "
             f"{args.repeat}, process start to exit; TRL {trl_version}\n\n"
             "| command | wall s | TRL wall / this |\n|---|---|---|\n"
             + "".join(f"| {v} | {median[v]:.1f} | "
                       f"{median['trl'] / median[v]:.2f}x |\n" for v in VARIANTS))
    print(table)
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"RESULTS-{report['date']}-wall-dpo"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
        trl_main(sys.argv[2:])
    else:
        main()
