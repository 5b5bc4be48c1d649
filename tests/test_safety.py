"""Safe defaults: weights only as safetensors, planted pickles never run, remote code only when
pinned, secrets never in logs, MLflow records, artifacts or cached results."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from posttrain import config as C
from posttrain.models import build_tiny_model, build_tiny_tokenizer, load_trained, save_model
from posttrain.rewards import load_reward_model


class _Bomb:
    """Unpickling this creates a marker file: the side effect proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(folder: Path, marker: Path) -> None:
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "model.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Bomb(marker)))


def test_planted_pickle_next_to_safetensors_is_never_executed(tmp_path):
    tokenizer = build_tiny_tokenizer()
    folder = tmp_path / "model"
    save_model(build_tiny_model(C.TinyModelConfig(hidden_size=32, intermediate_size=64),
                                tokenizer), tokenizer, folder)
    marker = tmp_path / "pwned"
    _plant(folder, marker)
    load_trained(folder)
    load_reward_model(folder, new_head=True)
    assert not marker.exists()


def test_a_folder_with_only_a_pickle_is_refused_without_running_it(tmp_path):
    tokenizer = build_tiny_tokenizer()
    folder = tmp_path / "model"
    save_model(build_tiny_model(C.TinyModelConfig(hidden_size=32, intermediate_size=64),
                                tokenizer), tokenizer, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    _plant(folder, marker)
    with pytest.raises(OSError):
        load_trained(folder)
    assert not marker.exists()


def test_remote_code_needs_an_explicit_pinned_revision(tmp_path):
    assert C.ModelConfig().trust_remote_code is False
    for revision in (None, "main", "v1.0"):
        with pytest.raises(ValueError, match="pinned to a full 40-character commit"):
            C.ModelConfig(name_or_path="org/model", trust_remote_code=True, revision=revision)
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert C.ModelConfig(name_or_path="org/model", trust_remote_code=True, revision=sha)
    # A local folder has no revision: the code on disk is what the user has.
    assert C.ModelConfig(name_or_path=str(tmp_path), trust_remote_code=True)


CANARY = "canary-secret-3f9a1c"
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY", "AWS_SECRET_ACCESS_KEY")


def _scan_tree(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and CANARY.encode() in path.read_bytes():
            hits.append(str(path))
    return hits


@pytest.mark.usefixtures("prefect_server")
def test_secrets_never_reach_logs_mlflow_artifacts_or_cached_results(tmp_path, monkeypatch,
                                                                     capfd):
    from pipelines.flows import pipeline
    from posttrain import tracking
    from tests.conftest import tiny_pipeline_values

    for var in SECRET_VARS:
        monkeypatch.setenv(var, CANARY)
    cfg = C.validate(C.PipelineConfig, tiny_pipeline_values(tmp_path))
    result = pipeline(cfg)
    pipeline(cfg)  # the cached path too
    assert CANARY not in str(result)
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err
    assert _scan_tree(tmp_path / "artifacts") == []  # stage folders and Prefect results
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    for run in c.search_runs([exp.experiment_id]):
        blob = str(run.data.params) + str(run.data.tags) + str(run.data.metrics)
        assert CANARY not in blob
        local = Path(run.info.artifact_uri.removeprefix("file://"))
        if local.is_dir():
            assert _scan_tree(local) == []
    assert os.environ["HF_TOKEN"] == CANARY  # the canary really was in the environment
