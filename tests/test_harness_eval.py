"""lm-evaluation-harness tasks in the evaluation stage (`evaluate.tasks`): refused in preflight
before anything trains when unknown or offline, known metric names and directions for the
promotion gate, the cache key and the ground moving with the harness settings, the CLI
table, and (slow) a pipeline whose comparison holds the harness's exact match beside the
checker's accuracy on the same prompts, with intervals, per-prompt values and its time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain import bootstrap, harness, harness_local, harness_preflight, preflight, promotion
from posttrain.config import ConfigError, PipelineConfig, PromotionConfig, validate
from posttrain.data import demo
from tests.conftest import SFT_STAGE, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]
EM = "lm_eval/posttrain_demo/exact_match"


def _cfg(tmp_path, stages=None, **sections) -> PipelineConfig:
    return validate(PipelineConfig, tiny_pipeline_values(tmp_path, stages, **sections))


def _problems(cfg: PipelineConfig, tmp_path) -> list[str]:
    with pytest.raises(preflight.PreflightError) as err:
        preflight.plan(cfg)
    assert not (tmp_path / "artifacts").exists(), "preflight must not write artifacts"
    return err.value.problems


# ------------------------------------------------------------------------------ preflight


def test_an_unknown_task_is_refused_in_preflight_before_training(tmp_path):
    cfg = _cfg(tmp_path, evaluate={"tasks": ["posttrain_demo", "no_such_task_xyz"]})
    (problem,) = _problems(cfg, tmp_path)
    assert problem.startswith("evaluate.tasks: ")
    assert "'no_such_task_xyz' is unknown" in problem and str(harness_local.LOCAL_TASKS) in problem


def test_a_hub_task_offline_is_refused_in_preflight(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: False)
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "needs_hub.yaml").write_text(
        "task: needs_hub\ndataset_path: someone/some_dataset\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n"
        "metric_list:\n  - metric: exact_match\n")
    cfg = _cfg(tmp_path, evaluate={"tasks": ["needs_hub"], "include_path": [str(tasks)]})
    (problem,) = _problems(cfg, tmp_path)
    assert "'someone/some_dataset'" in problem and "Hugging Face Hub" in problem
    assert "offline mode is on" in problem


def test_the_stage_checks_the_tasks_again_at_its_start(tmp_path):
    """The evaluation refuses an unknown task before loading any model (the tasks may have
    changed since preflight, e.g. a task folder removed)."""
    from posttrain.stages.evaluate_harness import harness_runner

    cfg = _cfg(tmp_path, evaluate={"tasks": ["no_such_task_xyz"]})
    manifest = {"datasets": {"sft": {"checker": "demo"}}}
    with pytest.raises(harness.TaskError, match="no_such_task_xyz' is unknown"):
        harness_runner(cfg, manifest, [{"prompt": "1+2=", "completion": "3"}], tmp_path)
    assert harness_runner(_cfg(tmp_path), manifest, [], tmp_path) is None  # no tasks


def test_the_demo_task_needs_an_answer_for_every_held_out_prompt(tmp_path):
    """Prompt-only held-out rows without the demo's checker have nothing to match: refused."""
    from posttrain.data.loading import write_jsonl

    prompts = [{"prompt": r["prompt"]} for r in demo.generate_sft(
        _cfg(tmp_path).demo, 0, "train")[:80]]
    write_jsonl(prompts, tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path, data={"mine": {"path": str(tmp_path / "p.jsonl")}},
               evaluate={"tasks": ["posttrain_demo"], "data": "mine"})
    problems = _problems(cfg, tmp_path)
    assert any("posttrain_demo over data.mine's held-out rows" in p and "no completion" in p
               for p in problems), problems


# ------------------------------------------------------------------------------ metrics


def test_the_plan_knows_the_harness_metric_and_promotes_on_it(tmp_path):
    cfg = _cfg(tmp_path, evaluate={"tasks": ["posttrain_demo"]}, promotion={"metric": EM})
    plan = preflight.plan(cfg)
    assert EM in plan.available_metrics and "checker_accuracy" in plan.available_metrics
    assert plan.promotion["metric"] == EM and plan.promotion["direction"] == "max"
    # without the task the metric will not exist: refused before training
    (problem,) = _problems(_cfg(tmp_path, promotion={"metric": EM}), tmp_path)
    assert f"promotion.metric: {EM!r} will not exist" in problem


