"""Run ONE benchmark variant in this process and print its result as one JSON line on stdout.

    python -m benchmarks.worker --variant sft --steps 7 --warmup 2 [--packing] ...
    python -m benchmarks.worker --variant dpo --reference copy ...
    python -m benchmarks.worker --variant logps --impl chunked --vocab 150000 --rows 1024
    python -m benchmarks.worker --variant calibrate

`benchmarks/run.py` spawns one worker per variant so that peak memory (ru_maxrss, or the CUDA
allocator's peak on GPU) belongs to that variant alone. Training variants call the library's own
`train()` functions (posttrain/recipes/) unchanged; timing comes from their per-step metric
callback, and work (tokens, LM-head rows, with or without autograd) from forward hooks.

Timed window: the callbacks of steps `warmup` .. `steps - 1`. The first steps (allocator warm-up,
lazy init) and the last one (it also runs the final evaluation) are outside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

STAGES = ("sft", "rm", "dpo", "orpo", "kto", "grpo", "ppo")
ONLINE = ("grpo", "ppo")


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.worker", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", required=True,
                   choices=(*STAGES, "logps", "rollout", "calibrate"))
    p.add_argument("--name", default=None, help="label copied into the JSON")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="training: fp32, or bf16 autocast (accelerate mixed precision, fp32 "
                        "master weights); calibrate: the GEMM's dtype")
    g = p.add_argument_group("model (random-initialised Qwen2)")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4*hidden)")
    g.add_argument("--vocab", type=int, default=4096, help="vocabulary (ignored with --data demo)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=7, help="optimizer steps in total")
    g.add_argument("--warmup", type=int, default=2, help="steps before the timed window (>= 1)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="examples (SFT), pairs (RM/DPO/ORPO) or rows (KTO) per step; with "
                        "--packing the rows are sized to hold as many real tokens on average")
    g.add_argument("--examples", type=int, default=None,
                   help="training examples (default: batch-size x steps, one epoch)")
    g.add_argument("--data", choices=("synthetic", "demo"), default="synthetic",
                   help="synthetic random tokens, or the built-in demo's SFT rows (SFT only)")
    g.add_argument("--prompt-len", type=_pair, default=(16, 128), help="lo,hi")
    g.add_argument("--completion-len", type=_pair, default=(16, 256), help="lo,hi")
    g.add_argument("--packing", action="store_true", help="SFT: pack rows of --max-length")
    g.add_argument("--max-length", type=int, default=512, help="SFT packed row length; demo rows longer are dropped")
    g.add_argument("--reference", choices=("precomputed", "copy"), default="precomputed",
                   help="DPO/KTO reference log-probs")
    g = p.add_argument_group("online RL (grpo, ppo) and rollout")
    g.add_argument("--new-tokens", type=int, default=32,
                   help="max new tokens per completion (random models rarely emit EOS)")
    g.add_argument("--generations", type=int, default=4,
                   help="GRPO: completions per prompt (batch-size counts completions)")
    g.add_argument("--sequences", type=int, default=32, help="rollout: sequences decoded at once")
    g.add_argument("--kv-cache", choices=("on", "off"), default="on",
                   help="rollout: posttrain.rollout.generate (on) or a greedy loop that "
                        "re-encodes the whole sequence every step (off)")
    g = p.add_argument_group("logps (token_logps vs log_softmax + gather)")
    g.add_argument("--impl", choices=("chunked", "full"), default="chunked")
    g.add_argument("--rows", type=int, default=1024, help="N of the (N, V) logits")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="token_logps chunk in rows (default: the library's memory-sized default)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g = p.add_argument_group("calibrate (GEMM in --precision)")
    g.add_argument("--gemm-size", type=int, default=1024)
    g.add_argument("--seconds", type=float, default=1.0, help="time spent multiplying")
    args = p.parse_args(argv)
    if args.variant in STAGES and (args.warmup < 1 or args.steps < args.warmup + 2):
        p.error("need --warmup >= 1 and --steps >= --warmup + 2 (the timed window runs from "
                "the end of step `warmup` to the end of step `steps - 1`)")
    return args


# ------------------------------------------------------------------------------------ helpers


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _memory(device, rss_before: float) -> dict[str, float]:
    import torch

    from benchmarks.synthetic import peak_rss_mb

    out = {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}
    out["extra_mb"] = out["peak_rss_mb"] - rss_before
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -------------------------------------------------------------------------------- calibration


def calibrate(args) -> dict:
    """GEMM throughput (fp32, or bf16 with --precision bf16): median and best GFLOP/s of
    n x n @ n x n products."""
    import torch

    device = _device()
    n = args.gemm_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates: list[float] = []
    start = time.perf_counter()
    while len(rates) < 5 or time.perf_counter() - start < args.seconds:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"gemm_size": n, "precision": args.precision,
            "gflops_median": statistics.median(rates),
            "gflops_best": max(rates), "samples": len(rates)}


# ------------------------------------------------------------------------------------- logps


def logps(args) -> dict:
    """Peak memory and time of forward + backward of per-token log-probs on (N, V) logits."""
    import torch

    from benchmarks.synthetic import current_rss_mb
    from posttrain.logprobs import default_chunk_rows, token_logps

    device = _device()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    logits = torch.randn(args.rows, args.vocab, device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    if args.impl == "full":
        out = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        out = token_logps(logits, targets, chunk_size=args.chunk_size)
    out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    logits_mb = logits.numel() * logits.element_size() / 2**20
    return {"impl": args.impl, "rows": args.rows, "vocab": args.vocab, "dtype": args.dtype,
            "chunk_size": (args.chunk_size or default_chunk_rows(args.vocab))
            if args.impl == "chunked" else None,
            "logits_mb": logits_mb, "seconds": seconds, **_memory(device, rss_before)}


# ----------------------------------------------------------------------------------- rollout


def _greedy_without_cache(model, prompt_ids: list[list[int]], max_new_tokens: int, eos: int,
                          pad: int):
    """Greedy decoding that re-encodes the whole sequence at every step (no KV cache): the
    baseline for posttrain.rollout.generate. Same masks, positions and stopping rule, so the
    tokens match generate(temperature=0) up to floating-point ties."""
    import torch

    from posttrain.logprobs import position_ids_from_mask
    from posttrain.rollout import left_pad

    ids, mask = left_pad(prompt_ids, pad, next(model.parameters()).device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, logits_to_keep=1)
        token = out.logits[:, -1].float().argmax(-1)
        alive = ~done
        tokens.append(torch.where(alive, token, pad))
        done = done | (token == eos)
        if bool(done.all()):
            break
        ids = torch.cat([ids, tokens[-1][:, None]], dim=1)
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
    return torch.stack(tokens, dim=1)


def rollout(args) -> dict:
    """Greedy decoding of --sequences prompts x --new-tokens, with or without the KV cache."""
    import torch

    from benchmarks import synthetic as syn
    from posttrain.rollout import generate

    intermediate = args.intermediate or 4 * args.hidden
    config = syn.qwen2_config(vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                              heads=args.heads, kv_heads=args.kv_heads, intermediate=intermediate)
    model = syn.build_model(config, reward=False, seed=args.seed).eval()
    rng = __import__("random").Random(f"rollout:{args.seed}")
    lengths = syn.lognormal_lengths(args.sequences, *args.prompt_len, rng)
    prompts = [[rng.randrange(syn.FIRST_CONTENT_ID, args.vocab) for _ in range(n)]
               for n in lengths]
    def decode(new_tokens: int):
        if args.kv_cache == "on":
            return generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0,
                            eos_token_ids=syn.EOS_ID, pad_token_id=syn.PAD_ID).completion_ids
        return _greedy_without_cache(model, prompts, new_tokens, syn.EOS_ID, syn.PAD_ID)

    with torch.no_grad():
        decode(2)  # warm-up (lazy initialisation, allocator), not timed
        counts = syn.count_work(model, syn.PAD_ID)
        rss_before = syn.current_rss_mb()
        t0 = time.perf_counter()
        tokens = decode(args.new_tokens)
        seconds = time.perf_counter() - t0
    new = int((tokens != syn.PAD_ID).sum())
    return {"kv_cache": args.kv_cache, "sequences": args.sequences,
            "max_new_tokens": args.new_tokens, "new_tokens": new, "seconds": seconds,
            "new_tokens_per_s": new / seconds, "positions_encoded": counts["nograd_positions"],
            "tokens": tokens.tolist(), "vocab": args.vocab, **_memory(_device(), rss_before)}


# ----------------------------------------------------------------------------------- training


def _model_and_data(args) -> dict:
    """The model, train/eval data and pad id of a stage variant."""
    from benchmarks import synthetic as syn

    intermediate = args.intermediate or 4 * args.hidden
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": intermediate}
    n = args.examples or args.batch_size * args.steps
    n_eval = max(args.batch_size, 2)
    lengths = (args.prompt_len, args.completion_len)
    pad, vocab = syn.PAD_ID, args.vocab
    extra = {}
    if args.variant in ONLINE:
        if args.data != "synthetic":
            raise SystemExit("--data demo is for the sft variant only")
        config = syn.qwen2_config(vocab=vocab, **shape)
        n_prompts = n // (args.generations if args.variant == "grpo" else 1)
        train = syn.prompt_rows(n_prompts, vocab, args.prompt_len, seed=args.seed)
        evals = syn.prompt_rows(n_eval, vocab, args.prompt_len, seed=args.seed + 1)
        extra["tokenizer"] = syn.word_tokenizer(vocab)
        if args.variant == "ppo":  # a random reward model; the value model starts from it
            import copy

            rm = syn.build_model(syn.qwen2_config(vocab=vocab, **shape), reward=True,
                                 seed=args.seed + 1)
            extra["reward_model"], extra["value_model"] = rm, copy.deepcopy(rm)
    elif args.data == "demo":
        if args.variant != "sft":
            raise SystemExit("--data demo is for the sft variant only")
        train, tokenizer = syn.demo_sft_examples(n, args.max_length, args.seed)
        evals = train[:n_eval]
        pad, vocab = tokenizer.pad_token_id, len(tokenizer)
        config = syn.qwen2_config(vocab=vocab, pad_token_id=pad,
                                  eos_token_id=tokenizer.eos_token_id, **shape)
    else:
        config = syn.qwen2_config(vocab=vocab, **shape)
        make = {"sft": syn.sft_examples, "kto": syn.kto_examples}.get(
            args.variant, syn.preference_pairs)
        train = make(n, vocab, *lengths, seed=args.seed)
        evals = make(n_eval, vocab, *lengths, seed=args.seed + 1)
    model = syn.build_model(config, reward=args.variant == "rm", seed=args.seed)
    return {"model": model, "train": train, "eval": evals, "pad": pad, "vocab": vocab,
            "shape": shape, **extra}


def _stage_config(args, train: list[dict]):
    from posttrain import config as C

    common = {"max_steps": args.steps, "per_device_batch_size": args.batch_size,
              "learning_rate": 1e-4, "warmup_steps": 0, "lr_scheduler": "constant",
              "eval_every": args.steps, "log_every": 1, "seed": args.seed}
    if args.variant == "sft":
        rows = args.batch_size
        if args.packing:  # as many real tokens per step as batch_size padded examples, on average
            mean = sum(len(e["input_ids"]) for e in train) / len(train)
            rows = max(1, round(args.batch_size * mean / args.max_length))
        return C.SFTConfig(**{**common, "per_device_batch_size": rows},
                           packing=args.packing, max_length=max(args.max_length, 8))
    if args.variant == "rm":
        return C.RewardConfig(**common)
    if args.variant == "dpo":
        return C.DPOConfig(**common, reference=args.reference)
    if args.variant == "orpo":
        return C.ORPOConfig(**common)
    if args.variant == "kto":
        return C.KTOConfig(**common, reference=args.reference)
    online = {"max_completion_length": args.new_tokens, "temperature": 1.0,
              "max_length": args.prompt_len[1] + args.new_tokens}
    if args.variant == "grpo":  # batch-size counts completions: batch/G prompts per step
        return C.GRPOConfig(**common, **online, num_generations=args.generations, beta=0.0,
                            reward_functions={"benchmarks.synthetic:char_count_reward": 1.0})
    return C.PPOConfig(**common, **online)  # batch-size prompts, 1 completion each


def _train_fn(args):
    """The recipe's train(), with its precompute_reference wrapped to time the up-front pass."""
    from posttrain.recipes import grpo, kto, ppo, preference, reward, sft

    timing = {"precompute_s": 0.0}
    for module in (preference, kto):
        original = module.precompute_reference

        def timed(*a, _original=original, **kw):
            t0 = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                timing["precompute_s"] += time.perf_counter() - t0

        module.precompute_reference = timed
    fn = {
        "sft": sft.train, "rm": reward.train, "kto": kto.train,
        "dpo": lambda *a, **kw: preference.train("dpo", *a, **kw),
        "orpo": lambda *a, **kw: preference.train("orpo", *a, **kw),
        "grpo": grpo.train, "ppo": ppo.train,
    }[args.variant]
    return fn, timing


