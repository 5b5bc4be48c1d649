"""Crash and resume: a stage killed mid-run resumes from its last complete checkpoint (model,
optimizer, scheduler, RNG, data position) and its loss curve then equals an uninterrupted run's;
a half-written or corrupted checkpoint is never used. (A kill -9 of the `posttrain` command
and its rerun: tests/test_crash.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain import checkpoints
from posttrain.config import (
    DemoTaskConfig,
    DPOConfig,
    SFTConfig,
    TinyModelConfig,
)
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.recipes import preference, sft

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
