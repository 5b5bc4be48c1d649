"""Only the work a run needs: reference log-probs are precomputed for the rows the run's
micro-batches will hold (in the sampler's seeded order, across epochs and processes) and for the
held-out rows it evaluates (`max_eval_rows`), and the loss is the one of a full precompute."""

from __future__ import annotations

import pytest

from posttrain import training
from posttrain.config import DemoTaskConfig, DPOConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.preference import tokenize_preference_rows
from posttrain.models import build_tiny_model
from posttrain.recipes import preference
from posttrain.training import endless_batches, rows_used

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)


@pytest.mark.parametrize(("n", "batch_size", "world_size", "num_batches"),
                         [(10, 2, 2, 3), (10, 4, 1, 2), (7, 3, 1, 5), (12, 2, 3, 100)])
def test_rows_used_are_the_rows_the_batches_hold(n, batch_size, world_size, num_batches):
    """(10, 2, 2, 3): an epoch holds 10 // 4 = 2 global batches (8 rows, 2 dropped), so 3
    batches are epoch 0's 8 rows plus the first 4 of epoch 1's order; (12, 2, 3, 100) runs
    through every row."""
    held = set()
    for rank in range(world_size):
        batches = endless_batches(list(range(n)), batch_size, list, seed=5, rank=rank,
                                  world_size=world_size)
        for _ in range(num_batches):
            held.update(next(batches))
    assert rows_used(n, batch_size, num_batches, seed=5, world_size=world_size) == sorted(held)
    if (n, num_batches) == (10, 3):
        assert 8 <= len(held) <= 10
    if num_batches == 100:
        assert sorted(held) == list(range(n))


@pytest.fixture(scope="module")
def pairs(tokenizer):
    cfg = DemoTaskConfig(num_train=400, num_eval=20)
    return [tokenize_preference_rows(demo.generate_preference(cfg, 0, split), tokenizer,
                                     max_length=48)[0] for split in ("train", "eval")]


def _run(policy, pairs, tokenizer, monkeypatch) -> tuple[list[float], list[int]]:
    """Per-step losses and the number of rows of each precompute call."""
    sizes = []
    real = preference.precompute_reference

    def counted(model, rows, **kw):
        sizes.append(len(rows))
        return real(model, rows, **kw)

    monkeypatch.setattr(preference, "precompute_reference", counted)
    history: list[dict] = []
    cfg = DPOConfig(max_steps=2, per_device_batch_size=4, learning_rate=1e-2, warmup_steps=0,
                    eval_every=1, log_every=1, max_eval_rows=4, seed=3)
    preference.train("dpo", policy, pairs[0], pairs[1], cfg, pad_token_id=tokenizer.pad_token_id,
                     log_metrics=lambda m, s: history.append(dict(m)))
    return [m["loss"] for m in history] + [history[-1]["eval_loss"]], sizes


def test_dpo_precomputes_only_the_rows_it_trains_on(pairs, tokenizer, monkeypatch):
    """2 steps x batch 4 of 400 pairs: 8 training rows and the 4 held-out rows evaluated get
    reference log-probs, and the losses are those of precomputing all 400."""
    assert len(pairs[0]) == 400
    losses, sizes = _run(build_tiny_model(TINY, tokenizer), pairs, tokenizer, monkeypatch)
    assert sizes == [8, 4]
    monkeypatch.setattr(training.batches, "rows_used", lambda n, *args, **kwargs: list(range(n)))
    full_losses, full_sizes = _run(build_tiny_model(TINY, tokenizer), pairs, tokenizer,
                                   monkeypatch)
    assert full_sizes == [400, 4]
    assert losses == pytest.approx(full_losses, abs=1e-6)
    assert losses[1] != pytest.approx(losses[0], abs=1e-4)  # it trained between the steps
