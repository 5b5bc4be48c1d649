"""Crash and resume: a stage killed mid-run resumes from its last complete checkpoint (model,
optimizer, scheduler, RNG, data position) and its loss curve then equals an uninterrupted run's;
a half-written or corrupted checkpoint is never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import checkpoints, stages, tracking
from posttrain.config import (
    DemoTaskConfig,
    DPOConfig,
    PipelineConfig,
    SFTConfig,
    TinyModelConfig,
    validate,
)
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.recipes import preference, sft
from tests.conftest import SFT_STAGE, tiny_pipeline_values

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64)


class Crash(Exception):
    pass


def _crash_after(step: int, history: list):
    def log(metrics, s):
        history.append((s, metrics["loss"]))
        if s == step:
            raise Crash(f"crash after step {s}")
    return log


def _curve(train, ckpt: Path, crash_at: int | None) -> list[tuple[int, float]]:
    history: list = []
    log = _crash_after(crash_at, history) if crash_at else (lambda m, s: history.append(
        (s, m["loss"])))
    try:
        train(log, ckpt)
    except Crash:
        pass
    return history


def _assert_resumed(train, tmp_path):
    full = _curve(train, tmp_path / "a", None)
    crashed = _curve(train, tmp_path / "b", crash_at=5)  # checkpoints at 2 and 4
    resumed = _curve(train, tmp_path / "b", None)
    assert [s for s, _ in crashed] == [1, 2, 3, 4, 5]
    assert [s for s, _ in resumed] == [5, 6, 7, 8]  # from the step-4 checkpoint
    expected = dict(full)
    for s, loss in resumed:
        assert loss == pytest.approx(expected[s], abs=1e-4)


def test_sft_resumes_exactly(tmp_path):
    tok = build_tiny_tokenizer()
    rows = demo.generate_sft(DemoTaskConfig(), 0, "train")[:200]
    examples, _ = tokenize_sft_rows(rows, tok, max_length=48)
    cfg = SFTConfig(max_steps=8, per_device_batch_size=4, learning_rate=3e-3, warmup_steps=3,
                    max_length=48, eval_every=100, log_every=1, checkpoint_every=2)

    def train(log, ckpt):
        sft.train(build_tiny_model(TINY, tok), examples, examples[:4], cfg,
                  pad_token_id=tok.pad_token_id, log_metrics=log, checkpoint_dir=ckpt)

    _assert_resumed(train, tmp_path)


def test_dpo_resumes_exactly(tmp_path):
    tok = build_tiny_tokenizer()
    rows = demo.generate_preference(DemoTaskConfig(), 0, "train")[:100]
    pairs, _ = tokenize_preference_rows(rows, tok, max_length=48)
    cfg = DPOConfig(max_steps=8, per_device_batch_size=4, learning_rate=1e-3, warmup_steps=3,
                    max_length=48, eval_every=100, log_every=1, checkpoint_every=2)

    def train(log, ckpt):
        preference.train("dpo", build_tiny_model(TINY, tok), pairs, pairs[:4], cfg,
                         pad_token_id=tok.pad_token_id, log_metrics=log, checkpoint_dir=ckpt)

    _assert_resumed(train, tmp_path)


def test_half_written_and_corrupted_checkpoints_are_not_used(tmp_path, caplog):
    tok = build_tiny_tokenizer()
    rows = demo.generate_sft(DemoTaskConfig(), 0, "train")[:100]
    examples, _ = tokenize_sft_rows(rows, tok, max_length=48)
    cfg = SFTConfig(max_steps=4, per_device_batch_size=4, warmup_steps=0, max_length=48,
                    eval_every=100, checkpoint_every=2)
    sft.train(build_tiny_model(TINY, tok), examples, examples[:4], cfg,
              pad_token_id=tok.pad_token_id, checkpoint_dir=tmp_path)
    assert checkpoints.latest_valid(tmp_path)[1] == 4
    # A crash while writing step 6 leaves only a temporary folder: step 4 stays the latest.
    half = tmp_path / ".tmp-step-000006-deadbeef"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert checkpoints.latest_valid(tmp_path)[1] == 4
    # A corrupted step 4 is refused with a message; step 2 is used.
    weights = next((tmp_path / "step-000004").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with caplog.at_level("WARNING"):
        assert checkpoints.latest_valid(tmp_path)[1] == 2
    assert "refusing checkpoint" in caplog.text and "does not match" in caplog.text


CHILD = """
import sys, json
from posttrain import stages
from posttrain.config import PipelineConfig, validate
cfg = validate(PipelineConfig, json.loads(sys.argv[1]))
data = stages.run_data_stage(cfg)
stages.run_training_stage(cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))
"""


def _run_sft(cfg: PipelineConfig) -> dict:
    """The data stage, then the pipeline's SFT stage (named 'sft', from the base model)."""
    data = stages.run_data_stage(cfg)
    return stages.run_training_stage(cfg, "sft", stages.inputs_for(cfg.stage("sft"), data, {}))


