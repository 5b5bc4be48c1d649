"""Config validation: documented fields, errors that name the field, overrides, shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from posttrain import config as C

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_field_of_every_config_has_a_description():
    seen: set = set()
    _models(C.PipelineConfig, seen)
    assert C.SFTConfig in seen and C.LoraConfig in seen
    missing = [
        f"{m.__name__}.{name}"
        for m in seen
        for name, f in m.model_fields.items()
        if not (f.description and f.description.strip())
    ]
    assert missing == []


@pytest.mark.parametrize("name", ["demo.yaml", "qwen0.5b-lora.yaml"])
def test_shipped_configs_validate(name):
    cfg = C.load_pipeline_config(ROOT / "conf" / name)
    assert isinstance(cfg, C.PipelineConfig)


def test_qwen_example_uses_lora_and_no_remote_code():
    cfg = C.load_pipeline_config(ROOT / "conf" / "qwen0.5b-lora.yaml")
    assert cfg.model.lora is not None and cfg.model.trust_remote_code is False


def test_override_sets_nested_field_with_yaml_typing():
    cfg = C.load_pipeline_config(
        ROOT / "conf" / "demo.yaml", ["sft.learning_rate=1e-3", "sft.packing=false",
                                       "model.lora.r=4"]
    )
    assert cfg.sft.learning_rate == pytest.approx(1e-3)
    assert cfg.sft.packing is False
    assert cfg.model.lora.r == 4


def test_unknown_field_is_named():
    with pytest.raises(C.ConfigError, match=r"sft\.learnin_rate: Extra inputs are not permitted"):
        C.load_pipeline_config(None, ["sft.learnin_rate=0.1"])


def test_every_invalid_field_is_named_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.load_pipeline_config(None, ["sft.learning_rate=-1", "model.tiny.hidden_size=abc"])
    msg = str(e.value)
    assert "sft.learning_rate" in msg and "greater than 0" in msg
    assert "model.tiny.hidden_size" in msg


def test_cross_field_validation():
    with pytest.raises(C.ConfigError, match=r"methods \['dpo'\] need data.preference"):
        C.load_pipeline_config(None, ["methods=[dpo]"])
    with pytest.raises(C.ConfigError, match="ppo needs data.preference"):
        C.load_pipeline_config(None, ["methods=[ppo]"])
    with pytest.raises(C.ConfigError, match="dpo.reference='adapter' needs model.lora"):
        C.load_pipeline_config(None, ["methods=[dpo]", "data.preference.path=demo",
                                      "dpo.reference=adapter"])
    with pytest.raises(C.ConfigError, match="label_smoothing applies to loss_type 'robust'"):
        C.load_pipeline_config(None, ["dpo.label_smoothing=0.1"])


@pytest.mark.parametrize("bad", ["sft.max_steps", "=3", "sft.max_steps=[1"])
def test_malformed_override(bad):
    with pytest.raises(C.ConfigError):
        C.load_pipeline_config(None, [bad])


def test_override_into_a_value_is_refused():
    with pytest.raises(C.ConfigError, match="is a value, not a section"):
        C.load_pipeline_config(ROOT / "conf" / "demo.yaml", ["name.x=1"])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="must be a mapping"):
        C.load_pipeline_config(bad)


def test_configs_are_frozen():
    cfg = C.PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.sft.max_steps = 3  # type: ignore[misc]
