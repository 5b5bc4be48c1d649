"""Generated tokens/s of the rollout decoding paths, side by side with transformers' `generate`.

    python -m benchmarks.bench_decode                        # 32 and 128 sequences x 64 tokens
    python -m benchmarks.bench_decode --sequences 32 --new-tokens 32 --repeat 1 --out -
    python -m benchmarks.bench_decode --worker static --sequences 32   # one variant, one JSON line

Variants, each in its own process (the driver runs them back to back per batch size, ABCD ABCD
with --repeat):
- loop: `posttrain.rollout.generate(backend="loop")`, the DynamicCache loop of eager forwards;
- static: `backend="static"`, transformers' StaticCache and eager decode steps;
- compiled: `backend="compiled"`, the static cache and a torch.compile'd decode step (inductor;
  CUDA graphs on a GPU); its first call (the compile) is reported apart;
- generate: `model.generate(do_sample=True)` with transformers' defaults (dynamic cache, no
  compile on the CPU), the same prompts, temperature 1, no top-k/top-p, same max_new_tokens.

Every variant samples at temperature 1 from the same random-initialised Qwen2 (hidden 256 by
default) on the same seeded synthetic prompts (lengths 16-128, log-normal, left-padded). One
untimed call of the same shape first (allocator warm-up; the compile for "compiled"), then
--repeat timed calls; "generated tokens/s" = tokens up to and including each row's first EOS
over the median call seconds. The three posttrain paths use the same seeded torch.Generator, so
their tokens must be identical ("same tokens as loop"); `generate` draws from the global RNG.
Ratios are formed only between variants of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

VARIANTS = ("loop", "static", "compiled", "generate")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=VARIANTS, default=None,
                   help="run one variant in this process and print its JSON line")
    p.add_argument("--sequences", default="32,128", help="rows decoded at once (comma list)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=2, help="timed calls per variant (median)")
    p.add_argument("--rounds", type=int, default=1, help="driver: processes per variant, ABCD...")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    p.add_argument("--out", default=None,
                   help="report path stem; '-': print only (default results/RESULTS-<date>-decode)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- worker


def _completion_lengths(completions, eos: int) -> list[int]:
    """Tokens of each row up to and including its first EOS (all of them without one)."""
    out = []
    for row in completions.tolist():
        out.append(row.index(eos) + 1 if eos in row else len(row))
    return out


def worker(args: argparse.Namespace) -> dict:
    import torch

    from benchmarks import synthetic as syn
    from posttrain.rollout import generate, left_pad

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    n = int(args.sequences)
    config = syn.qwen2_config(vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                              heads=args.heads, kv_heads=args.kv_heads,
                              intermediate=4 * args.hidden)
    model = syn.build_model(config, reward=False, seed=args.seed).to(device).eval()
    rng = __import__("random").Random(f"decode:{args.seed}")
    prompts = [[rng.randrange(syn.FIRST_CONTENT_ID, args.vocab) for _ in range(k)]
               for k in syn.lognormal_lengths(n, 16, 128, rng)]
    ids, mask = left_pad(prompts, syn.PAD_ID, device)

    def call():
        if args.worker == "generate":
            torch.manual_seed(args.seed)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens, eos_token_id=syn.EOS_ID,
                                 pad_token_id=syn.PAD_ID)
            return out[:, ids.shape[1]:]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        return generate(model, prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                        eos_token_ids=syn.EOS_ID, pad_token_id=syn.PAD_ID, generator=generator,
                        backend=args.worker).completion_ids

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens

    first_s, _ = timed()  # warm-up of the same shape; the compile for "compiled"
    runs = [timed() for _ in range(args.repeat)]
    seconds = statistics.median(s for s, _ in runs)
    tokens = runs[0][1]
    generated = sum(_completion_lengths(tokens, syn.EOS_ID))
    return {"variant": args.worker, "sequences": n, "max_new_tokens": args.new_tokens,
            "prompt_width": ids.shape[1], "first_call_s": first_s, "seconds": seconds,
            "seconds_all": [s for s, _ in runs], "generated_tokens": generated,
            "tokens_per_s": generated / seconds, "tokens": tokens.tolist(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------- driver


def _worker_argv(args: argparse.Namespace, variant: str, n: int) -> list[str]:
    return ["--worker", variant, "--sequences", str(n), "--new-tokens", str(args.new_tokens),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads",
            str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab),
            "--repeat", str(args.repeat), "--threads", str(args.threads), "--seed",
            str(args.seed)]


def _median_runs(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("first_call_s", "seconds", "tokens_per_s"):
        out[key] = statistics.median(r[key] for r in ok)
    out["rounds"] = len(ok)
    return out


def _same_tokens(a: dict, b: dict) -> str:
    if "tokens" not in a or "tokens" not in b:
        return "-"
    pairs = [(x, y) for ra, rb in zip(a["tokens"], b["tokens"]) for x, y in zip(ra, rb)]
    same = sum(x == y for x, y in pairs) / max(len(pairs), 1)
    return "yes" if same == 1.0 else f"{100 * same:.1f}%"


def report(args: argparse.Namespace, results: dict[int, dict[str, dict]]) -> str:
    any_result = next(r for by in results.values() for r in by.values() if "error" not in r)
    lines = [f"# Decoding: generated tokens/s, {dt.date.today().isoformat()}", "",
             (f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, device "
             f"{any_result['device']}; torch {any_result['torch']}, {any_result['threads']} "
             "thread(s) per worker"),
             (f"- Model: random Qwen2, hidden {args.hidden}, {args.layers} layers, {args.heads} "
             f"heads ({args.kv_heads} KV), MLP {4 * args.hidden}, vocabulary {args.vocab}, fp32, "
             f"sdpa; {args.new_tokens} new tokens at temperature 1; prompts 16-128 tokens"),
             f"- Command: python -m benchmarks.bench_decode {' '.join(sys.argv[1:])}", "",
             ("| sequences | variant | first call s | tokens/s | **/ loop** | **/ generate** | "
             "same tokens as loop |"), "|---|---|---|---|---|---|---|"]
    for n, by in results.items():
        loop, hf = by.get("loop", {}), by.get("generate", {})
        for variant in VARIANTS:
            r = by.get(variant, {})
            if "error" in r or not r:
                lines.append(f"| {n} | {variant} | failed: {r.get('error', 'not run')} | | | | |")
                continue
            def ratio(base: dict, r=r) -> str:
                return f"**{r['tokens_per_s'] / base['tokens_per_s']:.2f}**" \
                    if "tokens_per_s" in base else "-"
            same = _same_tokens(loop, r) if variant != "generate" else "(global RNG)"
            lines.append(f"| {n} (P={r['prompt_width']}) | {variant} | {r['first_call_s']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} | {ratio(loop)} | {ratio(hf)} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from benchmarks.run import run_worker

    results: dict[int, dict[str, dict]] = {}
    for n in (int(s) for s in args.sequences.split(",")):
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                r = run_worker("benchmarks.bench_decode", _worker_argv(args, variant, n),
                               args.timeout)
                print(f"{n} {variant}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, first call "
                      f"{r['first_call_s']:.1f} s" if "error" not in r else str(r["error"])),
                      file=sys.stderr)
                runs[variant].append(r)
        results[n] = {v: _median_runs(rs) for v, rs in runs.items()}
    text = report(args, results)
    print(text)
    if args.out != "-":
        stem = Path(args.out) if args.out else RESULTS / f"RESULTS-{dt.date.today()}-decode"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(text)
        raw = {str(n): {v: {k: x for k, x in r.items() if k != "tokens"} for v, r in by.items()}
               for n, by in results.items()}
        stem.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
