"""The promotion gate and the MLflow Model Registry.

`decide` is a pure function: comparison (stage -> metrics) + the current champion's metrics +
`PromotionConfig` -> `Decision`. It fails closed: a missing or non-finite metric that the gate
reads (on any candidate, on the champion, or on the reference model the guards fall back to), or an
empty comparison, promotes nothing. A candidate wins when it

1. is the best eligible candidate on the primary metric (`cfg.metric`, `cfg.direction`),
2. passes every guard: the metric does not regress against the reference (the champion, or the
   evaluation's reference model when there is no champion yet) by more than the guard's
   tolerance, and
3. beats the champion's primary metric by at least `cfg.min_margin` and by more than 0 (an
   unchanged re-run therefore never moves the alias), and, with `cfg.require_significance`,
   so does the lower bound of the bootstrap 95% interval of that improvement
   (`improvement_interval`: paired by prompt when the champion's stored per-prompt values are
   on the same held-out prompts, else an unpaired bootstrap, said in the decision; a champion
   without stored per-prompt values then promotes nothing). The interval, when there is one,
   is recorded in the decision (`interval`) either way.

`register_champion` registers the winner as a new version: an MLflow model with the
`transformers` flavor (chat signature, tokenizer and chat template inside, the model card as the
version's description) logged on the run that trained it; it stores its metrics as version tags
for the next comparison, and the per-prompt values of its evaluation inside the MLflow model
(`posttrain_per_prompt.json`, with the held-out prompts' hash also as a version tag) so that a
later gate can pair on prompts; and moves the alias (`champion`); earlier versions stay.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import export, harness, tracking
from posttrain.config import ConfigError, MetricGuard, PipelineConfig, PromotionConfig
from posttrain.stages.evaluate import harness_metrics

# Lazy imports: posttrain.models (torch) and bootstrap (numpy) load only to register or
# compare; the flows and preflight import this module.

BASE = "base"
# Which way is better, for the metrics evaluation produces.
DIRECTIONS = {"checker_accuracy": "max", "reward_score": "max", "win_rate_vs_reference": "max",
              "eos_rate": "max", "eval_loss": "min", "perplexity": "min",
              "chosen_perplexity": "min", "kl_to_reference": "min",
              "kl_per_token_to_reference": "min"}
DEFAULT_METRICS = ("checker_accuracy", "reward_score", "eval_loss")
DEFAULT_GUARD = MetricGuard(metric="eval_loss", direction="min", tolerance=0.5)


def resolve(cfg: PipelineConfig, available: set[str]) -> PromotionConfig:
    """The promotion settings with every null filled for this pipeline: the primary metric (the
    first of DEFAULT_METRICS that evaluation produces), its direction, the guards. A metric the
    evaluation will not produce is a ConfigError, found before anything trains."""
    p = cfg.promotion
    metric = p.metric or next((m for m in DEFAULT_METRICS if m in available), None)
    if metric is None:
        raise ConfigError(
            f"promotion: none of {', '.join(DEFAULT_METRICS)} will exist for this pipeline (its "
            f"evaluation gives {', '.join(sorted(available))}); set promotion.metric, or "
            "promotion.enabled=false")
    guards = p.guards if p.guards is not None else (
        (DEFAULT_GUARD,) if DEFAULT_GUARD.metric in available else ())
    gives = "evaluation gives " + ", ".join(sorted(available))
    problems = [f"promotion.{field}: {name!r} will not exist for this pipeline ({gives})"
                for field, name in [("metric", metric)] + [("guards", g.metric) for g in guards]
                if name not in available]
    direction = p.direction or DIRECTIONS.get(metric) or harness_direction(cfg, metric)
    if direction is None:
        problems.append(f"promotion.direction: say whether {metric!r} is better high ('max') or "
                        "low ('min')")
    if problems:
        raise ConfigError("\n".join(problems))
    return p.model_copy(update={"metric": metric, "direction": direction, "guards": guards})


def harness_direction(cfg: PipelineConfig, metric: str) -> str | None:
    """An `lm_eval/...` metric's direction: its task config's higher_is_better for the
    configured tasks (`stages.evaluate.harness_metrics`), else the harness's registry of
    metric names; None for other metrics or when neither says."""
    if not metric.startswith(harness.PREFIX + "/"):
        return None
    return harness_metrics(cfg).get(metric) or harness.metric_direction(metric)


METRICS_TAG = "posttrain.metrics"
STAGE_TAG = "posttrain.stage"
PROMPTS_TAG = "posttrain.eval_prompts_hash"
GROUND_TAG = "posttrain.eval_ground"
PER_PROMPT_FILE = "posttrain_per_prompt.json"  # inside a registered version's MLflow model
CI_SUFFIXES = ("_ci_low", "_ci_high")


@dataclass
class Decision:
    """What the gate decided and why; `rows` holds one line per candidate for the record."""

    promote: bool
    winner: str | None = None
    reasons: list[str] = field(default_factory=list)
    champion: dict | None = None
    rows: list[dict] = field(default_factory=list)
    interval: dict | None = None  # the winner's improvement over the champion, with its CI

    def to_dict(self) -> dict:
        return {"promote": self.promote, "winner": self.winner, "reasons": self.reasons,
                "champion": self.champion, "rows": self.rows, "interval": self.interval}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _better(a: float, b: float, direction: str) -> float:
    """How much better a is than b (positive = better) under `direction`."""
    return a - b if direction == "max" else b - a


def _missing(metrics: dict | None, names: list[str]) -> list[str]:
    return [n for n in names if not _finite((metrics or {}).get(n))]


def decide(comparison: dict[str, dict] | None, champion_metrics: dict | None,
           cfg: PromotionConfig, reference_model: str = BASE,
           intervals: dict[str, dict] | None = None) -> Decision:
    """Choose the stage to promote, or none (see the module docstring). `cfg` is resolved
    (`resolve`); without a champion the guards compare against `reference_model`.
    `intervals` (stage -> `improvement_interval`) give each candidate's improvement over the
    champion with its bootstrap interval; `cfg.require_significance` needs the winner's."""
    if not cfg.enabled:
        return Decision(False, reasons=["promotion is disabled (promotion.enabled=false)"])
    if not comparison:
        return Decision(False, reasons=["no evaluation results: nothing is promoted"])
    if cfg.metric is None or cfg.direction is None or cfg.guards is None:
        raise ValueError("decide() needs resolved promotion settings (promotion.resolve)")
    names = [cfg.metric] + [g.metric for g in cfg.guards]
    eligible = [s for s in comparison if s != BASE and (cfg.candidates is None
                                                        or s in cfg.candidates)]
    if not eligible:
        return Decision(False, reasons=["no eligible candidate among the evaluated stages"])
    problems = [f"{s}: missing or non-finite {', '.join(m)}"
                for s in eligible if (m := _missing(comparison[s], names))]
    if champion_metrics is not None and (m := _missing(champion_metrics, names)):
        problems.append(f"champion: missing or non-finite {', '.join(m)}")
    reference = champion_metrics
    if reference is None and cfg.guards:
        reference = comparison.get(reference_model)
        if reference is None or (m := _missing(reference, [g.metric for g in cfg.guards])):
            problems.append("no champion and no complete reference model baseline for the "
                            "guards")
    if problems:
        return Decision(False, reasons=["incomplete evaluation, nothing is promoted:", *problems],
                        champion=champion_metrics)
    rows = [_check(s, comparison[s], reference, champion_metrics, cfg) for s in eligible]
    passing = [r for r in rows if not r["failed_guards"]]
    if not passing:
        return Decision(False, reasons=["every candidate fails a guard"], rows=rows,
                        champion=champion_metrics)
    sign = 1 if cfg.direction == "max" else -1
    best = max(passing, key=lambda r: sign * r[cfg.metric])
    stage, value = best["stage"], best[cfg.metric]
    if champion_metrics is None:
        why = f"{stage} is the best candidate on {cfg.metric} ({value:.4g}); no champion yet"
        return Decision(True, stage, [why], rows=rows)
    gain = best["improvement"]
    interval = (intervals or {}).get(stage)
    about = [interval_text(interval)] if interval else []
    if not (gain > 0 and gain >= cfg.min_margin):
        why = (f"best candidate {stage} does not beat the champion on {cfg.metric} by the "
               f"margin: {gain:.4g} vs min_margin {cfg.min_margin}")
        return Decision(False, reasons=[why, *about], champion=champion_metrics, rows=rows,
                        interval=interval)
    why = f"{stage} beats the champion on {cfg.metric} by {gain:.4g} (min {cfg.min_margin})"
    if cfg.require_significance:
        low = (interval or {}).get("ci_low")
        if not _finite(low):
            note = (interval or {}).get("basis") or "no interval was computed"
            refused = ("but promotion.require_significance is set and there is no confidence "
                       f"interval for the improvement ({note}): nothing is promoted")
            return Decision(False, reasons=[why, refused], champion=champion_metrics, rows=rows,
                            interval=interval)
        if not (low > 0 and low >= cfg.min_margin):
            refused = (f"but not significantly: the 95% interval's lower bound {low:.4g} does "
                       f"not clear min_margin {cfg.min_margin} and 0 "
                       "(promotion.require_significance)")
            return Decision(False, reasons=[why, refused, *about], champion=champion_metrics,
                            rows=rows, interval=interval)
        why += f"; significantly: the 95% interval's lower bound {low:.4g} clears it"
    return Decision(True, stage, [why, *about], champion=champion_metrics, rows=rows,
                    interval=interval)


