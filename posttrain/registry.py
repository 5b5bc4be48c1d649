"""The MLflow Model Registry side of promotion: a registered version is an MLflow model with the
`transformers` flavor (chat signature, tokenizer and chat template inside, the model card as the
version's description) logged on the run that trained it; it stores its metrics as version tags
for the next comparison, and the per-prompt values of its evaluation inside the MLflow model
(`posttrain_per_prompt.json`, with the held-out prompts' hash also as a version tag) so that a
later gate (posttrain/promotion.py) can pair on prompts; `register_champion` moves the alias
(`champion`) to it; earlier versions stay.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import export, tracking
from posttrain.charts import CI_SUFFIXES, is_number
from posttrain.config import PromotionConfig

# Lazy imports: posttrain.models (torch) loads only to save a version's model; the flows and
# preflight import this module through posttrain.promotion.

METRICS_TAG = "posttrain.metrics"
STAGE_TAG = "posttrain.stage"
PROMPTS_TAG = "posttrain.eval_prompts_hash"
GROUND_TAG = "posttrain.eval_ground"
PER_PROMPT_FILE = "posttrain_per_prompt.json"  # inside a registered version's MLflow model


def registered_model_name(cfg: PromotionConfig, pipeline_name: str) -> str:
    return cfg.registered_model or pipeline_name


def champion_version(name: str, alias: str = "champion"):
    """The model version holding `alias`, or None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_per_prompt(name: str, alias: str = "champion") -> dict | None:
    """The per-prompt evaluation values stored with the champion version
    (`posttrain_per_prompt.json` in its MLflow model), or None when there is no champion or it
    has none (registered before they were stored)."""
    import tempfile

    import mlflow

    version = champion_version(name, alias)
    if version is None or not version.source:
        return None
    with tempfile.TemporaryDirectory(prefix="posttrain-champion-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source.rstrip('/')}/{PER_PROMPT_FILE}", dst_path=tmp,
                tracking_uri=tracking.tracking_uri())
        except Exception:  # noqa: BLE001 - not there, whatever the store says: no values
            return None
        return json.loads(Path(path).read_text())


def download_champion(name: str, dst: str | Path, alias: str = "champion") -> Path:
    """The champion version's Hugging Face model folder (the `model/` of its MLflow model),
    downloaded into `dst`."""
    import mlflow

    version = champion_version(name, alias)
    if version is None:
        raise LookupError(f"{name} has no version with alias {alias!r}")
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{version.source.rstrip('/')}/model", dst_path=str(dst),
        tracking_uri=tracking.tracking_uri())
    return Path(path)


def same_ground(name: str, ground: str | None, alias: str = "champion") -> bool:
    """Whether the champion was evaluated on the same held-out set and evaluation settings as
    `ground` (`posttrain.stages.evaluate.evaluation_ground`); False when it does not say
    (registered before the tag existed)."""
    version = champion_version(name, alias)
    return bool(version is not None and ground
                and (version.tags or {}).get(GROUND_TAG) == ground)


def champion_metrics(name: str, alias: str = "champion") -> dict | None:
    """The metrics stored on the champion version when it was promoted; {} when it has none
    (which the gate treats as missing metrics, i.e. fail-closed)."""
    version = champion_version(name, alias)
    if version is None:
        return None
    return json.loads((version.tags or {}).get(METRICS_TAG, "{}"))


MODEL_ARTIFACT = "registered_model"  # where a version's MLflow model is logged on its run
ADAPTER_DIR = "adapter"  # the LoRA adapter, inside the MLflow model, next to the merged weights


def _pip_requirements() -> list[str]:
    """What loading the model needs, pinned to the versions that saved it (local version labels
    such as torch's '+cpu' dropped). Given explicitly: MLflow's inference imports every
    module torch can use and fails on the absent ones."""
    from importlib import metadata

    out = []
    for package in ("mlflow", "transformers", "torch", "tokenizers", "safetensors",
                    "accelerate"):
        try:
            out.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return out


