"""Evaluation stage: the base model and every trained stage on the same held-out prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.charts import CI_SUFFIXES
from posttrain.config import PipelineConfig
from posttrain.data import demo
from posttrain.data.formats import eval_rows
from posttrain.data.loading import read_jsonl
from posttrain.data.validation import (
    LANGUAGE_MODELING,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    PROMPT_COMPLETION,
    UNPAIRED_PREFERENCE,
)
from posttrain.methods import PAIRS
from posttrain.stages.common import digest, dump, model_params, run_stage
from posttrain.stages.evaluate_harness import (
    harness_fingerprint,
    harness_metrics,
    harness_runner,
    point_task_at,
)
from posttrain.vision.models import is_vision_model

# Lazy imports: the evaluation (torch, transformers) and bootstrap (numpy) load inside the
# stage's body; the flows, promotion and preflight import this module without them.

BASE = "base"
# Formats whose held-out rows carry a reference completion (held-out loss and perplexity).
WITH_REFERENCE = (PROMPT_COMPLETION, LANGUAGE_MODELING, PREFERENCE, PREFERENCE_IMPLICIT,
                  UNPAIRED_PREFERENCE)


def evaluation_metrics(cfg: PipelineConfig, formats: dict[str, str], checker: bool) -> set[str]:
    """The comparison metrics this pipeline's evaluation produces for every model, given the
    format of each data source it reads (by name) and whether the held-out source has a
    checker. Preflight and the promotion defaults read this; `_evaluate_all` produces them."""
    out = {"mean_completion_length", "eos_rate", "kl_to_reference", "kl_per_token_to_reference"}
    if formats[cfg.eval_source] in WITH_REFERENCE:
        out |= {"eval_loss", "perplexity"}
    if checker:
        out.add("checker_accuracy")
    if cfg.eval_reward is not None:
        out |= {"reward_score", "win_rate_vs_reference"}
    if any(fmt in PAIRS for fmt in formats.values()):
        out.add("chosen_perplexity")
    return out | set(harness_metrics(cfg))


def eval_stage_key(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                   reward_manifest: dict | None = None) -> str:
    datasets = data_manifest["datasets"]
    upstream = {n: digest(m) for n, m in candidates.items()}
    if reward_manifest is not None:
        upstream["reward"] = digest(reward_manifest)
    data = {n: datasets[n]["fingerprint"] for n in _read_sources(cfg, data_manifest)}
    harness_params = {"harness": harness_fingerprint(cfg)} if cfg.evaluate.tasks else {}
    return artifacts.stage_key(
        "evaluate", {"evaluate": dump(cfg.evaluate), "model": model_params(cfg),
                     "eval_source": cfg.eval_source, **harness_params},
        upstream=upstream, data_fingerprint=artifacts.hash_json(data),
    )


def _read_sources(cfg: PipelineConfig, data_manifest: dict) -> list[str]:
    """The eval source, and the first preference source (for chosen_perplexity)."""
    out = [cfg.eval_source]
    pairs = _preference_source(data_manifest)
    return out + ([pairs] if pairs and pairs not in out else [])


def _preference_source(data_manifest: dict) -> str | None:
    return next((n for n, d in data_manifest["datasets"].items()
                 if d["format"] in PAIRS), None)


def run_eval_stage(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                   reward_manifest: dict | None = None, *,
                   parent_run_id: str | None = None) -> dict:
    """Held-out loss, checker accuracy, reward-model score, win rate and KL against the
    reference model, perplexity on chosen responses, completion length and samples for the base
    model and each candidate, on the same held-out prompts; the comparison goes into the
    manifest."""
    key = eval_stage_key(cfg, data_manifest, candidates, reward_manifest)
    params = {**dump(cfg.evaluate), "data": cfg.eval_source, "candidates": list(candidates)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        task_dir = out.dir / "harness_tasks"
        vision = is_vision_model(cfg.model)
        if vision:
            from posttrain.vision.evaluate import evaluate_all, sample_images

            results = evaluate_all(cfg, data_manifest, _rows(cfg, data_manifest)[0], candidates)
        else:
            results = _evaluate_all(cfg, data_manifest, candidates, reward_manifest,
                                    task_dir=task_dir)
        point_task_at(task_dir, out.dir, artifacts.stage_dir(cfg.artifacts_root, "evaluate",
                                                              key))
        ground = evaluation_ground(cfg, *_rows(cfg, data_manifest), reward_manifest,
                                   candidates)
        e = cfg.evaluate
        comparison = {name: with_intervals(r.metrics, r.per_prompt, e.bootstrap_samples,
                                           e.bootstrap_seed) | {"eval_seconds": r.seconds["total"]}
                      for name, r in results.items()}
        paired = paired_to(results, e.reference, e.bootstrap_samples, e.bootstrap_seed)
        for name, r in results.items():
            tracking.log_metrics(run_id, {f"{name}/{k}": v for k, v in comparison[name].items()})
            tracking.log_metrics(run_id, {f"{name}/seconds/{k}": v for k, v in r.seconds.items()})
            tracking.log_metrics(run_id, {f"{name}/vs_{e.reference}/{m}_{k}": d[k]
                                          for m, d in paired.get(name, {}).items()
                                          for k in ("diff", "ci_low", "ci_high")})
            if vision:  # the table shows each sample's image (MLflow stores them beside it)
                tracking.client().log_table(
                    run_id, _columns(sample_images(Path(data_manifest["path"]), r.samples)),
                    f"samples/{name}.json")
            else:
                tracking.log_table(run_id, r.samples, f"samples/{name}.json")
            (out.dir / f"samples_{name}.json").write_text(json.dumps(r.samples, indent=2))
        _log_on_stage_runs(comparison, candidates)
        (out.dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
        (out.dir / "paired.json").write_text(json.dumps(
            {"reference": e.reference, "differences": paired}, indent=2))
        (out.dir / PER_PROMPT_FILE).write_text(json.dumps(
            {**ground, "models": {n: r.per_prompt for n, r in results.items()}}))
        out.meta["comparison"] = comparison
        out.meta["paired"] = paired
        out.meta["reference"] = e.reference
        out.meta["ground"] = ground
        out.meta["reward_manifest"] = reward_manifest  # a champion re-evaluated later needs it
        return {f"{n}/{k}": v for n, m in comparison.items() for k, v in m.items()}

    return run_stage(cfg, "evaluate", key, params, body, parent_run_id=parent_run_id)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {c: [r.get(c) for r in rows] for c in (rows[0] if rows else {})}


PER_PROMPT_FILE = "per_prompt.json"
CI_LOW, CI_HIGH = CI_SUFFIXES


def with_intervals(metrics: dict[str, float], per_prompt: dict[str, dict], samples: int,
                   seed: int) -> dict[str, float]:
    """The metrics with each one's bootstrap 95% interval over prompts beside it
    (`<metric>_ci_low`, `<metric>_ci_high`), for those with per-prompt values; unchanged when
    `samples` is 0."""
    from posttrain import bootstrap

    out = dict(metrics)
    if samples < 1:
        return out
    for name in metrics:
        if name in per_prompt:
            low, high = bootstrap.interval(per_prompt[name], samples=samples, seed=seed)
            out[name + CI_LOW], out[name + CI_HIGH] = low, high
    return out


def paired_to(results: dict, reference: str, samples: int, seed: int) -> dict[str, dict]:
    """Every other model's paired difference to `reference` on each metric (model minus
    reference, prompts resampled once for both): {model: {metric: {diff, ci_low, ci_high}}}."""
    from posttrain import bootstrap

    if samples < 1 or reference not in results:
        return {}
    ref = results[reference].per_prompt
    return {name: {m: bootstrap.paired_difference(rec, ref[m], samples=samples, seed=seed)
                   for m, rec in r.per_prompt.items()
                   if m in ref and len(rec["num"]) == len(ref[m]["num"])}
            for name, r in results.items() if name != reference}


def _checker(data_manifest: dict, source: str):
    if data_manifest["datasets"][source].get("checker") == "demo":
        return lambda prompt, completion: demo.check(demo.prompt_text(prompt), completion)
    return None


def _held_out(cfg: PipelineConfig, data_manifest: dict, source: str) -> list[dict]:
    name = f"{source}_eval.jsonl"
    rows = eval_rows(read_jsonl(Path(data_manifest["path"]) / name),
                     data_manifest["datasets"][source]["format"], name)
    return rows[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts else rows


def _loaders(cfg: PipelineConfig, candidates: dict[str, dict]) -> dict:
    from posttrain.models import load_causal_lm

    loaders = {BASE: lambda: load_causal_lm(cfg.model)}
    for name, m in candidates.items():
        loaders[name] = lambda m=m: load_causal_lm(cfg.model, path=Path(m["path"]) / "model")
    return loaders


def evaluate_model_dir(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                       reward_manifest: dict | None, model_dir: str | Path,
                       name: str = "champion") -> dict:
    """A model folder outside the graph (the registry's champion, downloaded) evaluated as the
    stage evaluates its candidates, on the current held-out rows and settings, against the
    current reference (evaluated again beside it: win rate and KL need its completions and
    scores): {"metrics" (with intervals and eval_seconds), "per_prompt" ({prompts_hash,
    pairs_hash, ground, metrics}), "samples"}."""
    from posttrain.models import load_causal_lm

    reference = cfg.evaluate.reference
    loaders = {name: lambda: load_causal_lm(cfg.model, path=Path(model_dir)),
               reference: _loaders(cfg, candidates)[reference]}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="posttrain-harness-") as tmp:
        results = _evaluate_all(cfg, data_manifest, candidates, reward_manifest, loaders,
                                task_dir=Path(tmp))
    ground = evaluation_ground(cfg, *_rows(cfg, data_manifest), reward_manifest, candidates)
    r, e = results[name], cfg.evaluate
    metrics = with_intervals(r.metrics, r.per_prompt, e.bootstrap_samples, e.bootstrap_seed)
    return {"metrics": metrics | {"eval_seconds": r.seconds["total"]},
            "per_prompt": {**ground, "metrics": r.per_prompt}, "samples": r.samples}


def _evaluate_all(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                  reward_manifest: dict | None, loaders: dict | None = None,
                  task_dir: Path | None = None) -> dict:
    """Every model's Evaluation, with `win_rate_vs_reference` and `kl_to_reference` added. The
    reference goes last so that, while it is loaded, it scores everyone's completions (one model
    in memory at a time). `loaders` (name -> model factory, the reference among them) replace
    the base model and the candidates.

    With `evaluate.tasks`, each model, as placed for the checker, also runs the harness tasks
    (`lm_eval/<task>/<metric>` in its metrics, per-item values in its per_prompt, the time in
    its seconds); `posttrain_demo` is written into `task_dir` over the held-out rows, so the
    harness scores the very prompts the checker sees."""
    from posttrain.evaluate import completion_token_logps, evaluate_candidate
    from posttrain.models import load_tokenizer
    from posttrain.rewards import load_reward_model
    from posttrain.training import make_accelerator, place

    rows, pref_rows = _rows(cfg, data_manifest)
    run_harness = harness_runner(cfg, data_manifest, rows, task_dir)  # checked before loading
    tokenizer = load_tokenizer(cfg.model)
    accelerator = make_accelerator(cfg.model.mixed_precision)  # the device every model goes to
    scorer = None
    if reward_manifest is not None:
        scorer = place(load_reward_model(Path(reward_manifest["path"]) / "model"), accelerator,
                       frozen=True)
    loaders = loaders or _loaders(cfg, candidates)
    reference = cfg.evaluate.reference
    order = [n for n in loaders if n != reference] + [reference]
    pad, bs = tokenizer.pad_token_id, cfg.evaluate.batch_size
    results, own_logps, ref_logps = {}, {}, {}
    for name in order:
        clock = time.perf_counter()
        model = place(loaders[name](), accelerator, frozen=True)
        results[name] = evaluate_candidate(
            model, tokenizer, rows, max_new_tokens=cfg.evaluate.max_new_tokens,
            batch_size=bs, max_length=cfg.evaluate.max_length,
            num_samples=cfg.evaluate.num_samples,
            checker=_checker(data_manifest, cfg.eval_source), reward_model=scorer,
            preference_rows=pref_rows,
        )
        if run_harness is not None:
            run_harness(model, tokenizer, results[name])
        seconds = results[name].seconds  # generate, loss, reward, chosen_perplexity; + kl, total
        if name != reference:
            t = time.perf_counter()
            own_logps[name] = completion_token_logps(model, results[name].completions, pad, bs)
            seconds["kl"] = time.perf_counter() - t
            seconds["total"] = time.perf_counter() - clock  # loading the model included
        else:
            seconds["kl"], seconds["total"] = 0.0, time.perf_counter() - clock
            for n in own_logps:  # the reference scoring n's completions is n's cost
                t = time.perf_counter()
                ref_logps[n] = completion_token_logps(model, results[n].completions, pad, bs)
                results[n].seconds["kl"] += time.perf_counter() - t
                results[n].seconds["total"] += time.perf_counter() - t
        del model
    _add_pairwise(results, reference, own_logps, ref_logps)
    return {name: results[name] for name in loaders}  # base, then the stages in config order


def _rows(cfg: PipelineConfig, data_manifest: dict) -> tuple[list[dict], list[dict] | None]:
    """The held-out rows, and the held-out preference pairs (None without a pair source)."""
    rows = _held_out(cfg, data_manifest, cfg.eval_source)
    pairs = _preference_source(data_manifest)
    pref_rows = None
    if pairs is not None:
        pref_rows = read_jsonl(Path(data_manifest["path"]) / f"{pairs}_eval.jsonl")
        pref_rows = pref_rows[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts \
            else pref_rows
    return rows, pref_rows


def _add_pairwise(results: dict, reference: str, own_logps: dict, ref_logps: dict) -> None:
    from posttrain import bootstrap
    from posttrain.evaluate import (
        k3_kl_items,
        k3_kl_per_token,
        kl_items,
        mean_log_ratio,
        summed_logps,
        win_items,
        win_rate,
    )

    ref = results[reference]
    for name, r in results.items():
        if name == reference:
            zeros = [0.0] * len(r.completions)
            r.metrics["kl_to_reference"] = r.metrics["kl_per_token_to_reference"] = 0.0
            r.per_prompt["kl_to_reference"] = bootstrap.per_item(zeros)
            r.per_prompt["kl_per_token_to_reference"] = bootstrap.per_item(zeros)
        else:
            # Per-token log-probs: summed for the sequence log-ratio, per token for k3.
            own_tokens, ref_tokens = own_logps[name], ref_logps[name]
            own_sums, ref_sums = summed_logps(own_tokens), summed_logps(ref_tokens)
            r.metrics["kl_to_reference"] = mean_log_ratio(own_sums, ref_sums)
            r.per_prompt["kl_to_reference"] = kl_items(own_sums, ref_sums)
            r.metrics["kl_per_token_to_reference"] = k3_kl_per_token(own_tokens, ref_tokens)
            r.per_prompt["kl_per_token_to_reference"] = k3_kl_items(own_tokens, ref_tokens)
        if any(s is not None for s in r.scores):
            r.metrics["win_rate_vs_reference"] = win_rate(r.scores, ref.scores)
            r.per_prompt["win_rate_vs_reference"] = win_items(r.scores, ref.scores)


# Evaluation settings that change no metric (only speed, the sample table or the intervals).
NOT_GROUND = ("enabled", "batch_size", "num_samples", "bootstrap_samples", "bootstrap_seed")


def evaluation_ground(cfg: PipelineConfig, rows: list[dict], pref_rows: list[dict] | None,
                      reward_manifest: dict | None, candidates: dict[str, dict]) -> dict:
    """What two evaluations must share for their numbers (and per-prompt values) to be
    compared: `prompts_hash` (the held-out rows, in order), `pairs_hash` (the preference pairs
    of chosen_perplexity) and `ground`: a hash of those, every evaluation setting that can
    change a number (all of `evaluate` but NOT_GROUND, so settings added later count too), the
    model settings (tokenizer), the reward model and the reference model (KL, win rate), and
    with `evaluate.tasks` the harness fingerprint (lm-eval's version, the task configs, their
    local data, the harness settings)."""
    e = cfg.evaluate
    prompts = artifacts.hash_json(rows)
    pairs = artifacts.hash_json(pref_rows) if pref_rows else None
    reference = candidates.get(e.reference)
    settings = {"prompts": prompts, "pairs": pairs,
                "evaluate": {k: v for k, v in dump(e).items() if k not in NOT_GROUND},
                "model": model_params(cfg),
                "reward": digest(reward_manifest) if reward_manifest is not None else None,
                "reference": digest(reference) if reference is not None else e.reference}
    harness_hash = harness_fingerprint(cfg)
    if harness_hash is not None:
        settings["harness"] = harness_hash
    return {"prompts_hash": prompts, "pairs_hash": pairs,
            "ground": artifacts.hash_json(settings)}


def _log_on_stage_runs(comparison: dict[str, dict], candidates: dict[str, dict]) -> None:
    """Each candidate's held-out metrics also go on the run that trained it (`heldout/...`), so
    the MLflow UI compares stage runs on the same numbers."""
    for name, manifest in candidates.items():
        run_id = manifest.get("mlflow_run_id")
        if run_id and name in comparison:
            tracking.log_metrics(run_id, {f"heldout/{k}": v for k, v in comparison[name].items()})


def available_metrics(cfg: PipelineConfig, data_manifest: dict) -> set[str]:
    """`evaluation_metrics` for the sources as the data stage prepared them."""
    datasets = data_manifest["datasets"]
    return evaluation_metrics(cfg, {n: d["format"] for n, d in datasets.items()},
                              datasets[cfg.eval_source].get("checker") is not None)
