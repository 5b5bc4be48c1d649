"""The recipes in conf/ and conf/examples/: they validate, their paths can be overridden from the
command line, `posttrain plan` passes on them, and the chain example runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.yaml"))
CONFIGS = [ROOT / "conf" / "demo.yaml", ROOT / "conf" / "qwen0.5b-lora.yaml", *EXAMPLES]
# The built-in data, small: enough rows for every example's batches, a fast preflight.
SMALL_DEMO = ["demo.num_train=300", "demo.num_eval=40"]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT / "conf"))


def _posttrain(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_examples_are_there():
    assert {p.name for p in EXAMPLES} >= {
        "dpo-from-instruct.yaml", "chain-sft-dpo-grpo.yaml", "dpo-betas.yaml",
        "reference-free.yaml", "grpo-vs-rloo.yaml"}
    assert not (ROOT / "conf" / "examples" / "demo.yaml").exists()  # the demo is conf/demo.yaml


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_validates(path):
    cfg = load_pipeline_config(path)
    assert cfg.stages, "a recipe declares at least one stage"
    for stage in cfg.stages:
        assert stage.data in cfg.data


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_sources_have_the_usual_names(path):
    cfg = load_pipeline_config(path)
    assert set(cfg.data) <= {"sft", "preference", "prompts", "kto"}
    assert all(src.is_demo for src in cfg.data.values())  # they run offline as they are
    assert cfg.model.name_or_path in ("tiny", "tiny-vlm")


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_model_and_data_paths_override_from_the_command_line(path, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    sources = list(load_pipeline_config(path).data)
    files = {name: tmp_path / f"{name}.jsonl" for name in sources}
    for file in files.values():
        file.write_text('{"prompt": "p", "completion": "c"}\n')
    overrides = [f"model.name_or_path={model_dir}",
                 *(f"data.{name}.path={file}" for name, file in files.items())]
    cfg = load_pipeline_config(path, overrides)
    assert cfg.model.name_or_path == str(model_dir)
    for name, file in files.items():
        assert cfg.data[name].path == str(file)
    # Only the path changed: the source keeps its other settings.
    before = load_pipeline_config(path)
    for name in sources:
        assert cfg.data[name].model_dump(exclude={"path"}) == \
            before.data[name].model_dump(exclude={"path"})
    assert [s.model_dump() for s in cfg.stages] == [s.model_dump() for s in before.stages]


def test_dpo_from_instruct_is_one_dpo_stage_from_the_base_model():
    cfg = load_pipeline_config(ROOT / "conf/examples/dpo-from-instruct.yaml")
    assert [(s.name, s.method, s.start, s.data) for s in cfg.stages] == [
        ("dpo", "dpo", "base", "preference")]
    assert cfg.data["preference"].path == "demo:preference"
    assert (cfg.eval_source, cfg.evaluate.reference) == ("preference", "base")


def test_chain_example_starts_each_method_from_the_one_before():
    cfg = load_pipeline_config(ROOT / "conf/examples/chain-sft-dpo-grpo.yaml")
    assert [(s.name, s.method, s.start, s.data) for s in cfg.stages] == [
        ("sft", "sft", "base", "sft"), ("dpo", "dpo", "sft", "preference"),
        ("grpo", "grpo", "dpo", "prompts")]
    assert cfg.stage("grpo").reward_functions == {"posttrain.reward_functions:demo_checker": 1.0}
    assert cfg.evaluate.reference == "sft"


def test_dpo_betas_example_trains_two_betas_from_one_sft():
    cfg = load_pipeline_config(ROOT / "conf/examples/dpo-betas.yaml")
    dpo = {s.name: s for s in cfg.stages if s.method == "dpo"}
    assert set(dpo) == {"dpo-b01", "dpo-b05"}
    assert (dpo["dpo-b01"].beta, dpo["dpo-b05"].beta) == (0.1, 0.5)
    assert all(s.start == "sft" for s in dpo.values())
    # Only beta differs between the two.
    assert dpo["dpo-b01"].model_dump(exclude={"name", "beta"}) == \
        dpo["dpo-b05"].model_dump(exclude={"name", "beta"})
    # A stage name with a dash is addressable by an override.
    cfg = load_pipeline_config(ROOT / "conf/examples/dpo-betas.yaml", ["stages.dpo-b05.beta=1.0"])
    assert cfg.stage("dpo-b05").beta == 1.0


def test_reference_free_example_trains_orpo_simpo_and_cpo_from_one_sft():
    """The three reference-free methods from the same SFT model, with the papers' settings:
    SimPO beta 2, gamma 1, no NLL; CPO beta 0.1 with NLL weight 1; none needs a reference."""
    from posttrain.methods import uses_reference

    cfg = load_pipeline_config(ROOT / "conf/examples/reference-free.yaml")
    assert [(s.name, s.method, s.start, s.data) for s in cfg.stages] == [
        ("sft", "sft", "base", "sft"), ("orpo", "orpo", "sft", "preference"),
        ("simpo", "simpo", "sft", "preference"), ("cpo", "cpo", "sft", "preference")]
    simpo, cpo = cfg.stage("simpo"), cfg.stage("cpo")
    assert (simpo.beta, simpo.gamma, simpo.cpo_alpha) == (2.0, 1.0, 0.0)
    assert (cpo.beta, cpo.cpo_alpha) == (0.1, 1.0)
    assert not any(uses_reference(s) for s in cfg.stages)
    assert cfg.promotion.candidates == ("orpo", "simpo", "cpo")


def test_grpo_vs_rloo_example_differs_in_the_method_only():
    """GRPO and RLOO from one SFT model with the same sampling, reward and KL weight; RLOO's KL
    goes into the reward. Both load the SFT model as their reference (beta > 0)."""
    from posttrain.methods import uses_reference

    cfg = load_pipeline_config(ROOT / "conf/examples/grpo-vs-rloo.yaml")
    assert [(s.name, s.method, s.start, s.data) for s in cfg.stages] == [
        ("sft", "sft", "base", "sft"), ("grpo", "grpo", "sft", "prompts"),
        ("rloo", "rloo", "sft", "prompts")]
    grpo, rloo = cfg.stage("grpo"), cfg.stage("rloo")
    shared = {"num_generations", "per_device_batch_size", "temperature", "beta",
              "reward_functions", "max_completion_length", "learning_rate", "max_steps"}
    assert grpo.model_dump(include=shared) == rloo.model_dump(include=shared)
    assert rloo.kl_placement == "reward" and uses_reference(grpo) and uses_reference(rloo)
    assert cfg.evaluate.reference == "sft"


def test_online_dpo_example_ranks_with_the_reward_model_and_with_the_checker():
    """Two online DPO stages from one SFT model, the same sampling and beta, ranked one by the
    reward stage's model and one by the checker; only the first uses the reward stage."""
    cfg = load_pipeline_config(ROOT / "conf/examples/online-dpo.yaml")
    assert [(s.name, s.method, s.start, s.data) for s in cfg.stages] == [
        ("sft", "sft", "base", "sft"), ("reward", "reward", "sft", "preference"),
        ("online_dpo_rm", "online_dpo", "sft", "prompts"),
        ("online_dpo_checker", "online_dpo", "sft", "prompts")]
    rm, checker = cfg.stage("online_dpo_rm"), cfg.stage("online_dpo_checker")
    shared = {"per_device_batch_size", "temperature", "beta", "max_completion_length",
              "learning_rate", "max_steps"}
    assert rm.model_dump(include=shared) == checker.model_dump(include=shared)
    assert rm.uses_reward_stage and rm.reward == "reward"
    assert not checker.uses_reward_stage and checker.reward is None
    with pytest.raises(Exception, match="online_dpo_checker.reward"):
        load_pipeline_config(ROOT / "conf/examples/online-dpo.yaml",
                             ["stages.online_dpo_checker.reward=reward"])


