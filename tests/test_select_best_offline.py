"""`select_best` in the offline loop (posttrain/training/loop.py `fit`, SFT, reward, DPO, ORPO, SimPO,
CPO, KTO): the metric names it accepts are the ones each method's evaluation logs, the best
evaluated step's weights are the model the stage ends with, and a resumed run selects the same
step."""

from __future__ import annotations

import pytest
import torch

from posttrain import training
from posttrain.config import (
    CPOConfig,
    DemoTaskConfig,
    DPOConfig,
    KTOConfig,
    ORPOConfig,
    RewardConfig,
    SFTConfig,
    SimPOConfig,
    TinyModelConfig,
)
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows, tokenize_unpaired_rows
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import kto, preference, reward, sft
from posttrain.rewards import load_reward_model

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
SMALL = {"per_device_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0,
         "max_length": 48, "log_every": 1000}


@pytest.fixture(scope="module")
def data(tokenizer):
    task = DemoTaskConfig(num_train=40, num_eval=8)
    examples, _ = tokenize_sft_rows(demo.generate_sft(task, 0, "train"), tokenizer, max_length=48)
    pairs, _ = tokenize_preference_rows(demo.generate_preference(task, 0, "train"), tokenizer,
                                        max_length=48)
    unpaired, _ = tokenize_unpaired_rows(demo.generate_kto(task, 0, "train"), tokenizer,
                                         max_length=48)
    return {"sft": examples, "pairs": pairs, "kto": unpaired}


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _run(method, model, data, tokenizer, cfg, log=None):
    pad = tokenizer.pad_token_id
    kw = {"pad_token_id": pad, "log_metrics": log}
    if method == "sft":
        return sft.train(model, data["sft"], data["sft"][:8], cfg, **kw)
    if method == "kto":
        return kto.train(model, data["kto"], data["kto"][:8], cfg, **kw)
    if method == "reward":
        return reward.train(model, data["pairs"], data["pairs"][:8], cfg, **kw)
    return preference.train(method, model, data["pairs"], data["pairs"][:8], cfg, **kw)


CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "orpo": ORPOConfig,
           "simpo": SimPOConfig, "cpo": CPOConfig, "kto": KTOConfig}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_names_select_best_accepts_are_the_ones_the_method_logs(method, data, tokenizer,
                                                                    tmp_path):
    if method == "reward":
        save_model(build_tiny_model(TINY, tokenizer), tokenizer, tmp_path)
        model = load_reward_model(tmp_path, new_head=True)
    else:
        model = build_tiny_model(TINY, tokenizer)
    cfg = CONFIGS[method](max_steps=1, eval_every=1, **SMALL)
    history = []
    _run(method, model, data, tokenizer, cfg, lambda m, s: history.append(m))
    logged = {k for k in history[-1] if k.startswith("eval_")}
    assert cfg.eval_metric_names() == logged
    with pytest.raises(ValueError, match="select_best: 'eval/reward' is not a metric"):
        CONFIGS[method](select_best="eval/reward")


def test_sft_select_best_keeps_the_lowest_eval_loss_step(data, tokenizer, monkeypatch):
    values = iter([3.0, 1.0, 2.0, 2.5])  # steps 2, 4, 6, 8: the best (min) is step 4
    monkeypatch.setattr(sft, "evaluate_loss", lambda *a: {"eval_loss": next(values)})
    model = build_tiny_model(TINY, tokenizer)
    snapshots = {}
    cfg = SFTConfig(max_steps=8, eval_every=2, select_best="eval_loss", **SMALL)
    assert cfg.best_mode == "min"
    final = _run("sft", model, data, tokenizer, cfg,
                 lambda m, s: snapshots.__setitem__(s, _weights(model)))
    assert sorted(snapshots) == [2, 4, 6, 8]
    assert final["best_step"] == 4 and final["best/eval_loss"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[4]))
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[8]))


def test_dpo_select_best_on_its_real_held_out_accuracy(data, tokenizer):
    model = build_tiny_model(TINY, tokenizer)
    snapshots, values = {}, {}

    def log(m, s):
        snapshots[s] = _weights(model)
        values[s] = m["eval_rewards/margins"]

    cfg = DPOConfig(max_steps=6, eval_every=1, select_best="eval_rewards/margins", **SMALL)
    final = _run("dpo", model, data, tokenizer, cfg, log)
    best = max(values, key=lambda s: (values[s], -s))
    assert final["best_step"] == best
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[best]))


def test_sft_select_best_resumes_to_the_same_step(data, tokenizer, monkeypatch, tmp_path):
    """Killed after step 5, resumed from the step-4 checkpoint: the best (step 2, scripted by
    optimizer step) and its weights come from the checkpoint."""
    scripted = {2: 0.5, 4: 1.0, 6: 2.0, 8: 3.0}
    step = {"n": 0}
    real_step = training.optimizer_step

    def counting(*a, **k):
        step["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(training.loop, "optimizer_step", counting)  # as `fit` calls it
    monkeypatch.setattr(sft, "evaluate_loss", lambda *a: {"eval_loss": scripted[step["n"]]})
    cfg = SFTConfig(max_steps=8, eval_every=2, checkpoint_every=2, select_best="eval_loss",
                    **{**SMALL, "log_every": 1})

    class Crash(Exception):
        pass

    def run(ckpt, crash_at=None):
        model = build_tiny_model(TINY, tokenizer)

        def log(m, s):
            if s == crash_at:
                raise Crash

        try:
            final = sft.train(model, data["sft"], data["sft"][:8], cfg,
                              pad_token_id=tokenizer.pad_token_id, log_metrics=log,
                              checkpoint_dir=ckpt)
        except Crash:
            final = None
        return model, final

    full, final = run(tmp_path / "a")
    assert final["best_step"] == 2
    step["n"] = 0
    assert run(tmp_path / "b", crash_at=5)[1] is None
    step["n"] = 4  # it resumes after step 4
    resumed, again = run(tmp_path / "b")
    assert again["best_step"] == 2 and again["best/eval_loss"] == 0.5
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fit_refuses_select_best_without_an_evaluation(tokenizer):
    from posttrain.training import Objective, build_optimizer, fit, make_accelerator

    class Unevaluated(Objective):
        def count(self, batch):
            return 1

        def loss(self, batch):
            return None, {}

    model = torch.nn.Linear(2, 1)
    cfg = SFTConfig(max_steps=2, select_best="eval_loss", **SMALL)
    optimizer, scheduler = build_optimizer(list(model.parameters()), cfg)
    with pytest.raises(ValueError, match="select_best: eval_loss needs an evaluation"):
        fit(make_accelerator(), model, optimizer, scheduler, list(model.parameters()),
            iter([]), cfg, name="sft", objective=Unevaluated())
