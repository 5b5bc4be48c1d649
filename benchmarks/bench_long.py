"""Peak memory of one SFT step on a long sequence with a large vocabulary: chunked vs full logits.

    python -m benchmarks.bench_long                     # 4k and 8k tokens, vocabulary 150k
    python -m benchmarks.bench_long --tokens 4096 --vocab 151936 --cap-gb 12
    python -m benchmarks.bench_long --trl-python .venv-bench/bin/python --only chunked,trl

One forward + backward of the SFT loss on one sequence of `--tokens` tokens, every token but the
first carrying a loss (the worst case: N = T loss positions), small Qwen2 body (hidden 64,
2 layers, untied LM head), fp32 on CPU. Variants, each in its own process, back to back:

- chunked: posttrain's path, `SelectedLogits(..., targets=...)` + `sft_loss`: the LM head,
  float32 upcast and log-softmax run on row chunks (2**24 // V rows), recomputed in backward;
- unchunked: the LM head on all N loss positions at once, then cross-entropy (posttrain's
  SFT loss before the chunked path);
- full: the model's own forward, (1, T, V) logits and cross-entropy, as a plain transformers
  training step computes it (what TRL's SFTTrainer does without a fused-loss kernel).

- trl (with `--trl-python`, an interpreter that has trl, e.g. .venv-bench): one training step
  of TRL's SFTTrainer on the same model and the same token ids (a pre-tokenized one-row dataset,
  every token a loss token), batch 1, no checkpoints or logging integrations. Its step includes
  what a trainer step holds beyond ours: AdamW's two moments (8 bytes per parameter, reported
  as "optimizer MB") and the trainer's own bookkeeping.

"step MB" = peak RSS during the step minus RSS just before it (model, optimizer-free: only the
step's activations, logits and gradients); "peak RSS MB" the whole process. Every worker runs
under an address-space cap (`--cap-gb`, RLIMIT_AS) so a variant that needs more fails with a
MemoryError instead of pushing a shared machine into swap or the OOM killer; such a row reads
"over the cap" with the size of the logits it would have had to hold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("chunked", "unchunked", "full", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=VARIANTS, default=None, help="run one variant")
    p.add_argument("--tokens", default="4096,8192", help="sequence lengths, comma-separated")
    p.add_argument("--vocab", type=int, default=150_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap per worker")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--only", default=",".join(VARIANTS), help="variants, comma-separated")
    p.add_argument("--trl-python", default=None,
                   help="an interpreter with trl: adds TRL's SFTTrainer as the 'trl' variant")
    return p.parse_args(argv)


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.synthetic import current_rss_mb, peak_rss_mb
    from posttrain.logprobs import SelectedLogits, default_chunk_rows, shift_targets
    from posttrain.losses.sft import sft_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    T = int(args.tokens)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=4 * args.hidden, max_position_embeddings=T,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    ids = torch.randint(3, args.vocab, (1, T))
    labels = ids.clone()
    labels[0, 0] = -100
    mask = torch.ones_like(ids)
    if args.worker == "trl":  # imported before the measurement: their memory is not the step's
        import datasets  # noqa: F401
        import trl  # noqa: F401
    before = current_rss_mb()
    peak_before = peak_rss_mb()
    started = time.perf_counter()
    if args.worker == "chunked":
        select, targets = shift_targets(labels)
        logps, _ = SelectedLogits(model)(ids, mask, select, targets=targets)
        loss, _ = sft_loss(logps, targets.numel())
    elif args.worker == "unchunked":
        select, targets = shift_targets(labels)
        logits = SelectedLogits(model)(ids, mask, select)  # (N, V)
        loss = F.cross_entropy(logits.float(), targets)
    elif args.worker == "trl":
        loss = _trl_step(model, ids, args.vocab)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits  # (1, T, V)
        loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:])
    if args.worker != "trl":
        loss.backward()
        loss = loss.item()
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    optimizer_mb = 8 * sum(p.numel() for p in model.parameters()) / 2**20
    return {"variant": args.worker, "tokens": T, "vocab": args.vocab, "loss": loss,
            "optimizer_mb": optimizer_mb if args.worker == "trl" else 0.0,
            "step_mb": peak - max(before, peak_before) if peak > peak_before else 0.0,
            "peak_rss_mb": peak, "rss_before_mb": before, "seconds": seconds,
            "chunk_rows": default_chunk_rows(args.vocab)}


def _trl_step(model, ids, vocab: int) -> float:
    """One SFTTrainer step on `ids` (already tokenized: TRL skips its own tokenization); the
    loss TRL logged for it."""
    import contextlib
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from benchmarks.synthetic import word_tokenizer

    logged: list[float] = []
    dataset = Dataset.from_list([{"input_ids": ids[0].tolist()}])
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        config = SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=1,
                           learning_rate=1e-4, logging_steps=1, save_strategy="no",
                           report_to="none", use_cpu=True, disable_tqdm=True,
                           dataloader_num_workers=0, max_length=ids.shape[1], packing=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=word_tokenizer(vocab))
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return logged[-1] if logged else float("nan")


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import run_worker

    args = parse_args(argv)
    if args.worker:
        cap = int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(worker(args)))
        return {}
    results: dict[tuple[int, str], dict] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for variant in VARIANTS:
            if variant not in args.only.split(",") or (variant == "trl" and not args.trl_python):
                continue
            flags = ["--worker", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
                     "--hidden", str(args.hidden), "--layers", str(args.layers),
                     "--threads", str(args.threads), "--cap-gb", str(args.cap_gb)]
            results[(tokens, variant)] = run_worker(
                "benchmarks.bench_long", flags, args.timeout,
                python=args.trl_python if variant == "trl" else None)
    print(report(args, results))
    return results


def report(args, results: dict[tuple[int, str], dict]) -> str:
    import torch

    lines = [
        (f"{dt.date.today()}, {platform.node() or 'machine'} ({os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {args.threads or 'default'} threads); Qwen2 hidden {args.hidden}, "
        f"{args.layers} layers, vocabulary {args.vocab}, untied head, fp32, one sequence, every "
        f"token a loss token, cap {args.cap_gb:g} GB address space per worker"),
        "",
        ("| tokens | variant | full logits would be MB | step MB | peak RSS MB | step s | "
        "step memory vs chunked | loss |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for (tokens, variant), r in results.items():
        logits_mb = (tokens - 1) * args.vocab * 4 / 2**20
        if "error" in r:
            err = " ".join(r["error"]) if isinstance(r["error"], list) else str(r["error"])
            why = "over the cap" if "MemoryError" in err or "memory" in err.lower() else err[:80]
            lines.append(f"| {tokens} | {variant} | {logits_mb:.0f} | {why} | | | | |")
            continue
        chunked = results.get((tokens, "chunked"), {})
        vs = (f"{r['step_mb'] / chunked['step_mb']:.1f}x"
              if chunked.get("step_mb") and r is not chunked else "1x")
        lines.append(f"| {tokens} | {variant} | {logits_mb:.0f} | {r['step_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | {vs} | {r['loss']:.6f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
