"""Every model a stage runs lives on the accelerator's device.

There is no second device on this machine, so the check makes one up: the accelerator's device
becomes `cpu:0`, a device torch accepts (tensors land on the CPU) but that compares unequal to
the plain `cpu` every model is built on. `Module.to(device)` stamps the module tree with the
device it was sent to (a deep copy keeps the stamp, as a copy of a placed model is on that device
too), and a global forward pre-hook records every module with parameters or buffers of its own
whose forward runs without the accelerator's stamp. A model that is never moved, moved before a
copy was taken, or moved to a hard-coded 'cpu' is caught; on a GPU each of these would be a
device-mismatch error at its first forward.

Covered: DPO (precomputed and frozen-copy reference), KTO, GRPO with β > 0 and a reward-model
reward function (built as the online stage builds it), PPO (policy, value, reward, reference)
and the evaluation stage (every candidate and the reward scorer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from posttrain.config import (
    DemoTaskConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    PipelineConfig,
    PPOConfig,
    TinyModelConfig,
)
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows, tokenize_unpaired_rows
from posttrain.models import build_tiny_model, save_model
from posttrain.rewards import load_reward_model
from tests.conftest import tiny_pipeline_values

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
DEVICE = torch.device("cpu", 0)  # the made-up accelerator device


@pytest.fixture
def off_device(monkeypatch):
    """The names of modules whose forward ran off the accelerator's device (must stay empty)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "device", property(lambda self: DEVICE))
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            for m in self.modules():
                m.__dict__["_placed_on"] = device
        return out

    monkeypatch.setattr(torch.nn.Module, "to", to)
    seen: list[str] = []

    def check(module, args):
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and module.__dict__.get("_placed_on") != DEVICE:
            seen.append(type(module).__name__)

    handle = register_module_forward_pre_hook(check)
    yield seen
    handle.remove()


def _ran_on_device(seen: list[str]) -> None:
    assert not seen, f"forwards off the accelerator's device: {sorted(set(seen))}"


def _pairs(tokenizer, n_train=16, n_eval=4):
    cfg = DemoTaskConfig(num_train=n_train, num_eval=n_eval)
    return [tokenize_preference_rows(demo.generate_preference(cfg, 0, s), tokenizer,
                                     max_length=48)[0] for s in ("train", "eval")]


SMALL = {"max_steps": 1, "per_device_batch_size": 4, "warmup_steps": 0, "eval_every": 1,
         "log_every": 1, "max_length": 48}


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_dpo_runs_policy_and_reference_on_the_device(tokenizer, off_device, reference):
    from posttrain.recipes import preference

    train, held = _pairs(tokenizer)
    preference.train("dpo", build_tiny_model(TINY, tokenizer), train, held,
                     DPOConfig(**SMALL, reference=reference), pad_token_id=tokenizer.pad_token_id)
    _ran_on_device(off_device)


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_kto_runs_policy_and_reference_on_the_device(tokenizer, off_device, reference):
    from posttrain.recipes import kto

    cfg = DemoTaskConfig(num_train=16, num_eval=4)
    train, held = [tokenize_unpaired_rows(demo.generate_kto(cfg, 0, s), tokenizer,
                                          max_length=48)[0] for s in ("train", "eval")]
    kto.train(build_tiny_model(TINY, tokenizer), train, held,
              KTOConfig(**SMALL, reference=reference), pad_token_id=tokenizer.pad_token_id)
    _ran_on_device(off_device)


def _reward_dir(tokenizer, tmp_path: Path) -> Path:
    out = tmp_path / "reward"
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 1}), tokenizer), tokenizer,
               out / "model")
    return out


