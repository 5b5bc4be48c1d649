"""Flow tests on a shared Prefect test server: caching across runs and MLflow records."""

from __future__ import annotations

import json

import pytest

from posttrain import tracking
from posttrain.config import PipelineConfig, validate
from posttrain.data import demo
from posttrain.data.loading import write_jsonl
from tests.conftest import SFT_STAGE, stage, stage_runs, statuses, tiny_pipeline_values

pytestmark = pytest.mark.usefixtures("prefect_server")


def _cfg(tmp_path, **sections) -> PipelineConfig:
    return validate(PipelineConfig, tiny_pipeline_values(tmp_path, **sections))


def _no_training(*args, **kwargs):
    raise AssertionError("a cached stage must not train")


def test_unchanged_rerun_trains_nothing_and_logs_cache_hits(tmp_path, monkeypatch):
    from pipelines.flows import pipeline
    from posttrain.recipes import sft

    cfg = _cfg(tmp_path)
    first = pipeline(cfg)
    assert statuses(first) == {"data": "ran", "sft": "ran", "evaluate": "ran"}
    first_children = stage_runs(first["mlflow_run_id"])
    assert set(first_children) == {"data", "sft", "evaluate"}
    sft_run = first_children["sft"]
    assert sft_run.info.status == "FINISHED"
    assert "learning_rate" in sft_run.data.params  # no stage prefix: runs compare side by side
    history = tracking.client().get_metric_history(sft_run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, cfg.stage("sft").max_steps + 1))
    assert first_children["data"].inputs.dataset_inputs  # the dataset is logged as an input

    weights = next((tmp_path / "artifacts" / "sft").glob("*/model/model.safetensors"))
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(sft, "train", _no_training)
    second = pipeline(cfg)
    assert statuses(second) == {"data": "cached", "sft": "cached", "evaluate": "cached"}
    assert weights.stat().st_mtime_ns == mtime
    for name, run in stage_runs(second["mlflow_run_id"]).items():
        assert run.data.tags[tracking.CACHE_HIT_TAG] == "true"
        assert run.data.tags[tracking.SOURCE_RUN_TAG] == first_children[name].info.run_id
    assert second["comparison"] == first["comparison"]


def test_changing_an_sft_field_reruns_sft_and_evaluation_only(tmp_path):
    from pipelines.flows import pipeline

    pipeline(_cfg(tmp_path))
    changed = pipeline(_cfg(tmp_path, stages=[{**SFT_STAGE, "learning_rate": 1e-3}]))
    assert statuses(changed) == {"data": "cached", "sft": "ran", "evaluate": "ran"}


@pytest.mark.slow
def test_changing_one_data_row_reruns_everything_downstream(tmp_path):
    from pipelines.flows import pipeline

    rows = demo.generate_sft(_cfg(tmp_path).demo, 0, "train")[:200]
    path = tmp_path / "sft.jsonl"
    write_jsonl(rows, path)
    cfg = _cfg(tmp_path, data={"sft": {"path": str(path), "eval_fraction": 0.1}})
    first = pipeline(cfg)
    assert statuses(first) == {"data": "ran", "sft": "ran", "evaluate": "ran"}
    assert statuses(pipeline(cfg))["data"] == "cached"

    rows[7] = {**rows[7], "completion": json.loads(json.dumps(rows[7]["completion"]))}
    rows[7]["completion"][0]["content"] += "0"
    write_jsonl(rows, path)
    assert statuses(pipeline(cfg)) == {"data": "ran", "sft": "ran", "evaluate": "ran"}


def test_sft_flow_runs_data_and_sft(tmp_path):
    from pipelines.flows import stage_flow

    result = stage_flow(_cfg(tmp_path), ["sft"])
    assert [r["stage"] for r in result["stages"]] == ["data", "sft"]
    assert (tmp_path / "artifacts" / "sft").exists()


def _pref_stages(**dpo) -> list[dict]:
    return [SFT_STAGE, stage("reward"), stage("dpo", **dpo), stage("orpo"), stage("kto")]


@pytest.mark.slow
def test_preference_methods_are_independent_cached_stages(tmp_path):
    from pipelines.flows import pipeline

    values = tiny_pipeline_values(tmp_path, _pref_stages())
    first = pipeline(validate(PipelineConfig, values))
    assert statuses(first) == {s: "ran" for s in
                              ("data", "sft", "reward", "dpo", "orpo", "kto", "evaluate")}
    assert set(first["comparison"]) == {"base", "sft", "dpo", "orpo", "kto"}
    assert all("reward_score" in m for m in first["comparison"].values())
    children = stage_runs(first["mlflow_run_id"])
    assert {"reward", "dpo", "orpo", "kto"} <= set(children)
    assert "rewards/margins" in children["dpo"].data.metrics
    assert "eval_accuracy" in children["reward"].data.metrics

    changed = pipeline(validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, _pref_stages(beta=0.3))))
    assert statuses(changed) == {
        "data": "cached", "sft": "cached", "reward": "cached", "dpo": "ran", "orpo": "cached",
        "kto": "cached", "evaluate": "ran",
    }


def test_stage_flow_runs_one_method_with_its_upstream(tmp_path):
    from pipelines.flows import stage_flow

    values = tiny_pipeline_values(tmp_path, _pref_stages())
    result = stage_flow(validate(PipelineConfig, values), ["orpo"])
    assert [r["stage"] for r in result["stages"]] == ["data", "sft", "orpo"]