def _loss_history(experiment: str) -> list[dict[int, float]]:
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], "tags.`posttrain.stage` = 'sft'",
                         order_by=["attributes.start_time ASC"])
    return [{m.step: m.value for m in c.get_metric_history(r.info.run_id, "loss")} for r in runs]


@pytest.mark.slow
def test_sft_stage_killed_with_sigkill_resumes_on_the_next_run(tmp_path):
    sft_cfg = {"max_steps": 300, "checkpoint_every": 25, "log_every": 1, "eval_every": 1000,
               "warmup_steps": 5}
    killed_values = tiny_pipeline_values(tmp_path / "k", stages=[{**SFT_STAGE, **sft_cfg}])
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(killed_values)],
                             env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    ckpt_root = tmp_path / "k" / "artifacts" / "sft"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_root.glob("*.checkpoints/step-000050")):
        assert child.poll() is None, "the stage finished before it could be killed"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not list(ckpt_root.glob("*/manifest.json"))  # no artifact from the killed run

    cfg = validate(PipelineConfig, killed_values)
    manifest = _run_sft(cfg)
    assert not manifest["cached"]
    _killed, resumed = _loss_history(cfg.tracking.experiment)
    start = min(resumed)
    assert start > 50 and start % 25 == 1  # resumed after a checkpoint, not from scratch

    clean = validate(PipelineConfig, tiny_pipeline_values(tmp_path / "c",
                                                        stages=[{**SFT_STAGE, **sft_cfg}]))
    _run_sft(clean)
    (full,) = _loss_history(clean.tracking.experiment)
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-4), step


def test_grpo_resumes_exactly(tmp_path):
    from posttrain.config import GRPOConfig
    from posttrain.recipes import grpo

    tok = build_tiny_tokenizer()
    prompts = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4)
               for b in range(4)]
    cfg = GRPOConfig(max_steps=8, per_device_batch_size=16, num_generations=4,
                     learning_rate=3e-3, warmup_steps=3, max_length=32, max_completion_length=5,
                     eval_every=100, log_every=1, checkpoint_every=2)

    def sevens(prompts, completions, **_):  # conversational prompts: message-list completions
        texts = [c[0]["content"] for c in completions]
        return [t.count("7") / max(len(t), 1) for t in texts]

    def train(log, ckpt):
        grpo.train(build_tiny_model(TINY, tok), tok, prompts, prompts[:2], cfg,
                   reward_fns={"sevens": sevens}, weights={"sevens": 1.0}, log_metrics=log,
                   checkpoint_dir=ckpt)

    _assert_resumed(train, tmp_path)


def test_ppo_resumes_exactly(tmp_path):
    """PPO killed after rollout batch 5 resumes from its step-4 checkpoint (policy, value model,
    shared optimizer, scheduler, sampling RNG, prompt position) and logs the same losses as the
    uninterrupted run; the reference stays the starting policy."""
    from posttrain.config import PPOConfig
    from posttrain.models import save_model
    from posttrain.recipes import ppo
    from posttrain.rewards import load_reward_model

    tok = build_tiny_tokenizer()
    save_model(build_tiny_model(TINY.model_copy(update={"seed": 1}), tok), tok, tmp_path / "rm")
    prompts = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4)
               for b in range(4)]
    cfg = PPOConfig(max_steps=8, per_device_batch_size=4, num_mini_batches=2, num_ppo_epochs=2,
                    learning_rate=3e-3, warmup_steps=3, max_length=32, max_completion_length=5,
                    log_every=1, checkpoint_every=2)

    def train(log, ckpt):
        def as_loss(metrics, step):  # _curve records "loss"
            log({**metrics, "loss": metrics["loss/policy_avg"] + metrics["loss/value_avg"]},
                step)

        ppo.train(build_tiny_model(TINY, tok), load_reward_model(tmp_path / "rm", new_head=True),
                  load_reward_model(tmp_path / "rm", new_head=True), tok, prompts, cfg,
                  log_metrics=as_loss, checkpoint_dir=ckpt)

    _assert_resumed(train, tmp_path)