@pytest.mark.parametrize(("override", "message"), [
    ("stages.simpo.gamma=-0.5", "stages.simpo.gamma: Input should be greater than or equal"),
    ("stages.simpo.beta=0", "stages.simpo.beta: Input should be greater than 0"),
    ("stages.cpo.cpo_alpha=-1", "stages.cpo.cpo_alpha: Input should be greater than or equal"),
    ("stages.cpo.reference=copy", "stages.cpo.reference: Extra inputs are not permitted"),
    ("stages.simpo.loss_type=ipo", "stages.simpo.loss_type: Extra inputs are not permitted"),
])
def test_reference_free_settings_are_validated(override, message):
    """Bad SimPO/CPO settings fail at load, named by stage and field; a reference mode is
    refused on a method that has no reference."""
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_pipeline_config(ROOT / "conf/examples/reference-free.yaml", [override])
    assert message in str(e.value)


def test_distill_example_distils_the_wider_sft_model_into_a_narrower_student():
    cfg = load_pipeline_config(ROOT / "conf/examples/distill.yaml")
    sft, gkd = cfg.stages
    assert (sft.method, gkd.method, gkd.teacher, gkd.start) == ("sft", "gkd", "sft", "base")
    assert gkd.student is not None and gkd.student.name_or_path == "tiny"
    assert gkd.student.tiny.hidden_size < cfg.model.tiny.hidden_size
    assert (gkd.lmbda, gkd.beta, gkd.temperature) == (0.5, 0.5, 0.9)
    assert cfg.evaluate.reference == "sft" and cfg.promotion.candidates == ("gkd",)


