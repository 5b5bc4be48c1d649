"""Bootstrap confidence intervals over prompts (posttrain.bootstrap): hand-computable cases,
pairing, and where they show (comparison chart, CLI table); a pipeline's evaluation carries them
beside every metric, stores per-prompt values, and a registered champion keeps them for a later
gate to pair on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from posttrain import bootstrap

# ------------------------------------------------------------------------------- bootstrap


def test_a_metric_with_zero_variance_has_a_zero_width_interval():
    record = bootstrap.per_item([0.75] * 9)
    assert bootstrap.value(record) == 0.75
    assert bootstrap.interval(record, samples=200, seed=3) == (0.75, 0.75)
    # token-weighted: every row has the same loss per token (2.0), whatever its length
    loss = bootstrap.per_item([2.0, 6.0, 10.0], [1, 3, 5])
    assert bootstrap.interval(loss, samples=100, seed=0) == (2.0, 2.0)


def test_the_interval_is_the_percentiles_of_means_of_resampled_prompts():
    """Eight prompts' checker results, 500 resamples with seed 7, computed directly here."""
    x = np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=float)
    idx = np.random.default_rng(7).integers(0, len(x), size=(500, len(x)))
    want = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    got = bootstrap.interval(bootstrap.per_item(x.tolist()), samples=500, seed=7)
    assert got == pytest.approx(tuple(want), abs=0)
    assert got[0] < bootstrap.value(bootstrap.per_item(x.tolist())) == 0.625 < got[1]
    # a different seed draws other prompts
    assert bootstrap.interval(bootstrap.per_item(x.tolist()), samples=500, seed=8) != got


def test_token_weighted_loss_resamples_rows_of_sum_and_count():
    """Rows (loss sum, tokens): (2, 1), (3, 3), (9, 2): the loss is 14 / 6, not the mean of the
    rows' own means; each resample is sum(sums) / sum(counts) of the drawn rows; perplexity is
    exp of each bound."""
    sums, counts = np.array([2.0, 3.0, 9.0]), np.array([1.0, 3.0, 2.0])
    loss = bootstrap.per_item(sums.tolist(), counts.tolist())
    assert bootstrap.value(loss) == pytest.approx(14 / 6)
    idx = np.random.default_rng(1).integers(0, 3, size=(300, 3))
    want = np.percentile(sums[idx].sum(1) / counts[idx].sum(1), [2.5, 97.5])
    low, high = bootstrap.interval(loss, samples=300, seed=1)
    assert (low, high) == pytest.approx(tuple(want))
    ppl = bootstrap.per_item(sums.tolist(), counts.tolist(), transform="exp")
    assert bootstrap.value(ppl) == pytest.approx(math.exp(14 / 6))
    assert bootstrap.interval(ppl, samples=300, seed=1) == pytest.approx(
        (math.exp(low), math.exp(high)))


def test_items_without_a_value_weigh_nothing():
    """A row without a reference (None) is left out of the value and of every resample."""
    record = bootstrap.per_item([1.0, None, 0.0, None])
    assert bootstrap.value(record) == 0.5
    low, high = bootstrap.interval(record, samples=400, seed=0)
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert bootstrap.interval(bootstrap.per_item([]), samples=10, seed=0) == (
        pytest.approx(math.nan, nan_ok=True),) * 2