def test_expected_metrics_come_from_the_task_configs(tmp_path):
    assert harness.expected_metrics(["posttrain_demo"]) == {EM: "max"}
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "lower.yaml").write_text(
        "task: lower\ndataset_path: json\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n"
        "filter_list:\n  - name: first\n    filter: [{function: take_first}]\n"
        "  - name: last\n    filter: [{function: take_first}]\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: acc\n"
        "    higher_is_better: false\n")
    assert harness.expected_metrics(["lower"], include_path=folder) == {
        "lm_eval/lower/word_perplexity/first": "min", "lm_eval/lower/word_perplexity/last": "min",
        "lm_eval/lower/acc/first": "min", "lm_eval/lower/acc/last": "min"}
    assert harness.metric_direction("lm_eval/wikitext/word_perplexity") == "min"
    assert harness.metric_direction("lm_eval/gsm8k/exact_match/strict-match") == "max"
    assert harness.metric_direction("checker_accuracy") is None


def test_resolve_takes_the_direction_of_a_harness_metric(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, evaluate={"tasks": ["posttrain_demo"]}, promotion={"metric": EM})
    assert promotion.resolve(cfg, {EM, "eval_loss"}).direction == "max"
    # a task whose config says lower is better: min
    monkeypatch.setattr(promotion, "harness_metrics", lambda cfg: {EM: "min"})
    assert promotion.resolve(cfg, {EM, "eval_loss"}).direction == "min"
    # an explicit direction wins
    cfg = _cfg(tmp_path, evaluate={"tasks": ["posttrain_demo"]},
               promotion={"metric": EM, "direction": "max"})
    assert promotion.resolve(cfg, {EM}).direction == "max"
    with pytest.raises(ConfigError, match="will not exist"):
        promotion.resolve(cfg, {"eval_loss"})


def test_the_gate_promotes_on_the_harness_metric():
    cfg = PromotionConfig(metric=EM, direction="max", guards=(), min_margin=0.05)
    comparison = {"base": {EM: 0.0}, "sft": {EM: 0.30}, "dpo": {EM: 0.35}}
    decision = promotion.decide(comparison, None, cfg)
    assert decision.promote and decision.winner == "dpo"
    decision = promotion.decide(comparison, {EM: 0.32}, cfg)  # 0.03 < min_margin
    assert not decision.promote and "does not beat the champion" in decision.reasons[0]
    decision = promotion.decide(comparison, {EM: 0.25}, cfg)
    assert decision.promote and decision.winner == "dpo"
    # fail-closed: a candidate without the metric promotes nothing
    decision = promotion.decide({"sft": {"checker_accuracy": 1.0}}, None, cfg)
    assert not decision.promote and "missing or non-finite" in decision.reasons[1]


def test_a_harness_tasks_own_documents_pair_on_the_evaluation_ground():
    """A task other than the demo's has its own documents: a champion's values pair with the
    candidate's when their grounds (which hold the harness fingerprint) agree, not merely the
    held-out prompts."""
    key = "lm_eval/gsm8k/exact_match/strict-match"
    a = bootstrap.per_item([1, 0, 1, 1], group="gsm8k")
    b = bootstrap.per_item([1, 0, 0, 1], group="gsm8k")
    cand = {"prompts_hash": "p", "pairs_hash": None, "ground": "g1", "metrics": {key: a}}
    same = promotion.improvement_interval(cand, {**cand, "metrics": {key: b}}, key, "max",
                                          samples=200, seed=0)
    assert same["paired"] and same["diff"] == pytest.approx(0.25)
    other = promotion.improvement_interval(cand, {**cand, "ground": "g2", "metrics": {key: b}},
                                           key, "max", samples=200, seed=0)
    assert not other["paired"] and "unpaired" in other["basis"]


# ------------------------------------------------------------------------------ key and ground


def test_the_cache_key_and_the_ground_move_with_the_harness_settings(tmp_path):
    from posttrain.stages.evaluate import eval_stage_key, evaluation_ground

    manifest = {"datasets": {"sft": {"format": "prompt_completion", "fingerprint": "f"}}}
    rows = [{"prompt": "1+2=", "completion": "3"}]

    def key_and_ground(**evaluate):
        cfg = _cfg(tmp_path, evaluate=evaluate)
        return (eval_stage_key(cfg, manifest, {"sft": {"digest": "s"}}),
                evaluation_ground(cfg, rows, None, None, {"sft": {"digest": "s"}})["ground"])

    none = key_and_ground()
    demo_task = key_and_ground(tasks=["posttrain_demo"])
    assert key_and_ground(tasks=["posttrain_demo"]) == demo_task
    seen = [none, demo_task]
    for change in ({"limit": 10}, {"num_fewshot": 2}, {"harness_max_gen_toks": 4},
                   {"apply_chat_template": False}, {"gen_kwargs": {"temperature": 0.5}}):
        moved = key_and_ground(tasks=["posttrain_demo"], **change)
        assert all(moved[0] != k for k, _ in seen) and all(moved[1] != g for _, g in seen), \
            change
        seen.append(moved)
    # the fingerprint is part of both (lm-eval's version, the task configs)
    from posttrain.stages import evaluate_harness as ev

    cfg = _cfg(tmp_path, evaluate={"tasks": ["posttrain_demo"]})
    assert ev.harness_fingerprint(cfg) == harness_preflight.fingerprint(
        ["posttrain_demo"], **ev.harness_settings(cfg))
    assert ev.harness_fingerprint(_cfg(tmp_path)) is None


