"""Retries that make sense: a transient I/O failure is retried by Prefect; a configuration or
data error fails at once."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, PipelineConfig, validate
from posttrain.data.loading import DataError
from tasks.common import is_transient
from tests.conftest import tiny_pipeline_values


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(28, "No space left on device"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionError("connection reset"), True),
        (DataError("data.jsonl row 3, field 'prompt': missing"), False),
        (ConfigError("invalid configuration"), False),
        (ValueError("bad value"), False),
        (RuntimeError("a bug"), False),
        (OSError("disk"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        # what is missing or refused now will be missing or refused on a second try
        (FileNotFoundError(2, "No such file or directory", "data.jsonl"), False),
        (IsADirectoryError(21, "Is a directory"), False),
        (PermissionError(13, "Permission denied"), False),
        (ImportError("No module named 'my_rewards'"), False),
        (ModuleNotFoundError("No module named 'my_rewards'"), False),
        (KeyError("sft"), False),
        (TypeError("reward() got an unexpected keyword argument"), False),
        # transformers reports a model that does not exist as a plain OSError
        (OSError("nope/model is not a local folder and is not a valid model identifier listed "
                 "on 'https://huggingface.co/models'"), False),
        (OSError("org/model does not appear to have a file named config.json"), False),
        # huggingface_hub's not-found errors are OSError subclasses, recognised by class name
        (type("RepositoryNotFoundError", (OSError,), {})("404 Client Error"), False),
        (type("GatedRepoError", (OSError,), {})("403 Client Error"), False),
    ],
)
def test_only_io_errors_are_transient(error, transient):
    assert is_transient(error) is transient


def test_config_and_data_errors_are_not_transient_even_as_io_subclasses():
    # A DataError or ConfigError is never retried, whatever it also inherits from.
    class UnreadableData(DataError, OSError):
        pass

    class BadSetting(ConfigError, ConnectionError):
        pass

    assert not is_transient(UnreadableData("data.jsonl: not valid JSON"))
    assert not is_transient(BadSetting("invalid configuration"))


@pytest.mark.usefixtures("prefect_server")
def test_transient_failure_is_retried_and_a_data_error_is_not(tmp_path, monkeypatch):
    from pipelines.flows import pipeline
    from posttrain.stages import data as data_stage

    calls = []
    real = data_stage.load_dataset

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(data_stage, "load_dataset", flaky)
    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path, promotion={"enabled": False}))
    result = pipeline(cfg)
    assert result["stages"][0]["status"] == "ran" and len(calls) == 2

    def broken(*args, **kwargs):
        calls.append(1)
        raise DataError("sft.jsonl row 1, field 'prompt': missing")

    calls.clear()
    monkeypatch.setattr(data_stage, "load_dataset", broken)
    # another split seed: a new data key, so the data stage runs (and loads) again
    cfg2 = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, data={"sft": {"path": "demo:sft", "seed": 1}}, promotion={"enabled": False}))
    with pytest.raises(DataError, match="row 1"):
        pipeline(cfg2)
    assert len(calls) == 1  # not retried
