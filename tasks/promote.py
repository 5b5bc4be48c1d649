"""Promotion task: the gate (posttrain.promotion.decide), the registry alias, and Prefect
artifacts on the flow run recording the decision: a markdown report and a table (one row per
model, its held-out metrics and its part in the decision)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from posttrain import promotion, registry, stages, tracking
from posttrain.charts import CI_SUFFIXES
from posttrain.config import PipelineConfig


@task(name="promote")
def promote_task(cfg: PipelineConfig, evaluation: dict, candidates: dict[str, dict],
                 data: dict, parent_run_id: str | None = None) -> dict:
    """Decide, register the winner (alias moved only when the gate passes), record the decision
    as a markdown artifact and as tags on the parent run."""
    comparison = evaluation.get("comparison", {})
    p = promotion.resolve(cfg, stages.available_metrics(cfg, data))
    name = registry.registered_model_name(p, cfg.name)
    champion = registry.champion_metrics(name, p.alias) if p.enabled else None
    per_prompt = _per_prompt(evaluation)
    intervals, basis = None, None
    if champion is not None and comparison:
        champion, stored, basis = champion_on_current_ground(cfg, name, p.alias, evaluation,
                                                             candidates, data, parent_run_id)
        intervals = {
            stage: promotion.improvement_interval(
                _model_values(per_prompt, stage), stored, p.metric, p.direction,
                samples=cfg.evaluate.bootstrap_samples, seed=cfg.evaluate.bootstrap_seed)
            for stage in comparison if stage != promotion.BASE}
    decision = promotion.decide(comparison, champion, p, reference_model=cfg.evaluate.reference,
                                intervals=intervals)
    result = decision.to_dict() | {"registered_model": name, "version": None,
                                   "champion_basis": basis}
    if basis:
        result["reasons"] = [*result["reasons"], f"champion: {basis}"]
    if decision.promote:
        result["version"] = registry.register_champion(
            name, decision.winner, candidates[decision.winner], comparison[decision.winner],
            alias=p.alias, tags={"posttrain.parent_run_id": parent_run_id or ""},
            per_prompt=_model_values(per_prompt, decision.winner),
        )
    if parent_run_id:
        c = tracking.client()
        c.set_tag(parent_run_id, "posttrain.promoted", str(decision.promote).lower())
        c.set_tag(parent_run_id, "posttrain.promoted_stage", decision.winner or "")
        c.set_tag(parent_run_id, "posttrain.promoted_version", result["version"] or "")
    create_markdown_artifact(
        markdown=decision_markdown(result, comparison, p.metric),
        key=_artifact_key(f"{cfg.name}-promotion"),
        description=f"Promotion decision for {name}",
    )
    create_table_artifact(
        table=decision_table(result, comparison, p.metric),
        key=_artifact_key(f"{cfg.name}-comparison"),
        description=decision_markdown(result, {}, p.metric).split("## Comparison")[0],
    )
    return result


def champion_on_current_ground(cfg: PipelineConfig, name: str, alias: str, evaluation: dict,
                               candidates: dict[str, dict], data: dict,
                               parent_run_id: str | None) -> tuple[dict | None, dict | None, str]:
    """The champion's metrics and per-prompt values to compare with, and a sentence saying
    which they are: those stored with the version when it was evaluated on the same held-out
    set and settings (`same_ground`), else the registered model re-evaluated now on the
    current ones (its metrics logged on the parent run as `champion/<metric>`). A champion that
    cannot be re-evaluated gives None metrics with the reason: the gate then promotes nothing
    rather than compare numbers from different sets."""
    import tempfile

    from posttrain.stages.evaluate import evaluate_model_dir

    ground = (evaluation.get("ground") or {}).get("ground")
    if registry.same_ground(name, ground, alias):
        return (registry.champion_metrics(name, alias), registry.champion_per_prompt(name, alias),
                "its registered numbers (evaluated on the same held-out set and settings)")
    try:
        with tempfile.TemporaryDirectory(prefix="posttrain-champion-") as tmp:
            model_dir = registry.download_champion(name, tmp, alias)
            again = evaluate_model_dir(
                cfg, data, candidates, evaluation.get("reward_manifest"), model_dir)
    except Exception as error:  # noqa: BLE001 - any failure: compare nothing, say why
        why = (f"could not be re-evaluated on the current held-out set "
               f"({type(error).__name__}: {error}); its registered numbers are from another "
               "set or settings, so nothing is compared")
        return {}, None, why
    if parent_run_id:
        tracking.log_metrics(parent_run_id, {f"champion/{k}": v
                                             for k, v in again["metrics"].items()})
    why = ("re-evaluated on the current held-out set and settings (the registered numbers "
           "came from a different set or settings)")
    return again["metrics"], again["per_prompt"], why


def _per_prompt(evaluation: dict) -> dict | None:
    """The evaluation's per-prompt values (per_prompt.json in its folder), None without."""
    from posttrain.stages.evaluate import PER_PROMPT_FILE

    path = Path(evaluation.get("path") or "") / PER_PROMPT_FILE
    return json.loads(path.read_text()) if evaluation.get("path") and path.is_file() else None


