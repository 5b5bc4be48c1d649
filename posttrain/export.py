"""Self-contained Hugging Face folders and model cards from what the pipeline produced.

`export(source, out_dir)` takes a stage artifact folder (`<artifacts_root>/<stage>/<key>`) or a
registered version (`models:/<name>@<alias>`, `models:/<name>/<version>`) and writes a folder
that any Hugging Face tool loads on its own: the merged weights as safetensors, config.json,
generation_config.json, the tokenizer with its chat template, and a README.md model card with
the metrics, the data fingerprints and the lineage (which stages, from which base model, with
which settings). Nothing in it points back to this machine.

The lineage is read from what the stage artifacts record: each manifest holds its stage's
settings (method, the stage it starts from, its data source), key, digest and metrics. The
upstream artifacts are found through the MLflow pipeline run the stage ran in (its sibling
stage runs carry their keys), else as the only artifact of that stage under the same
artifacts root; when neither finds one, the card says the link is not recorded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from posttrain import artifacts, tracking

LINEAGE_FILE = "posttrain_lineage.json"
CARD_FILE = "README.md"
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json",
                   # a vision-language model's processor (AutoProcessor reads these)
                   "processor_config.json", "preprocessor_config.json")
# Settings that are not training settings (the graph fields and the model), for the card.
_GRAPH_FIELDS = ("method", "starts_from", "start", "data", "reward", "model", "lora")


class ExportError(RuntimeError):
    """A source that is not a stage artifact or registered version with a model."""


# ---------------------------------------------------------------------------------- lineage


def _start_of(config: dict) -> str:
    return config.get("starts_from") or config.get("start") or "base"


def _sibling_manifest(manifest: dict, stage: str) -> dict | None:
    """The manifest of upstream stage `stage` of the artifact `manifest` describes: the artifact
    whose key the pipeline run's child run of that stage records, else the only artifact of that
    stage next to this one; None when neither exists."""
    root = Path(manifest["path"]).parent.parent
    run_id = manifest.get("mlflow_run_id")
    if run_id:
        try:
            c = tracking.client()
            run = c.get_run(run_id)
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent:
                found = c.search_runs(
                    [run.info.experiment_id],
                    f"tags.mlflow.parentRunId = '{parent}' and "
                    f"tags.`{tracking.STAGE_TAG}` = '{stage}'", max_results=1)
                key = found[0].data.tags.get(tracking.KEY_TAG) if found else None
                if key and (root / stage / key / artifacts.MANIFEST).is_file():
                    return artifacts.verify(root / stage / key, full=False)
        except Exception as e:  # noqa: BLE001 - no tracking server: fall back to the folders
            print(f"lineage: could not read MLflow run {run_id} ({type(e).__name__}: {e}); "
                  f"looking for {stage!r} among the artifact folders")
    folders = [p.parent for p in (root / stage).glob(f"*/{artifacts.MANIFEST}")]
    if len(folders) == 1:
        return artifacts.verify(folders[0], full=False)
    return None


def _stage_entry(manifest: dict) -> dict:
    config = manifest.get("config") or {}
    return {
        "stage": manifest.get("stage"),
        "method": config.get("method"),
        "starts_from": _start_of(config),
        "data": config.get("data"),
        "reward": config.get("reward"),
        "key": manifest.get("key"),
        "digest": manifest.get("digest"),
        "created_at": manifest.get("created_at"),
        "settings": {k: v for k, v in config.items() if k not in _GRAPH_FIELDS},
        "lora": config.get("lora"),
        "metrics": manifest.get("metrics") or {},
    }


def _heldout_metrics(manifest: dict) -> dict:
    """The evaluation's numbers for this stage, as logged on its own run (`heldout/<metric>`)."""
    run_id = manifest.get("mlflow_run_id")
    if not run_id:
        return {}
    try:
        metrics = tracking.client().get_run(run_id).data.metrics
    except Exception:  # noqa: BLE001 - no tracking server: no held-out numbers
        return {}
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("heldout/")}


