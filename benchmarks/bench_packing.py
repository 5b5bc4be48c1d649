"""Packed vs padded SFT: real tokens/s at hidden 256 and rows of 2048, naming the attention path.

    python -m benchmarks.bench_packing                  # CPU: padded, packed (dense mask, sdpa)
    python -m benchmarks.bench_packing --steps 8 --repeat 2
    python -m benchmarks.bench_packing --attn sdpa,flex_attention,flash_attention_2   # a GPU

Each variant runs `posttrain.recipes.sft.train` unchanged in its own process (python -m
benchmarks.bench_packing --worker ...), back to back (interleaved with --repeat), on the same
synthetic examples (prompts 16-256 and completions 32-1024 tokens at rows of 2048, i.e. up to
1/8 and 1/2 of a row; the clipped log-normal of benchmarks/synthetic.py). Packed: `--rows` rows of `--max-length` tokens a step; padded: as many
examples a step as the packed rows hold on average, padded to the longest of the batch. The
attention path is what the recipe chose and returned (`attention`: dense_mask, flex_attention,
varlen, or padded). Real tokens/s is the recipe's own `tokens_per_second` (non-padding tokens
through the training forward / step seconds), median over the timed steps (after --warmup,
before the last step, which also evaluates). The result is the ratio packed / padded of the same
run; absolute numbers describe one machine at one moment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help="run one variant, print one JSON line")
    p.add_argument("--packing", choices=("on", "off"), default="on", help="worker: the variant")
    p.add_argument("--attn", default="sdpa",
                   help="attn_implementation(s) for the packed variants, comma-separated "
                        "(sdpa, eager, flex_attention, flash_attention_2); the padded variant "
                        "uses the first")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=2, help="packed rows per step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--precision", choices=("no", "bf16"), default="no")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    return p.parse_args(argv)


def _examples(args) -> list[dict]:
    from benchmarks.synthetic import sft_examples

    # enough rows for every step of both variants (one epoch, no reshuffle into a short tail)
    n = max(64, args.rows * (args.steps + 1) * args.max_length // 300)
    longest = args.max_length
    return sft_examples(n, args.vocab, (16, longest // 8), (32, longest // 2), seed=0)


def _padded_batch(args, examples: list[dict]) -> int:
    """Examples per padded step holding the real tokens of `rows` packed rows on average."""
    from posttrain.data.packing import pack_bfd

    bins = pack_bfd([len(e["input_ids"]) for e in examples], args.max_length)
    return max(1, round(args.rows * len(examples) / len(bins)))


def worker(args) -> dict:
    import torch

    from benchmarks.synthetic import build_model, peak_rss_mb, qwen2_config
    from posttrain.config import SFTConfig
    from posttrain.recipes import sft
    from posttrain.training import make_accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    examples = _examples(args)
    packing = args.packing == "on"
    batch = args.rows if packing else _padded_batch(args, examples)
    config = qwen2_config(vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate)
    config.max_position_embeddings = args.max_length
    model = build_model(config, reward=False, seed=0)
    model.set_attn_implementation(args.attn)
    accelerator = make_accelerator(args.precision)
    model.to(accelerator.device)
    steps: list[tuple[float, dict]] = []
    cfg = SFTConfig(max_steps=args.steps, per_device_batch_size=batch, learning_rate=1e-4,
                    warmup_steps=0, max_length=args.max_length, packing=packing,
                    eval_every=args.steps, log_every=1, completion_only_loss=True)
    started = time.perf_counter()
    final = sft.train(model, examples, examples[:batch], cfg, pad_token_id=0,
                      log_metrics=lambda m, s: steps.append((time.perf_counter(), dict(m))),
                      accelerator=accelerator)
    timed = [m for _, m in steps[args.warmup : args.steps - 1]] or [m for _, m in steps]
    seconds = [b[0] - a[0] for a, b in itertools.pairwise(steps)][args.warmup - 1 : args.steps - 2]
    gpu_mb = (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None
    return {
        "name": f"{'packed' if packing else 'padded'} {args.attn}",
        "attention": final["attention"], "attn_implementation": args.attn, "batch": batch,
        "tokens_per_s": statistics.median(m["tokens_per_second"] for m in timed),
        "step_s": statistics.median(seconds) if seconds else None,
        "steps_timed": len(timed), "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_mb,
        "train_s": time.perf_counter() - started,
    }


def _flags(args, **over) -> list[str]:
    keep = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_length",
            "rows", "steps", "warmup", "threads", "precision")
    values = {**{k: getattr(args, k) for k in keep}, **over}
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import run_worker

    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    attns = args.attn.split(",")
    variants = [("off", attns[0])] + [("on", a) for a in attns]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for packing, attn in variants:
            r = run_worker("benchmarks.bench_packing",
                           ["--worker", *_flags(args, packing=packing, attn=attn)], args.timeout)
            runs.setdefault(f"{'packed' if packing == 'on' else 'padded'} {attn}", []).append(r)
    print(report(args, runs))
    return runs


def report(args, runs: dict[str, list[dict]]) -> str:
    import torch

    def med(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    padded = next(iter(runs.values()))
    base = med(padded, "tokens_per_s")
    lines = [
        (f"{dt.date.today()}, {platform.node() or 'machine'} ({os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads or 'default'} threads"
        f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}); "
        f"hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, rows of "
        f"{args.max_length}, {args.rows} packed rows a step, {args.steps} steps "
        f"({args.warmup} warm-up), {args.repeat} repeat(s), precision {args.precision}"),
        "",
        "| variant | attention path | batch | real tokens/s | step s | peak RSS MB | vs padded |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            lines.append(f"| {name} | failed: {errors[0]} | | | | | |")
            continue
        tps, step = med(rs, "tokens_per_s"), med(rs, "step_s")
        ratio = f"{tps / base:.2f}x" if base and tps else ""
        lines.append(f"| {name} | {rs[0]['attention']} | {rs[0]['batch']} | {tps:.0f} | "
                     f"{step:.2f} | {med(rs, 'peak_rss_mb'):.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
