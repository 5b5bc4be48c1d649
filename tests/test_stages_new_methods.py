"""SimPO, CPO and RLOO as stages of a graph, without Prefect: each trains from the SFT stage,
writes a model artifact, logs its method's metrics to its MLflow child run under TRL's names, and
is evaluated beside the others."""

from __future__ import annotations

import pytest

from posttrain import stages, tracking
from posttrain.config import PipelineConfig, validate
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values


@pytest.mark.slow
def test_simpo_cpo_and_rloo_stages_train_log_and_are_evaluated(tmp_path):
    values = tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("simpo"), stage("cpo"), stage("rloo", beta=0.1)])
    cfg = validate(PipelineConfig, values)
    manifests = stages.run_all(cfg)
    assert list(manifests["evaluate"]["comparison"]) == ["base", "sft", "simpo", "cpo", "rloo"]
    client = tracking.client()
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    wanted = {
        "simpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss"},
        "cpo": {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll_loss"},
        "rloo": {"loss", "reward", "reward_std", "kl", "rewards/demo_checker/mean",
                 "completions/mean_length", "clip_ratio/region_mean"},
    }
    for name, keys in wanted.items():
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert keys <= set(run.data.metrics), (name, keys - set(run.data.metrics))
        assert run.data.params["method"] == name