def lineage(manifest: dict, heldout: dict | None = None) -> dict:
    """What produced the artifact `manifest` describes, as JSON: the chain of stages from the
    base model to it (each with its method, settings, key, digest and training metrics), the
    base model, the data sources they read (format, rows, content fingerprint) and the held-out
    evaluation metrics (`heldout`, else those logged on the stage's run). No machine paths."""
    chain = [_stage_entry(manifest)]
    current, missing = manifest, None
    while chain[0]["starts_from"] not in ("base", None):
        upstream = _sibling_manifest(current, chain[0]["starts_from"])
        if upstream is None:
            missing = chain[0]["starts_from"]
            break
        chain.insert(0, _stage_entry(upstream))
        current = upstream
    data_manifest = _sibling_manifest(manifest, "data")
    datasets = (data_manifest or {}).get("datasets", {})
    used = {e["data"] for e in chain if e["data"]}
    base = manifest.get("base_model") or current.get("base_model") or (
        (current.get("config") or {}).get("model"))
    return {
        "stage": manifest.get("stage"),
        "method": chain[-1]["method"],
        "key": manifest.get("key"),
        "digest": manifest.get("digest"),
        "base_model": base,
        "chain": chain,
        "unresolved_upstream": missing,
        "data": {name: {k: d.get(k) for k in ("source", "format", "train_rows", "eval_rows",
                                                "fingerprint")}
                 for name, d in datasets.items() if name in used},
        "data_digest": (data_manifest or {}).get("digest"),
        "heldout_metrics": dict(heldout) if heldout is not None else _heldout_metrics(manifest),
    }


