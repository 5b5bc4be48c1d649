"""Benchmark posttrain's training stages and efficiency features, side by side in one run.

    python -m benchmarks.run --quick                      # ~2-3 minutes on a 2-core CPU
    python -m benchmarks.run --only sft,dpo --repeat 3    # a subset, each pair run 3 times (ABAB)
    python -m benchmarks.run --hidden 256 --layers 4 --vocab 32000 --steps 30

Every variant runs in its own process (`python -m benchmarks.worker ...`), so its peak memory is
its own; the variants being compared run back to back (interleaved with --repeat) and the matmul
calibration runs at the start and the end, because a shared machine's speed drifts. Results are
RATIOS of numbers measured in this run; absolute numbers only describe this machine at this
moment. Writes RESULTS-<date>.md, .json and .png (a chart of the ratios) under --out, prints the
markdown, and with --mlflow logs the whole report to MLflow (benchmarks/publish.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("sft", "rm", "dpo", "orpo", "kto", "grpo", "ppo", "rollout", "logps", "orchestration")
# The built-in demo's model and SFT batch (conf/demo.yaml): 16 packed rows of 64 ~ 64 examples.
DEMO_MODEL = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
              "--intermediate", "256"]


# Named shapes for --preset. qwen0.5b: Qwen2.5-0.5B's architecture (random weights: no download),
# bf16 autocast, the batch sizes of a single-GPU run; the run that measures model FLOPs
# utilization against the same run's bf16 GEMM.
PRESETS = {
    "qwen0.5b": {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864,
                 "vocab": 151936, "steps": 20, "warmup": 5, "sft_batch": 16, "pair_batch": 8,
                 "new_tokens": 128, "repeat": 1, "precision": "bf16", "gemm_size": 8192},
}


@dataclass
class Variant:
    name: str
    group: str
    args: list[str]
    runs: list[dict] = field(default_factory=list)
    module: str = "benchmarks.worker"
    python: str = sys.executable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small model, few steps, smaller logits: a couple of minutes on 2 cores")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a named model shape and settings (explicit flags still win): "
                        "'qwen0.5b' is Qwen2.5-0.5B's shape (896 hidden, 24 layers, vocabulary "
                        "151936) in bf16 for a GPU, the model FLOPs utilization run")
    p.add_argument("--only", default=",".join(GROUPS),
                   help=f"comma-separated groups to run, from {','.join(GROUPS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for RESULTS-<date>.md/.json ('-': print only)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs of each variant, interleaved; medians are reported (default 1 "
                        "with --quick, else 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every worker, calibration included (default 1: less "
                        "sensitive to other processes on a shared machine; 0 = torch's default)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--label", default="",
                   help="suffix of the output files: RESULTS-<date>-<label>.md/.json/.png")
    p.add_argument("--mlflow", nargs="?", const="posttrain-benchmarks", default=None,
                   metavar="EXPERIMENT",
                   help="also log the report to MLflow (MLFLOW_TRACKING_URI, default "
                        "sqlite:///mlflow.db): a parent run with the ratios, a child run per "
                        "variant; experiment 'posttrain-benchmarks' unless named")
    p.add_argument("--trl", action="store_true",
                   help="also run SFT, RM, DPO, ORPO, KTO and GRPO through TRL's trainers, "
                        "interleaved with ours, and report ours/TRL ratios (needs trl: see "
                        "--trl-python)")
    p.add_argument("--trl-python", default=None,
                   help="interpreter with trl installed for the TRL workers (default: this one; "
                        "e.g. .venv-bench/bin/python from `pip install -e .[bench]`)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="training precision (bf16: autocast with fp32 master weights) and the "
                        "calibration GEMM's dtype, so %% of matmul compares like with like "
                        "(default fp32)")
    g = p.add_argument_group("model and data (defaults depend on --quick / --preset)")
    g.add_argument("--hidden", type=int)
    g.add_argument("--intermediate", type=int, help="MLP width (default 4 x hidden)")
    g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--vocab", type=int)
    g.add_argument("--steps", type=int, help="optimizer steps per variant")
    g.add_argument("--warmup", type=int, help="untimed steps at the start")
    g.add_argument("--prompt-len", default="16,128", help="lo,hi of the log-normal spread")
    g.add_argument("--completion-len", default="16,256", help="lo,hi of the log-normal spread")
    g.add_argument("--max-length", type=int, default=512, help="packed row length (SFT)")
    g.add_argument("--sft-batch", type=int, help="SFT examples per step (packing: same tokens)")
    g.add_argument("--pair-batch", type=int, help="pairs per step (RM, DPO, ORPO); KTO rows x2")
    g.add_argument("--new-tokens", type=int, help="GRPO/PPO new tokens per completion")
    g.add_argument("--gemm-size", type=int,
                   help="n of the calibration's n x n GEMM (default 1024; 8192 with --preset "
                        "qwen0.5b)")
    g.add_argument("--rollout", default="32,64",
                   help="sequences,new tokens of the KV-cache comparison (greedy)")
    args = p.parse_args(argv)
    quick = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 4096, "steps": 12,
             "warmup": 2, "sft_batch": 8, "pair_batch": 4, "repeat": 1, "new_tokens": 32,
             "gemm_size": 1024}
    full = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 32000, "steps": 30,
            "warmup": 5, "sft_batch": 16, "pair_batch": 8, "repeat": 3, "new_tokens": 64,
            "gemm_size": 1024}
    defaults = {**(quick if args.quick else full), **PRESETS.get(args.preset, {})}
    defaults.setdefault("precision", "fp32")
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    unknown = set(args.only.split(",")) - set(GROUPS)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    return args


# ------------------------------------------------------------------------------------ the plan


def plan(args) -> list[Variant]:
    """The variants, grouped so that the ones compared with each other run back to back."""
    model = ["--hidden", args.hidden, "--layers", args.layers, "--heads", args.heads,
             "--kv-heads", args.kv_heads, "--vocab", args.vocab,
             *(["--intermediate", args.intermediate] if args.intermediate else [])]
    train = [*model, "--precision", args.precision, "--steps", args.steps, "--warmup", args.warmup,
             "--prompt-len", args.prompt_len, "--completion-len", args.completion_len]
    sft = [*train, "--variant", "sft", "--batch-size", args.sft_batch,
           "--max-length", args.max_length]
    demo = ["--variant", "sft", "--data", "demo", *DEMO_MODEL, "--precision", args.precision,
            "--steps", args.steps,
            "--warmup", args.warmup, "--batch-size", 64, "--max-length", 64]
    pairs = [*train, "--batch-size", args.pair_batch]
    kto = [*train, "--variant", "kto", "--batch-size", 2 * args.pair_batch]
    logits = [(32000, 4096), (150000, 1024)] if args.quick else [(32000, 8192), (150000, 2048)]
    online = [*train, "--new-tokens", args.new_tokens]
    sequences, new_tokens = args.rollout.split(",")
    rollout = [*model, "--variant", "rollout", "--sequences", sequences, "--new-tokens",
               new_tokens, "--prompt-len", args.prompt_len]
    out = {
        "sft": [Variant("sft padded", "sft", sft), Variant("sft packed", "sft", [*sft, "--packing"]),
                Variant("sft demo padded", "sft", demo),
                Variant("sft demo packed", "sft", [*demo, "--packing"])],
        "rm": [Variant("rm", "rm", [*pairs, "--variant", "rm"])],
        "dpo": [Variant("dpo precomputed", "dpo", [*pairs, "--variant", "dpo"]),
                Variant("dpo copy", "dpo", [*pairs, "--variant", "dpo", "--reference", "copy"])],
        "orpo": [Variant("orpo", "orpo", [*pairs, "--variant", "orpo"])],
        "kto": [Variant("kto precomputed", "kto", kto),
                Variant("kto copy", "kto", [*kto, "--reference", "copy"])],
        # GRPO: batch counts completions, G = 4 per prompt; PPO: prompts, one completion each.
        "grpo": [Variant("grpo", "grpo", [*online, "--variant", "grpo", "--generations", 4,
                                          "--batch-size", 2 * args.pair_batch])],
        "ppo": [Variant("ppo", "ppo", [*online, "--variant", "ppo",
                                       "--batch-size", args.pair_batch])],
        "rollout": [Variant(f"rollout {mode}", "rollout", [*rollout, "--kv-cache", flag])
                    for mode, flag in (("kv-cache", "on"), ("no-cache", "off"))],
        "logps": [
            Variant(f"logps {impl} V={v} N={n}", "logps",
                    ["--variant", "logps", "--impl", impl.split()[0], "--vocab", v,
                     "--rows", n, *(["--chunk-size", chunk] if chunk else [])])
            for v, n in logits
            for impl, chunk in (("full", 0), ("chunked default", None),
                                ("chunked 4096", 4096), ("chunked 256", 256))
        ],
        # Embedded Prefect + sqlite MLflow (the default), a running Prefect server (`make ui`
        # + PREFECT_API_URL), and both servers (infra/).
        "orchestration": [Variant(name, "orchestration", flags, module="benchmarks.orchestration")
                          for name, flags in (
                              ("orchestration", []),
                              ("orchestration prefect server", ["--prefect-server"]),
                              ("orchestration both servers",
                               ["--prefect-server", "--mlflow-server"]))],
    }
    chosen = [v for g in GROUPS if g in args.only.split(",") for v in out[g]]
    if args.trl:
        chosen = _with_trl_twins(args, chosen)
    for v in chosen:
        v.args = [str(a) for a in v.args] + ["--threads", str(args.threads), "--name", v.name]
    return chosen


def _with_trl_twins(args, chosen: list[Variant]) -> list[Variant]:
    """Each stage variant TRL has (synthetic data), followed by its TRL twin: same arguments,
    run by benchmarks.trl_worker under --trl-python, interleaved with ours."""
    from benchmarks import trl_worker

    python = args.trl_python or sys.executable
    if not trl_worker.available(args.trl_python):
        print(f"--trl: {python} cannot import trl (pip install -e .[bench]); skipped",
              file=sys.stderr)
        return chosen
    out = []
    for v in chosen:
        out.append(v)
        if v.group in trl_worker.STAGES and "demo" not in v.name:
            out.append(Variant(f"trl {v.name}", v.group, list(v.args),
                               module="benchmarks.trl_worker", python=python))
    return out


def run_worker(module: str, worker_args: list[str], timeout: int,
               python: str | None = None) -> dict:
    """One variant in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [python or sys.executable, "-m", module, *worker_args]
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "cmd": " ".join(cmd)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["no output"],
                "returncode": proc.returncode, "cmd": " ".join(cmd)}
    return json.loads(lines[-1])


