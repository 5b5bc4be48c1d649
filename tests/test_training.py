"""The shared training pieces (posttrain/training/) on toy models: gradient accumulation equals
one big batch, endless batches reshuffle, drop the ragged tail and shard disjointly, the optimizer
warms up, `fit` logs and evaluates when configured, and reference runners pick the right model."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from posttrain.config import TrainingConfig
from posttrain.training import (
    Objective,
    accumulate,
    build_optimizer,
    endless_batches,
    fit,
    reference_runner,
)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _toy(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


class SquaredError(Objective):
    """Squared error SUMMED over the micro-batch's rows, as `accumulate` expects; one item a
    row."""

    def __init__(self, net, evaluate=None):
        self.net, self.held_out, self.evaluates = net, evaluate, evaluate is not None

    def count(self, batch):
        return len(batch["y"])

    def loss(self, batch):
        err = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)  # (n,)
        return err.sum(), {"sq": float(err.detach().sum()), "rows": float(len(err))}

    def evaluate(self):
        return self.held_out()


class PositiveY(SquaredError):
    """Also the mean of y over the rows with y > 0 alone, a (sum, count) metric."""

    def loss(self, batch):
        err = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        positive = batch["y"] > 0
        return err.sum(), {"pos_y": (float(batch["y"][positive].sum()), int(positive.sum()))}


# ------------------------------------------------------------------------------ accumulate


def test_accumulate_uneven_micro_batches_equal_one_big_batch(accelerator):
    """Micro-batches of 2 and 6 rows: the accumulated gradient is that of the 8-row mean.

    A mean of per-micro-batch means would weigh the 2 rows of the first micro-batch 3x as much as
    the 6 rows of the second; the test checks that this differs, so it can tell the two apart.
    """
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    micro = [{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}]

    net = _toy()
    metrics, total = accumulate(accelerator, net, micro, SquaredError(net))
    accumulated = [p.grad.clone() for p in net.parameters()]

    big = _toy()
    (big(x).squeeze(-1) - y).pow(2).mean().backward()
    expected = [p.grad.clone() for p in big.parameters()]

    means = _toy()
    for mb in micro:
        ((means(mb["x"]).squeeze(-1) - mb["y"]).pow(2).mean() / len(micro)).backward()
    mean_of_means = [p.grad.clone() for p in means.parameters()]

    assert total == 8
    for got, want, wrong in zip(accumulated, expected, mean_of_means):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(got, wrong, atol=1e-4)
    with torch.no_grad():
        mse = float((big(x).squeeze(-1) - y).pow(2).mean())
    assert metrics["sq"] == pytest.approx(mse, rel=1e-6)  # global per-item mean
    assert metrics["rows"] == pytest.approx(1.0)


def test_accumulate_subset_means_count_their_own_items(accelerator):
    """A (sum, count) metric is a mean over its own items: here the rows with y > 0. Micro-batch
    one has y = (1, -1) -> (1.0, 1), micro-batch two y = (-2, -3, -4) -> none of them (0.0, 0):
    the metric is 1.0 (not a NaN from the empty micro-batch, nor 1.0 * 2 / 5 per item). With
    no such row anywhere it is NaN (undefined), never 0."""
    net = _toy()
    x = torch.zeros(5, 3)
    micro = [{"x": x[:2], "y": torch.tensor([1.0, -1.0])},
             {"x": x[2:], "y": torch.tensor([-2.0, -3.0, -4.0])}]
    metrics, _ = accumulate(accelerator, net, micro, PositiveY(net))
    assert metrics["pos_y"] == 1.0
    metrics, _ = accumulate(accelerator, net, micro[1:], PositiveY(net))
    assert math.isnan(metrics["pos_y"])


# --------------------------------------------------------------------------- endless_batches


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_endless_batches_reshuffle_each_epoch_and_drop_the_tail():
    units = list(range(10))
    it = endless_batches(units, 3, list, seed=7)
    epochs = [_take(it, 3) for _ in range(4)]  # 10 // 3 = 3 full batches per epoch
    seen = []
    for batches in epochs:
        assert all(len(b) == 3 for b in batches)
        flat = [u for b in batches for u in b]
        assert len(set(flat)) == 9  # no repeats within an epoch, the 10th unit is dropped
        seen.append(flat)
    assert len({tuple(s) for s in seen}) == 4, "every epoch has a new order"
    dropped = {(set(units) - set(s)).pop() for s in seen}
    assert len(dropped) > 1, "the dropped unit changes with the shuffle"
    # deterministic from the seed, different for another seed
    again = endless_batches(units, 3, list, seed=7)
    assert _take(again, 12) == [b for batches in epochs for b in batches]
    other = endless_batches(units, 3, list, seed=8)
    assert _take(other, 3) != epochs[0]


def test_endless_batches_shard_disjointly_across_processes():
    units = list(range(11))
    r0 = endless_batches(units, 2, list, seed=3, rank=0, world_size=2)
    r1 = endless_batches(units, 2, list, seed=3, rank=1, world_size=2)
    for _ in range(3):  # 11 // (2 * 2) = 2 batches per process per epoch
        a, b = _take(r0, 2), _take(r1, 2)
        flat_a, flat_b = [u for x in a for u in x], [u for x in b for u in x]
        assert all(len(x) == 2 for x in a + b)
        assert not set(flat_a) & set(flat_b), "processes must never share a unit in one epoch"
        assert len(set(flat_a) | set(flat_b)) == 8


def test_endless_batches_too_few_units_is_a_clear_error():
    with pytest.raises(ValueError, match="3 KTO examples cannot fill one batch of 2 per "
                                         "process x 2 processes"):
        next(endless_batches([1, 2, 3], 2, list, seed=0, world_size=2, what="KTO examples"))
    # exactly enough is fine
    assert next(endless_batches([1, 2, 3, 4], 2, list, seed=0, rank=1, world_size=2)) != []


# -------------------------------------------------------------------- optimizer, schedule, fit


def test_build_optimizer_warms_up_linearly_then_holds_for_constant():
    net = _toy()
    cfg = TrainingConfig(learning_rate=1e-2, warmup_steps=4, max_steps=10,
                         lr_scheduler="constant", weight_decay=0.1)
    optimizer, scheduler = build_optimizer(list(net.parameters()), cfg)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2])


def test_build_optimizer_schedules_every_update_of_a_step():
    """PPO: 2 steps of 3 updates, 1 warm-up step -> 3 warm-up updates (0, 1/3, 2/3 of the
    peak), then linear decay over the remaining 3 of 6 updates: 1, 2/3, 1/3."""
    net = _toy()
    cfg = TrainingConfig(learning_rate=3e-2, warmup_steps=1, max_steps=2, lr_scheduler="linear")
    optimizer, scheduler = build_optimizer(list(net.parameters()), cfg, updates_per_step=3)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 1e-2, 2e-2, 3e-2, 2e-2, 1e-2])


def test_fit_steps_logs_and_evaluates_on_schedule(accelerator):
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5])
    x = torch.randn(64, 3, generator=g)
    rows = [{"x": x[i], "y": x[i] @ w} for i in range(64)]

    def collate(ex):
        return {"x": torch.stack([e["x"] for e in ex]), "y": torch.stack([e["y"] for e in ex])}

    net = _toy()
    with torch.no_grad():
        start_mse = float((net(x).squeeze(-1) - x @ w).pow(2).mean())
    cfg = TrainingConfig(max_steps=30, per_device_batch_size=8, grad_accum=2, learning_rate=0.1,
                         warmup_steps=0, lr_scheduler="constant", log_every=10, eval_every=15,
                         max_grad_norm=None)
    optimizer, scheduler = build_optimizer(list(net.parameters()), cfg)
    modes = []

    def evaluate():
        modes.append((net.training, torch.is_grad_enabled()))
        with torch.no_grad():
            return {"eval_mse": float((net(x).squeeze(-1) - x @ w).pow(2).mean())}

    logged: list[tuple[int, dict]] = []
    final = fit(accelerator, net, optimizer, scheduler, list(net.parameters()),
                endless_batches(rows, 8, collate, seed=0), cfg, name="toy",
                objective=SquaredError(net, evaluate),
                log_metrics=lambda m, s: logged.append((s, dict(m))))
    assert [s for s, _ in logged] == [10, 15, 20, 30]
    assert modes == [(False, False), (False, False)]  # evaluated at 15 and 30, eval mode, no grad
    assert "eval_mse" in dict(logged)[15] and "eval_mse" not in dict(logged)[10]
    assert net.training
    assert final["eval_mse"] < start_mse / 20  # the loop actually optimizes
    assert final["rows"] == pytest.approx(1.0)
    assert set(final) >= {"grad_norm", "learning_rate"}


# ------------------------------------------------------------------------- reference_runner


def test_reference_runner_modes():
    assert reference_runner("precomputed", _toy()) is None
    with pytest.raises(ValueError, match="model.lora"):
        reference_runner("adapter", _toy())
    with pytest.raises(ValueError, match="unknown reference mode 'frozen'"):
        reference_runner("frozen", _toy())


def test_copy_reference_is_frozen_at_creation_and_runs_in_eval_mode_without_grad():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    x = torch.ones(2, 3)
    net.eval()
    before = net(x).detach()
    net.train()
    run = reference_runner("copy", net)
    with torch.no_grad():
        net[0].weight.add_(1.0)  # the policy moves on; the copy must not
    out = run(lambda ref: (ref(x), ref.training, torch.is_grad_enabled()))
    torch.testing.assert_close(out[0], before)  # dropout off: eval mode
    assert out[1:] == (False, False)
    assert net.training