# ------------------------------------------------------------------------------ model card


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def is_vision_folder(model_dir: str | Path) -> bool:
    """Whether a model folder holds a vision-language model (its config has a vision part)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def model_card(info: dict, *, name: str | None = None, vision: bool = False) -> str:
    """A README.md model card (YAML front matter, then markdown) for `lineage()`'s output;
    `vision`: of a vision-language model (its pipeline tag and usage)."""
    title = name or f"posttrain {info['stage']}"
    methods = sorted({e["method"] for e in info["chain"] if e["method"]})
    tag = "image-text-to-text" if vision else "text-generation"
    front = ["---", "library_name: transformers", f"pipeline_tag: {tag}",
             "tags:", "- posttrain", *[f"- {m}" for m in methods]]
    base = info.get("base_model")
    if base and base != "tiny" and not str(base).startswith("/"):
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [*front, "", f"# {title}", "",
             (f"Trained by posttrain: stage `{info['stage']}` ({info['method']}), artifact key "
              f"`{info['key']}`, digest `{info['digest']}`."), ""]
    held = info.get("heldout_metrics") or {}
    if held:
        lines += ["## Held-out evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(held.items())]
        lines.append("")
    lines += ["## Lineage", "",
              f"Base model: `{_describe_base(base)}`.", ""]
    lines += ["| # | stage | method | starts from | data | key |", "|---|---|---|---|---|---|"]
    for i, e in enumerate(info["chain"], 1):
        lines.append(f"| {i} | {e['stage']} | {e['method']} | {e['starts_from']} | "
                     f"{e['data'] or ''} | `{e['key']}` |")
    if info.get("unresolved_upstream"):
        lines.append(f"\nThe artifact of `{info['unresolved_upstream']}`, which the first stage "
                     "above starts from, was not found: the chain before it is not recorded.")
    lines.append("")
    if info.get("data"):
        lines += ["## Data", "",
                  "| source | from | format | train rows | held-out rows | content fingerprint |",
                  "|---|---|---|---|---|---|"]
        for n, d in info["data"].items():
            lines.append(f"| {n} | {d['source']} | {d['format']} | {d['train_rows']} | "
                         f"{d['eval_rows']} | `{d['fingerprint']}` |")
        lines.append("")
    for e in info["chain"]:
        lines += [f"## Stage `{e['stage']}` ({e['method']})", "", "| setting | value |",
                  "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(e["settings"].items())]
        if e.get("lora"):
            lines.append(f"| lora | {_fmt(e['lora'])} |")
        if e.get("reward") not in (None, "None"):
            lines.append(f"| reward | {e['reward']} |")
        numbers = {k: v for k, v in e["metrics"].items() if isinstance(v, (int, float))}
        if numbers:
            lines += ["", "Training metrics (final): " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in sorted(numbers.items()))]
        lines.append("")
    lines += ["## Use", "", "```python", *(_VISION_USE if vision else _TEXT_USE), "```", ""]
    return "\n".join(lines)


_TEXT_USE = [
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
    "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
    "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": PROMPT}],",
    "                                    add_generation_prompt=True, return_tensors=\"pt\")"]
_VISION_USE = [
    "from transformers import AutoModelForImageTextToText, AutoProcessor",
    "processor = AutoProcessor.from_pretrained(FOLDER)",
    "model = AutoModelForImageTextToText.from_pretrained(FOLDER)",
    "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"},",
    "                                             {\"type\": \"text\", \"text\": PROMPT}]}]",
    "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
    "inputs = processor(text=[text], images=[IMAGE], return_tensors=\"pt\")"]


def _describe_base(base) -> str:
    if base == "tiny":
        return "tiny (posttrain's built-in Qwen2-style model, built from its config)"
    if base and str(base).startswith("/"):
        return f"a local folder ({Path(base).name})"
    return str(base)


# ---------------------------------------------------------------------------------- export


def _is_registry_uri(source: str) -> bool:
    return str(source).startswith("models:/")


def _copy_hf_files(model_dir: Path, tokenizer_dir: Path, out: Path) -> None:
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ExportError(f"{model_dir}: pickle weights are not exported; safetensors only")
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(
        model_dir.glob("*.safetensors.index.json"))
    if not weights or not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json and safetensors weights to export")
    for path in [*(model_dir / f for f in MODEL_FILES), *weights]:
        if path.is_file():
            shutil.copy2(path, out / path.name)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy2(tokenizer_dir / f, out / f)
    if not (out / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


def _copy_hf_files_of(folder: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (folder / f).is_file() and not (out / f).is_file():
            shutil.copy2(folder / f, out / f)


def _scrub_config(out: Path) -> None:
    """Drop the machine path transformers may record as `_name_or_path`."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    if str(config.get("_name_or_path", "")).startswith("/"):
        config.pop("_name_or_path")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(source: str | Path, out_dir: str | Path, *, name: str | None = None) -> Path:
    """Write a self-contained Hugging Face folder for `source` (a stage artifact folder, or
    `models:/<name>@<alias>` / `models:/<name>/<version>`) into `out_dir` (created; must be empty
    if it exists). Returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if _is_registry_uri(str(source)):
        _export_registered(str(source), out)
        return out
    folder = Path(source)
    try:
        manifest = artifacts.verify(folder)
    except artifacts.ArtifactError as e:
        raise ExportError(f"{folder} is not a stage artifact: {e}") from None
    model_dir = folder / "model"
    if not model_dir.is_dir():
        raise ExportError(f"{folder}: stage {manifest.get('stage')!r} has no model folder "
                          "(a data or evaluation stage?)")
    _copy_hf_files(model_dir, model_dir, out)
    _scrub_config(out)
    info = lineage(manifest)
    (out / LINEAGE_FILE).write_text(json.dumps(info, indent=2, default=str))
    (out / CARD_FILE).write_text(model_card(info, name=name, vision=is_vision_folder(out)))
    return out


def _export_registered(uri: str, out: Path) -> None:
    """A registered version (an MLflow transformers model, as `registry.register_champion`
    logs it) to a Hugging Face folder; its card and lineage come with it."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="posttrain-export-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        if not (local / "MLmodel").is_file():
            raise ExportError(f"{uri} is not an MLflow model (no MLmodel file)")
        tokenizer_dir = local / "components" / "tokenizer"
        _copy_hf_files(local / "model", tokenizer_dir if tokenizer_dir.is_dir() else
                       local / "model", out)
        for part in ("processor", "image_processor"):  # a vision-language model's
            if (local / "components" / part).is_dir():
                _copy_hf_files_of(local / "components" / part, out)
        _scrub_config(out)
        for f in (LINEAGE_FILE, CARD_FILE):
            if (local / f).is_file():
                shutil.copy2(local / f, out / f)
        if not (out / CARD_FILE).is_file() and (local / "model_card.md").is_file():
            shutil.copy2(local / "model_card.md", out / CARD_FILE)
