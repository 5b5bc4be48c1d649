"""The same benchmark variant through TRL's trainers (TRL 1.x), for ours/TRL ratios.

    python -m benchmarks.trl_worker --variant dpo --reference copy ...   (same flags as the worker)

Needs trl (the `bench` extra): run it with an interpreter that has it, e.g. a separate
environment made with `python -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'`
(`python -m benchmarks.run --trl --trl-python .venv-bench/bin/python`). Tested with trl 1.16.0,
transformers 5.24, torch 2.13 (CPU).

Both sides train the same random-initialised Qwen2 (the worker's, same seed) on the same token
ids: the ids become text ("t17 t5 ...") for a word-level tokenizer with one token per id, which
TRL tokenizes back into exactly those ids (TRL appends EOS itself, so our trailing EOS is left out
of the text; `epoch_grad_tokens`, the real tokens of all training forwards of the run (one
epoch), must equal ours: run.py checks it; GRPO samples its completions, so there the counts agree
only in expectation). Same settings: steps, per-device batch, AdamW lr 1e-4 constant without
warm-up, clipping 1.0, beta 0.1 (GRPO: beta 0, loss_type 'grpo', group-scaled rewards, one
iteration, temperature 1, the same char-count reward), fp32 or bf16 autocast (`--precision`), one
process, no logging integrations, no checkpoints, no evaluation, no gradient checkpointing (TRL's
configs turn it on by default; before 2026-12-06 TRL ran with it, recomputing every forward in
its backward pass, which cost it throughput and saved it activation memory). Timing uses a
TrainerCallback's step ends and the worker's forward hooks and timed window.

Differences that stay (they are TRL's defaults, so they are part of what is compared):
- TRL builds its tokenized dataset (and, with precompute_ref_log_probs, the reference log-probs)
  in the trainer's constructor: `setup_s` times the constructor, `e2e_s` runs from its start.
- TRL 1.16 runs the LM head as a fused, tiled kernel on the positions with a label (like ours) but
  on `lm_head.weight` directly, so our LM-head hook sees nothing: no model FLOPs for TRL rows.
- TRL logs extra per-step metrics (entropy, token accuracy, ...) and shuffles with its own sampler
  (other batches than ours, same data).
- SFT packing: TRL's packed rows are not isolated per example on this path (no flash attention),
  ours are (block-diagonal mask); not the same computation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
import time

from benchmarks import worker

STAGES = ("sft", "rm", "dpo", "orpo", "kto", "grpo")  # TRL 1.16 has no PPO trainer


def available(python: str | None = None) -> bool:
    """Whether `python` (default: this interpreter) can import trl."""
    import subprocess

    if python is None:
        return importlib.util.find_spec("trl") is not None
    probe = subprocess.run([python, "-c", "import trl"], capture_output=True, check=False)
    return probe.returncode == 0


def _text(ids: list[int]) -> str:
    """Ids as text; a leading space so that prompt + completion splits at the boundary."""
    from benchmarks.synthetic import EOS_ID, ids_to_text

    return ids_to_text(ids[:-1] if ids and ids[-1] == EOS_ID else ids)


def _dataset(stage: str, examples: list[dict]):
    from datasets import Dataset

    if stage == "grpo":  # prompt rows are text already (word-level, see synthetic.prompt_rows)
        return Dataset.from_list([{"prompt": e["prompt"]} for e in examples])
    if stage == "sft":
        rows = []
        for e in examples:
            p = sum(1 for label in e["labels"] if label == -100)
            rows.append({"prompt": _text(e["input_ids"][:p]).lstrip(),
                         "completion": _text(e["input_ids"][p:])})
    elif stage == "kto":
        rows = [{"prompt": _text(e["prompt_ids"]).lstrip(), "completion": _text(e["completion_ids"]),
                 "label": e["label"]} for e in examples]
    else:
        rows = [{"prompt": _text(e["prompt_ids"]).lstrip(), "chosen": _text(e["chosen_ids"]),
                 "rejected": _text(e["rejected_ids"])} for e in examples]
    return Dataset.from_list(rows)


def _trainer_classes(stage: str):
    """(ConfigClass, TrainerClass); ORPO/KTO may live under trl.experimental in newer TRL."""
    import trl

    names = {"sft": "SFT", "rm": "Reward", "dpo": "DPO", "orpo": "ORPO", "kto": "KTO",
             "grpo": "GRPO"}[stage]
    for module in (trl, f"trl.experimental.{stage}"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module) if isinstance(module, str) else module
            return getattr(mod, f"{names}Config"), getattr(mod, f"{names}Trainer")
    raise SystemExit(f"this trl has no {names}Trainer")


def train_stage(args) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.synthetic import (
        char_count_reward,
        count_work,
        current_rss_mb,
        parameter_counts,
        word_tokenizer,
    )

    if args.data != "synthetic" or args.variant not in STAGES:
        raise SystemExit(f"the TRL branch runs {STAGES} on synthetic data only")
    built = worker._model_and_data(args)
    model, tokenizer = built["model"], word_tokenizer(built["vocab"])
    model.config.pad_token_id = tokenizer.pad_token_id
    ours = worker._stage_config(args, built["train"])
    counts, params = count_work(model, built["pad"]), parameter_counts(model)
    marks: dict[int, tuple[float, dict]] = {}
    counts["gen_tokens"] = 0  # sampled completion tokens (GRPO), from TRL's logged mean length

    class Marks(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            marks[state.global_step] = (time.perf_counter(), dict(counts))

        def on_log(self, targs, state, control, logs=None, **kw):
            # Trainer logs right after on_step_end: credit the step just marked.
            if logs and "completions/mean_length" in logs and state.global_step in marks:
                generated = round(logs["completions/mean_length"] * ours.per_device_batch_size)
                counts["gen_tokens"] += generated
                marks[state.global_step][1]["gen_tokens"] += generated

    config_cls, trainer_cls = _trainer_classes(args.variant)
    precompute = args.reference == "precomputed"
    extra = {"sft": {"packing": args.packing, "max_length": args.max_length,
                     "completion_only_loss": True},
             "dpo": {"beta": 0.1, "precompute_ref_log_probs": precompute},
             "kto": {"beta": 0.1, "precompute_ref_log_probs": precompute},
             "orpo": {"beta": 0.1}, "rm": {},
             # Ours: GRPOConfig(loss_type="grpo", scale_rewards="group", num_iterations=1,
             # beta=0, temperature 1, batch counts completions) -- the same settings.
             "grpo": {"num_generations": args.generations,
                      "max_completion_length": args.new_tokens, "temperature": 1.0,
                      "beta": 0.0, "loss_type": "grpo", "scale_rewards": "group",
                      "num_iterations": 1, "epsilon": 0.2}}[args.variant]
    dataset = _dataset(args.variant, built["train"])
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        cfg = config_cls(
            output_dir=out, max_steps=args.steps,
            per_device_train_batch_size=ours.per_device_batch_size, learning_rate=1e-4,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
            seed=args.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            dataloader_num_workers=0, bf16=args.precision == "bf16",
            # TRL's configs default to True; the worker's training never recomputes activations,
            # so TRL must not either for the same computation (and the same memory).
            gradient_checkpointing=False, **extra,
        )
        rss_before = current_rss_mb()
        t0 = time.perf_counter()
        if args.variant in ("dpo", "kto") and not precompute:  # TRL would reload it by name
            import copy

            extra_models = {"ref_model": copy.deepcopy(model)}  # hooks too: nograd work
        else:
            extra_models = {}
        if args.variant == "grpo":
            extra_models = {"reward_funcs": [char_count_reward]}
        trainer = trainer_cls(model=model, args=cfg, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Marks()], **extra_models)
        setup_s = time.perf_counter() - t0
        trainer.train()
    window = worker._window(marks, params, args.warmup, args.steps - 1)
    window.update(flops_per_s=None, mean_flops_per_s=None, model_flops=None)  # see docstring
    return {"stage": args.variant, "tool": "trl", "packing": args.packing,
            "precision": args.precision,
            "reference": args.reference if args.variant in ("dpo", "kto") else None,
            "per_device_batch_size": ours.per_device_batch_size, "vocab": built["vocab"],
            "params": params, **window, "setup_s": setup_s,
            "precompute_s": setup_s if precompute and args.variant in ("dpo", "kto") else 0.0,
            "e2e_s": marks[args.steps - 1][0] - t0,
            "epoch_grad_tokens": marks[max(marks)][1]["grad_tokens"],
            "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing",
                                                   False)),
            "new_tokens": args.new_tokens if args.variant == "grpo" else None,
            "generations": args.generations if args.variant == "grpo" else None,
            **worker._memory(worker._device(), rss_before)}


def main(argv: list[str] | None = None) -> None:
    args = worker.parse_args(argv)
    import torch
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"name": args.name or f"trl {args.variant}", "variant": args.variant,
              "trl": trl.__version__, **train_stage(args),
              "torch_threads": torch.get_num_threads(), "device": str(worker._device())}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
