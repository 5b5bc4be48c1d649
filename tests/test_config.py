"""Config validation: documented fields, errors that name the field, overrides, shipped YAML,
and the stage graph (names, starts, data sources, reward stages)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from posttrain import config as C
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "conf" / "demo.yaml"


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for f in model.model_fields.values():
        for arg in _flatten_annotation(f.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)


def _flatten_annotation(a):
    args = getattr(a, "__args__", None)
    if not args:
        return [a]
    return [x for arg in args for x in _flatten_annotation(arg)]


def _invalid(values: dict) -> str:
    """The ConfigError message validating `values` gives (the test fails when it validates)."""
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.PipelineConfig, values)
    return str(e.value)


def test_every_field_of_every_config_has_a_description():
    seen: set = set()
    _models(C.PipelineConfig, seen)
    stage_models = {C.SFTConfig, C.RewardConfig, C.DPOConfig, C.ORPOConfig, C.KTOConfig,
                    C.GRPOConfig, C.PPOConfig}
    assert stage_models <= seen  # every method of `stages` is reached through the union
    assert {C.LoraConfig, C.DatasetSource, C.DemoTaskConfig, C.MetricGuard} <= seen
    missing = [
        f"{m.__name__}.{name}"
        for m in seen
        for name, f in m.model_fields.items()
        if not (f.description and f.description.strip())
    ]
    assert missing == []


SHIPPED = sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))


def test_the_shipped_configs_are_found():
    assert {"demo.yaml", "qwen0.5b-lora.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = C.load_pipeline_config(ROOT / "conf" / name)
    assert isinstance(cfg, C.PipelineConfig)
    assert cfg.stages, "a shipped config declares at least one stage"


def test_qwen_example_uses_lora_and_no_remote_code():
    cfg = C.load_pipeline_config(ROOT / "conf" / "qwen0.5b-lora.yaml")
    assert cfg.model.lora is not None and cfg.model.trust_remote_code is False
    assert cfg.stage("sft").method == "sft"


def test_demo_declares_every_method_from_sft():
    cfg = C.load_pipeline_config(DEMO)
    assert sorted(s.method for s in cfg.stages) == sorted(
        ["sft", "reward", "dpo", "orpo", "kto", "grpo", "ppo", "simpo", "cpo", "rloo",
         "online_dpo", "gkd"])
    from posttrain.methods import METHODS

    assert {s.method for s in cfg.stages} == set(METHODS)  # every method the project has
    assert cfg.stages[0].name == "sft" and cfg.stages[0].start == "base"
    assert all(s.start == "sft" for s in cfg.stages[1:])
    assert cfg.stage("ppo").reward == "reward"
    assert all(s.data in cfg.data for s in cfg.stages)


def test_no_config_is_the_demo():
    # `posttrain run` without a config loads None; `make demo` runs conf/demo.yaml.
    assert C.load_pipeline_config(None) == C.load_pipeline_config("conf/demo.yaml")
    assert C.load_pipeline_config() == C.load_pipeline_config(DEMO)
    from pipelines.cli import _load

    assert _load(None, None) == C.load_pipeline_config(DEMO)


def test_make_demo_runs_the_demo_config():
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^demo\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    runs = [line for line in recipe if re.search(r"posttrain run\b", line)]
    assert runs, recipe
    for line in runs:
        args = line.split("posttrain run", 1)[1].split()
        assert args in ([], ["conf/demo.yaml"]), line


def test_an_empty_pipeline_has_no_stages():
    cfg = C.PipelineConfig()
    assert cfg.stages == () and cfg.data == {}
    assert cfg.eval_source is None and cfg.used_sources == []


def test_override_sets_nested_field_with_yaml_typing():
    cfg = C.load_pipeline_config(
        DEMO, ["stages.sft.learning_rate=1e-3", "stages.sft.packing=false", "model.lora.r=4"]
    )
    assert cfg.stage("sft").learning_rate == pytest.approx(1e-3)
    assert cfg.stage("sft").packing is False
    assert cfg.model.lora.r == 4


def test_override_addresses_a_stage_by_name():
    demo = C.load_pipeline_config(DEMO)
    cfg = C.load_pipeline_config(DEMO, ["stages.dpo.beta=0.25", "stages.orpo.max_steps=7"])
    assert cfg.stage("dpo").beta == pytest.approx(0.25) != demo.stage("dpo").beta
    assert cfg.stage("orpo").max_steps == 7
    # nothing else moves: the other stages, and the order of the stages
    assert [s.name for s in cfg.stages] == [s.name for s in demo.stages]
    for s in cfg.stages:
        if s.name not in ("dpo", "orpo"):
            assert s == demo.stage(s.name)
    assert cfg.stage("kto").beta == demo.stage("kto").beta


def test_override_of_an_unknown_stage_names_the_stages():
    with pytest.raises(C.ConfigError) as e:
        C.load_pipeline_config(DEMO, ["stages.nope.beta=0.5"])
    msg = str(e.value)
    assert "no stage named 'nope'" in msg
    for name in ("sft", "reward", "dpo", "orpo", "kto", "grpo", "ppo"):
        assert repr(name) in msg


def test_override_of_the_stage_list_itself_asks_for_a_name():
    with pytest.raises(C.ConfigError, match=r"list of stages; name a stage"):
        C.load_pipeline_config(DEMO, ["stages.beta=0.5"])


def test_override_points_a_source_and_the_model_at_local_files(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    cfg = C.load_pipeline_config(DEMO, [f"data.preference.path={pairs}",
                                        f"model.name_or_path={model_dir}"])
    assert cfg.data["preference"].path == str(pairs) and not cfg.data["preference"].is_demo
    assert cfg.data["sft"].path == "demo:sft"  # the other sources are untouched
    assert cfg.model.name_or_path == str(model_dir)
    # a local folder needs no pinned revision for remote code: the code is right there
    cfg = C.load_pipeline_config(DEMO, [f"model.name_or_path={model_dir}",
                                        "model.trust_remote_code=true"])
    assert cfg.model.trust_remote_code is True
    with pytest.raises(C.ConfigError, match="trust_remote_code=true needs revision pinned"):
        C.load_pipeline_config(DEMO, ["model.name_or_path=org/model",
                                      "model.trust_remote_code=true"])


def test_unknown_field_is_named():
    with pytest.raises(C.ConfigError,
                       match=r"stages\.sft\.learnin_rate: Extra inputs are not permitted"):
        C.load_pipeline_config(None, ["stages.sft.learnin_rate=0.1"])


def test_a_field_error_names_the_stage_not_its_index_or_method(tmp_path):
    values = tiny_pipeline_values(tmp_path, [SFT_STAGE, stage("dpo", name="dpo-b05", beta=-1)])
    msg = _invalid(values)
    assert "stages.dpo-b05.beta: Input should be greater than 0" in msg
    assert "stages.1" not in msg and "stages.dpo-b05.dpo" not in msg


def test_every_invalid_field_is_named_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.load_pipeline_config(None, ["stages.sft.learning_rate=-1",
                                      "model.tiny.hidden_size=abc"])
    msg = str(e.value)
    assert "stages.sft.learning_rate" in msg and "greater than 0" in msg
    assert "model.tiny.hidden_size" in msg


def test_cross_field_validation():
    with pytest.raises(C.ConfigError,
                       match=r"stages\.dpo\.reference: 'adapter' needs model\.lora"):
        C.load_pipeline_config(None, ["stages.dpo.reference=adapter"])
    assert C.load_pipeline_config(None, ["stages.dpo.reference=adapter",
                                         "model.lora.r=4"]).stage("dpo").reference == "adapter"
    with pytest.raises(C.ConfigError,
                       match=r"stages\.dpo: label_smoothing applies to loss_type 'robust'"):
        C.load_pipeline_config(None, ["stages.dpo.label_smoothing=0.1"])
    with pytest.raises(C.ConfigError, match=r"stages\.kto: per_device_batch_size must be at "
                                            r"least 2"):
        C.load_pipeline_config(None, ["stages.kto.per_device_batch_size=1"])
    with pytest.raises(C.ConfigError, match=r"stages\.grpo: per_device_batch_size \(12\) counts "
                                            r"completions"):
        C.load_pipeline_config(None, ["stages.grpo.per_device_batch_size=12"])


# ------------------------------------------------------------------------------ stage graph


SOURCES = "(sources: sft, preference, prompts)"
REWARD = stage("reward", start="sft")


@pytest.mark.parametrize(
    ("stages", "sections", "problem"),
    [
        ([SFT_STAGE, stage("dpo", start="nope")], {},
         "stages.dpo.start: 'nope' is neither 'base' nor an earlier stage (earlier: sft)"),
        # a later stage is not an earlier one: the order of `stages` is the order they run in
        ([SFT_STAGE, stage("dpo", start="orpo"), stage("orpo")], {},
         "stages.dpo.start: 'orpo' is neither 'base' nor an earlier stage (earlier: sft)"),
        ([stage("sft", start="sft", data="sft")], {},
         "stages.sft.start: 'sft' is neither 'base' nor an earlier stage (earlier: none)"),
        ([SFT_STAGE, stage("dpo"), stage("dpo", beta=0.5)], {},
         "stages.dpo.name: another stage already has this name"),
        ([SFT_STAGE, REWARD, stage("dpo", start="reward")], {},
         "stages.dpo.start: 'reward' is a reward model; start from a language model"),
        ([SFT_STAGE, stage("dpo", data=None)], {},
         f"stages.dpo.data: name the data source this dpo stage trains on {SOURCES}"),
        ([SFT_STAGE, stage("dpo", data="pairs")], {},
         f"stages.dpo.data: no data source named 'pairs' {SOURCES}"),
        ([SFT_STAGE, REWARD, stage("ppo", reward=None)], {},
         "stages.ppo.reward: name the reward stage that scores this stage's completions"),
        ([SFT_STAGE, REWARD, stage("ppo", reward="sft")], {},
         "stages.ppo.reward: 'sft' is not an earlier reward stage"),
        ([SFT_STAGE, REWARD, stage("ppo", reward="nope")], {},
         "stages.ppo.reward: 'nope' is not an earlier reward stage"),
        ([SFT_STAGE, stage("ppo"), REWARD], {},
         "stages.ppo.reward: 'reward' is not an earlier reward stage"),
        ([SFT_STAGE, REWARD, stage("dpo", reward="reward")], {},
         ("stages.dpo.reward: only PPO, and GRPO with 'reward_model' in reward_functions, "
          "use a reward stage")),
        ([SFT_STAGE, REWARD, stage("grpo", reward="reward")], {},
         "stages.grpo.reward: only PPO, and GRPO with 'reward_model' in reward_functions"),
        ([SFT_STAGE, stage("grpo", reward_functions={})], {},
         "stages.grpo.reward_functions: name at least one"),
        ([SFT_STAGE, REWARD, stage("grpo", reward_functions={"reward_model": 1.0})], {},
         "stages.grpo.reward: name the reward stage that scores this stage's completions"),
        ([SFT_STAGE], {"evaluate": {"reference": "nope"}},
         "evaluate.reference: 'nope' is neither 'base' nor a language-model stage"),
        ([SFT_STAGE, REWARD], {"evaluate": {"reference": "reward"}},
         "evaluate.reference: 'reward' is neither 'base' nor a language-model stage"),
        ([SFT_STAGE, REWARD], {"evaluate": {"reward": "nope"}},
         "evaluate.reward: 'nope' is not a reward stage"),
        ([SFT_STAGE, REWARD], {"evaluate": {"reward": "sft"}},
         "evaluate.reward: 'sft' is not a reward stage"),
        ([SFT_STAGE], {"evaluate": {"data": "nope"}},
         "evaluate.data: no data source named 'nope'"),
        ([SFT_STAGE, stage("dpo")], {"promotion": {"candidates": ["dpo", "nope"]}},
         "promotion.candidates: 'nope' is not a language-model stage"),
        ([SFT_STAGE, REWARD], {"promotion": {"candidates": ["reward"]}},
         "promotion.candidates: 'reward' is not a language-model stage"),
        ([SFT_STAGE], {"promotion": {"require_significance": True},
                       "evaluate": {"bootstrap_samples": 0}},
         ("promotion.require_significance needs confidence intervals: set "
         "evaluate.bootstrap_samples above 0")),
    ],
)
def test_graph_problems_name_the_stage_and_field(tmp_path, stages, sections, problem):
    msg = _invalid(tiny_pipeline_values(tmp_path, stages, **sections))
    assert f"\n  {problem}" in msg, msg


@pytest.mark.parametrize("name", C.RESERVED_NAMES)
def test_reserved_stage_names_are_refused(tmp_path, name):
    msg = _invalid(tiny_pipeline_values(tmp_path, [SFT_STAGE, stage("dpo", name=name)]))
    assert f"stages.{name}.name: {name!r} is reserved" in msg


def test_every_graph_problem_is_named_at_once(tmp_path):
    msg = _invalid(tiny_pipeline_values(
        tmp_path, [SFT_STAGE, stage("dpo", start="nope", data="pairs"), stage("ppo")],
        evaluate={"reference": "gone"}))
    for problem in ("stages.dpo.start: 'nope'", "stages.dpo.data: no data source named 'pairs'",
                    "stages.ppo.reward: 'reward' is not an earlier reward stage",
                    "evaluate.reference: 'gone'"):
        assert problem in msg, msg


def test_a_valid_graph_of_every_kind_validates(tmp_path):
    cfg = C.validate(C.PipelineConfig, tiny_pipeline_values(tmp_path, [
        SFT_STAGE, REWARD, stage("dpo"), stage("ppo"),
        stage("grpo", reward="reward",
              reward_functions={"reward_model": 1.0,
                                "posttrain.reward_functions:demo_checker": 0.5}),
        stage("kto", start="dpo"),  # a chain: KTO after DPO
    ], evaluate={"reference": "sft", "reward": "reward"}, promotion={"candidates": ["dpo"]}))
    assert cfg.stage("kto").start == "dpo" and cfg.stage("grpo").uses_reward_stage
    assert cfg.eval_reward == "reward" and cfg.eval_source == "sft"
    assert cfg.used_sources == ["sft", "preference", "prompts"]


def test_a_stage_name_defaults_to_its_method(tmp_path):
    bare = {k: v for k, v in stage("dpo").items() if k != "name"}
    cfg = C.validate(C.PipelineConfig, tiny_pipeline_values(
        tmp_path, [{k: v for k, v in SFT_STAGE.items() if k != "name"}, bare]))
    assert [s.name for s in cfg.stages] == ["sft", "dpo"]
    assert cfg.stage("dpo").start == "sft"
    alone = C.SFTConfig(max_steps=3)  # a stage config used by itself (recipes)
    assert (alone.name, alone.start, alone.data) == ("sft", "base", None)
    assert C.GRPOConfig(reward_functions={"m:f": 1.0}).name == "grpo"


def test_the_same_method_twice_with_different_names_and_settings(tmp_path):
    cfg = C.validate(C.PipelineConfig, tiny_pipeline_values(tmp_path, [
        SFT_STAGE, stage("dpo", name="dpo-b01", beta=0.1), stage("dpo", name="dpo-b05", beta=0.5),
    ]))
    assert cfg.stage("dpo-b01").beta == pytest.approx(0.1)
    assert cfg.stage("dpo-b05").beta == pytest.approx(0.5)
    assert [s.method for s in cfg.stages] == ["sft", "dpo", "dpo"]
    with pytest.raises(KeyError, match=r"no stage named 'dpo'.*dpo-b01"):
        cfg.stage("dpo")


def test_bad_stage_and_source_names_are_refused(tmp_path):
    msg = _invalid(tiny_pipeline_values(tmp_path, [SFT_STAGE, stage("dpo", name="DPO One")]))
    assert "stages.DPO One.name" in msg and "pattern" in msg
    values = tiny_pipeline_values(tmp_path, [SFT_STAGE])
    values["data"]["bad name"] = {"path": "demo:sft"}
    assert "data.bad name: source names are letters, digits" in _invalid(values)


@pytest.mark.parametrize("name", [5, ["a"]])
def test_a_stage_name_of_the_wrong_type_is_a_config_error(name):
    msg = _invalid({"stages": [{"name": name, "method": "sft", "max_steps": -1}]})
    assert "name" in msg and "max_steps" in msg


@pytest.mark.parametrize("path", ["demo", "demo:nope"])
def test_a_demo_source_names_its_kind(tmp_path, path):
    values = tiny_pipeline_values(tmp_path, data={"sft": {"path": path}})
    msg = _invalid(values)
    assert f"data.sft: path {path!r}: the built-in data is one of " in msg
    for name in C.DEMO_SOURCES:
        assert name in msg
    with pytest.raises(C.ConfigError, match=r"data\.preference: path 'demo'.*demo:preference"):
        C.load_pipeline_config(DEMO, ["data.preference.path=demo"])


# ---------------------------------------------------------------------------------- merging


def test_merge_deep_merges_mappings_and_replaces_lists():
    base = {"name": "a", "model": {"name_or_path": "tiny", "tiny": {"hidden_size": 64,
                                                                      "seed": 0}},
            "stages": [{"name": "sft"}, {"name": "dpo"}], "data": {"sft": {"path": "x"}}}
    update = {"model": {"tiny": {"seed": 1}}, "stages": [{"name": "orpo"}], "extra": {"k": 1},
              "data": "replaced"}
    out = C.merge(base, update)
    assert out == {"name": "a", "model": {"name_or_path": "tiny",
                                          "tiny": {"hidden_size": 64, "seed": 1}},
                   "stages": [{"name": "orpo"}], "data": "replaced", "extra": {"k": 1}}
    # neither input is changed, and the result shares no nested object with the base
    assert base["model"]["tiny"] == {"hidden_size": 64, "seed": 0}
    assert base["stages"] == [{"name": "sft"}, {"name": "dpo"}]
    out["model"]["name_or_path"] = "changed"
    assert base["model"]["name_or_path"] == "tiny"
    assert C.merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}  # a mapping replaces a value


# ------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("bad", ["stages.sft.max_steps", "=3", "stages.sft.max_steps=[1"])
def test_malformed_override(bad):
    with pytest.raises(C.ConfigError):
        C.load_pipeline_config(None, [bad])


def test_override_into_a_value_is_refused():
    with pytest.raises(C.ConfigError, match="is a value, not a section"):
        C.load_pipeline_config(DEMO, ["name.x=1"])
    with pytest.raises(C.ConfigError, match="is a value, not a section"):
        C.load_pipeline_config(DEMO, ["stages.sft.max_steps.x=1"])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="must be a mapping"):
        C.load_pipeline_config(bad)


def test_configs_are_frozen():
    cfg = C.load_pipeline_config(DEMO)
    with pytest.raises(ValidationError):
        cfg.stages[0].max_steps = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.data["sft"].path = "other.jsonl"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.stages.append(cfg.stages[0])  # type: ignore[attr-defined]  # a tuple
