"""Benchmark posttrain's training stages and efficiency features, side by side in one run.

    python -m benchmarks.run --quick                      # ~2-3 minutes on a 2-core CPU
    python -m benchmarks.run --only sft,dpo --repeat 3    # a subset, each pair run 3 times (ABAB)
    python -m benchmarks.run --hidden 256 --layers 4 --vocab 32000 --steps 30

Every variant runs in its own process (`python -m benchmarks.worker ...`), so its peak memory is
its own; the variants being compared run back to back (interleaved with --repeat) and the matmul
calibration runs at the start and the end, because a shared machine's speed drifts. Results are
RATIOS of numbers measured in this run; absolute numbers only describe this machine at this
moment. Writes RESULTS-<date>.md and RESULTS-<date>.json under --out and prints the markdown.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("sft", "rm", "dpo", "orpo", "kto", "logps")
# The built-in demo's model and SFT batch (conf/demo.yaml): 16 packed rows of 64 ~ 64 examples.
DEMO_MODEL = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
              "--intermediate", "256"]


@dataclass
class Variant:
    name: str
    group: str
    args: list[str]
    runs: list[dict] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small model, few steps, smaller logits: a couple of minutes on 2 cores")
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
    p.add_argument("--trl", action="store_true",
                   help="UNTESTED: also run the stages through TRL's trainers (needs trl: "
                        "pip install -e .[bench]) and report ours/TRL ratios")
    g = p.add_argument_group("model and data (defaults depend on --quick)")
    g.add_argument("--hidden", type=int)
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
    args = p.parse_args(argv)
    quick = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 4096, "steps": 12,
             "warmup": 2, "sft_batch": 8, "pair_batch": 4, "repeat": 1}
    full = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 32000, "steps": 30,
            "warmup": 5, "sft_batch": 16, "pair_batch": 8, "repeat": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.only.split(",")) - set(GROUPS)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    return args


# ------------------------------------------------------------------------------------ the plan


def plan(args) -> list[Variant]:
    """The variants, grouped so that the ones compared with each other run back to back."""
    model = ["--hidden", args.hidden, "--layers", args.layers, "--heads", args.heads,
             "--kv-heads", args.kv_heads, "--vocab", args.vocab]
    train = [*model, "--steps", args.steps, "--warmup", args.warmup,
             "--prompt-len", args.prompt_len, "--completion-len", args.completion_len]
    sft = [*train, "--variant", "sft", "--batch-size", args.sft_batch,
           "--max-length", args.max_length]
    demo = ["--variant", "sft", "--data", "demo", *DEMO_MODEL, "--steps", args.steps,
            "--warmup", args.warmup, "--batch-size", 64, "--max-length", 64]
    pairs = [*train, "--batch-size", args.pair_batch]
    kto = [*train, "--variant", "kto", "--batch-size", 2 * args.pair_batch]
    logits = [(32000, 4096), (150000, 1024)] if args.quick else [(32000, 8192), (150000, 2048)]
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
        "logps": [
            Variant(f"logps {impl} V={v} N={n}", "logps",
                    ["--variant", "logps", "--impl", impl.split()[0], "--vocab", v,
                     "--rows", n, "--chunk-size", chunk])
            for v, n in logits
            for impl, chunk in (("full", 0), ("chunked 4096", 4096), ("chunked 256", 256))
        ],
    }
    chosen = [v for g in GROUPS if g in args.only.split(",") for v in out[g]]
    for v in chosen:
        v.args = [str(a) for a in v.args] + ["--threads", str(args.threads), "--name", v.name]
    return chosen


def run_worker(module: str, worker_args: list[str], timeout: int) -> dict:
    """One variant in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", module, *worker_args]
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
            out[key] = statistics.median(r[key] for r in ok if key in r)
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

    def add(what: str, value: float | None, how: str) -> None:
        if value is not None:
            rows.append({"ratio": what, "value": value, "definition": how})

    for label, pack, pad in (("synthetic spread", "sft packed", "sft padded"),
                             ("demo rows", "sft demo packed", "sft demo padded")):
        add(f"SFT packing / padding, real tokens/s ({label})",
            _ratio(get(pack, "tokens_per_s"), get(pad, "tokens_per_s")),
            "median per-step non-pad tokens/s, packed over padded (>1: packing faster)")
        add(f"SFT packing / padding, training memory ({label})",
            _ratio(get(pack, "extra_mb"), get(pad, "extra_mb")),
            "peak RSS minus RSS before train(), packed over padded")
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
        if name.startswith("trl "):  # UNTESTED branch (--trl)
            ours = name.removeprefix("trl ")
            add(f"ours / TRL, real tokens/s ({ours})",
                _ratio(get(ours, "tokens_per_s"), get(name, "tokens_per_s")),
                "median per-step non-pad tokens/s (>1: ours faster)")
            add(f"ours / TRL, peak RSS ({ours})",
                _ratio(get(ours, "peak_rss_mb"), get(name, "peak_rss_mb")),
                "peak resident memory of the worker process (<1: ours smaller)")
        if name.startswith("logps full "):
            tail = name.removeprefix("logps full ")
            for chunk in ("4096", "256"):
                other = f"logps chunked {chunk} {tail}"
                add(f"log_softmax / token_logps(chunk {chunk}), extra memory, {tail}",
                    _ratio(get(name, "extra_mb"), get(other, "extra_mb")),
                    "peak RSS minus RSS with the logits allocated, fwd+bwd (>1: chunked smaller)")
                add(f"log_softmax / token_logps(chunk {chunk}), time, {tail}",
                    _ratio(get(name, "seconds"), get(other, "seconds")),
                    "seconds of fwd+bwd (>1: chunked faster)")
    return rows