# ------------------------------------------------------------------------------ the table


def test_the_cli_table_shows_harness_metrics_under_their_task_within_80_columns(monkeypatch):
    from rich.console import Console

    from pipelines import cli
    from tests.test_cli import SEVEN, _whole

    comparison = {m: {**v, EM: 0.123456 + i / 10, EM + "_ci_low": 0.1, EM + "_ci_high": 0.3,
                      "lm_eval/gsm8k/exact_match/strict-match": 0.5, "eval_seconds": 1.5}
                  for i, (m, v) in enumerate(SEVEN.items())}
    console = Console(width=80, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli.print_summary({"stages": [], "comparison": comparison}, PipelineConfig())
    text = console.export_text()
    lines = text.splitlines()
    assert "\u2026" not in text and max(len(line) for line in lines) <= 80, text
    assert text.count("evaluation (held-out)") == 1  # seven models still in one table
    at = next(i for i, line in enumerate(lines) if line.split() == ["lm_eval/posttrain_demo"])
    cells = lines[at + 1].split()
    assert cells[0] == "exact_match" and len(cells) == 8
    assert all(_whole(c, 0.123456 + i / 10) for i, c in enumerate(cells[1:])), cells
    assert lines[at + 2].split()[0] == "±95%"
    assert any(line.split() == ["lm_eval/gsm8k"] for line in lines)
    assert any(line.split()[:1] == ["exact_match/strict-match"] for line in lines)
    rows = [line.split()[0] for line in lines if line.startswith(" ") and line.split()]
    assert rows.index("lm_eval/posttrain_demo") < rows.index("eval_seconds")


def test_the_demo_config_runs_the_local_task():
    import yaml

    values = yaml.safe_load((ROOT / "conf/demo.yaml").read_text())
    assert values["evaluate"]["tasks"] == ["posttrain_demo"]


def test_the_comparison_chart_draws_a_harness_metric_with_its_interval():
    from posttrain import charts

    comparison = {"base": {EM: 0.0, EM + "_ci_low": 0.0, EM + "_ci_high": 0.0},
                  "sft": {EM: 0.3, EM + "_ci_low": 0.2, EM + "_ci_high": 0.4}}
    fig = charts.comparison_chart(comparison)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_title() == EM
    assert [t.get_text() for t in ax.texts] == ["0", "0.3"]
    assert len(ax.collections) == 1  # the error bars
    fig.savefig("/dev/null", format="png")


def test_the_full_task_index_is_built_once_per_process(tmp_path, monkeypatch):
    """Indexing lm-eval's own task configs takes seconds: preflight, the cache key and every
    model's run share one; a changed YAML in an include folder indexes again."""
    import lm_eval.tasks

    built = []

    class Manager:
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_defaults)
            self.all_tasks = ["gsm8k"] if include_defaults else []

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    monkeypatch.setattr(harness_preflight, "_FULL_MANAGERS", {})
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.yaml").write_text("task: a\n")
    first = harness_preflight.task_manager(["gsm8k"], folder)
    assert harness_preflight.task_manager(["gsm8k"], folder) is first
    assert built == [False, True, False]  # the local index is cheap and built each time
    (folder / "a.yaml").write_text("task: a\noutput_type: generate_until\n")
    assert harness_preflight.task_manager(["gsm8k"], folder) is not first
    assert built.count(True) == 2


def _held_out_rows(cfg, data_manifest):
    from posttrain.stages.evaluate import _held_out

    return _held_out(cfg, data_manifest, cfg.eval_source)


# ------------------------------------------------------------------------------ a pipeline


