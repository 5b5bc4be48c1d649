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


def test_grpo_select_best_resumes_to_the_same_best_step(tmp_path):
    """select_best's best step and weights are in the checkpoint: a run killed after step 5
    resumes from step 4 and still selects step 2 (scripted: eval/reward is 0.9 at step 2 and
    lower later), with step 2's weights, as the uninterrupted run."""
    import torch

    from posttrain.config import GRPOConfig
    from posttrain.recipes import grpo

    tok = build_tiny_tokenizer()
    prompts = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4)
               for b in range(4)]
    cfg = GRPOConfig(max_steps=8, per_device_batch_size=16, num_generations=4,
                     learning_rate=3e-3, warmup_steps=3, max_length=32, max_completion_length=5,
                     eval_every=2, log_every=1, checkpoint_every=2, select_best="eval/reward",
                     reward_functions={"m:sevens": 1.0})
    scripted = {2: 0.9, 4: 0.5, 6: 0.3, 8: 0.1}

    def run(ckpt, crash_at=None, start=0):
        step = {"n": start}  # optimizer steps so far: one training reward call each

        def sevens(prompts, completions, **_):
            step["n"] += 1
            texts = [c[0]["content"] for c in completions]
            return [t.count("7") / max(len(t), 1) for t in texts]

        def scripted_eval(prompts, completions, **_):
            return [scripted[step["n"]]] * len(prompts)

        model, snapshots = build_tiny_model(TINY, tok), {}

        def log(metrics, s):
            snapshots[s] = [p.detach().clone() for p in model.parameters()]
            if s == crash_at:
                raise Crash(f"crash after step {s}")

        try:
            final = grpo.train(model, tok, prompts, prompts[:2], cfg,
                               reward_fns={"sevens": sevens}, weights={"sevens": 1.0},
                               eval_reward_fns={"scripted": scripted_eval},
                               eval_weights={"scripted": 1.0}, log_metrics=log,
                               checkpoint_dir=ckpt)
        except Crash:
            final = None
        return model, final, snapshots

    full, final, snapshots = run(tmp_path / "a")
    assert final["best_step"] == 2 and final["best/eval/reward"] == pytest.approx(0.9)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), snapshots[2]))
    _, crashed, _ = run(tmp_path / "b", crash_at=5)
    assert crashed is None and checkpoints.latest_valid(tmp_path / "b")[1] == 4
    resumed, again, later = run(tmp_path / "b", start=4)
    assert min(later) == 5  # it did resume from step 4
    assert again["best_step"] == 2 and again["best/eval/reward"] == pytest.approx(0.9)
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


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


# ------------------------------------------------------------ checkpoints kept, signals obeyed


def _sft_run(tmp_path, **settings):
    tok = build_tiny_tokenizer()
    rows = demo.generate_sft(DemoTaskConfig(), 0, "train")[:100]
    examples, _ = tokenize_sft_rows(rows, tok, max_length=48)
    cfg = SFTConfig(**{"max_steps": 8, "per_device_batch_size": 4, "warmup_steps": 0,
                       "max_length": 48, "eval_every": 100, "log_every": 1,
                       "checkpoint_every": 2, **settings})

    def train(log=None):
        return sft.train(build_tiny_model(TINY, tok), examples, examples[:4], cfg,
                         pad_token_id=tok.pad_token_id, log_metrics=log,
                         checkpoint_dir=tmp_path)
    return train


def test_only_the_newest_verified_checkpoints_are_kept(tmp_path, monkeypatch):
    from posttrain import artifacts

    _sft_run(tmp_path, checkpoint_keep=2)()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000006", "step-000008"]

    # A new checkpoint that does not verify fails the step and deletes nothing older.
    def broken(folder, full=True):
        raise artifacts.ArtifactError(f"{folder}: file does not match its digest")
    monkeypatch.setattr(artifacts, "verify", broken)
    with pytest.raises(artifacts.ArtifactError):
        _sft_run(tmp_path / "b", checkpoint_keep=1)()
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-000002"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_at_a_step_boundary(tmp_path, sig):
    """SIGTERM: a checkpoint of the step it stops after, then Interrupted; SIGINT: Interrupted
    at once, the last periodic checkpoint stays the newest. The rerun resumes from there."""
    import os
    import signal

    from posttrain import interrupt

    full: list = []
    _sft_run(tmp_path / "full")(lambda m, s: full.append((s, m["loss"])))

    def send_at_3(metrics, step):
        if step == 3:
            os.kill(os.getpid(), getattr(signal, sig))

    train = _sft_run(tmp_path / "run")
    with pytest.raises(interrupt.Interrupted) as stopped, interrupt.stage("sft"):
        train(send_at_3)
    newest = 3 if sig == "SIGTERM" else 2
    assert str(stopped.value) == (f"interrupted by {sig} during stage 'sft' after step 3; a "
                                  f"rerun resumes it from the checkpoint at step {newest}")
    assert checkpoints.latest_valid(tmp_path / "run")[1] == newest
    resumed: list = []
    train(lambda m, s: resumed.append((s, m["loss"])))
    assert resumed[0][0] == newest + 1
    for (s, loss), (s_full, loss_full) in zip(resumed, full[newest:], strict=True):
        assert s == s_full and loss == pytest.approx(loss_full, abs=1e-4)


def test_a_stage_that_reaches_no_step_boundary_is_stopped_after_the_grace_time(monkeypatch):
    import os
    import signal
    import time

    from posttrain import interrupt

    monkeypatch.setattr(interrupt, "GRACE_SECONDS", 0.2)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), interrupt.stage("dpo"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # e.g. precomputing reference log-probs: no step ends
    assert time.monotonic() - started < 5