def _model_values(per_prompt: dict | None, stage: str) -> dict | None:
    """One model's per-prompt values with the hashes of the prompts they are on."""
    if not per_prompt or stage not in per_prompt.get("models", {}):
        return None
    return {k: per_prompt.get(k) for k in ("prompts_hash", "pairs_hash", "ground")} | {
        "metrics": per_prompt["models"][stage]}


def decision_table(result: dict, comparison: dict[str, dict], primary: str) -> list[dict]:
    """One row per model (the registry's champion last): its held-out metrics, the primary
    first, and `decision` saying which model was promoted or best."""
    metrics = sorted({k for m in comparison.values() for k in m}, key=lambda k: (k != primary, k))
    winner = result.get("winner")
    rows = []
    for model, m in comparison.items():
        part = ""
        if model == winner:
            part = "promoted" if result["promote"] else "best, not promoted"
        rows.append({"model": model, "decision": part,
                     **{k: _number(m.get(k)) for k in metrics}})
    if result.get("champion"):
        rows.append({"model": "champion (registry)",
                     "decision": "replaced" if result["promote"] else "kept",
                     **{k: _number(result["champion"].get(k)) for k in metrics}})
    return rows


def _number(v):
    """A metric for the table: None where missing or not finite (JSON has no NaN)."""
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def decision_markdown(result: dict, comparison: dict[str, dict], primary: str) -> str:
    if result["promote"]:
        head = (f"**Promoted `{result['winner']}`** as version {result['version']} of "
                f"`{result['registered_model']}` (alias moved).")
    else:
        head = f"**Nothing promoted**; `{result['registered_model']}` keeps its champion."
    lines = ["# Promotion decision", "", head, ""] + [f"- {r}" for r in result["reasons"]]
    metrics = sorted({k for m in comparison.values() for k in m
                      if not k.endswith(CI_SUFFIXES)},
                     key=lambda k: (k != primary, k))
    lines += ["", "## Comparison (held-out)", "",
              "| stage | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
    for stage, m in comparison.items():
        lines.append(f"| {stage} | " + " | ".join(_with_ci(m, k) for k in metrics) + " |")
    if result.get("champion"):
        lines.append("| *champion* | " + " | ".join(_with_ci(result["champion"], k)
                                                    for k in metrics) + " |")
    return "\n".join(lines) + "\n"


def _with_ci(m: dict, k: str) -> str:
    """A cell: the value, and its 95% bootstrap interval when the evaluation gave one."""
    low, high = m.get(k + CI_SUFFIXES[0]), m.get(k + CI_SUFFIXES[1])
    if _number(low) is None or _number(high) is None:
        return _fmt(m.get(k))
    return f"{_fmt(m.get(k))} [{_fmt(low)}, {_fmt(high)}]"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _artifact_key(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "posttrain"