def interval_text(interval: dict) -> str:
    """One line for the decision: the improvement, its interval and how it was computed."""
    low, high = interval.get("ci_low"), interval.get("ci_high")
    ci = (f"95% CI [{low:.4g}, {high:.4g}]" if _finite(low) and _finite(high)
          else "no 95% CI")
    return (f"improvement over the champion on {interval.get('metric')}: "
            f"{interval.get('diff', math.nan):.4g}, {ci} ({interval.get('basis', '')})")


def improvement_interval(candidate: dict | None, champion: dict | None, metric: str,
                         direction: str, *, samples: int, seed: int) -> dict:
    """The candidate's improvement over the champion on `metric` (positive = better under
    `direction`) with its percentile-bootstrap 95% interval, from per-prompt files
    ({prompts_hash, pairs_hash, metrics: {metric: bootstrap.per_item record}}): paired by
    prompt when both were evaluated on the same prompts (same hash), else an unpaired bootstrap
    (each side resampled on its own); `basis` says which, or why there is no interval
    (ci_low/ci_high NaN)."""
    from posttrain import bootstrap

    out = {"metric": metric, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "paired": False}
    a = ((candidate or {}).get("metrics") or {}).get(metric)
    b = ((champion or {}).get("metrics") or {}).get(metric)
    if a is None:
        return out | {"basis": f"the candidate has no per-prompt values of {metric}"}
    if b is None:
        return out | {"basis": f"the champion has no stored per-prompt values of {metric} "
                               "(registered without them)"}
    if samples < 1:
        return out | {"basis": "evaluate.bootstrap_samples is 0"}
    # the items: held-out prompts, preference pairs, or (a harness task's documents) whatever
    # the evaluation's ground says, which holds the harness tasks' fingerprint
    group = a.get("group") or "prompts"
    hash_key = {"pairs": "pairs_hash", "prompts": "prompts_hash"}.get(group, "ground")
    same = (candidate.get(hash_key) is not None and candidate.get(hash_key) ==
            champion.get(hash_key) and len(a["num"]) == len(b["num"]))
    if same:
        d = bootstrap.paired_difference(a, b, samples=samples, seed=seed)
        basis = "paired by prompt: the champion was evaluated on the same held-out prompts"
    else:
        d = bootstrap.unpaired_difference(a, b, samples=samples, seed=seed)
        basis = ("unpaired bootstrap: the champion was evaluated on other held-out prompts, so "
                 "prompts could not be paired")
    if direction == "min":
        d = bootstrap.flip(d)
    return out | d | {"basis": basis}


