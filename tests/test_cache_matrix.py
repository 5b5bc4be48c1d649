"""Cache invalidation matrix: one cause at a time, exactly the expected stages re-run.

Stages run without Prefect (posttrain.stages): the same keys decide both the artifact folders and
the Prefect cache, so this is the matrix of both.
"""

from __future__ import annotations

import pytest

from posttrain import artifacts, stages
from posttrain.config import PipelineConfig, validate
from posttrain.data import demo
from posttrain.data.loading import write_jsonl
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

SMALL = {"max_steps": 2, "per_device_batch_size": 4, "warmup_steps": 0, "max_length": 48,
         "eval_every": 2}
ALL = ("data", "sft", "dpo", "evaluate")


def _cfg(tmp_path, path, dpo: dict | None = None, **overrides) -> PipelineConfig:
    values = tiny_pipeline_values(
        tmp_path, [SFT_STAGE, stage("dpo", **{**SMALL, **(dpo or {})})],
        data={"sft": {"path": str(path)}}, evaluate={"max_prompts": 8},
    )
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        values[section] = {**values.get(section, {}), field: value}
    return validate(PipelineConfig, values)


def _run(cfg: PipelineConfig) -> set[str]:
    """The stages that actually ran (were not found in the cache)."""
    return {name for name, m in stages.run_all(cfg).items() if not m["cached"]}


@pytest.fixture()
def baseline(tmp_path):
    rows = demo.generate_sft(validate(PipelineConfig, {}).demo, 0, "train")[:120]
    path = tmp_path / "sft.jsonl"
    write_jsonl(rows, path)
    assert _run(_cfg(tmp_path, path)) == set(ALL)
    assert _run(_cfg(tmp_path, path)) == set()  # unchanged: nothing re-runs
    return tmp_path, path, rows


@pytest.mark.slow
def test_one_data_row_reruns_everything(baseline):
    tmp_path, path, rows = baseline
    rows[3] = {**rows[3], "completion": [{"role": "assistant", "content": "42"}]}
    write_jsonl(rows, path)
    assert _run(_cfg(tmp_path, path)) == set(ALL)


@pytest.mark.slow
def test_chat_template_reruns_everything_but_data(baseline):
    tmp_path, path, _ = baseline
    template = ("#{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert _run(_cfg(tmp_path, path, **{"model.chat_template": template})) == \
        {"sft", "dpo", "evaluate"}


@pytest.mark.slow
def test_base_model_revision_reruns_everything_but_data(baseline):
    tmp_path, path, _ = baseline
    assert _run(_cfg(tmp_path, path, **{"model.revision": "v2"})) == {"sft", "dpo", "evaluate"}


@pytest.mark.slow
def test_one_stage_field_reruns_that_stage_and_evaluation(baseline):
    tmp_path, path, _ = baseline
    assert _run(_cfg(tmp_path, path, dpo={"beta": 0.3})) == {"dpo", "evaluate"}


@pytest.mark.slow
def test_renaming_a_stage_is_not_a_new_result(baseline):
    """The key holds what a stage computes, not its name: the renamed DPO stage finds the
    same key (in its own folder, so it trains once there) and evaluation re-runs."""
    tmp_path, path, _ = baseline
    values = _cfg(tmp_path, path).model_dump(mode="json")
    before = stages.run_all(validate(PipelineConfig, values))["dpo"]["key"]
    values["stages"][1]["name"] = "dpo-renamed"
    renamed = stages.run_all(validate(PipelineConfig, values))
    assert renamed["dpo-renamed"]["key"] == before
    assert renamed["sft"]["cached"]


@pytest.mark.slow
def test_library_code_reruns_everything(baseline, monkeypatch):
    tmp_path, path, _ = baseline
    monkeypatch.setattr(artifacts, "code_version", lambda: "edited-library")
    assert _run(_cfg(tmp_path, path)) == set(ALL)
