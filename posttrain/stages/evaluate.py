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


def run_eval_stage(cfg: PipelineConfig, data_manifest: dict, candidates: dict[str, dict],
                   reward_manifest: dict | None = None, *,
                   parent_run_id: str | None = None) -> dict:
    """Held-out loss, checker accuracy, reward-model score, completion length and samples for the
    base model and each candidate; the comparison goes into the manifest."""
    key = eval_stage_key(cfg, data_manifest, candidates, reward_manifest)
    params = {"evaluate": dump(cfg.evaluate), "candidates": sorted(candidates)}

    def body(out: artifacts.StageOutput, run_id: str) -> dict:
        from posttrain.evaluate import evaluate_model
        from posttrain.models import load_causal_lm, load_tokenizer, load_trained
        from posttrain.rewards import load_reward_model

        rows = read_jsonl(Path(data_manifest["path"]) / "sft_eval.jsonl")
        rows = rows[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts else rows
        tokenizer = load_tokenizer(cfg.model)
        scorer = None
        if reward_manifest is not None:
            scorer = load_reward_model(Path(reward_manifest["path"]) / "model").eval()
        models = {"base": lambda: load_causal_lm(cfg.model)}
        for name, m in candidates.items():
            models[name] = lambda m=m: load_trained(Path(m["path"]) / "model")
        results: dict[str, dict] = {}
        for name, load in models.items():
            metrics, samples = evaluate_model(
                load(), tokenizer, rows, max_new_tokens=cfg.evaluate.max_new_tokens,
                batch_size=cfg.evaluate.batch_size, max_length=cfg.sft.max_length,
                num_samples=cfg.evaluate.num_samples, checker=_checker(data_manifest),
                reward_model=scorer,
            )
            results[name] = metrics
            tracking.log_metrics(run_id, {f"{name}/{k}": v for k, v in metrics.items()})
            tracking.log_table(run_id, samples, f"samples/{name}.json")
            (out.dir / f"samples_{name}.json").write_text(json.dumps(samples, indent=2))
        (out.dir / "comparison.json").write_text(json.dumps(results, indent=2))
        out.meta["comparison"] = results
        return {f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}

    return run_stage(cfg, "evaluate", key, params, body, parent_run_id=parent_run_id)