def _check(stage: str, metrics: dict, reference: dict | None, champion: dict | None,
           cfg: PromotionConfig) -> dict:
    failed = []
    for g in cfg.guards:
        regression = -_better(metrics[g.metric], reference[g.metric], g.direction)
        if regression > g.tolerance:
            failed.append(f"{g.metric} regresses by {regression:.4g} > {g.tolerance}")
    improvement = (_better(metrics[cfg.metric], champion[cfg.metric], cfg.direction)
                   if champion is not None else None)
    return {"stage": stage, cfg.metric: metrics[cfg.metric], "improvement": improvement,
            "failed_guards": failed}


# ------------------------------------------------------------------------------------ registry


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

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                 use_safetensors=True)
    tokenizer = load_trained_tokenizer(model_dir)
    model.name_or_path = model.config._name_or_path = name  # MLmodel's source_model_name and
    # the served "model" field
    example = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
    model_card = huggingface_hub.ModelCard(card) if card else None
    path = Path(path)
    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        mlflow.transformers.save_model(
            {"model": model, "tokenizer": tokenizer}, str(path), task="llm/v1/chat",
            input_example=example, model_card=model_card, pip_requirements=_pip_requirements(),
            # greedy, as the evaluation decodes: transformers' text-generation pipeline samples
            # (temperature 0.7) unless told otherwise
            model_config={"do_sample": False}, metadata={"posttrain.name": name})
    (path / "LICENSE.txt").unlink(missing_ok=True)  # MLflow's hub-license placeholder text
    for rel, text in (extra_files or {}).items():
        (path / rel).write_text(text)
    if adapter_dir is not None and Path(adapter_dir).is_dir():
        shutil.copytree(adapter_dir, path / ADAPTER_DIR)
    return path


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
    clean = {k: v for k, v in metrics.items() if _finite(v)}
    values = {k: v for k, v in clean.items()  # the card's held-out numbers: no CIs or timing
              if not k.endswith(CI_SUFFIXES) and k != "eval_seconds"}
    info = export.lineage(manifest, heldout=values)
    card = export.model_card(info, name=name)
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
