"""The pipeline's models outside posttrain: plain transformers auto classes, the MLflow registry
(transformers flavor, pyfunc, `mlflow models serve`) and `posttrain export`.

The fast test saves a tiny model with the stages' own save function; the slow ones share one tiny
pipeline run (data, a few SFT steps, evaluation) and compare against what its evaluation decoded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import SFT_STAGE, tiny_pipeline_values
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import models, registry, tracking
from posttrain.config import DemoTaskConfig, PipelineConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.evaluate import greedy_completions

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
MAX_NEW = 6


def _held_out_rows() -> list[dict]:
    """Held-out demo rows of every task, chat and plain strings, with spaces and digits."""
    chat = demo.generate_sft(DemoTaskConfig(num_train=30, num_eval=12), 0, "eval")
    plain = demo.generate_sft(DemoTaskConfig(num_train=30, num_eval=6, conversational=False), 0,
                              "eval")
    return chat + plain


def _same_ids(folder: Path, training_tokenizer, rows: list[dict]) -> None:
    """AutoTokenizer (and the bare tokenizer.json) give the training tokenizer's ids: for the
    SFT examples as training tokenizes them, and for the rendered chat text."""
    auto = AutoTokenizer.from_pretrained(folder)
    assert auto.chat_template == training_tokenizer.chat_template
    assert (auto.pad_token_id, auto.eos_token_id) == (training_tokenizer.pad_token_id,
                                                     training_tokenizer.eos_token_id)
    want, _ = tokenize_sft_rows(rows, training_tokenizer, max_length=64)
    got, _ = tokenize_sft_rows(rows, auto, max_length=64)
    assert [e["input_ids"] for e in got] == [e["input_ids"] for e in want]
    assert [e["labels"] for e in got] == [e["labels"] for e in want]
    bare = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for row in rows:
        text = training_tokenizer.apply_chat_template(
            row["prompt"] + row["completion"], tokenize=False) if isinstance(
            row["prompt"], list) else row["prompt"] + row["completion"]
        assert " " in text or "=" in text
        assert bare.encode(text, add_special_tokens=False).ids == \
            training_tokenizer(text)["input_ids"]


def _hf_greedy(folder: Path, prompts: list) -> list[str]:
    """Completions as a user gets them with plain transformers: auto classes, chat template,
    greedy generate, one prompt at a time."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            enc = tok.apply_chat_template(prompt, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
        else:
            enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_a_saved_tiny_model_loads_with_auto_classes_to_the_training_ids(tmp_path, tokenizer):
    """The stages' save function (models.save_model) on the built-in model: AutoTokenizer gives
    the training ids (spaces included: `rev chvr` kept its space), and auto classes + greedy
    generate decode what posttrain's evaluation decodes."""
    model = models.build_tiny_model(TINY, tokenizer)
    models.save_model(model, tokenizer, tmp_path)
    rows = _held_out_rows()
    _same_ids(tmp_path, tokenizer, rows)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto("rev chvr")["input_ids"] == tokenizer("rev chvr")["input_ids"]
    assert len(auto("rev chvr")["input_ids"]) == 8
    prompts = [r["prompt"] for r in rows[:4]] + [rows[-1]["prompt"]]
    evaluated = [c["text"] for c in greedy_completions(models.load_trained(tmp_path), tokenizer,
                                                       prompts, max_new_tokens=MAX_NEW,
                                                       batch_size=8)]
    assert _hf_greedy(tmp_path, prompts) == evaluated
    assert len(set(evaluated)) > 1  # not one degenerate string for every prompt


