"""Runs GRPO and PPO on the tiny model, once per process of a (possibly) distributed launch.

    torchrun --nproc_per_node 2 tests/dist_rl_worker.py OUT --prompts 2
    python tests/dist_rl_worker.py OUT --prompts 4      # the same global batch in one process

Every process builds the same models and prompts; the recipes shard the prompts by rank and
sample each shard with the global batch's noise (posttrain.rollout.generate). Unlike
tests/dist_worker.py, EVERY process logs (the online recipes' sampled-batch metrics are its own
shard's): process r writes OUT.r.json with {"grpo": [metrics per step], "grpo_texts": [the
completions it scored, per step], "grpo_weights": digest, "ppo": ..., ...}.
tests/test_distributed.py combines the shards and compares them with the one-process run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.config import GRPOConfig, PPOConfig, TinyModelConfig
from posttrain.models import build_tiny_model, build_tiny_tokenizer, save_model, stop_token_ids
from posttrain.recipes import grpo, ppo
from posttrain.rewards import load_reward_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
STEPS = 4
PROMPTS = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]


class EveryProcessLogs(Accelerator):
    """The recipes hand metrics to `log_metrics` on the main process only; here every process
    logs its own (no checkpoints are written, the one other use of is_main_process)."""

    @property
    def is_main_process(self) -> bool:
        return True


def _recorder(into: list):
    def log(metrics: dict, step: int) -> None:
        into.append({"step": step, **{k: float(v) for k, v in metrics.items()
                                      if k != "seconds_per_step"}})

    return log


def _digest(model: torch.nn.Module) -> float:
    return float(sum(w.detach().abs().sum() for w in model.state_dict().values()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--prompts", type=int, required=True, help="prompts per process")
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = EveryProcessLogs(cpu=True)
    rank = accelerator.process_index
    tokenizer = build_tiny_tokenizer()
    out: dict = {"world_size": accelerator.num_processes, "rank": rank}
    common = {"max_steps": STEPS, "warmup_steps": 0, "eval_every": 1000, "log_every": 1,
              "max_length": 24, "max_completion_length": 6, "seed": 5,
              "lr_scheduler": "constant", "temperature": 0.9, "top_k": 40,
              "generation_backend": "loop"}

    texts: list = []

    def sevens(prompts, completions, **_):
        texts.append(list(completions))
        return [c.count("7") / max(len(c), 1) + 0.1 * len(c) for c in completions]

    # GRPO: G = 2 completions per prompt, one micro-batch, β > 0 (a reference: `kl` logged).
    G = 2
    policy = build_tiny_model(TINY, tokenizer)
    history: list = []
    grpo.train(policy, tokenizer, PROMPTS, PROMPTS[:2],
               GRPOConfig(**common, per_device_batch_size=args.prompts * G, num_generations=G,
                          learning_rate=3e-3, beta=0.1, loss_type="grpo"),
               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
               log_metrics=_recorder(history), accelerator=accelerator)
    out.update(grpo=history, grpo_texts=texts, grpo_weights=_digest(policy))

    # PPO: a tiny reward model (saved by the main process), one minibatch, two epochs.
    reward_dir = Path(f"{args.out}.reward")
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 1}), tokenizer), tokenizer,
               reward_dir)
    accelerator.wait_for_everyone()
    policy = build_tiny_model(TINY, tokenizer)
    with torch.no_grad():  # a louder stop token: completions of several lengths on each shard
        policy.get_output_embeddings().weight[sorted(stop_token_ids(policy, tokenizer))] *= 8
    history = []
    ppo.train(policy, load_reward_model(reward_dir, new_head=True), load_reward_model(reward_dir),
              tokenizer, PROMPTS,
              PPOConfig(**common, per_device_batch_size=args.prompts, num_ppo_epochs=2,
                        num_mini_batches=1, learning_rate=3e-3),
              log_metrics=_recorder(history), accelerator=accelerator)
    out.update(ppo=history, ppo_weights=_digest(policy))

    Path(f"{args.out}.{rank}.json").write_text(json.dumps(out, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