def save_mlflow_model(model_dir: str | Path, path: str | Path, *, name: str,
                      card: str | None = None, extra_files: dict[str, str] | None = None,
                      adapter_dir: str | Path | None = None) -> Path:
    """Save the Hugging Face model folder `model_dir` (merged weights, tokenizer, chat
    template) as an MLflow model at `path`: the `transformers` flavor, pipeline task
    text-generation served as the `llm/v1/chat` inference task (its chat signature: messages
    in, a chat completion out), an input example of chat messages, the tokenizer and its chat
    template inside, `card` as the model card. The model's recorded name is `name`, never a
    machine path, and nothing is fetched from a hub (no model card or license look-up).
    `extra_files` (relative name -> text) and `adapter_dir` (copied under `adapter/`) are added
    next to MLmodel."""
    import shutil
    from unittest import mock

    import huggingface_hub
    import mlflow
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_trained_tokenizer

    model_card = huggingface_hub.ModelCard(card) if card else None
    path = Path(path)
    if export.is_vision_folder(model_dir):
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
            _save_vision_model(model_dir, path, name=name, model_card=model_card)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                     use_safetensors=True)
        tokenizer = load_trained_tokenizer(model_dir)
        model.name_or_path = model.config._name_or_path = name  # MLmodel's source_model_name
        # and the served "model" field
        example = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
            mlflow.transformers.save_model(
                {"model": model, "tokenizer": tokenizer}, str(path), task="llm/v1/chat",
                input_example=example, model_card=model_card,
                pip_requirements=_pip_requirements(),
                # greedy, as the evaluation decodes: transformers' text-generation pipeline
                # samples (temperature 0.7) unless told otherwise
                model_config={"do_sample": False}, metadata={"posttrain.name": name})
    (path / "LICENSE.txt").unlink(missing_ok=True)  # MLflow's hub-license placeholder text
    for rel, text in (extra_files or {}).items():
        (path / rel).write_text(text)
    if adapter_dir is not None and Path(adapter_dir).is_dir():
        shutil.copytree(adapter_dir, path / ADAPTER_DIR)
    return path


def _save_vision_model(model_dir: str | Path, path: Path, *, name: str, model_card) -> None:
    """A vision-language model folder as an MLflow transformers model: an image-text-to-text
    pipeline saved with its processor. MLflow loads such a model as components
    (`mlflow.transformers.load_model(uri, return_type="components")`: model, processor,
    tokenizer, image processor); it has no pyfunc serving for models with a processor."""
    import mlflow
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype="auto",
                                                        use_safetensors=True)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model.name_or_path = model.config._name_or_path = name
    mlflow.transformers.save_model(
        pipeline("image-text-to-text", model=model, processor=processor), str(path),
        processor=processor, model_card=model_card, pip_requirements=_pip_requirements(),
        metadata={"posttrain.name": name})


def register_champion(name: str, stage: str, manifest: dict, metrics: dict, *,
                      alias: str = "champion", tags: dict[str, str] | None = None,
                      experiment: str | None = None, per_prompt: dict | None = None) -> str:
    """Register `stage`'s model as a new version of `name`, move `alias` to it, return the
    version number. Earlier versions and their tags stay.

    The version is an MLflow model (`save_mlflow_model`) of the stage's merged model, logged
    under `registered_model/` on the run that trained the stage (a run of its own in
    `experiment` when the manifest has none), with the model card (`posttrain.export`) as its
    description and its lineage as `posttrain_lineage.json`; a LoRA stage's adapter comes
    along under `adapter/`. `per_prompt` (this model's per-prompt evaluation values with the
    held-out prompts' hashes) goes in as `posttrain_per_prompt.json`, its hashes as tags."""
    import tempfile

    from mlflow.exceptions import MlflowException

    c = tracking.client()
    try:
        c.create_registered_model(name, description="Promoted by the posttrain gate.")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    clean = {k: v for k, v in metrics.items() if is_number(v)}
    values = {k: v for k, v in clean.items()  # the card's held-out numbers: no CIs or timing
              if not k.endswith(CI_SUFFIXES) and k != "eval_seconds"}
    info = export.lineage(manifest, heldout=values)
    card = export.model_card(info, name=name,
                             vision=export.is_vision_folder(Path(manifest["path"], "model")))
    run_id = manifest.get("mlflow_run_id")
    own_run = not run_id
    if own_run:
        run_id = tracking.start_run(experiment or name, f"register {name} ({stage})",
                                    tags={STAGE_TAG: stage})
    model_dir = Path(manifest["path"], "model")
    with tempfile.TemporaryDirectory(prefix="posttrain-register-") as tmp:
        local = save_mlflow_model(
            model_dir, Path(tmp) / MODEL_ARTIFACT, name=name, card=card,
            extra_files={export.LINEAGE_FILE: json.dumps(info, indent=2, default=str),
                         export.CARD_FILE: card,
                         **({PER_PROMPT_FILE: json.dumps(per_prompt)} if per_prompt else {})},
            adapter_dir=model_dir / ADAPTER_DIR)
        c.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    if own_run:
        tracking.end_run(run_id)
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    version_tags = {
        STAGE_TAG: stage,
        tracking.KEY_TAG: manifest.get("key", ""),
        METRICS_TAG: json.dumps(clean),
        **{f"metric.{k}": f"{v:.6g}" for k, v in values.items()},
        **({PROMPTS_TAG: str(per_prompt.get("prompts_hash")),
            GROUND_TAG: str(per_prompt.get("ground"))} if per_prompt else {}),
        **(tags or {}),
    }
    version = c.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                     description=card)
    c.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
