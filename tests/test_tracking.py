"""MLflow views that compare: the same param names on every stage's run, a comparison chart whose
scales the untrained base model does not flatten, and the metric line training reports."""

from __future__ import annotations

import logging

from posttrain import charts, tracking
from posttrain.config import PipelineConfig, validate
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values


def test_stage_runs_log_their_settings_under_the_same_names(tmp_path):
    """SFT, DPO and GRPO runs all have `learning_rate`, `max_steps`, `method`, `starts_from`
    (DPO and GRPO also `beta`) with no stage prefix, so MLflow's run comparison lines them up."""
    from posttrain.stages.common import run_params

    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("dpo", beta=0.3), stage("grpo", start="dpo", learning_rate=2e-5)]))
    params = {s.name: tracking.flatten(run_params(cfg, s)) for s in cfg.stages}
    shared = {"learning_rate", "max_steps", "method", "starts_from", "data", "model"}
    assert all(shared <= set(p) for p in params.values())
    assert [params[n]["method"] for n in params] == ["sft", "dpo", "grpo"]
    assert [params[n]["starts_from"] for n in params] == ["base", "sft", "dpo"]
    assert params["dpo"]["beta"] == "0.3" and "beta" in params["grpo"]
    assert params["grpo"]["learning_rate"] == "2e-05" and params["sft"]["learning_rate"] == "0.003"
    assert not [k for p in params.values() for k in p if k.startswith(("sft.", "dpo.", "grpo."))]


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_comparison_chart_scales_each_metric_to_the_trained_models():
    """Perplexity: base 102 against sft 2.1 and dpo 2.3. The panel's axis is set by the trained
    models (0 .. 2.3 + 25% of 2.3 = 2.875), so base's bar is cut at the top, hatched, labelled
    with its true value; every bar carries its value. KL (base 62, others 0.05 and 0.1) the same;
    win rate (no base outlier) spans 0 .. 0.6 + 25% = 0.75."""
    comparison = {
        "base": {"perplexity": 102.37, "kl_to_reference": 62.0, "win_rate_vs_reference": 0.5},
        "sft": {"perplexity": 2.1, "kl_to_reference": 0.05, "win_rate_vs_reference": 0.45},
        "dpo": {"perplexity": 2.3, "kl_to_reference": 0.1, "win_rate_vs_reference": 0.6},
    }
    fig = charts.comparison_chart(comparison)
    panels = _panels(fig)
    assert set(panels) == {"perplexity", "kl_to_reference", "win_rate_vs_reference"}
    ppl = panels["perplexity"]
    assert ppl.get_ylim() == (0.0, 2.3 * 1.25)
    heights = [b.get_height() for b in ppl.patches]
    assert heights == [2.3 * 1.25, 2.1, 2.3]  # base cut at the axis' top
    assert [b.get_hatch() for b in ppl.patches] == ["//", None, None]
    assert [t.get_text() for t in ppl.texts] == ["102 (cut)", "2.1", "2.3"]
    kl = panels["kl_to_reference"]
    assert kl.get_ylim() == (0.0, 0.125) and kl.texts[0].get_text() == "62 (cut)"
    win = panels["win_rate_vs_reference"]
    assert win.get_ylim() == (0.0, 0.75)
    assert [t.get_text() for t in win.texts] == ["0.5", "0.45", "0.6"]
    fig.savefig("/dev/null", format="png")  # renders


def test_comparison_chart_handles_missing_and_negative_values():
    """A missing metric reads n/a (bar of 0); negative values get an axis below zero:
    trained -0.2 and 0.1 -> span 0.3, limits -0.2 - 0.075 .. 0.1 + 0.075."""
    comparison = {"base": {"reward_score": -3.0}, "sft": {"reward_score": -0.2},
                  "dpo": {"reward_score": 0.1, "eos_rate": 1.0}}
    panels = _panels(charts.comparison_chart(comparison))
    lo, hi = panels["reward_score"].get_ylim()
    assert (round(lo, 6), round(hi, 6)) == (-0.275, 0.175)
    assert [t.get_text() for t in panels["reward_score"].texts] == ["-3 (cut)", "-0.2", "0.1"]
    assert [t.get_text() for t in panels["eos_rate"].texts] == ["n/a", "n/a", "1"]


