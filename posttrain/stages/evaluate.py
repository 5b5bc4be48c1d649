"""Evaluation stage: the base model and every candidate on the same held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig
from posttrain.data import demo
from posttrain.data.loading import read_jsonl
from posttrain.stages.common import digest, dump, run_stage


def eval_stage_key(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                   reward_manifest: dict | None = None) -> str:
    upstream = {"data": digest(data_manifest), **{n: digest(m) for n, m in candidates.items()}}
    if reward_manifest is not None:
        upstream["reward"] = digest(reward_manifest)
    return artifacts.stage_key(
        "evaluate",
        {"evaluate": dump(cfg.evaluate), "model": dump(cfg.model), "max_length": cfg.sft.max_length},
        upstream=upstream,
    )


def _checker(data_manifest: dict):
    if data_manifest.get("checker") == "demo":
        return lambda prompt, completion: demo.check(demo.prompt_text(prompt), completion)
    return None


REFERENCE = "sft"  # win rate and KL are measured against the SFT model


def run_eval_stage(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                   reward_manifest: dict | None = None, *,
                   parent_run_id: str | None = None) -> dict:
    """Held-out loss, checker accuracy, reward-model score, win rate and KL against SFT,
    perplexity on chosen responses, completion length and samples for the base model and each
    candidate, on the same held-out prompts; the comparison goes into the manifest."""
    key = eval_stage_key(cfg, data_manifest, candidates, reward_manifest)
    params = {"evaluate": dump(cfg.evaluate), "candidates": sorted(candidates)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        results = _evaluate_all(cfg, data_manifest, candidates, reward_manifest)
        comparison = {name: r.metrics for name, r in results.items()}
        for name, r in results.items():
            tracking.log_metrics(run_id, {f"{name}/{k}": v for k, v in r.metrics.items()})
            tracking.log_table(run_id, r.samples, f"samples/{name}.json")
            (out.dir / f"samples_{name}.json").write_text(json.dumps(r.samples, indent=2))
        _log_on_stage_runs(comparison, candidates)
        (out.dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
        out.meta["comparison"] = comparison
        return {f"{n}/{k}": v for n, m in comparison.items() for k, v in m.items()}

    return run_stage(cfg, "evaluate", key, params, body, parent_run_id=parent_run_id)


def _evaluate_all(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                  reward_manifest: dict | None) -> dict:
    """Every model's Evaluation, with `win_rate_vs_sft` and `kl_to_sft` added when SFT is among
    the candidates. SFT goes last so that, while it is loaded, it scores everyone's completions
    (one model in memory at a time)."""
    from posttrain.evaluate import completion_logps, evaluate_candidate
    from posttrain.models import load_causal_lm, load_tokenizer, load_trained
    from posttrain.rewards import load_reward_model

    data_dir = Path(data_manifest["path"])
    rows = read_jsonl(data_dir / "sft_eval.jsonl")
    rows = rows[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts else rows
    pref_path = data_dir / "preference_eval.jsonl"
    pref_rows = read_jsonl(pref_path) if pref_path.is_file() else None
    if pref_rows and cfg.evaluate.max_prompts:
        pref_rows = pref_rows[: cfg.evaluate.max_prompts]
    tokenizer = load_tokenizer(cfg.model)
    scorer = None
    if reward_manifest is not None:
        scorer = load_reward_model(Path(reward_manifest["path"]) / "model").eval()
    loaders = {"base": lambda: load_causal_lm(cfg.model)}
    for name, m in candidates.items():
        loaders[name] = lambda m=m: load_trained(Path(m["path"]) / "model")
    order = [n for n in loaders if n != REFERENCE] + ([REFERENCE] if REFERENCE in loaders else [])
    pad, bs = tokenizer.pad_token_id, cfg.evaluate.batch_size
    results, own_logps, ref_logps = {}, {}, {}
    for name in order:
        model = loaders[name]()
        results[name] = evaluate_candidate(
            model, tokenizer, rows, max_new_tokens=cfg.evaluate.max_new_tokens,
            batch_size=bs, max_length=cfg.sft.max_length, num_samples=cfg.evaluate.num_samples,
            checker=_checker(data_manifest), reward_model=scorer, preference_rows=pref_rows,
        )
        if name != REFERENCE:
            own_logps[name] = completion_logps(model, results[name].completions, pad, bs)
        else:
            ref_logps = {n: completion_logps(model, results[n].completions, pad, bs)
                         for n in own_logps}
        del model
    if REFERENCE in results:
        _add_pairwise(results, own_logps, ref_logps)
    return {name: results[name] for name in loaders}  # base, sft, methods: the config's order


def _add_pairwise(results: dict, own_logps: dict, ref_logps: dict) -> None:
    from posttrain.evaluate import kl_estimate, win_rate

    ref = results[REFERENCE]
    for name, r in results.items():
        if name == REFERENCE:
            r.metrics["kl_to_sft"] = 0.0
        else:
            r.metrics["kl_to_sft"] = kl_estimate(own_logps[name], ref_logps[name])
        if any(s is not None for s in r.scores):
            r.metrics["win_rate_vs_sft"] = win_rate(r.scores, ref.scores)


def _log_on_stage_runs(comparison: dict[str, dict], candidates: dict[str, dict]) -> None:
    """Each candidate's held-out metrics also go on the run that trained it (`heldout/...`), so
    the MLflow UI compares stage runs on the same numbers."""
    for name, manifest in candidates.items():
        run_id = manifest.get("mlflow_run_id")
        if run_id and name in comparison:
            tracking.log_metrics(run_id, {f"heldout/{k}": v for k, v in comparison[name].items()})