# ------------------------------------------------------------------------------------ markdown


def _f(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _settings(o: dict) -> str:
    if not o:
        return ""
    return (f"Settings: Qwen2 hidden {o['hidden']}, {o['layers']} layers, {o['heads']} heads "
            f"({o['kv_heads']} KV), vocab {o['vocab']}; {o['steps']} steps of which the first "
            f"{o['warmup']} and the last are untimed; SFT {o['sft_batch']} examples/step, "
            f"{o['pair_batch']} pairs/step (KTO {2 * int(o['pair_batch'])} rows); prompt "
            f"lengths {o['prompt_len']}, completion lengths {o['completion_len']}; "
            f"{o['repeat']} run(s) per variant.")


def markdown(report: dict) -> str:
    cal = report["calibration"]
    lines = [
        f"# posttrain benchmarks, {report['date']}",
        "",
        (f"Machine: {report['machine']}. torch {report['torch']}, {report['threads']} "
         "thread(s) per worker."),
        (f"Matmul calibration (fp32 {cal['gemm_size']}^3 GEMM, median of start and end): "
         f"{_f(cal['gflops'], 1)} GFLOP/s (start {_f(cal['start'], 1)}, "
         f"end {_f(cal['end'], 1)})."),
        f"Command: `{report['command']}`",
        _settings(report.get("options", {})),
        "",
        "## Training stages",
        "",
        ("| variant | batch | real tokens/s | steps/s | pad % | model GFLOP/s | % of matmul "
         "| peak RSS MB | train mem MB | precompute s | end-to-end s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r.get("variant") in ("logps", "calibrate"):
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['name']} | {r['per_device_batch_size']} | {_f(r['tokens_per_s'])} "
            f"| {_f(r['steps_per_s'], 2)} | {_f(100 * r['pad_fraction'], 0)} "
            f"| {_f(r['flops_per_s'] / 1e9, 2)} | {_f(r.get('matmul_fraction', 0) * 100, 1)} "
            f"| {_f(r['peak_rss_mb'])} | {_f(r['extra_mb'])} | {_f(r['precompute_s'], 2)} "
            f"| {_f(r['e2e_s'], 2)} |"
        )
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
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main


def _calibrate(args) -> dict:
    return run_worker("benchmarks.worker", ["--variant", "calibrate", "--threads",
                                            str(args.threads), "--seconds", "1"], args.timeout)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = plan(args)
    print(f"{len(variants)} variants x {args.repeat}, threads={args.threads}", file=sys.stderr)
    start = _calibrate(args)
    for group in dict.fromkeys(v.group for v in variants):
        members = [v for v in variants if v.group == group]
        for _ in range(args.repeat):  # ABAB: drift hits every variant of a group alike
            for v in members:
                v.runs.append(run_worker("benchmarks.worker", v.args, args.timeout))
                print(f"  {v.name}: {_summary(v.runs[-1])}", file=sys.stderr)
    if args.trl:
        from benchmarks import trl_worker

        variants += trl_worker.variants(args, variants, run_worker)
    end = _calibrate(args)
    gflops = [c["gflops_median"] for c in (start, end) if "error" not in c]
    calibration = {"gemm_size": start.get("gemm_size"), "start": start.get("gflops_median"),
                   "end": end.get("gflops_median"),
                   "gflops": statistics.median(gflops) if gflops else None}
    results = [{**median_result(v.runs), "name": v.name} for v in variants]
    for r in results:
        if "flops_per_s" in r and calibration["gflops"]:
            r["matmul_fraction"] = r["flops_per_s"] / (calibration["gflops"] * 1e9)
    by_name = {r["name"]: r for r in results}
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "torch": start.get("torch"), "threads": start.get("torch_threads"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "options": {k: str(v) for k, v in vars(args).items()},
        "calibration": calibration, "results": results, "ratios": ratios(by_name),
        "runs": {v.name: v.runs for v in variants},
    }
    text = markdown(report)
    print(text)
    if str(args.out) != "-":
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"RESULTS-{report['date']}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        print(f"wrote {stem}.md and .json", file=sys.stderr)
    return report


def _summary(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    if r.get("variant") == "logps":
        return f"extra {r['extra_mb']:.0f} MB, {r['seconds']:.2f} s"
    return f"{r['tokens_per_s']:.0f} tok/s, {r['steps_per_s']:.2f} steps/s, " \
           f"peak {r['peak_rss_mb']:.0f} MB"


if __name__ == "__main__":
    main()