@pytest.mark.slow
def test_a_pipeline_compares_the_harness_exact_match_with_the_checker(tmp_path):
    """SFT trained well enough to answer some held-out prompts: the comparison has the
    harness's exact match on the evaluation's own held-out prompts within 0.02 of the
    checker's accuracy for base and SFT, with its interval, per-prompt values paired with the
    reference, and its time inside eval_seconds; promotion on it picks SFT."""
    import torch

    from posttrain import stages, tracking

    torch.set_num_threads(1)
    sft = {**SFT_STAGE, "max_steps": 300, "per_device_batch_size": 16, "learning_rate": 3e-3,
           "warmup_steps": 10, "eval_every": 10**6, "log_every": 50}
    values = tiny_pipeline_values(
        tmp_path, [sft],
        demo={"tasks": ["add", "sort"], "num_train": 2000, "num_eval": 60,
              "conversational": True},
        evaluate={"tasks": ["posttrain_demo"], "max_new_tokens": 16, "batch_size": 30,
                  "bootstrap_samples": 200},
        promotion={"metric": EM})
    cfg = validate(PipelineConfig, values)
    manifests = stages.run_all(cfg)
    ev = manifests["evaluate"]
    comparison = ev["comparison"]
    assert list(comparison) == ["base", "sft"]
    folder = Path(ev["path"])
    per_prompt = json.loads((folder / "per_prompt.json").read_text())
    for model, m in comparison.items():
        assert abs(m[EM] - m["checker_accuracy"]) <= 0.02, (model, m[EM], m["checker_accuracy"])
        assert m[EM + "_ci_low"] <= m[EM] + 1e-9 <= m[EM + "_ci_high"] + 2e-9
        record = per_prompt["models"][model][EM]
        assert record["group"] == "prompts" and len(record["num"]) == 60
        assert bootstrap.value(record) == pytest.approx(m[EM])
        checker = per_prompt["models"][model]["checker_accuracy"]["num"]
        assert sum(a == b for a, b in zip(record["num"], checker)) >= 0.98 * 60
    assert 0.1 < comparison["sft"][EM] < 1.0  # not 0 == 0
    # the task the harness ran: this evaluation's held-out prompts, written next to its results
    written = [json.loads(line) for line in
               (folder / "harness_tasks" / "posttrain_demo.jsonl").read_text().splitlines()]
    assert len(written) == 60
    assert written == harness_local.task_rows(_held_out_rows(cfg, manifests["data"]),
                                        answer=demo.correct_answer)
    # the record names its JSONL where the stage folder lies now: it runs from there
    task_yaml = (folder / "harness_tasks" / "posttrain_demo.yaml").read_text()
    assert str(folder.resolve() / "harness_tasks" / "posttrain_demo.jsonl") in task_yaml
    assert harness_preflight.check_tasks(["posttrain_demo"], include_path=folder / "harness_tasks") == []
    paired = ev["paired"]["sft"][EM]
    assert paired["diff"] == pytest.approx(comparison["sft"][EM] - comparison["base"][EM])
    assert paired["ci_low"] <= paired["diff"] <= paired["ci_high"]
    # the harness's time is logged, and counted in eval_seconds
    run = tracking.client().get_run(ev["mlflow_run_id"])
    for model in comparison:
        harness_seconds = run.data.metrics[f"{model}/seconds/lm_eval"]
        assert 0 < harness_seconds < comparison[model]["eval_seconds"]
        assert run.data.metrics[f"{model}/seconds/lm_eval/posttrain_demo"] <= harness_seconds
        assert run.data.metrics[f"{model}/{EM}"] == pytest.approx(comparison[model][EM])
    # promotion on the harness metric: SFT (the only candidate) wins, then re-runs tie
    p = promotion.resolve(cfg, stages.available_metrics(cfg, manifests["data"]))
    assert (p.metric, p.direction) == (EM, "max")
    decision = promotion.decide(comparison, None, p)
    assert decision.promote and decision.winner == "sft"
    from tasks.promote import _model_values

    mine = _model_values(per_prompt, "sft")
    same = promotion.improvement_interval(mine, mine, EM, "max", samples=100, seed=0)
    assert same["paired"] and (same["diff"], same["ci_low"], same["ci_high"]) == (0, 0, 0)
    assert not promotion.decide(comparison, comparison["sft"], p).promote
    # an unchanged rerun is cached; another limit re-runs the evaluation
    again = stages.run_all(cfg)
    assert again["evaluate"]["key"] == ev["key"]
    limited = validate(PipelineConfig, {**values, "evaluate": {**values["evaluate"],
                                                               "limit": 20}})
    assert stages.eval_stage_key(limited, manifests["data"], {"sft": manifests["sft"]}) != \
        ev["key"]
    assert not math.isnan(comparison["base"][EM])
