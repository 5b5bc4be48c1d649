"""conf/examples/vision-colours.yaml through the command a user runs (issue 21): the tiny VLM
learns the image task with SFT (planted mistake included), DPO improves on it, the evaluation
logs sample tables with their images, the rerun comes from the cache, and the promoted champion
loads with MLflow's and transformers' own loaders and answers from the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "conf" / "examples" / "vision-colours.yaml"


def _posttrain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _status(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) >= 2 and cells[0] in ("data", "sft", "dpo", "evaluate"):
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.slow
def test_the_vision_example_learns_the_image_task_and_its_champion_loads(tmp_path):
    first = _posttrain(["run", str(EXAMPLE)], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _status(first.stdout) == {"data": "ran", "sft": "ran", "dpo": "ran", "evaluate": "ran"}
    [evaluation] = (tmp_path / "artifacts" / "evaluate").glob("*/manifest.json")
    comparison = json.loads(evaluation.read_text())["comparison"]
    accuracy = {name: comparison[name]["checker_accuracy"] for name in ("base", "sft", "dpo")}
    # The example's seed gives base 0, SFT 0.77 (yellow squares called "green", as planted),
    # DPO 0.97; the bounds leave room for another machine's float rounding.
    assert accuracy["base"] < 0.3 < accuracy["sft"] - 0.3, accuracy
    assert accuracy["dpo"] > accuracy["sft"] + 0.1, accuracy
    assert "promoted dpo as version 1 of vision-colours" in first.stdout

    import mlflow

    # A client of its own: the worker's global tracking URI is the session store of the tests.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("posttrain-vision").experiment_id],
                               "tags.mlflow.runName = 'evaluate'")
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/dpo.json",
                                                      str(tmp_path))).read_text())
    image_column = table["columns"].index("image")
    assert all(row[image_column]["type"] == "image" for row in table["data"])
    assert client.list_artifacts(run.info.run_id, "table_images/samples/dpo")

    again = _posttrain(["run", str(EXAMPLE)], tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert set(_status(again.stdout).values()) == {"cached"}

    # The champion, as a user loads it in a script of their own: MLflow's transformers flavor
    # (components, since a model with a processor has no pipeline form there), then a plain
    # `generate` on a new image of a blue square.
    script = (
        "import random, mlflow\n"
        "from posttrain.vision import demo\n"
        "parts = mlflow.transformers.load_model('models:/vision-colours@champion',"
        " return_type='components')\n"
        "model, processor = parts['model'], parts['processor']\n"
        "messages = [{'role': 'user', 'content': [{'type': 'image'},"
        " {'type': 'text', 'text': demo.QUESTION}]}]\n"
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        "inputs = processor(text=[text], images=[demo._image(random.Random(5), 'blue', 32)],"
        " return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=6, do_sample=False)\n"
        "print('ANSWER', processor.tokenizer.decode(out[0, inputs['input_ids'].shape[1]:],"
        " skip_special_tokens=True))\n")
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = loaded.stdout.split("ANSWER", 1)[1].strip()
    assert answer == "blue", answer

    # `posttrain export` of the champion: a folder the Auto classes load, processor included.
    exported = _posttrain(["export", "models:/vision-colours@champion", str(tmp_path / "hf")],
                          tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert type(AutoProcessor.from_pretrained(tmp_path / "hf")).__name__ == "LlavaProcessor"
    AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    assert "pipeline_tag: image-text-to-text" in (tmp_path / "hf" / "README.md").read_text()