def test_metric_logger_reports_each_logged_step_as_a_line():
    """What a Prefect task sends to its run's logs: one line per logged step, losses first."""
    from posttrain import progress

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = progress.logger.level
    progress.logger.addHandler(handler)
    progress.logger.setLevel(logging.INFO)
    try:
        tracking.MetricLogger(None)({"learning_rate": 1e-3, "loss": 1.23456, "eval_loss": 2.0}, 10)
        tracking.MetricLogger(None, echo=False)({"loss": 1.0}, 11)
    finally:
        progress.logger.removeHandler(handler)
        progress.logger.setLevel(level)
    assert lines == ["step 10: loss=1.235 eval_loss=2 learning_rate=0.001"]


def test_a_stage_whose_peer_process_left_during_a_stop_is_killed_not_failed(tmp_path):
    """In a launch of several processes, a process that waits in a collective on a peer that a
    signal's grace period stopped gets the transport's "connection closed by peer": with the
    stop pending, its run is KILLED by that signal, and the same error without a stop is a
    failure (FAILED, the error as it is)."""
    import pytest

    from posttrain import interrupt
    from posttrain.stages.common import run_stage

    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, [SFT_STAGE]))
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]")

    def stopping(out, run_id):
        interrupt.adopt("SIGTERM")  # as agree_on_stop does for a signal another process got
        raise gone

    def failing(out, run_id):
        raise gone

    with pytest.raises(interrupt.Interrupted) as stopped:
        run_stage(cfg, "sft", "k1", {}, stopping)
    assert stopped.value.__cause__ is gone
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        run_stage(cfg, "sft", "k2", {}, failing)
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.data.tags[tracking.KEY_TAG]: r for r in c.search_runs([exp.experiment_id])}
    assert runs["k1"].info.status == "KILLED"
    assert runs["k1"].data.tags["posttrain.failure"].startswith(
        "Interrupted: interrupted by SIGTERM during stage 'sft' (another process of the launch "
        "stopped first)")
    assert runs["k2"].info.status == "FAILED"
    assert "Connection closed by peer" in runs["k2"].data.tags["posttrain.failure"]


def test_the_runs_a_killed_launched_process_left_running_are_closed_by_its_command(tmp_path):
    """pipelines.stop: a launched stage's processes killed at the stop's deadline (under load,
    SIGTERM's checkpoint took longer) cannot close their runs; the command closes the RUNNING
    runs those PIDs opened on this host, children first, and no other run."""
    from posttrain.artifacts import current_owner

    experiment = f"launched-{tmp_path.name}"
    me = current_owner()
    theirs = {tracking.OWNER_TAGS["pid"]: "999991", tracking.OWNER_TAGS["host"]: str(me["host"])}
    parent = tracking.start_run(experiment, "sft", tags=theirs)
    child = tracking.start_run(experiment, "eval", parent_run_id=parent, tags=theirs)
    other = tracking.start_run(experiment, "other", tags={
        tracking.OWNER_TAGS["pid"]: "999992", tracking.OWNER_TAGS["host"]: str(me["host"])})
    closed = tracking.close_own_runs(experiment, status="KILLED",
                                     reason="Interrupted: interrupted by SIGTERM", pids=[999991])
    assert closed == [child, parent]
    c = tracking.client()
    assert [c.get_run(r).info.status for r in (parent, child, other)] == [
        "KILLED", "KILLED", "RUNNING"]
    assert c.get_run(parent).data.tags["posttrain.failure"].startswith("Interrupted: interrupted")
    tracking.end_run(other)
