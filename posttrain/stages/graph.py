"""The stage graph: which manifests a stage gets, which stages a target needs, and a plain
(Prefect-free) run of the whole graph. The Prefect flows walk the graph the same way, with each
stage as a cached task."""

from __future__ import annotations

from collections.abc import Callable

from posttrain.config import PipelineConfig, load_pipeline_config
from posttrain.methods import is_policy
from posttrain.stages import gkd, online, preference, reward, sft
from posttrain.stages.common import existing, inputs_for, training_key
from posttrain.stages.data import run_data_stage
from posttrain.stages.evaluate import run_eval_stage

# Lazy imports: torch (posttrain.training) loads only when a command line ends; the flows and
# preflight import this module.

# The function that trains each method's stage: (cfg, stage, inputs, parent_run_id=) -> manifest.
# Stage modules import torch only inside their bodies, so importing them all here is light.
STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "sft": sft.run_sft_stage,
    "reward": reward.run_reward_stage,
    **dict.fromkeys(("dpo", "orpo", "simpo", "cpo", "kto"), preference.run_method_stage),
    "gkd": gkd.run_gkd_stage,
    **dict.fromkeys(("grpo", "rloo", "online_dpo", "ppo"), online.run_online_stage),
}


def needed(cfg: PipelineConfig, targets: list[str] | None = None) -> list:
    """The stages to run for `targets` (None: all), with every stage they start from or use,
    in the config's order."""
    if targets is None:
        return list(cfg.stages)
    wanted: set[str] = set()
    todo = list(targets)
    while todo:
        stage = cfg.stage(todo.pop())
        if stage.name in wanted:
            continue
        wanted.add(stage.name)
        todo += [n for n in (stage.start, stage.reward) if n not in (None, "base")]
        teacher = getattr(stage, "teacher", None)  # GKD: a stage name, or a folder
        if teacher is not None and teacher in {s.name for s in cfg.stages}:
            todo.append(teacher)
    return [s for s in cfg.stages if s.name in wanted]


def stage_key(cfg: PipelineConfig, name: str, inputs: dict) -> str:
    return training_key(cfg, cfg.stage(name), inputs)


def run_training_stage(cfg: PipelineConfig, name: str, inputs: dict, *,
                       parent_run_id: str | None = None) -> dict:
    """Run (or find cached) the training stage `name` with its upstream manifests (a teacher
    stage the inputs lack is looked up, or run, first: see `with_teacher`)."""
    stage = cfg.stage(name)
    inputs = with_teacher(cfg, stage, inputs, parent_run_id=parent_run_id)
    return STAGE_FUNCTIONS[stage.method](cfg, stage, inputs, parent_run_id=parent_run_id)


def with_teacher(cfg: PipelineConfig, stage, inputs: dict, *,
                 parent_run_id: str | None = None) -> dict:
    """`inputs` with a GKD stage's teacher stage manifest under 'teacher', for a runner that
    passes only data/start/reward (the Prefect task): the existing artifact found by its key (a
    lookup, nothing recorded), else the teacher run through the graph (it trains the teacher
    and what it needs, or finds them cached). Any other stage, or a folder teacher: as is."""
    teacher = getattr(stage, "teacher", None)
    if inputs.get("teacher") is not None or teacher not in {s.name for s in cfg.stages}:
        return inputs
    found = existing(cfg, teacher, inputs["data"], {})
    if found is None:
        found = run_all(cfg, [teacher], parent_run_id=parent_run_id, evaluate=False)[teacher]
    return {**inputs, "teacher": found}


def candidates(cfg: PipelineConfig, manifests: dict[str, dict]) -> dict[str, dict]:
    """The trained language models evaluation compares (reward models score, they are not
    candidates), in the config's order."""
    return {s.name: manifests[s.name] for s in cfg.stages
            if is_policy(s) and manifests.get(s.name) is not None}


def run_all(cfg: PipelineConfig, targets: list[str] | None = None, *,
            parent_run_id: str | None = None, evaluate: bool | None = None) -> dict[str, dict]:
    """Data, every needed stage, and (for the whole graph, unless evaluate=False) evaluation,
    without Prefect; returns the manifests by stage name ('data', ..., 'evaluate')."""
    manifests = {"data": run_data_stage(cfg, parent_run_id=parent_run_id)}
    for stage in needed(cfg, targets):
        manifests[stage.name] = run_training_stage(
            cfg, stage.name, inputs_for(stage, manifests["data"], manifests),
            parent_run_id=parent_run_id)
    if evaluate if evaluate is not None else (targets is None and cfg.evaluate.enabled):
        reward = cfg.eval_reward
        manifests["evaluate"] = run_eval_stage(
            cfg, manifests["data"], candidates(cfg, manifests),
            manifests[reward] if reward else None, parent_run_id=parent_run_id)
    return manifests


def command_line(method_name: str, argv: list[str] | None = None) -> None:
    """`python -m posttrain.recipes.<method> --config FILE [field=value ...]`: data and every
    stage of that method in the pipeline (with what they start from), no Prefect, no
    evaluation; prints each artifact's folder."""
    import argparse

    from posttrain.training import end_distributed  # torch: only once a stage has trained

    parser = argparse.ArgumentParser(
        prog=f"python -m posttrain.recipes.{method_name}",
        description=f"data + the {method_name} stages of a pipeline, no Prefect")
    parser.add_argument("--config", default=None, help="pipeline YAML (default: built-in demo)")
    parser.add_argument("overrides", nargs="*",
                        help=f"dotted overrides, e.g. stages.{method_name}.max_steps=50")
    args = parser.parse_args(argv)
    cfg = load_pipeline_config(args.config, args.overrides)
    targets = [s.name for s in cfg.stages if s.method == method_name]
    if not targets:
        parser.error(f"the config has no {method_name} stage")
    manifests = run_all(cfg, targets, evaluate=False)
    for name in targets:
        print(f"{method_name.upper()} artifact ({name}): {manifests[name]['path']}")
    end_distributed()
