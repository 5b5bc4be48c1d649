"""UNTESTED: the same benchmark variant through TRL's trainers, for ours/TRL ratios.

    python -m benchmarks.trl_worker --variant dpo --reference copy ...   (same flags as the worker)

trl is not installed where this was written (it is the `bench` extra: `pip install -e .[bench]`),
so this file has never run. It reuses the worker's model and synthetic data, so both sides train
the same random-initialised Qwen2 on the same token ids: the ids become text ("t17 t5 ...") for a
word-level tokenizer with one token per id, which TRL tokenizes back into exactly those ids
(TRL appends EOS itself, so the trailing EOS id is dropped from the text). Timing uses a
TrainerCallback's step ends and the same forward hooks as the worker; rates are compared as real
tokens/s and steps/s (TRL runs the LM head on every position, so its "model FLOPs" by our
counting would include the head on prompt tokens too).

Settings mapped: steps, batch size, lr 1e-4 constant without warm-up, grad clip 1.0, beta 0.1,
packing (SFT: TRL's rows per batch = ours), reference 'precomputed' -> precompute_ref_log_probs.
Not mapped: our block-diagonal packing mask (TRL's packing isolates examples only with a
flash-attention/padding-free path), so the SFT packing comparison is not the same computation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
import time

from benchmarks import worker

STAGES = ("sft", "rm", "dpo", "orpo", "kto")


def available() -> bool:
    return importlib.util.find_spec("trl") is not None


def variants(args, ours: list, run_worker) -> list:
    """TRL twins of our stage variants (synthetic data only), each run args.repeat times."""
    from benchmarks.run import Variant

    if not available():
        print("--trl: trl is not installed (pip install -e .[bench]); skipped", file=sys.stderr)
        return []
    twins = [Variant(f"trl {v.name}", v.group, list(v.args)) for v in ours
             if v.group in STAGES and "demo" not in v.name]
    for v in twins:
        v.args[v.args.index("--name") + 1] = v.name
        for _ in range(args.repeat):
            v.runs.append(run_worker("benchmarks.trl_worker", v.args, args.timeout))
    return twins


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from benchmarks.synthetic import EOS_ID, FIRST_CONTENT_ID, PAD_ID

    words = {"<pad>": PAD_ID, "<unk>": 1, "<eos>": EOS_ID}
    words.update({f"t{i}": i for i in range(FIRST_CONTENT_ID, vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   eos_token="<eos>", unk_token="<unk>")


def _text(ids: list[int]) -> str:
    """Ids as text; a leading space so that prompt + completion splits at the boundary."""
    from benchmarks.synthetic import EOS_ID

    return "".join(f" t{i}" for i in (ids[:-1] if ids and ids[-1] == EOS_ID else ids))


def _dataset(stage: str, examples: list[dict]):
    from datasets import Dataset

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

    names = {"sft": "SFT", "rm": "Reward", "dpo": "DPO", "orpo": "ORPO", "kto": "KTO"}[stage]
    for module in (trl, f"trl.experimental.{stage}"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module) if isinstance(module, str) else module
            return getattr(mod, f"{names}Config"), getattr(mod, f"{names}Trainer")
    raise SystemExit(f"this trl has no {names}Trainer")


def train_stage(args) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.synthetic import count_work, current_rss_mb, parameter_counts

    if args.data != "synthetic":
        raise SystemExit("the TRL branch runs synthetic data only")
    built = worker._model_and_data(args)
    model, tokenizer = built["model"], _tokenizer(built["vocab"])
    ours = worker._stage_config(args, built["train"])
    counts, params = count_work(model, built["pad"]), parameter_counts(model)
    marks: dict[int, tuple[float, dict]] = {}

    class Marks(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            marks[state.global_step] = (time.perf_counter(), dict(counts))

    config_cls, trainer_cls = _trainer_classes(args.variant)
    extra = {"sft": {"packing": args.packing, "max_length": args.max_length,
                     "completion_only_loss": True},
             "dpo": {"beta": 0.1, "precompute_ref_log_probs": args.reference == "precomputed"},
             "kto": {"beta": 0.1, "precompute_ref_log_probs": args.reference == "precomputed"},
             "orpo": {"beta": 0.1}, "rm": {}}[args.variant]
    with tempfile.TemporaryDirectory() as out:
        cfg = config_cls(
            output_dir=out, max_steps=args.steps,
            per_device_train_batch_size=ours.per_device_batch_size, learning_rate=1e-4,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
            save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **extra,
        )
        trainer = trainer_cls(model=model, args=cfg, train_dataset=_dataset(args.variant,
                              built["train"]), processing_class=tokenizer, callbacks=[Marks()])
        rss_before = current_rss_mb()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
    return {"stage": args.variant, "tool": "trl", "packing": args.packing,
            "reference": args.reference if args.variant in ("dpo", "kto") else None,
            "per_device_batch_size": ours.per_device_batch_size, "vocab": built["vocab"],
            "params": params, **worker._window(marks, params, args.warmup, args.steps - 1),
            "precompute_s": None, "e2e_s": marks[args.steps - 1][0] - t0,
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