def median_result(runs: list[dict]) -> dict:
    """The first run with every top-level number replaced by its median over the runs."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            median = statistics.median(r[key] for r in ok if key in r)
            # An even count of equal ints (32, 32) has the median 32.0: keep counts integers.
            out[key] = int(median) if isinstance(value, int) and median == int(median) else median
    out["repeats"] = len(ok)
    return out


# -------------------------------------------------------------------------------------- ratios


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(res: dict[str, dict]) -> list[dict]:
    """Side-by-side ratios from the variants that ran (missing ones are skipped)."""
    def get(name: str, key: str):
        r = res.get(name)
        return None if r is None or "error" in r else r.get(key)

    rows = []

    def add(what: str, value: float | None, how: str, better: str | None = "higher") -> None:
        """`better`: the side of 1 that is a win ('higher', 'lower'), None where neither is."""
        if value is not None:
            rows.append({"ratio": what, "value": value, "definition": how, "better": better})

    for label, pack, pad in (("synthetic spread", "sft packed", "sft padded"),
                             ("demo rows", "sft demo packed", "sft demo padded")):
        add(f"SFT packing / padding, real tokens/s ({label})",
            _ratio(get(pack, "tokens_per_s"), get(pad, "tokens_per_s")),
            "median per-step non-pad tokens/s, packed over padded (>1: packing faster)")
        add(f"SFT packing / padding, training memory ({label})",
            _ratio(get(pack, "extra_mb"), get(pad, "extra_mb")),
            "peak RSS minus RSS before train(), packed over padded", "lower")
    for method in ("dpo", "kto"):
        pre, copy = f"{method} precomputed", f"{method} copy"
        add(f"{method.upper()} precomputed / copy, steps/s",
            _ratio(get(pre, "steps_per_s"), get(copy, "steps_per_s")),
            "median step rate, precomputed over copy (>1: precomputed faster per step)")
        add(f"{method.upper()} copy / precomputed, end-to-end time",
            _ratio(get(copy, "e2e_s"), get(pre, "e2e_s")),
            "train() start to the last timed step, precompute pass included, one epoch of "
            "data (>1: precomputed faster overall)")
        add(f"{method.upper()} copy / precomputed, training memory",
            _ratio(get(copy, "extra_mb"), get(pre, "extra_mb")),
            "peak RSS minus RSS before train() (the copy holds a second model)")
    for name in res:
        if name.startswith("trl "):
            ours = name.removeprefix("trl ")
            add(f"ours / TRL, real tokens/s ({ours})",
                _ratio(get(ours, "tokens_per_s"), get(name, "tokens_per_s")),
                "median per-step non-pad tokens/s of the training forwards (>1: ours faster)")
            add(f"ours / TRL, steps/s ({ours})",
                _ratio(get(ours, "steps_per_s"), get(name, "steps_per_s")),
                "median optimizer steps/s; a GRPO step includes sampling its completions "
                "(>1: ours faster)")
            add(f"ours / TRL, end-to-end time ({ours})",
                _ratio(get(name, "e2e_s"), get(ours, "e2e_s")),
                "TRL over ours: trainer construction (TRL) or train() (ours) to the last timed "
                "step, data preparation and reference precompute included (>1: ours faster)")
            add(f"ours / TRL, peak RSS ({ours})",
                _ratio(get(ours, "peak_rss_mb"), get(name, "peak_rss_mb")),
                "peak resident memory of the worker process (<1: ours smaller)", "lower")
            add(f"ours / TRL, training memory ({ours})",
                _ratio(get(ours, "extra_mb"), get(name, "extra_mb")),
                "peak RSS minus RSS before train() / before the TRL trainer is built "
                "(<1: ours smaller)", "lower")
        if name.startswith("logps full "):
            tail = name.removeprefix("logps full ")
            for chunk in ("default", "4096", "256"):
                other = f"logps chunked {chunk} {tail}"
                label = f"chunk {get(other, 'chunk_size')}" if chunk == "default" else \
                    f"chunk {chunk}"
                label = f"default, {label}" if chunk == "default" else label
                add(f"log_softmax / token_logps({label}), extra memory, {tail}",
                    _ratio(get(name, "extra_mb"), get(other, "extra_mb")),
                    "peak RSS minus RSS with the logits allocated, fwd+bwd (>1: chunked smaller)")
                add(f"log_softmax / token_logps({label}), time, {tail}",
                    _ratio(get(name, "seconds"), get(other, "seconds")),
                    "seconds of fwd+bwd (>1: chunked faster)")
    if get("rollout kv-cache", "seconds") is not None:
        add(f"rollout no cache / KV cache, time ({get('rollout kv-cache', 'sequences')} "
            f"sequences x {get('rollout kv-cache', 'max_new_tokens')} new tokens)",
            _ratio(get("rollout no-cache", "seconds"), get("rollout kv-cache", "seconds")),
            "greedy decoding seconds, re-encoding the sequence every step over "
            "posttrain.rollout.generate (>1: the cache is faster); same tokens: "
            f"{_f(100 * (get('rollout no-cache', 'same_tokens_fraction') or 0), 1)}%")
        add("rollout no cache / KV cache, positions encoded",
            _ratio(get("rollout no-cache", "positions_encoded"),
                   get("rollout kv-cache", "positions_encoded")),
            "token positions through the decoder, the work the cache saves", None)
    for name, orch in res.items():
        if orch.get("variant") != "orchestration" or "error" in orch:
            continue
        cold, cached = orch["cold"], orch["cached"]
        body = sum(st["body_s"] or 0 for st in cold["stages"])
        add(f"{name}, cold run: flow seconds / stage-body seconds",
            _ratio(cold["flow_s"], body),
            "pipeline() call over the summed manifest 'seconds' of the stages that ran "
            "(training, saving); >1 is what Prefect + MLflow add", None)
        add(f"{name}, cached rerun / cold run, wall time",
            _ratio(cached["wall_s"], cold["wall_s"]),
            "whole process (imports, Prefect start-up or connection, flow), fully cached over "
            "cold", "lower")
        base = res.get("orchestration")
        if name != "orchestration" and base and "error" not in base:
            add(f"cached rerun wall time, embedded / {name.removeprefix('orchestration ')}",
                _ratio(base["cached"]["wall_s"], cached["wall_s"]),
                "the fully cached rerun's process wall time with the embedded Prefect server "
                "and sqlite MLflow over the same with running servers (>1: servers faster; "
                "their own start-up, paid once, excluded)")
    return rows


# ------------------------------------------------------------------------------------ markdown


def _f(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _settings(o: dict) -> str:
    if not o:
        return ""
    mlp = o.get("intermediate")
    mlp = f"MLP {mlp}" if mlp not in (None, "None") else "MLP 4 x hidden"
    return (f"Settings: Qwen2 hidden {o['hidden']}, {o['layers']} layers, {o['heads']} heads "
            f"({o['kv_heads']} KV), {mlp}, vocab {o['vocab']}, {o.get('precision', 'fp32')}; "
            f"{o['steps']} steps of which the first "
            f"{o['warmup']} and the last are untimed; SFT {o['sft_batch']} examples/step, "
            f"{o['pair_batch']} pairs/step (KTO {2 * int(o['pair_batch'])} rows); prompt "
            f"lengths {o['prompt_len']}, completion lengths {o['completion_len']}; "
            f"{o['repeat']} run(s) per variant.")


def markdown(report: dict, chart_file: str | None = None) -> str:
    cal = report["calibration"]
    lines = [
        f"# posttrain benchmarks, {report['date']}",
        "",
        (f"Machine: {report['machine']}. torch {report['torch']}, {report['threads']} "
         "thread(s) per worker."),
        (f"Matmul calibration ({cal.get('precision', 'fp32')} {cal['gemm_size']}^3 GEMM, "
         "median of start and end): "
         f"{_f(cal['gflops'], 1)} GFLOP/s (start {_f(cal['start'], 1)}, "
         f"end {_f(cal['end'], 1)})."),
        f"Command: `{report['command']}`",
        _settings(report.get("options", {})),
        "",
        "## Training stages",
        "",
        ("| variant | batch | real tokens/s | steps/s | pad % | model GFLOP/s | % of matmul "
         "| peak RSS MB | train mem MB | peak CUDA MB | precompute s | end-to-end s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = report["results"]
    for r in results:
        if r.get("variant") in ("logps", "calibrate", "rollout", "orchestration"):
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 10)
            continue
        flops = r.get("flops_per_s")
        lines.append(
            f"| {r['name']} | {r['per_device_batch_size']} | {_f(r['tokens_per_s'])} "
            f"| {_f(r['steps_per_s'], 2)} | {_f(100 * r['pad_fraction'], 0)} "
            f"| {_f(flops and flops / 1e9, 2)} "
            f"| {_f(r.get('matmul_fraction') and r['matmul_fraction'] * 100, 1)} "
            f"| {_f(r['peak_rss_mb'])} | {_f(r['extra_mb'])} | {_f(r.get('cuda_peak_mb'))} "
            f"| {_f(r.get('precompute_s'), 2)} "
            f"| {_f(r['e2e_s'], 2)} |"
        )
    lines += _online_table(results) + _trl_table(results) + _rollout_table(results) \
        + _orchestration_table(results)
    logps = [r for r in report["results"] if r.get("variant") == "logps"]
    if logps:
        lines += ["", "## Per-token log-probs, forward + backward on (N, V) fp32 logits", "",
                  "| variant | logits MB | extra memory MB | peak RSS MB | seconds |",
                  "|---|---|---|---|---|"]
        for r in logps:
            if "error" in r:
                lines.append(f"| {r['name']} | error: {r['error']} | | | |")
                continue
            lines.append(f"| {r['name']} | {_f(r['logits_mb'])} | {_f(r['extra_mb'])} "
                         f"| {_f(r['peak_rss_mb'])} | {_f(r['seconds'], 2)} |")
    lines += ["", "## Ratios (same run, side by side)", "", "| ratio | value | definition |",
              "|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['value']:.2f} | {r['definition']} |" for r in report["ratios"]]
    if chart_file:
        lines += ["", f"![ratios]({chart_file})"]
    return "\n".join(lines) + "\n"


def _online_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r.get("variant") in ("grpo", "ppo") and "error" not in r]
    if not rows:
        return []
    out = ["", "## Online RL (GRPO, PPO): sampling + training per step", "",
           ("| variant | completions/step | new tokens max | generated tokens/s "
           "| trained tokens/s | steps/s | % of matmul | peak RSS MB | train mem MB |"),
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['per_device_batch_size']} | {r.get('new_tokens')} "
                   f"| {_f(r.get('gen_tokens_per_s'))} | {_f(r['tokens_per_s'])} "
                   f"| {_f(r['steps_per_s'], 2)} "
                   f"| {_f(r.get('matmul_fraction') and r['matmul_fraction'] * 100, 1)} "
                   f"| {_f(r['peak_rss_mb'])} | {_f(r['extra_mb'])} |")
    return out


def _trl_table(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    pairs = [(by[n.removeprefix("trl ")], by[n]) for n in by
             if n.startswith("trl ") and n.removeprefix("trl ") in by]
    if not pairs:
        return []
    out = ["", "## Side by side with TRL (same model, data, batch, steps, optimizer)", "",
           ("| stage | ours tokens/s | TRL tokens/s | ours/TRL | ours peak RSS MB "
           "| TRL peak RSS MB | ours/TRL | ours train mem MB | TRL train mem MB | ours/TRL "
           "| same tokens |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ours, trl in pairs:
        if "error" in ours or "error" in trl:
            out.append(f"| {ours['name']} | error: {ours.get('error') or trl.get('error')} |"
                       + " |" * 9)
            continue
        a, b = ours.get("epoch_grad_tokens"), trl.get("epoch_grad_tokens")
        if ours.get("variant") in ("grpo", "ppo"):  # sampled completions: equal only in expectation
            same = f"sampled: {_f(a)} vs {_f(b)}"
        else:
            same = "yes" if a == b else "NO"
        out.append(
            f"| {ours['name']} | {_f(ours['tokens_per_s'])} | {_f(trl['tokens_per_s'])} "
            f"| {_f(_ratio(ours['tokens_per_s'], trl['tokens_per_s']), 2)} "
            f"| {_f(ours['peak_rss_mb'])} | {_f(trl['peak_rss_mb'])} "
            f"| {_f(_ratio(ours['peak_rss_mb'], trl['peak_rss_mb']), 2)} "
            f"| {_f(ours['extra_mb'])} | {_f(trl['extra_mb'])} "
            f"| {_f(_ratio(ours['extra_mb'], trl['extra_mb']), 2)} | {same} |")
    return out


def _rollout_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r.get("variant") == "rollout"]
    if not rows:
        return []
    out = ["", "## Greedy rollout with and without the KV cache", "",
           ("| variant | sequences | new tokens | seconds | new tokens/s | positions encoded "
           "| peak RSS MB |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error']} |" + " |" * 5)
            continue
        out.append(f"| {r['name']} | {r['sequences']} | {r['new_tokens']} "
                   f"| {_f(r['seconds'], 2)} | {_f(r['new_tokens_per_s'])} "
                   f"| {_f(r['positions_encoded'])} | {_f(r['peak_rss_mb'])} |")
    return out


def _orchestration_table(results: list[dict]) -> list[str]:
    out = []
    for orch in results:
        if orch.get("variant") == "orchestration":
            out += _one_orchestration_table(orch)
    return out


def _one_orchestration_table(orch: dict) -> list[str]:
    if "error" in orch:
        return ["", f"{orch['name']}: error: {orch['error']}"]
    cold, cached = orch["cold"], orch["cached"]
    where = (f"Prefect {orch.get('prefect', 'embedded')}, MLflow {orch.get('mlflow', 'sqlite')}"
             + "".join(f"; {k} server healthy after {_f(v, 1)} s (once, not per run)"
                       for k, v in orch.get("server_start_s", {}).items()))
    title = (f"## {orch['name'].capitalize()}: the demo pipeline (Prefect + MLflow), cold then "
             "fully cached")
    out = ["", title, "", f"{where}. Overrides: `{' '.join(orch['overrides'])}`", "",
           "| stage | cold: task s | cold: stage body s | cold: overhead s | cached rerun: s |",
           "|---|---|---|---|---|"]
    again = {st["stage"]: st for st in cached["stages"]}
    for st in cold["stages"]:
        body = st["body_s"]
        out.append(f"| {st['stage']} | {_f(st['seconds'], 2)} | {_f(body, 2)} "
                   f"| {_f(body is not None and st['seconds'] - body or None, 2)} "
                   f"| {_f(again.get(st['stage'], {}).get('seconds'), 2)} |")
    out.append(f"| **whole flow** (pipeline() call) | {_f(cold['flow_s'], 2)} "
               f"| {_f(sum(st['body_s'] or 0 for st in cold['stages']), 2)} "
               f"| {_f(cold['flow_s'] - sum(st['body_s'] or 0 for st in cold['stages']), 2)} "
               f"| {_f(cached['flow_s'], 2)} |")
    labels = {"flow_entered": "flow start-up (pipeline() call to flow body: Prefect)",
              "start": "MLflow parent run start", "fingerprints": "data fingerprint check",
              "promote": "promotion (MLflow registry)",
              "finish": "finish (comparison chart, summary table, end run)"}
    for key, label in labels.items():
        if key in cold.get("phases", {}):
            out.append(f"| {label} | {_f(cold['phases'][key], 2)} | | "
                       f"| {_f(cached.get('phases', {}).get(key), 2)} |")
    out.append(f"| **process** (wall: imports, flow, interpreter exit) | "
               f"{_f(cold['wall_s'], 2)} | | | {_f(cached['wall_s'], 2)} |")
    out.append(f"| of which imports | {_f(cold['import_s'], 2)} | | "
               f"| {_f(cached['import_s'], 2)} |")
    return out


# ----------------------------------------------------------------------------------------- main


def _calibrate(args) -> dict:
    return run_worker("benchmarks.worker", ["--variant", "calibrate", "--threads",
                                            str(args.threads), "--seconds", "1", "--precision",
                                            args.precision, "--gemm-size",
                                            str(args.gemm_size)], args.timeout)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = plan(args)
    print(f"{len(variants)} variants x {args.repeat}, threads={args.threads}", file=sys.stderr)
    start = _calibrate(args)
    for group in dict.fromkeys(v.group for v in variants):
        members = [v for v in variants if v.group == group]
        for _ in range(args.repeat):  # ABAB: drift hits every variant of a group alike
            for v in members:
                v.runs.append(run_worker(v.module, v.args, args.timeout, v.python))
                print(f"  {v.name}: {_summary(v.runs[-1])}", file=sys.stderr)
    end = _calibrate(args)
    gflops = [c["gflops_median"] for c in (start, end) if "error" not in c]
    calibration = {"gemm_size": start.get("gemm_size"), "precision": args.precision,
                   "start": start.get("gflops_median"),
                   "end": end.get("gflops_median"),
                   "gflops": statistics.median(gflops) if gflops else None}
    results = [{**median_result(v.runs), "name": v.name} for v in variants]
    by_name = {r["name"]: r for r in results}
    cached, uncached = by_name.get("rollout kv-cache"), by_name.get("rollout no-cache")
    if cached and uncached and "tokens" in cached and "tokens" in uncached:
        pairs = [(a, b) for ra, rb in zip(cached["tokens"], uncached["tokens"])
                 for a, b in zip(ra, rb)]
        uncached["same_tokens_fraction"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    for r in results:  # too long for the report; the raw runs keep them
        r.pop("tokens", None)
    for r in results:
        if r.get("flops_per_s") and calibration["gflops"]:
            r["matmul_fraction"] = r["flops_per_s"] / (calibration["gflops"] * 1e9)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs"
                   + (f", GPU {start['device_name']}" if start.get("device") == "cuda" else ""),
        "torch": start.get("torch"), "threads": start.get("torch_threads"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "options": {k: str(v) for k, v in vars(args).items()},
        "calibration": calibration, "results": results, "ratios": ratios(by_name),
        "runs": {v.name: v.runs for v in variants},
    }
    _publish(args, report, variants)
    return report


def _publish(args, report: dict, variants: list[Variant]) -> None:
    """Print the markdown; write it with the JSON and the ratio chart under --out (a temporary
    folder with --out - when MLflow still needs the files); log all three with --mlflow."""
    from benchmarks import publish

    stem_name = "-".join(filter(None, ["RESULTS", report["date"], args.label]))
    chart = publish.ratio_chart(report["ratios"], f"posttrain benchmarks {report['date']}: "
                                                  "side-by-side ratios")
    text = markdown(report, chart_file=f"{stem_name}.png" if chart is not None else None)
    print(text)
    if str(args.out) == "-" and not args.mlflow:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if str(args.out) != "-" else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / stem_name
        files = [stem.with_suffix(".md"), stem.with_suffix(".json")]
        files[0].write_text(text)
        files[1].write_text(json.dumps(report, indent=2))
        if chart is not None:
            chart.savefig(stem.with_suffix(".png"), dpi=110)
            files.append(stem.with_suffix(".png"))
        if out == args.out:
            print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
        if args.mlflow:
            run_id = publish.log_to_mlflow(report, variants, files, args.mlflow)
            print(f"logged to MLflow ({publish.tracking.tracking_uri()}): experiment "
                  f"{args.mlflow!r}, run {run_id}", file=sys.stderr)


def _summary(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    if r.get("variant") == "logps":
        return f"extra {r['extra_mb']:.0f} MB, {r['seconds']:.2f} s"
    if r.get("variant") == "rollout":
        return f"{r['seconds']:.2f} s, {r['new_tokens_per_s']:.0f} new tok/s"
    if r.get("variant") == "orchestration":
        return f"cold {r['cold']['wall_s']:.1f} s, cached {r['cached']['wall_s']:.1f} s"
    return f"{r['tokens_per_s']:.0f} tok/s, {r['steps_per_s']:.2f} steps/s, " \
           f"peak {r['peak_rss_mb']:.0f} MB"


if __name__ == "__main__":
    main()
