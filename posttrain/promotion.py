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

The winner is registered, and the champion's metrics and per-prompt values read back, by
posttrain/registry.py (the MLflow Model Registry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain import harness
from posttrain.config import ConfigError, MetricGuard, PipelineConfig, PromotionConfig
from posttrain.stages.evaluate_harness import harness_metrics

# Lazy imports: bootstrap (numpy) loads only to compare; the flows and preflight import this
# module.

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
    configured tasks (`stages.evaluate_harness.harness_metrics`), else the harness's registry of
    metric names; None for other metrics or when neither says."""
    if not metric.startswith(harness.PREFIX + "/"):
        return None
    return harness_metrics(cfg).get(metric) or harness.metric_direction(metric)



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