def _window(marks: dict[int, tuple[float, dict]], params: dict, first: int, last: int) -> dict:
    """Rates over the callbacks of steps first..last: window means and per-step medians (the
    medians resist the bursts of a shared machine). Counters named aux_* (PPO's value and reward
    models, bodies the size of the policy's) add FLOPs but no tokens."""
    from benchmarks.synthetic import model_flops as policy_flops

    def model_flops(work: dict, params: dict) -> float:
        aux = {k[4:]: v for k, v in work.items() if k.startswith("aux_")}
        return policy_flops(work, params) + (
            policy_flops(aux, {**params, "head": 0}) if aux else 0.0)

    (ta, ca), (tb, cb) = marks[first], marks[last]
    seconds, steps = tb - ta, last - first
    work = {k: cb[k] - ca[k] for k in cb}
    per_step = []  # (seconds, tokens/s, FLOP/s) of each timed step
    for i in range(first + 1, last + 1):
        (t0, c0), (t1, c1) = marks[i - 1], marks[i]
        step_work = {k: c1[k] - c0[k] for k in c1}
        per_step.append((t1 - t0, step_work["grad_tokens"] / (t1 - t0),
                         model_flops(step_work, params) / (t1 - t0)))
    flops = model_flops(work, params)
    return {
        "steps_timed": steps, "seconds": seconds,
        "steps_per_s": 1 / statistics.median(s for s, _, _ in per_step),
        "tokens_per_s": statistics.median(r for _, r, _ in per_step),
        "flops_per_s": statistics.median(f for _, _, f in per_step),
        "mean_steps_per_s": steps / seconds,
        "mean_tokens_per_s": work["grad_tokens"] / seconds,
        "mean_flops_per_s": flops / seconds,
        "positions_per_s": work["grad_positions"] / seconds,
        "pad_fraction": 1 - work["grad_tokens"] / max(work["grad_positions"], 1),
        "gen_tokens_per_s": work.get("gen_tokens", 0) / seconds,
        "step_seconds": [round(s, 4) for s, _, _ in per_step],
        "work": work, "model_flops": flops,
    }


