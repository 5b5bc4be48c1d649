"""The stage graph: which manifests a stage gets, which stages a target needs, and a plain
(Prefect-free) run of the whole graph. The Prefect flows walk the graph the same way, with each
stage as a cached task."""

from __future__ import annotations

from posttrain.config import PipelineConfig
from posttrain.methods import is_policy, method
from posttrain.stages.common import training_key


def inputs_for(stage, data: dict, manifests: dict[str, dict]) -> dict:
    """The upstream manifests of `stage`: the data, the stage it starts from (None: the base
    model), the reward stage it uses (or None) and, for GKD, the teacher stage (absent when the
    teacher is a folder)."""
    inputs = {"data": data,
              "start": None if stage.start == "base" else manifests[stage.start],
              "reward": manifests[stage.reward] if stage.reward else None}
    teacher = getattr(stage, "teacher", None)
    if teacher is not None and teacher != "data" and teacher in manifests:
        inputs["teacher"] = manifests[teacher]
    return inputs


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
    """Run (or find cached) the training stage `name` with its upstream manifests."""
    stage = cfg.stage(name)
    return method(stage).runner()(cfg, stage, inputs, parent_run_id=parent_run_id)


def candidates(cfg: PipelineConfig, manifests: dict[str, dict]) -> dict[str, dict]:
    """The trained language models evaluation compares (reward models score, they are not
    candidates), in the config's order."""
    return {s.name: manifests[s.name] for s in cfg.stages
            if is_policy(s) and manifests.get(s.name) is not None}


def run_all(cfg: PipelineConfig, targets: list[str] | None = None, *,
            parent_run_id: str | None = None, evaluate: bool | None = None) -> dict[str, dict]:
    """Data, every needed stage, and (for the whole graph, unless evaluate=False) evaluation,
    without Prefect; returns the manifests by stage name ('data', ..., 'evaluate')."""
    from posttrain.stages.data import run_data_stage
    from posttrain.stages.evaluate import run_eval_stage

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