@pytest.mark.slow
def test_online_methods_run_as_cached_stages_with_curves_in_mlflow(tmp_path):
    from pipelines.flows import pipeline

    online = {"warmup_steps": 0, "max_length": 40}
    values = tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("reward", max_steps=2, warmup_steps=0),
        stage("grpo", **online), stage("ppo", **online)])
    cfg = validate(PipelineConfig, values)
    first = pipeline(cfg)
    assert statuses(first) == {s: "ran" for s in ("data", "sft", "reward", "grpo", "ppo",
                                                 "evaluate")}
    assert {"grpo", "ppo"} <= set(first["comparison"])
    children = stage_runs(first["mlflow_run_id"])
    c = tracking.client()
    assert [m.step for m in c.get_metric_history(children["grpo"].info.run_id, "reward")] == [1, 2]
    assert len(c.get_metric_history(children["ppo"].info.run_id, "objective/kl")) == 2
    second = pipeline(cfg)
    assert set(statuses(second).values()) == {"cached"}


# ------------------------------------------------------- evaluation, promotion, retraining


def _artifact_paths(run_id: str) -> set[str]:
    c = tracking.client()
    return {a.path for a in c.list_artifacts(run_id)}


@pytest.mark.slow
def test_evaluation_compares_every_stage_and_promotes_through_the_gate(tmp_path):
    from pipelines.flows import pipeline
    from posttrain import registry

    name = f"reg-{tmp_path.name}"
    values = tiny_pipeline_values(
        tmp_path, [SFT_STAGE, stage("reward"), stage("dpo")],
        evaluate={"reference": "sft"},
        promotion={"registered_model": name, "metric": "reward_score", "guards": []})
    cfg = validate(PipelineConfig, values)
    first = pipeline(cfg)
    comparison = first["comparison"]
    assert list(comparison) == ["base", "sft", "dpo"]
    for metrics in comparison.values():
        assert {"checker_accuracy", "reward_score", "win_rate_vs_reference", "kl_to_reference",
                "chosen_perplexity", "perplexity", "mean_completion_length"} <= set(metrics)
    assert comparison["sft"]["win_rate_vs_reference"] == 0.5
    assert comparison["sft"]["kl_to_reference"] == 0.0
    assert {"comparison.json", "comparison.png"} <= _artifact_paths(first["mlflow_run_id"])
    children = stage_runs(first["mlflow_run_id"])
    assert "heldout/win_rate_vs_reference" in tracking.client().get_run(
        children["dpo"].info.run_id).data.metrics

    decision = first["promotion"]
    best = max(("sft", "dpo"), key=lambda s: comparison[s]["reward_score"])
    assert decision["promote"] and decision["winner"] == best
    champion = registry.champion_version(name)
    assert str(champion.version) == decision["version"]
    assert champion.tags[registry.STAGE_TAG] == best
    parent = tracking.client().get_run(first["mlflow_run_id"])
    assert parent.data.tags["posttrain.promoted_stage"] == best

    # Every stage cached, the same numbers: not better than the champion, the alias stays.
    second = pipeline(cfg)
    assert not second["promotion"]["promote"]
    # Same held-out set and settings: the champion's registered numbers, not a re-evaluation.
    assert second["promotion"]["champion_basis"].startswith("its registered numbers")
    assert str(registry.champion_version(name).version) == decision["version"]


def test_failed_evaluation_promotes_nothing(tmp_path, monkeypatch):
    from pipelines.flows import pipeline
    from posttrain import registry
    from posttrain.stages import evaluate as eval_stage

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(eval_stage, "_evaluate_all", broken)
    name = f"reg-{tmp_path.name}"
    cfg = _cfg(tmp_path, promotion={"registered_model": name})
    with pytest.raises(RuntimeError, match="evaluation broke"):
        pipeline(cfg)
    assert registry.champion_version(name) is None


@pytest.mark.slow
def test_retrain_caches_unchanged_data_and_reruns_changed_data(tmp_path, monkeypatch):
    from pipelines.flows import pipeline, retrain
    from tasks import events

    emitted = []
    monkeypatch.setattr(events, "emit_dataset_updated", lambda *a, **k: emitted.append((a, k)))
    rows = demo.generate_sft(_cfg(tmp_path).demo, 0, "train")[:120]
    path = tmp_path / "sft.jsonl"
    write_jsonl(rows, path)
    cfg = _cfg(tmp_path, data={"sft": {"path": str(path), "eval_fraction": 0.1}},
               promotion={"registered_model": f"reg-{tmp_path.name}"})
    pipeline(cfg)
    assert emitted == []  # a first run has nothing to compare with

    unchanged = retrain(cfg)
    assert set(statuses(unchanged).values()) == {"cached"}
    assert not unchanged["promotion"]["promote"]

    write_jsonl(rows[:-1], path)
    changed = pipeline(cfg)  # data preparation notices the new fingerprint and emits the event
    assert statuses(changed)["data"] == "ran"
    assert len(emitted) == 1 and emitted[0][0][0] == cfg.name
    assert emitted[0][0][1]["changed"] == ["sft"]

    write_jsonl(rows[:-2], path)
    again = retrain(cfg)  # the retraining flow itself never emits (it is the retraining)
    assert statuses(again) == {"data": "ran", "sft": "ran", "evaluate": "ran"}
    assert len(emitted) == 1
    parent = tracking.client().get_run(again["mlflow_run_id"])
    assert "sft" in json.loads(parent.data.tags["posttrain.data_fingerprints"])
