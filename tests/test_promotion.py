"""The promotion gate: pure decisions (fail-closed cases included) and the registry alias."""

from __future__ import annotations

import json
import math

import pytest

from posttrain import promotion, registry, tracking
from posttrain.config import ConfigError, MetricGuard, PipelineConfig, PromotionConfig

GUARD = MetricGuard(metric="eval_loss", direction="min", tolerance=0.1)
# The evaluation's reference model in these comparisons (evaluate.reference): the guards compare
# against it when there is no champion yet.
REF = "sft"


def _cfg(**kw) -> PromotionConfig:
    """Resolved settings, as promotion.resolve gives them to decide()."""
    return PromotionConfig(**{"metric": "checker_accuracy", "direction": "max",
                              "guards": (GUARD,), **kw})


def _decide(comparison, champion, cfg, reference_model=REF):
    return promotion.decide(comparison, champion, cfg, reference_model=reference_model)


def _m(acc: float, loss: float = 0.5) -> dict:
    return {"checker_accuracy": acc, "eval_loss": loss}


COMPARISON = {"base": _m(0.99, 9.0), "sft": _m(0.70), "dpo": _m(0.85, 0.45), "kto": _m(0.90, 0.55)}


def test_without_champion_the_best_candidate_passing_guards_wins():
    # kto (0.90) is best; its loss regresses 0.05 against SFT's 0.5, within the 0.1 tolerance.
    # base (0.99) is never a candidate.
    d = _decide(COMPARISON, None, _cfg())
    assert d.promote and d.winner == "kto"


def test_a_guard_regression_beyond_tolerance_disqualifies_a_candidate():
    comparison = {**COMPARISON, "kto": _m(0.90, 0.65)}  # loss +0.15 > 0.1
    d = _decide(comparison, None, _cfg())
    assert d.winner == "dpo"
    kto = next(r for r in d.rows if r["stage"] == "kto")
    assert kto["failed_guards"] and "eval_loss" in kto["failed_guards"][0]


def test_every_candidate_failing_a_guard_promotes_nothing():
    d = _decide(COMPARISON, _m(0.5, 0.1), _cfg())  # every loss regresses > 0.1
    assert not d.promote and d.winner is None


def test_the_winner_must_beat_the_champion_by_the_margin():
    champion = _m(0.88, 0.5)
    assert _decide(COMPARISON, champion, _cfg(min_margin=0.01)).winner == "kto"
    d = _decide(COMPARISON, champion, _cfg(min_margin=0.05))  # 0.90 - 0.88 < 0.05
    assert not d.promote and "margin" in d.reasons[0]


def test_equal_to_champion_is_not_promoted_even_with_zero_margin():
    assert not _decide(COMPARISON, _m(0.90, 0.55), _cfg(min_margin=0.0)).promote


def test_direction_min_prefers_lower_values():
    cfg = _cfg(metric="eval_loss", direction="min", guards=())
    assert _decide(COMPARISON, None, cfg).winner == "dpo"


@pytest.mark.parametrize(
    "comparison, champion, why",
    [
        ({}, None, "no evaluation"),
        (None, None, "no evaluation"),
        ({**COMPARISON, "dpo": {"checker_accuracy": 0.99}}, None, "dpo: missing"),  # no guard
        ({**COMPARISON, "dpo": {"eval_loss": 0.1}}, None, "dpo: missing"),  # no primary metric
        ({**COMPARISON, "dpo": _m(math.nan)}, None, "dpo: missing"),  # NaN counts as missing
        (COMPARISON, {"eval_loss": 0.1}, "champion: missing"),
        (COMPARISON, {}, "champion: missing"),  # a champion without stored metrics
        ({"base": _m(0.1), "dpo": _m(0.9)}, None, "no complete reference model baseline"),
        ({"base": _m(0.1)}, None, "no eligible candidate"),
    ],
)
def test_fail_closed(comparison, champion, why):
    d = _decide(comparison, champion, _cfg())
    assert not d.promote and d.winner is None
    assert why in " ".join(d.reasons)


def test_disabled_promotes_nothing():
    assert not _decide(COMPARISON, None, _cfg(enabled=False)).promote


def test_candidates_restrict_who_may_win():
    assert _decide(COMPARISON, None, _cfg(candidates=("dpo",))).winner == "dpo"


