"""Preflight (`posttrain plan`, and the first step of every command): each mistake a user
makes is found in seconds, before any stage trains, with a message naming what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import preflight
from posttrain.config import PipelineConfig, validate
from posttrain.data import demo
from posttrain.data.loading import write_jsonl
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]


def _problems(tmp_path, stages=None, **sections) -> list[str]:
    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, stages, **sections))
    with pytest.raises(preflight.PreflightError) as err:
        preflight.plan(cfg)
    assert not (tmp_path / "artifacts").exists(), "preflight must not write artifacts"
    return err.value.problems


def _one(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


def test_a_model_path_that_does_not_exist(tmp_path):
    problems = _problems(tmp_path, model={"name_or_path": str(tmp_path / "my-model")})
    _one(problems, "model.name_or_path", "does not exist")


def test_a_model_folder_with_pickle_weights_only(tmp_path):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    message = _one(_problems(tmp_path, model={"name_or_path": str(folder)}), "pickle")
    assert "pytorch_model.bin" in message and "save_pretrained" in message  # how to convert


def test_a_well_formed_hub_id_passes_the_model_check(tmp_path):
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, model={"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert preflight.check_model(cfg) == []


def test_a_reward_function_that_does_not_exist(tmp_path):
    grpo = stage("grpo", reward_functions={"my_missing_pkg.rewards:accuracy": 1.0})
    message = _one(_problems(tmp_path, [SFT_STAGE, grpo]), "stages.grpo.reward_functions")
    assert "my_missing_pkg" in message


def test_a_trl_reward_function_needs_its_column(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(
        "def accuracy(completions, solution, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    grpo = stage("grpo", reward_functions={"trl_rewards:accuracy": 1.0})
    _one(_problems(tmp_path, [SFT_STAGE, grpo]), "stages.grpo", "solution")


def test_packed_rows_fewer_than_the_batch(tmp_path):
    sft = {**SFT_STAGE, "per_device_batch_size": 500}
    message = _one(_problems(tmp_path, [sft]), "stages.sft", "packed rows", "batch of 500")
    assert "lower per_device_batch_size" in message


def test_online_batches_are_counted_in_prompts_per_method(tmp_path):
    """per_device_batch_size counts completions in GRPO (4 per prompt: 1600 -> 400 prompts)
    and in PPO (one per prompt: 400 -> 400 prompts); the demo has fewer prompts than that."""
    grpo = stage("grpo", per_device_batch_size=1600)
    ppo = stage("ppo", per_device_batch_size=400, num_mini_batches=1)
    reward = stage("reward")
    problems = _problems(tmp_path, [SFT_STAGE, reward, grpo, ppo])
    for name in ("grpo", "ppo"):
        message = _one(problems, f"stages.{name}", "cannot fill one batch of 400 prompts")
        assert "prompts in data.prompts" in message


def test_a_kto_eval_split_of_one_row(tmp_path):
    rows = demo.generate_kto(validate(PipelineConfig, tiny_pipeline_values(tmp_path)).demo,
                             0, "train")[:40]
    write_jsonl(rows, tmp_path / "kto.jsonl")
    write_jsonl(rows[:1], tmp_path / "kto_eval.jsonl")
    kto = stage("kto", data="kto")
    _one(_problems(tmp_path, [SFT_STAGE, kto], data={"kto": {
        "path": str(tmp_path / "kto.jsonl"), "eval_path": str(tmp_path / "kto_eval.jsonl")}}),
        "stages.kto", "held-out", "at least 2")


def test_a_bad_row_is_named_by_file_row_and_field(tmp_path):
    rows = demo.generate_sft(validate(PipelineConfig, tiny_pipeline_values(tmp_path)).demo,
                             0, "train")[:50]
    rows[7] = {**rows[7], "completion": ""}
    write_jsonl(rows, tmp_path / "sft.jsonl")
    _one(_problems(tmp_path, data={"sft": {"path": str(tmp_path / "sft.jsonl")}}),
         "sft.jsonl", "row 8", "completion")


def test_data_in_a_format_the_stage_cannot_train_on(tmp_path):
    dpo = stage("dpo", data="sft")  # prompt-completion rows for DPO
    message = _one(_problems(tmp_path, [SFT_STAGE, dpo]), "data.sft", "prompt_completion")
    assert "dpo (dpo) takes preference" in message and "sft (sft)" not in message


def test_a_promotion_metric_that_will_not_exist(tmp_path):
    rows = demo.generate_sft(validate(PipelineConfig, tiny_pipeline_values(tmp_path)).demo,
                             0, "train")[:80]
    write_jsonl(rows, tmp_path / "sft.jsonl")  # user data: no checker
    message = _one(_problems(tmp_path, data={"sft": {"path": str(tmp_path / "sft.jsonl")}},
                             promotion={"metric": "checker_accuracy"}), "promotion.metric")
    assert "checker_accuracy" in message and "eval_loss" in message  # what exists instead


def test_the_plan_shows_the_graph_and_what_is_cached(tmp_path):
    from posttrain import stages as stage_fns

    values = tiny_pipeline_values(tmp_path, [SFT_STAGE, stage("dpo")])
    cfg = validate(PipelineConfig, values)
    before = preflight.plan(cfg)
    assert [(r.stage, r.start, r.status) for r in before.rows] == [
        ("data", "-", "will run"), ("sft", "base", "will run"), ("dpo", "sft", "will run"),
        ("evaluate", "-", "will run")]
    assert before.rows[2].key is None  # it depends on the SFT artifact, not trained yet
    assert (before.rows[1].uses, before.rows[2].uses) == ("-", "reference")  # DPO's needs
    manifests = stage_fns.run_all(cfg, ["sft"])
    after = preflight.plan(cfg)
    assert [r.status for r in after.rows][:3] == ["cached", "cached", "will run"]
    assert after.rows[1].key == manifests["sft"]["key"]
    assert after.rows[2].key is not None


# ------------------------------------------------------------------ through the command line


def _posttrain(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    env.pop("PREFECT_API_URL", None)
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    return out, time.time() - started


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "dpo"])
def test_commands_fail_in_seconds_before_any_training(tmp_path, command):
    """A model folder that does not exist: `posttrain run` and a stage command exit 2
    with the message, start no Prefect server, log no MLflow run and write no artifact."""
    missing = tmp_path / "no-such-model"
    out, seconds = _posttrain([command, str(ROOT / "conf/demo.yaml"),
                               f"model.name_or_path={missing}",
                               f"artifacts_root={tmp_path / 'artifacts'}"], tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"model.name_or_path: {missing}" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert "nothing was trained" in out.stdout
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()
    assert seconds < 60, seconds


def test_a_hub_id_that_cannot_be_loaded_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    """Offline (or a typo in the id): the tokenizer cannot be fetched, and preflight says so."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _one(_problems(tmp_path, model={"name_or_path": "no-such-org/no-such-model"}),
                   "model.name_or_path", "cannot load the tokenizer", "no-such-org/no-such-model")
    assert "HF_HUB_OFFLINE" in message


def test_a_missing_accelerate_config(tmp_path):
    _one(_problems(tmp_path, launch={"accelerate_config": str(tmp_path / "nope.yaml")}),
         "launch.accelerate_config", "does not exist")