def train_stage(args) -> dict:
    """Train with the library's recipe; measure the timed window, setup and memory."""
    import torch

    from benchmarks.synthetic import (
        char_count_reward,
        count_work,
        current_rss_mb,
        parameter_counts,
    )
    from posttrain.training import make_accelerator

    built = _model_and_data(args)
    model, train = built["model"], built["train"]
    cfg = _stage_config(args, train)
    counts = count_work(model, built["pad"])
    if args.variant == "ppo":  # value (trained) and reward (frozen) bodies: FLOPs, not tokens
        aux = count_work(built["value_model"], built["pad"])
        count_work(built["reward_model"], built["pad"], counts=aux)
    else:
        aux = {}
    params = parameter_counts(model)
    fn, timing = _train_fn(args)
    marks: dict[int, tuple[float, dict]] = {}
    counts["gen_tokens"] = 0  # sampled completion tokens (GRPO/PPO)

    def log_metrics(metrics: dict, step: int) -> None:
        if "completions/mean_length" in metrics:
            counts["gen_tokens"] += round(metrics["completions/mean_length"]
                                          * cfg.per_device_batch_size * cfg.grad_accum)
        marks[step] = (time.perf_counter(),
                       {**counts, **{f"aux_{k}": v for k, v in aux.items()}})

    device = _device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    accelerator = make_accelerator("bf16" if args.precision == "bf16" else "no")
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        if args.variant == "grpo":
            final = fn(model, built["tokenizer"], train, built["eval"], cfg,
                       reward_fns={"chars": char_count_reward}, weights={"chars": 1.0},
                       log_metrics=log_metrics, accelerator=accelerator)
        elif args.variant == "ppo":
            final = fn(model, built["value_model"], built["reward_model"], built["tokenizer"],
                       train, cfg, log_metrics=log_metrics, accelerator=accelerator)
        else:
            final = fn(model, train, built["eval"], cfg, pad_token_id=built["pad"],
                       log_metrics=log_metrics, accelerator=accelerator)
    total_s = time.perf_counter() - t0
    return {
        "stage": args.variant, "data": args.data, "packing": args.packing,
        "precision": args.precision,
        "reference": args.reference if args.variant in ("dpo", "kto") else None,
        "per_device_batch_size": cfg.per_device_batch_size, "vocab": built["vocab"],
        **built["shape"], "params": params, "train_examples": len(train),
        **_window(marks, params, args.warmup, args.steps - 1),
        "precompute_s": timing["precompute_s"],
        "e2e_s": marks[args.steps - 1][0] - t0,  # train() start to the end of the last timed step
        "epoch_grad_tokens": marks[max(marks)][1]["grad_tokens"],  # all training forwards
        "total_s": total_s,
        "final_loss": final.get("loss", final.get("loss/policy_avg")),
        "new_tokens": args.new_tokens if args.variant in ONLINE else None,
        "generations": args.generations if args.variant == "grpo" else None,
        **_memory(device, rss_before),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = {"calibrate": calibrate, "logps": logps, "rollout": rollout}.get(args.variant,
                                                                          train_stage)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "name": args.name or args.variant, "variant": args.variant, **run(args),
        "loadavg_1m": [load_before, os.getloadavg()[0] if load_before is not None else None],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": str(_device()), "machine": platform.machine(),
        "device_name": (torch.cuda.get_device_name() if torch.cuda.is_available()
                        else platform.processor() or platform.machine()),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
