"""The promotion gate: pure decisions (fail-closed cases included) and the registry alias."""

from __future__ import annotations

import json
import math

import pytest

from posttrain import promotion, tracking
from posttrain.config import MetricGuard, PromotionConfig

GUARD = MetricGuard(metric="eval_loss", direction="min", tolerance=0.1)


def _cfg(**kw) -> PromotionConfig:
    return PromotionConfig(**{"metric": "checker_accuracy", "guards": (GUARD,), **kw})


def _m(acc: float, loss: float = 0.5) -> dict:
    return {"checker_accuracy": acc, "eval_loss": loss}


COMPARISON = {"base": _m(0.99, 9.0), "sft": _m(0.70), "dpo": _m(0.85, 0.45), "kto": _m(0.90, 0.55)}


def test_without_champion_the_best_candidate_passing_guards_wins():
    # kto (0.90) is best; its loss regresses 0.05 against SFT's 0.5, within the 0.1 tolerance.
    # base (0.99) is never a candidate.
    d = promotion.decide(COMPARISON, None, _cfg())
    assert d.promote and d.winner == "kto"


def test_a_guard_regression_beyond_tolerance_disqualifies_a_candidate():
    comparison = {**COMPARISON, "kto": _m(0.90, 0.65)}  # loss +0.15 > 0.1
    d = promotion.decide(comparison, None, _cfg())
    assert d.winner == "dpo"
    kto = next(r for r in d.rows if r["stage"] == "kto")
    assert kto["failed_guards"] and "eval_loss" in kto["failed_guards"][0]


def test_every_candidate_failing_a_guard_promotes_nothing():
    d = promotion.decide(COMPARISON, _m(0.5, 0.1), _cfg())  # every loss regresses > 0.1
    assert not d.promote and d.winner is None


def test_the_winner_must_beat_the_champion_by_the_margin():
    champion = _m(0.88, 0.5)
    assert promotion.decide(COMPARISON, champion, _cfg(min_margin=0.01)).winner == "kto"
    d = promotion.decide(COMPARISON, champion, _cfg(min_margin=0.05))  # 0.90 - 0.88 < 0.05
    assert not d.promote and "margin" in d.reasons[0]


def test_equal_to_champion_is_not_promoted_even_with_zero_margin():
    assert not promotion.decide(COMPARISON, _m(0.90, 0.55), _cfg(min_margin=0.0)).promote


def test_direction_min_prefers_lower_values():
    cfg = _cfg(metric="eval_loss", direction="min", guards=())
    assert promotion.decide(COMPARISON, None, cfg).winner == "dpo"


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
        ({"base": _m(0.1), "dpo": _m(0.9)}, None, "no complete SFT baseline"),
        ({"base": _m(0.1)}, None, "no eligible candidate"),
    ],
)
def test_fail_closed(comparison, champion, why):
    d = promotion.decide(comparison, champion, _cfg())
    assert not d.promote and d.winner is None
    assert why in " ".join(d.reasons)


def test_disabled_promotes_nothing():
    assert not promotion.decide(COMPARISON, None, _cfg(enabled=False)).promote


def test_candidates_restrict_who_may_win():
    assert promotion.decide(COMPARISON, None, _cfg(candidates=("dpo",))).winner == "dpo"


def test_register_champion_moves_the_alias_and_keeps_old_versions(tmp_path):
    folder = tmp_path / "sft" / "k1"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    run_id = tracking.start_run("test-promotion", "sft")
    tracking.log_folder(run_id, folder, max_mb=10)
    tracking.end_run(run_id)
    manifest = {"path": str(folder), "mlflow_run_id": run_id, "key": "k1"}
    name = f"test-promotion-{tmp_path.name}"

    assert promotion.champion_metrics(name) is None
    v1 = promotion.register_champion(name, "sft", manifest, _m(0.7))
    assert promotion.champion_metrics(name) == _m(0.7)
    v2 = promotion.register_champion(name, "dpo", {**manifest, "mlflow_run_id": None}, _m(0.8))
    assert v2 != v1
    champion = promotion.champion_version(name)
    assert str(champion.version) == v2 and champion.tags[promotion.STAGE_TAG] == "dpo"
    assert json.loads(champion.tags[promotion.METRICS_TAG]) == _m(0.8)
    first = tracking.client().get_model_version(name, v1)
    assert first.source.endswith("stage/model") and first.run_id == run_id
    assert champion.source.startswith("file://")  # no run: the local artifact folder