@pytest.mark.slow
def test_register_champion_moves_the_alias_and_keeps_old_versions(tmp_path):
    from posttrain import models
    from posttrain.config import TinyModelConfig

    folder = tmp_path / "sft" / "k1"
    tokenizer = models.build_tiny_tokenizer()
    tiny = TinyModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1)
    models.save_model(models.build_tiny_model(tiny, tokenizer), tokenizer, folder / "model")
    run_id = tracking.start_run("test-promotion", "sft")
    tracking.end_run(run_id)
    manifest = {"path": str(folder), "mlflow_run_id": run_id, "key": "k1", "stage": "sft"}
    name = f"test-promotion-{tmp_path.name}"

    assert registry.champion_metrics(name) is None
    v1 = registry.register_champion(name, "sft", manifest, _m(0.7))
    assert registry.champion_metrics(name) == _m(0.7)
    v2 = registry.register_champion(name, "dpo", {**manifest, "mlflow_run_id": None}, _m(0.8),
                                     experiment="test-promotion")
    assert v2 != v1
    champion = registry.champion_version(name)
    assert str(champion.version) == v2 and champion.tags[registry.STAGE_TAG] == "dpo"
    assert json.loads(champion.tags[registry.METRICS_TAG]) == _m(0.8)
    first = tracking.client().get_model_version(name, v1)
    # the version is an MLflow model logged on the run that trained the stage
    assert first.source.endswith(registry.MODEL_ARTIFACT) and first.run_id == run_id
    assert champion.run_id != run_id  # no run: a run of its own holds the model
    assert champion.source.endswith(registry.MODEL_ARTIFACT)
    assert "checker_accuracy | 0.8" in champion.description  # the model card


# ------------------------------------------------------------------- the reference model


def test_without_champion_the_guards_compare_against_the_reference_model():
    # kto's loss 0.65 regresses 0.15 against sft (0.5), beyond the 0.1 tolerance, but improves
    # on base (9.0): which model the guards read decides the winner.
    comparison = {**COMPARISON, "kto": _m(0.90, 0.65)}
    assert _decide(comparison, None, _cfg(), reference_model="sft").winner == "dpo"
    assert _decide(comparison, None, _cfg(), reference_model="base").winner == "kto"
    assert promotion.decide(comparison, None, _cfg()).winner == "kto"  # default: base
    # any stage can be the reference: against dpo (0.45) sft regresses 0.05 (within the
    # tolerance) and kto 0.2 (beyond it)
    d = _decide(comparison, None, _cfg(), reference_model="dpo")
    assert d.winner == "dpo"
    assert {r["stage"] for r in d.rows if r["failed_guards"]} == {"kto"}


def test_a_champion_not_the_reference_model_is_what_the_guards_read():
    # With a champion the reference model is irrelevant: every loss regresses > 0.1 against 0.1.
    for ref in ("sft", "base", "dpo"):
        assert not _decide(COMPARISON, _m(0.5, 0.1), _cfg(), reference_model=ref).promote


@pytest.mark.parametrize("reference_model", ["base", "sft", "ppo"])
def test_a_missing_reference_model_fails_closed(reference_model):
    comparison = {k: v for k, v in COMPARISON.items() if k != reference_model}
    d = _decide(comparison, None, _cfg(), reference_model=reference_model)
    assert not d.promote and d.winner is None
    assert "no complete reference model baseline" in " ".join(d.reasons)
    # without guards there is nothing to compare against, and nothing is missing
    assert _decide(comparison, None, _cfg(guards=()), reference_model=reference_model).promote


def test_an_incomplete_reference_model_fails_closed():
    comparison = {**COMPARISON, "sft": {"checker_accuracy": 0.7, "eval_loss": math.inf}}
    d = _decide(comparison, None, _cfg(candidates=("dpo", "kto")))
    assert not d.promote and "no complete reference model baseline" in " ".join(d.reasons)


def test_decide_needs_resolved_settings():
    with pytest.raises(ValueError, match="needs resolved promotion settings"):
        promotion.decide(COMPARISON, None, _cfg(direction=None))
    with pytest.raises(ValueError, match="needs resolved promotion settings"):
        promotion.decide(COMPARISON, None, _cfg(metric=None))


def test_decide_refuses_unresolved_guards_with_the_same_message():
    with pytest.raises(ValueError, match="needs resolved promotion settings"):
        promotion.decide(COMPARISON, None, PromotionConfig())


# --------------------------------------------------------------------------- resolve


def _pipeline(**promotion_settings) -> PipelineConfig:
    return PipelineConfig(promotion=promotion_settings)


ALL = {"checker_accuracy", "reward_score", "win_rate_vs_reference", "eval_loss", "perplexity",
       "kl_to_reference", "eos_rate", "mean_completion_length"}


@pytest.mark.parametrize(
    ("available", "metric", "direction"),
    [
        (ALL, "checker_accuracy", "max"),
        (ALL - {"checker_accuracy"}, "reward_score", "max"),
        ({"eval_loss", "perplexity", "kl_to_reference", "eos_rate"}, "eval_loss", "min"),
    ],
)
def test_resolve_picks_the_first_default_metric_available(available, metric, direction):
    p = promotion.resolve(_pipeline(), available)
    assert (p.metric, p.direction) == (metric, direction)
    assert p.guards == (promotion.DEFAULT_GUARD,)
    assert p.guards[0].metric == "eval_loss" and p.guards[0].tolerance == 0.5
    # resolved settings are what decide() takes
    comparison = {"base": {metric: 0.0, "eval_loss": 1.0}, "dpo": {metric: 1.0, "eval_loss": 1.0}}
    assert promotion.decide(comparison, None, p).promote


