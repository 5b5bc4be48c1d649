"""Runs SFT, DPO and KTO on the tiny model, once per process of a (possibly) distributed launch.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.json --batch 4
    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.json --batch 4 --fsdp   # sharded
    python tests/dist_worker.py OUT.json --batch 8      # the same global batch in one process

Every process builds the same model and data; the recipes shard the batches by rank. Rank 0
writes {"sft": [loss per step], "dpo": [...], ...} to OUT.json. tests/test_distributed.py
compares the trajectories of the two launches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import DemoTaskConfig, DPOConfig, KTOConfig, SFTConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows, tokenize_unpaired_rows
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.recipes import kto, preference, sft

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
STEPS = 5
KEYS = ("loss", "grad_norm", "mean_token_accuracy", "rewards/margins", "kl", "eval_loss")


def _recorder(into: list):
    def log(metrics: dict, step: int) -> None:
        into.append({"step": step, **{k: float(metrics[k]) for k in KEYS if k in metrics}})

    return log


def _full_weights(model: torch.nn.Module) -> dict:
    """`model.state_dict()` with whole tensors on every process (FSDP2 holds DTensor shards:
    `full_tensor()` all-gathers them; every process calls this in the same order)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()}


def _weights_digest(model: torch.nn.Module) -> float:
    """A scalar summary of the trained weights (sum of |w|), equal across equal runs."""
    return float(sum(w.detach().abs().sum() for w in _full_weights(model).values()))


def fsdp_accelerator() -> Accelerator:
    """An Accelerator whose `prepare` shards the model with FSDP2 over gloo on this CPU.

    accelerate only selects FSDP for GPU-family devices: with `cpu=True` it picks MULTI_CPU and
    ignores an `fsdp_plugin` (accelerate 1.16, state.py). torch's FSDP2 (`fully_shard`) itself
    runs on CPU with gloo, so the state is set to FSDP after construction: `prepare` then takes
    accelerate's FSDP2 path (per-decoder-layer `fully_shard`, DTensor parameters), as it does
    on GPUs with infra/accelerate/fsdp.yaml."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen2DecoderLayer"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = fsdp_accelerator() if args.fsdp else Accelerator(cpu=True)
    tokenizer = build_tiny_tokenizer()
    demo_cfg = DemoTaskConfig(num_train=200, num_eval=16)
    common = {"max_steps": STEPS, "per_device_batch_size": args.batch, "warmup_steps": 0,
              "eval_every": STEPS, "log_every": 1, "max_length": 48, "seed": 3,
              "grad_accum": args.grad_accum, "lr_scheduler": "constant"}
    out: dict = {"world_size": accelerator.num_processes,
                 "distributed_type": str(accelerator.distributed_type)}

    rows = demo.generate_sft(demo_cfg, 0, "train")
    examples, _ = tokenize_sft_rows(rows, tokenizer, max_length=48)
    model = build_tiny_model(TINY, tokenizer)
    history: list = []
    sft.train(model, examples, examples[:16],
              SFTConfig(**common, learning_rate=3e-3, packing=args.packing),
              pad_token_id=tokenizer.pad_token_id, log_metrics=_recorder(history),
              accelerator=accelerator)
    # FSDP2 shards every decoder layer (accelerate 1.16 leaves the tied embedding and the final
    # norm whole on each process: the trajectory shows their gradients are still synchronized).
    out["sharded"] = all(type(p).__name__ == "DTensor"
                         for n, p in model.named_parameters() if ".layers." in n)
    out["sft"], out["sft_weights"] = history, _weights_digest(model)
    sft_weights = _full_weights(model)

    pairs = {}
    for split in ("train", "eval"):
        pairs[split], _ = tokenize_preference_rows(
            demo.generate_preference(demo_cfg, 0, split), tokenizer, max_length=48)
    policy = build_tiny_model(TINY, tokenizer)  # a fresh module: `model` is wrapped in DDP
    policy.load_state_dict(sft_weights)
    history = []
    preference.train("dpo", policy, pairs["train"], pairs["eval"],
                     DPOConfig(**common, learning_rate=1e-3),
                     pad_token_id=tokenizer.pad_token_id, log_metrics=_recorder(history),
                     accelerator=accelerator)
    out["dpo"], out["dpo_weights"] = history, _weights_digest(policy)

    rows = {}
    for split in ("train", "eval"):
        rows[split], _ = tokenize_unpaired_rows(
            demo.generate_kto(demo_cfg, 0, split), tokenizer, max_length=48)
    policy = build_tiny_model(TINY, tokenizer)
    policy.load_state_dict(sft_weights)
    history = []
    # Two rows per process: z_ref must be the whole micro-batch's, not each shard's.
    kto.train(policy, rows["train"], rows["eval"], KTOConfig(**common, learning_rate=3e-3),
              pad_token_id=tokenizer.pad_token_id, log_metrics=_recorder(history),
              accelerator=accelerator)
    out["kto"], out["kto_weights"] = history, _weights_digest(policy)

    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(out, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