def test_grpo_runs_reference_and_reward_model_on_the_device(tokenizer, off_device, tmp_path):
    """β > 0 (a reference copy) and the reward model as a reward function, built by the online
    stage's own helper with the run's accelerator."""
    from posttrain.recipes import grpo
    from posttrain.stages import online
    from posttrain.training import make_accelerator

    cfg = GRPOConfig(**{**SMALL, "per_device_batch_size": 4}, num_generations=2, beta=0.1,
                     max_completion_length=3, reward_functions={"reward_model": 1.0})
    accelerator = make_accelerator()
    fns, weights = online._reward_functions(cfg, {"path": str(_reward_dir(tokenizer, tmp_path))},
                                            tokenizer, accelerator)
    prompts = [{"prompt": f"{a}+{a}="} for a in range(4)]
    grpo.train(build_tiny_model(TINY, tokenizer), tokenizer, prompts, prompts[:2], cfg,
               reward_fns=fns, weights=weights, accelerator=accelerator)
    _ran_on_device(off_device)


def test_ppo_runs_all_four_models_on_the_device(tokenizer, off_device, tmp_path):
    from posttrain.recipes import ppo

    rm = _reward_dir(tokenizer, tmp_path) / "model"
    cfg = PPOConfig(**{**SMALL, "per_device_batch_size": 2}, num_ppo_epochs=1,
                    max_completion_length=3)
    ppo.train(build_tiny_model(TINY, tokenizer), load_reward_model(rm, new_head=True),
              load_reward_model(rm), tokenizer, [{"prompt": f"{a}+{a}="} for a in range(4)], cfg)
    _ran_on_device(off_device)


def test_evaluation_runs_every_candidate_and_the_scorer_on_the_device(tokenizer, off_device,
                                                                       tmp_path):
    from posttrain.data.loading import write_jsonl
    from posttrain.data.validation import PREFERENCE, PROMPT_COMPLETION
    from posttrain.stages import evaluate as eval_stage

    cfg = PipelineConfig(**tiny_pipeline_values(tmp_path, evaluate={"max_prompts": 3}))
    demo_cfg = DemoTaskConfig(num_train=4, num_eval=4)
    data = tmp_path / "data"
    write_jsonl(demo.generate_sft(demo_cfg, 0, "eval"), data / "sft_eval.jsonl")
    write_jsonl(demo.generate_preference(demo_cfg, 0, "eval"), data / "preference_eval.jsonl")
    manifest = {"path": str(data), "datasets": {
        "sft": {"format": PROMPT_COMPLETION, "checker": "demo"},
        "preference": {"format": PREFERENCE}}}
    trained = tmp_path / "dpo"
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 2}), tokenizer), tokenizer,
               trained / "model")
    results = eval_stage._evaluate_all(cfg, manifest, {"dpo": {"path": str(trained)}},
                                       {"path": str(_reward_dir(tokenizer, tmp_path))})
    assert set(results) == {"base", "dpo"} and "reward_score" in results["dpo"].metrics
    _ran_on_device(off_device)


@pytest.fixture
def bf16_accelerator():
    """An accelerator with bf16 autocast (on the CPU here), in a fresh accelerate state: one
    process keeps one mixed-precision setting otherwise. Reset again afterwards."""
    from accelerate.state import AcceleratorState

    from posttrain.training import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    yield make_accelerator("bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_dpo_reference_computes_in_the_policys_precision(tokenizer, bf16_accelerator,
                                                          reference):
    """Under bf16 autocast the reference forward (precomputed or a frozen copy) runs in the
    same precision as the policy's training forward, so with policy = reference the first
    loss is ln 2 to float precision (a float32 reference against the bf16 policy: 3.5e-5 off)."""
    import math

    from posttrain.recipes import preference

    assert bf16_accelerator.mixed_precision == "bf16"
    train, held = _pairs(tokenizer)
    history: list[dict] = []
    preference.train("dpo", build_tiny_model(TINY, tokenizer), train, held,
                     DPOConfig(**SMALL, reference=reference), pad_token_id=tokenizer.pad_token_id,
                     accelerator=bf16_accelerator, log_metrics=lambda m, s: history.append(m))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