# ------------------------------------------------------------- one real (tiny) pipeline run


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Data, a few SFT steps and evaluation of a tiny pipeline, in an MLflow parent run (as
    `posttrain run` records it). Returns (cfg, manifests, samples of the SFT stage)."""
    from posttrain import stages

    tmp = tmp_path_factory.mktemp("eco")
    values = tiny_pipeline_values(
        tmp, [{**SFT_STAGE, "max_steps": 4}],
        evaluate={"max_prompts": 6, "num_samples": 6, "max_new_tokens": MAX_NEW})
    cfg = PipelineConfig.model_validate(values)
    parent = tracking.start_run(cfg.tracking.experiment, "pipeline")
    manifests = stages.run_all(cfg, parent_run_id=parent)
    tracking.end_run(parent)
    samples = json.loads((Path(manifests["evaluate"]["path"]) / "samples_sft.json").read_text())
    return cfg, manifests, samples


def _eval_prompts(manifests: dict) -> list:
    data = Path(manifests["data"]["path"])
    rows = [json.loads(line) for line in (data / "sft_eval.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:6]]


@pytest.mark.slow
def test_a_trained_stage_loads_with_auto_classes_and_reproduces_the_evaluation(pipeline_run):
    cfg, manifests, samples = pipeline_run
    folder = Path(manifests["sft"]["path"]) / "model"
    data = Path(manifests["data"]["path"])
    rows = [json.loads(line) for line in (data / "sft_eval.jsonl").read_text().splitlines()]
    training = models.load_tokenizer(cfg.model, path=folder)  # what a stage starting here uses
    _same_ids(folder, training, rows)
    _same_ids(folder, models.load_tokenizer(cfg.model), rows)  # the base model's tokenizer
    assert _hf_greedy(folder, _eval_prompts(manifests)) == [s["completion"] for s in samples]


@pytest.fixture(scope="module")
def champion(pipeline_run):
    cfg, manifests, _ = pipeline_run
    name = f"eco-{Path(cfg.artifacts_root).parent.name}"
    comparison = manifests["evaluate"]["comparison"]
    version = registry.register_champion(name, "sft", manifests["sft"], comparison["sft"])
    return name, version


@pytest.mark.slow
def test_the_champion_is_an_mlflow_transformers_model(pipeline_run, champion, tmp_path):
    import mlflow
    from mlflow.models import Model

    cfg, manifests, samples = pipeline_run
    name, version = champion
    uri = f"models:/{name}@champion"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    mlmodel = Model.load(str(local))
    assert set(mlmodel.flavors) == {"transformers", "python_function"}
    flavor = mlmodel.flavors["transformers"]
    assert (flavor["task"], flavor["inference_task"]) == ("text-generation", "llm/v1/chat")
    assert flavor["source_model_name"] == name
    assert mlmodel.signature.inputs.input_names()[0] == "messages"
    example = json.loads((local / "input_example.json").read_text())
    assert example["messages"][0]["role"] == "user"
    tokenizer_dir = local / "components" / "tokenizer"
    assert (tokenizer_dir / "tokenizer.json").is_file()
    assert (tokenizer_dir / "chat_template.jinja").read_text() == models.TINY_CHAT_TEMPLATE
    # the model card is the version's description; no machine path anywhere
    v = tracking.client().get_model_version(name, version)
    assert "## Lineage" in v.description and "checker_accuracy" in v.description
    assert v.description == (local / "README.md").read_text()
    for text in [v.description, (local / "MLmodel").read_text(),
                 (local / "posttrain_lineage.json").read_text(),
                 (local / "model" / "config.json").read_text()]:
        assert cfg.artifacts_root not in text and "/tmp" not in text
    # both loaders generate what the evaluation decoded, greedy
    prompts = _eval_prompts(manifests)
    pipe = mlflow.transformers.load_model(uri)
    rendered = [pipe.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts]
    out = [pipe(t, max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)[0]
           ["generated_text"] for t in rendered]
    expected = [s["completion"] for s in samples]
    assert out == expected
    pyfunc = mlflow.pyfunc.load_model(uri)
    answers = [pyfunc.predict({"messages": p, "max_tokens": MAX_NEW})[0] for p in prompts]
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
    assert all(a["model"] == name for a in answers)


@pytest.mark.slow
def test_a_lora_stage_registers_the_merged_model_and_keeps_the_adapter(tmp_path, tokenizer):
    import mlflow
    from peft import PeftModel

    from posttrain.artifacts import write_stage
    from posttrain.config import LoraConfig

    lora = models.apply_lora(models.build_tiny_model(TINY, tokenizer), LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    with write_stage(tmp_path, "sft", "lora-key") as out:
        models.save_model(lora, tokenizer, out.dir / "model")
        out.meta["config"] = {"method": "sft", "starts_from": "base", "data": "sft",
                              "lora": {"r": 4}}
    manifest = out.manifest
    name = f"eco-lora-{tmp_path.name}"
    registry.register_champion(name, "sft", manifest, {"checker_accuracy": 0.5},
                                experiment="eco-lora")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion",
                                                     dst_path=str(tmp_path / "dl")))
    assert (local / "adapter" / "adapter_config.json").is_file()
    pipe = mlflow.transformers.load_model(f"models:/{name}@champion")
    assert not isinstance(pipe.model, PeftModel)  # merged weights, a plain model
    ids = torch.tensor([tokenizer("rev abc")["input_ids"]])
    merged = lora.merge_and_unload().eval()
    with torch.no_grad():
        assert torch.allclose(pipe.model(ids).logits, merged(ids).logits, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_chat_request(pipeline_run, champion, mlflow_store):
    _, manifests, samples = pipeline_run
    name, _ = champion
    port = _free_port()
    # as with the virtual environment activated: the server starts `uvicorn` from the PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    pytest.fail(f"server did not start: {proc.stdout.read()[-3000:]}")
                time.sleep(1)
        prompt = _eval_prompts(manifests)[0]
        body = json.dumps({"messages": prompt, "max_tokens": MAX_NEW}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == samples[0]["completion"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_posttrain_export_writes_a_self_contained_folder(pipeline_run, champion, tmp_path,
                                                         mlflow_store):
    from safetensors.torch import load_file

    from posttrain.export import export

    cfg, manifests, samples = pipeline_run
    name, _ = champion
    stage_dir = manifests["sft"]["path"]
    out = tmp_path / "hf"
    done = subprocess.run([str(BIN / "posttrain"), "export", stage_dir, str(out)],
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store},
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    card = (out / "README.md").read_text()
    data_fp = manifests["data"]["datasets"]["sft"]["fingerprint"]
    eval_loss = manifests["evaluate"]["comparison"]["sft"]["eval_loss"]
    assert data_fp in card and manifests["sft"]["key"] in card
    assert f"| eval_loss | {eval_loss:.4g} |" in card  # held-out metrics
    assert "| learning_rate | 0.003 |" in card and "tiny" in card  # settings, base model
    assert cfg.artifacts_root not in card
    assert _hf_greedy(out, _eval_prompts(manifests)) == [s["completion"] for s in samples]

    # a registered version exports the same model, with its card
    registered = export(f"models:/{name}@champion", tmp_path / "from-registry")
    exported, from_registry = (load_file(d / "model.safetensors") for d in (out, registered))
    assert from_registry.keys() == exported.keys()
    assert all(torch.equal(from_registry[k], exported[k]) for k in exported)
    assert AutoTokenizer.from_pretrained(registered)("rev chvr")["input_ids"] == \
        AutoTokenizer.from_pretrained(out)("rev chvr")["input_ids"]
    assert data_fp in (registered / "README.md").read_text()
    refused = subprocess.run([str(BIN / "posttrain"), "export", manifests["data"]["path"],
                              str(tmp_path / "no")], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, check=False)
    assert refused.returncode == 2 and "has no model folder" in refused.stdout
