"""Property-based tests: malformed rows, files and configs give clear errors naming the row or
field, never a deep traceback of another type, and never a partial artifact."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.config import ConfigError, PipelineConfig, load_pipeline_config, validate
from posttrain.data.loading import DataError, load_rows
from posttrain.data.validation import detect_format, validate_rows

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Keys without control characters: a key with a newline would only test the line splitting of
# this test, not the error.
keys = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=6)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(keys, inner, max_size=3)),
    max_leaves=6,
)
columns = st.sampled_from(["prompt", "completion", "chosen", "rejected", "label", "text",
                           "messages", "role", "content", "x"])
rows = st.lists(st.dictionaries(columns, values, min_size=1, max_size=4), min_size=1,
                max_size=5)


@FAST
@given(rows)
def test_random_rows_are_accepted_or_refused_with_the_row_named(batch):
    try:
        fmt = detect_format(batch, "fuzz.jsonl")
        validate_rows(batch, fmt, source="fuzz.jsonl")
    except DataError as e:
        assert "fuzz.jsonl" in str(e)
        if "row" not in str(e):  # format detection speaks of columns instead
            assert "column" in str(e) or "format" in str(e), str(e)


@FAST
@given(rows, st.sampled_from(["drop"]), st.floats(min_value=0.0, max_value=1.0))
def test_drop_mode_never_loses_count(batch, mode, share):
    try:
        fmt = detect_format(batch, "f.jsonl")
        good, report = validate_rows(batch, fmt, source="f.jsonl", on_bad_rows=mode,
                                     max_drop_fraction=share)
    except DataError:
        return
    assert report["rows_in"] == len(batch)
    assert report["rows_out"] == len(good)
    assert sum(report["dropped"].values()) == len(batch) - len(good)


@FAST
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_random_file_bytes_load_or_fail_with_the_file_named(tmp_path, blob, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(blob)
    try:
        loaded = load_rows(str(path))
    except DataError as e:
        assert str(path) in str(e) or path.name in str(e), str(e)
    else:
        assert isinstance(loaded, list) and all(isinstance(r, dict) for r in loaded)


config_values = st.dictionaries(
    st.sampled_from(["name", "data", "demo", "model", "stages", "evaluate", "promotion",
                     "bogus"]),
    values, max_size=4,
)


def _lines_name_fields(message: str) -> None:
    assert message.startswith("invalid configuration (fuzz.yaml)"), message
    lines = message.split("\n")[1:]  # one "  field.path: reason" line per problem
    assert lines and all(line.startswith("  ") and ": " in line for line in lines), message


@FAST
@given(config_values)
def test_random_configs_validate_or_name_the_field(raw):
    try:
        validate(PipelineConfig, raw, "fuzz.yaml")
    except ConfigError as e:
        _lines_name_fields(str(e))


# Stage graphs built from a few names: some fit, most refer to what does not exist (yet).
names = st.sampled_from(["sft", "dpo", "reward", "ppo", "grpo", "base", "x"])
graph_stages = st.lists(
    st.fixed_dictionaries(
        {"method": st.sampled_from(["sft", "reward", "dpo", "orpo", "simpo", "cpo", "kto",
                                    "grpo", "rloo", "online_dpo", "gkd", "ppo"])},
        optional={"name": names, "start": names, "data": st.sampled_from(["sft", "pairs", "nope"]),
                  "reward": names, "beta": st.sampled_from([0.1, -1.0, "x"]),
                  "reward_functions": st.sampled_from([{}, {"reward_model": 1.0},
                                                       {"m:f": 1.0}])}),
    max_size=5,
)
graph_sections = st.fixed_dictionaries({}, optional={
    "evaluate": st.fixed_dictionaries({}, optional={"reference": names, "reward": names,
                                                    "data": st.sampled_from(["sft", "nope"])}),
    "promotion": st.fixed_dictionaries({}, optional={"candidates": st.lists(names, max_size=2)}),
})


@FAST
@given(graph_stages, graph_sections)
def test_random_stage_graphs_validate_or_name_the_stage_and_field(stages, sections):
    raw = {"data": {"sft": {"path": "demo:sft"}, "pairs": {"path": "demo:preference"}},
           "stages": stages, **sections}
    try:
        cfg = validate(PipelineConfig, raw, "fuzz.yaml")
    except ConfigError as e:
        _lines_name_fields(str(e))
        for line in str(e).split("\n")[1:]:
            field = line.strip().split(":")[0]
            assert field.split(".")[0] in ("stages", "evaluate", "promotion", "data"), line
    else:  # what validates is a graph: unique names, each start and reward an earlier stage
        seen: dict[str, str] = {}
        for s in cfg.stages:
            assert s.name not in seen and s.data in cfg.data
            assert s.start == "base" or seen.get(s.start) not in (None, "reward")
            assert s.reward is None or seen.get(s.reward) == "reward"
            seen[s.name] = s.method


overrides = st.one_of(
    st.text(max_size=30),
    st.builds(lambda prefix, rest: prefix + rest,
              st.sampled_from(["stages.", "stages.dpo.", "stages.nope.", "stages.sft.name=",
                               "data.", "data.preference.", "data.sft.path=", "evaluate.",
                               "promotion.", "model."]),
              st.text(max_size=20)),
)


@FAST
@given(overrides)
def test_random_overrides_apply_or_fail_cleanly(text):
    try:
        load_pipeline_config(None, [text])
    except ConfigError:
        pass


def test_malformed_data_file_leaves_no_partial_artifact(tmp_path):
    from posttrain import stages

    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n{not json\n")
    cfg = validate(PipelineConfig, {"artifacts_root": str(tmp_path / "a"),
                                    "data": {"sft": {"path": str(path)}},
                                    "stages": [{"method": "sft", "data": "sft"}],
                                    "tracking": {"experiment": "fuzz"}})
    with pytest.raises(DataError, match=r"broken\.jsonl.*line 2"):
        stages.run_data_stage(cfg)
    data_dir = tmp_path / "a" / "data"
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