def test_pairing_shrinks_the_interval_of_a_difference_of_correlated_values():
    """Two models' per-prompt scores share each prompt's difficulty (spread 1) and differ by a
    small per-prompt amount (spread 0.05) around +0.1: the paired interval is narrow and
    excludes 0; resampling each side on its own is dominated by the difficulty and does not."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1, 100)
    a = difficulty + 0.1 + rng.normal(0, 0.05, 100)
    b = difficulty
    ra, rb = bootstrap.per_item(a.tolist()), bootstrap.per_item(b.tolist())
    paired = bootstrap.paired_difference(ra, rb, samples=1000, seed=0)
    unpaired = bootstrap.unpaired_difference(ra, rb, samples=1000, seed=0)
    assert paired["diff"] == unpaired["diff"] == pytest.approx(float(np.mean(a - b)))
    assert paired["paired"] and not unpaired["paired"]
    assert paired["ci_high"] - paired["ci_low"] < 0.1 * (unpaired["ci_high"] - unpaired["ci_low"])
    assert paired["ci_low"] > 0 > unpaired["ci_low"]
    # a constant shift on every prompt: the paired difference has no uncertainty at all
    shifted = bootstrap.per_item((b + 0.25).tolist())
    exact = bootstrap.paired_difference(shifted, rb, samples=200, seed=0)
    assert exact["ci_low"] == pytest.approx(0.25) and exact["ci_high"] == pytest.approx(0.25)
    # the same seed draws the same prompts for both: a paired difference is the difference of
    # the two models' resampled statistics, computed here directly
    idx = bootstrap.indices(100, 1000, 0)
    want = np.percentile(a[idx].mean(1) - b[idx].mean(1), [2.5, 97.5])
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx(tuple(want))
    flipped = bootstrap.flip(paired)
    assert (flipped["diff"], flipped["ci_low"]) == (-paired["diff"], -paired["ci_high"])
    with pytest.raises(ValueError, match="same items"):
        bootstrap.paired_difference(ra, bootstrap.per_item([1.0]), samples=10, seed=0)


# --------------------------------------------------------------------------------- views


def test_the_chart_draws_intervals_as_error_bars_not_panels():
    from matplotlib.container import ErrorbarContainer

    from posttrain import charts

    comparison = {
        "base": {"checker_accuracy": 0.0, "checker_accuracy_ci_low": 0.0,
                 "checker_accuracy_ci_high": 0.0, "eval_seconds": 1.5},
        "sft": {"checker_accuracy": 0.5, "checker_accuracy_ci_low": 0.3,
                "checker_accuracy_ci_high": 0.7, "eval_seconds": 2.0},
        "dpo": {"checker_accuracy": 0.6, "checker_accuracy_ci_low": 0.4,
                "checker_accuracy_ci_high": 0.9, "eval_seconds": 2.5},
    }
    fig = charts.comparison_chart(comparison)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"checker_accuracy", "eval_seconds"}
    acc = panels["checker_accuracy"]
    (bars,) = [c for c in acc.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in segments] == [
        (0.0, 0.0), (0.3, 0.7), (0.4, 0.9)]
    assert acc.get_ylim()[1] == pytest.approx(0.9 * 1.25)  # room for dpo's upper bound
    assert not [c for c in panels["eval_seconds"].containers
                if isinstance(c, ErrorbarContainer)]
    fig.savefig("/dev/null", format="png")


def _printed(monkeypatch, comparison: dict, width: int = 80) -> str:
    from rich.console import Console

    from pipelines import cli
    from posttrain.config import PipelineConfig

    console = Console(width=width, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli.print_summary({"stages": [], "comparison": comparison}, PipelineConfig())
    return console.export_text()


def test_cli_table_shows_half_widths_under_each_metric_within_80_columns(monkeypatch):
    """Seven models with intervals on every metric and their evaluation time: still one table
    within 80 columns, no cell cut; under each metric a ±95% row of half-widths."""
    from tests.test_cli import SEVEN

    with_ci = {}
    for i, (model, metrics) in enumerate(SEVEN.items()):
        m = dict(metrics)
        for k, v in metrics.items():
            m[k + "_ci_low"], m[k + "_ci_high"] = v - 0.01 * (i + 1), v + 0.03 * (i + 1)
        with_ci[model] = m | {"eval_seconds": 1.25 + i}
    text = _printed(monkeypatch, with_ci)
    lines = text.splitlines()
    assert "\u2026" not in text and max(len(line) for line in lines) <= 80, text
    assert text.count("evaluation (held-out)") == 1
    rows = [line.split()[1:] for line in lines if line.split()[:1] == ["±95%"]]
    assert len(rows) == 6  # one under each of the six metrics
    # half-width (0.03 i + 0.01 i) / 2 = 0.02 i for model i = 1..7, two digits
    assert [float(c) for c in rows[0]] == pytest.approx([0.02 * i for i in range(1, 8)])
    (seconds,) = [line.split()[1:] for line in lines if line.split()[:1] == ["eval_seconds"]]
    assert [float(c) for c in seconds] == pytest.approx([1.25 + i for i in range(7)], abs=0.01)


# ------------------------------------------------------------------------------ pipeline


@pytest.mark.slow
def test_a_pipeline_evaluation_has_intervals_per_prompt_values_and_a_pairable_champion(
        tmp_path):
    from posttrain import promotion, registry, stages
    from posttrain.config import PipelineConfig, validate
    from tests.conftest import tiny_pipeline_values

    values = tiny_pipeline_values(tmp_path, evaluate={"bootstrap_samples": 200})
    cfg = validate(PipelineConfig, values)
    manifests = stages.run_all(cfg)
    ev = manifests["evaluate"]
    comparison = ev["comparison"]
    assert list(comparison) == ["base", "sft"]
    folder = Path(ev["path"])
    per_prompt = json.loads((folder / "per_prompt.json").read_text())
    assert per_prompt["prompts_hash"] and set(per_prompt["models"]) == {"base", "sft"}
    for model, metrics in comparison.items():
        assert metrics["eval_seconds"] > 0
        names = {k for k in metrics if not k.endswith(("_ci_low", "_ci_high"))} - {
            "eval_seconds"}
        assert names == {"checker_accuracy", "eval_loss", "perplexity", "eos_rate",
                         "mean_completion_length", "kl_to_reference", "kl_per_token_to_reference"}
        for name in names:
            low, high = metrics[name + "_ci_low"], metrics[name + "_ci_high"]
            assert low <= metrics[name] + 1e-9 and metrics[name] <= high + 1e-9, (model, name)
            # the per-prompt values give back the metric itself
            record = per_prompt["models"][model][name]
            assert bootstrap.value(record) == pytest.approx(metrics[name], rel=1e-5)
        assert len(per_prompt["models"][model]["checker_accuracy"]["num"]) == 24
    # the reference (base) against itself: KL 0 on every prompt, a zero-width interval
    assert comparison["base"]["kl_to_reference_ci_low"] == 0.0 == \
        comparison["base"]["kl_to_reference_ci_high"]
    paired = json.loads((folder / "paired.json").read_text())
    assert paired["reference"] == "base"
    d = paired["differences"]["sft"]["eval_loss"]
    assert d["diff"] == pytest.approx(comparison["sft"]["eval_loss"]
                                      - comparison["base"]["eval_loss"])
    assert d["ci_low"] <= d["diff"] <= d["ci_high"] < 0  # SFT lowers the loss, surely
    assert ev["paired"] == paired["differences"]

    # Registered with its per-prompt values, the champion pairs with a later evaluation of the
    # same prompts: the same model against itself improves by exactly 0.
    name = f"intervals-{tmp_path.name}"
    from tasks.promote import _model_values

    sft = _model_values(per_prompt, "sft")
    registry.register_champion(name, "sft", manifests["sft"], comparison["sft"],
                                per_prompt=sft)
    stored = registry.champion_per_prompt(name)
    assert stored == sft
    version = registry.champion_version(name)
    assert version.tags[registry.PROMPTS_TAG] == per_prompt["prompts_hash"]
    same = promotion.improvement_interval(sft, stored, "checker_accuracy", "max", samples=100,
                                          seed=0)
    assert same["paired"] and (same["diff"], same["ci_low"], same["ci_high"]) == (0, 0, 0)
    assert "paired by prompt" in same["basis"]

    # Item: champions compared on the same ground. Same held-out set and settings: the stored
    # numbers are used; a champion registered from another ground is downloaded from the
    # registry and re-evaluated on this one (the same model, greedy: the same numbers).
    from tasks.promote import champion_on_current_ground

    metrics, values, basis = champion_on_current_ground(cfg, name, "champion", ev,
                                                        {"sft": manifests["sft"]},
                                                        manifests["data"], None)
    assert values == sft and "registered numbers" in basis
    assert metrics["checker_accuracy"] == comparison["sft"]["checker_accuracy"]
    registry.register_champion(name, "sft", manifests["sft"], {"checker_accuracy": 0.123},
                                per_prompt={**sft, "ground": "another set"})
    metrics, values, basis = champion_on_current_ground(cfg, name, "champion", ev,
                                                        {"sft": manifests["sft"]},
                                                        manifests["data"], None)
    assert "re-evaluated on the current held-out set" in basis
    for k in ("checker_accuracy", "eval_loss", "kl_to_reference", "eos_rate"):
        assert metrics[k] == pytest.approx(comparison["sft"][k], rel=1e-5), k
    assert metrics["checker_accuracy_ci_low"] == comparison["sft"]["checker_accuracy_ci_low"]
    assert values["prompts_hash"] == per_prompt["prompts_hash"]
    assert values["metrics"]["checker_accuracy"] == sft["metrics"]["checker_accuracy"]
    # a champion that cannot be loaded (here: none in the registry): nothing to compare, and why
    metrics, values, basis = champion_on_current_ground(cfg, f"{name}-none", "champion", ev, {},
                                                        manifests["data"], None)
    assert metrics == {} and values is None and "could not be re-evaluated" in basis


def test_the_decision_report_shows_intervals_in_the_cells_not_as_columns():
    from tasks.promote import decision_markdown

    comparison = {"base": {"checker_accuracy": 0.0, "eval_seconds": 1.0},
                  "sft": {"checker_accuracy": 0.5, "checker_accuracy_ci_low": 0.3,
                          "checker_accuracy_ci_high": 0.7, "eval_seconds": 2.0}}
    result = {"promote": False, "winner": None, "registered_model": "m", "version": None,
              "reasons": ["why"], "champion": {"checker_accuracy": 0.4,
                                               "checker_accuracy_ci_low": 0.25,
                                               "checker_accuracy_ci_high": 0.55}}
    text = decision_markdown(result, comparison, "checker_accuracy")
    assert "| stage | checker_accuracy | eval_seconds |" in text
    assert "| sft | 0.5 [0.3, 0.7] | 2 |" in text and "| base | 0 | 1 |" in text
    assert "| *champion* | 0.4 [0.25, 0.55] |  |" in text


def test_the_evaluation_ground_changes_with_what_changes_numbers_only(tmp_path):
    """Batch size, sample count and bootstrap settings leave the ground alone; the generation
    budget, the held-out rows, the reward model or a retrained reference change it."""
    from posttrain.config import PipelineConfig, validate
    from posttrain.stages.evaluate import evaluation_ground
    from tests.conftest import tiny_pipeline_values

    def ground(rows=({"prompt": "a"},), reward=None, candidates=None, **evaluate):
        cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, evaluate=evaluate))
        return evaluation_ground(cfg, list(rows), None, reward,
                                 candidates or {"sft": {"digest": "s1"}})["ground"]

    base = ground()
    assert ground(batch_size=3, num_samples=0, bootstrap_samples=10, bootstrap_seed=5) == base
    assert ground(max_new_tokens=7) != base
    assert ground(rows=({"prompt": "b"},)) != base
    assert ground(reward={"digest": "r"}) != base
    assert ground(reference="sft") != ground(reference="sft",
                                             candidates={"sft": {"digest": "s2"}})