def test_resolve_adds_no_default_guard_without_eval_loss():
    p = promotion.resolve(_pipeline(), {"reward_score", "kl_to_reference", "eos_rate"})
    assert (p.metric, p.direction, p.guards) == ("reward_score", "max", ())


def test_resolve_keeps_explicit_settings():
    guard = MetricGuard(metric="kl_to_reference", direction="min", tolerance=2.0)
    p = promotion.resolve(_pipeline(metric="eos_rate", direction="min", guards=[guard],
                                    min_margin=0.1, candidates=None), ALL)
    assert (p.metric, p.direction, p.guards, p.min_margin) == ("eos_rate", "min", (guard,), 0.1)
    assert promotion.resolve(_pipeline(guards=[]), ALL).guards == ()  # no guards, on purpose
    p = promotion.resolve(_pipeline(metric="perplexity"), ALL)
    assert (p.metric, p.direction) == ("perplexity", "min")  # the metric's own direction


def test_resolve_without_any_default_metric_is_a_config_error():
    with pytest.raises(ConfigError, match=r"none of checker_accuracy, reward_score, eval_loss "
                                          r"will exist.*gives eos_rate, kl_to_reference"):
        promotion.resolve(_pipeline(), {"kl_to_reference", "eos_rate"})


def test_resolve_refuses_an_explicit_metric_that_will_not_exist():
    with pytest.raises(ConfigError) as e:
        promotion.resolve(_pipeline(metric="reward_score"),
                          {"checker_accuracy", "eval_loss", "eos_rate"})
    msg = str(e.value)
    assert "promotion.metric: 'reward_score' will not exist for this pipeline" in msg
    assert "(evaluation gives checker_accuracy, eos_rate, eval_loss)" in msg


def test_resolve_refuses_a_guard_on_a_metric_that_will_not_exist():
    guard = MetricGuard(metric="win_rate_vs_reference", direction="max")
    with pytest.raises(ConfigError) as e:
        promotion.resolve(_pipeline(guards=[guard]), {"checker_accuracy", "eval_loss"})
    msg = str(e.value)
    assert "promotion.guards: 'win_rate_vs_reference' will not exist" in msg
    assert "checker_accuracy, eval_loss" in msg
    assert "promotion.metric" not in msg  # the default metric itself is fine


def test_resolve_needs_a_direction_for_an_unknown_metric():
    with pytest.raises(ConfigError, match=r"promotion\.direction: say whether 'my_score' is "
                                          r"better high \('max'\) or low \('min'\)"):
        promotion.resolve(_pipeline(metric="my_score"), ALL | {"my_score"})
    p = promotion.resolve(_pipeline(metric="my_score", direction="max"), ALL | {"my_score"})
    assert (p.metric, p.direction) == ("my_score", "max")


def test_every_metric_evaluation_produces_has_a_direction():
    from posttrain.stages.evaluate import evaluation_metrics

    cfg = PipelineConfig.model_validate({
        "data": {"sft": {"path": "demo:sft"}, "preference": {"path": "demo:preference"}},
        "stages": [{"method": "sft", "data": "sft"},
                   {"method": "reward", "start": "sft", "data": "preference"}],
    })
    produced = evaluation_metrics(cfg, {"sft": "prompt_completion",
                                        "preference": "preference"}, True)
    assert produced - {"mean_completion_length"} <= set(promotion.DIRECTIONS)
    assert promotion.resolve(cfg, produced).metric == "checker_accuracy"


# --------------------------------------------------------------- significance (bootstrap CI)


def _interval(diff: float, low: float, high: float) -> dict:
    return {"metric": "checker_accuracy", "diff": diff, "ci_low": low, "ci_high": high,
            "paired": True, "basis": "paired by prompt"}