@pytest.mark.parametrize(("override", "message"), [
    ("stages.gkd.teacher=nothing", ("stages.gkd.teacher: 'nothing' is neither an earlier stage "
                                   "(earlier: sft) nor an existing model folder")),
    ("stages.gkd.teacher=gkd", "stages.gkd.teacher: 'gkd' is neither an earlier stage"),
    ("stages.gkd.teacher=null", "stages.gkd.teacher: name the teacher"),
    ("stages.gkd.start=sft", ("stages.gkd: student: a student model section builds the student "
                             "itself, so start must be 'base'")),
    ("stages.gkd.lmbda=1.5", "stages.gkd.lmbda: Input should be less than or equal to 1"),
    ("stages.gkd.beta=-0.1", "stages.gkd.beta: Input should be greater than or equal to 0"),
    ("stages.gkd.temperature=0", "stages.gkd.temperature: Input should be greater than 0"),
])
def test_distill_settings_are_validated(override, message):
    """A teacher that is no earlier stage and no folder, a student section with a start stage
    and out-of-range settings fail at load, named by stage and field."""
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_pipeline_config(ROOT / "conf/examples/distill.yaml", [override])
    assert message in str(e.value)


def test_distill_teacher_may_be_a_folder_but_not_a_reward_model(tmp_path):
    from posttrain.config import ConfigError

    cfg = load_pipeline_config(ROOT / "conf/examples/distill.yaml",
                               [f"stages.gkd.teacher={tmp_path}"])
    assert cfg.stage("gkd").teacher == str(tmp_path)
    values = {"data": {"sft": {"path": "demo:sft"}, "preference": {"path": "demo:preference"}},
              "stages": [{"name": "rm", "method": "reward", "data": "preference"},
                         {"name": "gkd", "method": "gkd", "teacher": "rm", "data": "sft"}]}
    from posttrain.config import PipelineConfig, validate

    with pytest.raises(ConfigError, match="stages.gkd.teacher: 'rm' is a reward model"):
        validate(PipelineConfig, values)


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_preflight_passes_on_every_example(path, tmp_path):
    """In-process preflight (what `posttrain plan` runs) on each example's built-in data."""
    from posttrain.preflight import plan

    cfg = load_pipeline_config(path, [*SMALL_DEMO, f"artifacts_root={tmp_path / 'artifacts'}"])
    result = plan(cfg)
    assert [r.stage for r in result.rows] == ["data", *(s.name for s in cfg.stages), "evaluate"]
    assert result.promotion["metric"] == "checker_accuracy"


@pytest.mark.slow
def test_posttrain_plan_on_dpo_from_instruct(tmp_path):
    result = _posttrain(["plan", str(ROOT / "conf/examples/dpo-from-instruct.yaml"),
                         f"artifacts_root={tmp_path / 'artifacts'}", *SMALL_DEMO], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "posttrain plan: dpo-from-instruct" in out and "preflight passed" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().split(" ", 1)[0] in ("data", "dpo", "evaluate")}
    assert rows["data"][1:4] == ["-", "-", "preference"]
    assert rows["dpo"][1:4] == ["dpo", "base", "preference"]
    assert "will run" in " ".join(rows["dpo"])
    assert rows["evaluate"][3] == "preference"
    assert not (tmp_path / "artifacts" / "dpo").exists()  # a plan trains nothing


@pytest.mark.slow
def test_chain_example_runs_end_to_end(tmp_path):
    """conf/examples/chain-sft-dpo-grpo.yaml, shortened, run through the library's graph
    runner (the command line's path is tests/test_cli.py's): every stage and the evaluation
    finish, and the evaluation compares base, sft, dpo and grpo."""
    from posttrain import stages, tracking

    overrides = [
        *SMALL_DEMO, f"artifacts_root={tmp_path / 'artifacts'}",
        "stages.sft.max_steps=30", "stages.sft.eval_every=15",
        "stages.dpo.max_steps=5", "stages.dpo.per_device_batch_size=8",
        "stages.grpo.max_steps=3", "stages.grpo.per_device_batch_size=16",
        "stages.grpo.eval_every=100", "evaluate.max_prompts=16",
        f"tracking.experiment=chain-{tmp_path.name}",
    ]
    cfg = load_pipeline_config(ROOT / "conf/examples/chain-sft-dpo-grpo.yaml", overrides)
    manifests = stages.run_all(cfg)
    comparison = manifests["evaluate"]["comparison"]
    assert list(comparison) == ["base", "sft", "dpo", "grpo"]
    assert {"checker_accuracy", "kl_to_reference"} <= set(comparison["grpo"])
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment)
                               .experiment_id])
    assert {r.info.run_name for r in runs} == {"data", "sft", "dpo", "grpo", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_distill_example_runs_end_to_end(tmp_path):
    """conf/examples/distill.yaml, shortened: the teacher trains, the narrower student is
    distilled from it (its saved model is narrower, the JSD to the teacher falls) and the
    evaluation compares base, sft and gkd."""
    import json

    from posttrain import stages

    overrides = [
        *SMALL_DEMO, f"artifacts_root={tmp_path / 'artifacts'}",
        "stages.sft.max_steps=30", "stages.sft.eval_every=15",
        "stages.gkd.max_steps=8", "stages.gkd.eval_every=4", "stages.gkd.log_every=1",
        "stages.gkd.per_device_batch_size=8", "stages.gkd.lmbda=0.5",
        "evaluate.max_prompts=16", f"tracking.experiment=distill-{tmp_path.name}",
    ]
    cfg = load_pipeline_config(ROOT / "conf/examples/distill.yaml", overrides)
    manifests = stages.run_all(cfg)
    assert list(manifests["evaluate"]["comparison"]) == ["base", "sft", "gkd"]
    gkd = manifests["gkd"]
    model_cfg = json.loads((Path(gkd["path"]) / "model" / "config.json").read_text())
    assert model_cfg["hidden_size"] == 64
    assert gkd["teacher"] == manifests["sft"]["path"]
    metrics = gkd["metrics"]
    assert 0.0 <= metrics["on_policy_fraction"] <= 1.0 and metrics["eval_jsd"] >= 0
    # the teacher's digest is part of the student's key: a retrained teacher is a new student
    assert stages.run_all(cfg, ["gkd"])["gkd"]["cached"]