def test_require_significance_flips_a_decision_with_a_narrow_margin():
    """kto beats the champion (0.88) by 0.02 >= min_margin 0.01, but the 95% interval of that
    improvement is [-0.03, 0.07]: promoted without require_significance, not with it; an
    interval [0.015, 0.03] clears the margin and promotes either way. The decision records the
    interval."""
    champion = _m(0.88, 0.5)
    wide = {"kto": _interval(0.02, -0.03, 0.07)}
    off = _decide_ci(COMPARISON, champion, _cfg(min_margin=0.01), wide)
    assert off.promote and off.winner == "kto" and off.interval == wide["kto"]
    assert "95% CI [-0.03, 0.07]" in " ".join(off.reasons)
    on = _decide_ci(COMPARISON, champion, _cfg(min_margin=0.01, require_significance=True), wide)
    assert not on.promote and on.winner is None
    assert "lower bound -0.03 does not clear min_margin 0.01" in " ".join(on.reasons)
    assert on.to_dict()["interval"] == wide["kto"]
    narrow = {"kto": _interval(0.02, 0.015, 0.03)}
    assert _decide_ci(COMPARISON, champion, _cfg(min_margin=0.01, require_significance=True),
                      narrow).winner == "kto"
    # a lower bound above 0 but below the margin is not enough
    low = {"kto": _interval(0.02, 0.005, 0.03)}
    assert not _decide_ci(COMPARISON, champion,
                          _cfg(min_margin=0.01, require_significance=True), low).promote


def _decide_ci(comparison, champion, cfg, intervals):
    return promotion.decide(comparison, champion, cfg, reference_model=REF, intervals=intervals)


def test_require_significance_without_an_interval_promotes_nothing_and_says_why():
    champion = _m(0.88, 0.5)
    cfg = _cfg(min_margin=0.01, require_significance=True)
    missing = {"kto": {"metric": "checker_accuracy", "diff": math.nan, "ci_low": math.nan,
                       "ci_high": math.nan, "paired": False,
                       "basis": "the champion has no stored per-prompt values"}}
    for intervals in (None, missing):
        d = _decide_ci(COMPARISON, champion, cfg, intervals)
        assert not d.promote
        assert "require_significance is set and there is no confidence interval" in d.reasons[1]
    assert "no stored per-prompt values" in _decide_ci(COMPARISON, champion, cfg,
                                                       missing).reasons[1]
    # without a champion there is nothing to be significant against: the best candidate wins
    assert _decide_ci(COMPARISON, None, cfg, None).winner == "kto"


def _values(prompts_hash: str, acc: list[float], loss: list[tuple[float, int]]) -> dict:
    from posttrain import bootstrap

    return {"prompts_hash": prompts_hash, "pairs_hash": None, "metrics": {
        "checker_accuracy": bootstrap.per_item(acc),
        "eval_loss": bootstrap.per_item([s for s, _ in loss], [n for _, n in loss])}}


def test_improvement_interval_pairs_on_the_same_prompts_and_says_when_it_cannot():
    """Candidate right on prompts 1-3 of 4, champion on 1-2: +0.25 on the same prompts (paired,
    prompts resampled once: every resample's difference is the share of prompt 3 drawn, in
    [0, 1]); on other prompts the bootstrap is unpaired and says so; a champion without stored
    values gives no interval and the reason."""
    from posttrain import bootstrap

    cand = _values("h1", [1, 1, 1, 0], [(2.0, 2), (2.0, 2), (1.0, 1), (4.0, 1)])
    champ = _values("h1", [1, 1, 0, 0], [(3.0, 2), (2.0, 2), (1.0, 1), (4.0, 1)])
    paired = promotion.improvement_interval(cand, champ, "checker_accuracy", "max",
                                            samples=300, seed=0)
    assert paired["paired"] and paired["diff"] == pytest.approx(0.25)
    assert 0.0 <= paired["ci_low"] <= 0.25 <= paired["ci_high"] <= 1.0
    assert "paired by prompt" in paired["basis"]
    want = bootstrap.paired_difference(cand["metrics"]["checker_accuracy"],
                                       champ["metrics"]["checker_accuracy"], samples=300, seed=0)
    assert (paired["ci_low"], paired["ci_high"]) == (want["ci_low"], want["ci_high"])
    # eval_loss (lower is better): loss 9/6 vs 10/6, an improvement of +1/6, bounds mirrored
    loss = promotion.improvement_interval(cand, champ, "eval_loss", "min", samples=300, seed=0)
    raw = bootstrap.paired_difference(cand["metrics"]["eval_loss"], champ["metrics"]["eval_loss"],
                                      samples=300, seed=0)
    assert loss["diff"] == pytest.approx(1 / 6)
    assert (loss["ci_low"], loss["ci_high"]) == (-raw["ci_high"], -raw["ci_low"])
    other = promotion.improvement_interval(cand, {**champ, "prompts_hash": "h2"},
                                           "checker_accuracy", "max", samples=300, seed=0)
    assert not other["paired"] and "unpaired" in other["basis"]
    assert other["ci_high"] - other["ci_low"] > paired["ci_high"] - paired["ci_low"]
    none = promotion.improvement_interval(cand, None, "checker_accuracy", "max", samples=300,
                                          seed=0)
    assert math.isnan(none["ci_low"]) and "no stored per-prompt values" in none["basis"]
