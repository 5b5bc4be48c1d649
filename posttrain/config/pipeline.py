"""The whole pipeline: launch and tracking settings, the stage union, the graph's checks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    Field,
)

from posttrain.config.base import ConfigError, _Frozen
from posttrain.config.data import DatasetSource, DemoTaskConfig, VisionDemoConfig
from posttrain.config.evaluation import EvalConfig, PromotionConfig, RetrainConfig
from posttrain.config.model import ModelConfig
from posttrain.config.offline import (
    CPOConfig,
    DPOConfig,
    GKDConfig,
    KTOConfig,
    ORPOConfig,
    RewardConfig,
    SFTConfig,
    SimPOConfig,
)
from posttrain.config.online import GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig
from posttrain.config.training import RESERVED_NAMES


class LaunchConfig(_Frozen):
    """How training stages start: in the Prefect worker's process, or as `accelerate launch`."""

    num_processes: int = Field(
        1,
        ge=1,
        description="Data-parallel processes per training stage; above 1 the stage runs under "
        "`accelerate launch` (DDP, one process per GPU; gloo on CPU). per_device_batch_size "
        "stays per process, so the global batch grows with it. With accelerate_config set, 1 "
        "keeps the file's num_processes.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (e.g. infra/accelerate/fsdp.yaml) for "
        "`accelerate launch --config_file`; set, the stage always runs as a launched process.",
    )

    @property
    def launched(self) -> bool:
        """Whether training stages run as `accelerate launch` processes."""
        return self.num_processes > 1 or self.accelerate_config is not None


class TrackingConfig(_Frozen):
    """MLflow settings (the tracking URI itself comes from MLFLOW_TRACKING_URI)."""

    experiment: str = Field("posttrain", description="MLflow experiment name.")
    max_artifact_mb: float = Field(
        200.0,
        ge=0.0,
        description="Copy a stage's folder into MLflow when smaller than this; larger stages "
        "log their manifest and a tag with the folder's path.",
    )


class _AnyOf:
    """JSON schema `anyOf` for a discriminated union (pydantic writes `oneOf`, which the Prefect
    UI's form cannot render: it then offers a raw JSON box instead of each stage's fields). The
    alternatives exclude each other through their `method`, so both say the same."""

    @staticmethod
    def __get_pydantic_json_schema__(core_schema, handler):
        schema = handler(core_schema)
        if "oneOf" in schema:
            schema["anyOf"] = schema.pop("oneOf")
        return schema


StageConfig = Annotated[
    SFTConfig | RewardConfig | DPOConfig | ORPOConfig | SimPOConfig | CPOConfig | KTOConfig
    | GKDConfig | GRPOConfig | RLOOConfig | OnlineDPOConfig | PPOConfig,
    Field(discriminator="method"),
    _AnyOf,
]
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class PipelineConfig(_Frozen):
    """A whole pipeline: named data sources, a base model, an ordered list of stages."""

    name: str = Field("demo", description="Pipeline name, shown in Prefect and MLflow.")
    artifacts_root: str = Field(
        "artifacts", description="Folder holding the content-addressed stage artifacts."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads when training on CPU; null keeps torch's default. "
        "Tiny models run fastest on 1 thread, and 1 thread degrades gracefully when the "
        "machine is shared (2 spinning threads on 2 busy cores can be 30x slower).",
    )
    data: dict[str, DatasetSource] = Field(
        {},
        description="Named data sources, e.g. {sft: {path: chat.jsonl}, preference: {path: "
        "pairs.jsonl}}; a stage reads the one its `data` names, and nothing else is loaded.",
    )
    demo: DemoTaskConfig = Field(
        DemoTaskConfig(), description="Generator of the built-in data (sources 'demo:...')."
    )
    vision_demo: VisionDemoConfig = Field(
        VisionDemoConfig(),
        description="Generator of the built-in image task (sources 'demo:vision-...').",
    )
    model: ModelConfig = Field(ModelConfig(), description="Base model (the stages' 'base').")
    stages: tuple[StageConfig, ...] = Field(
        (),
        description="The stages in order; each names its method, what it starts from, its data "
        "and its own settings, e.g. [{name: sft, method: sft, data: sft}, {name: dpo, method: "
        "dpo, start: sft, data: preference, beta: 0.1}].",
    )
    evaluate: EvalConfig = Field(EvalConfig(), description="Evaluation stage.")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow tracking.")
    launch: LaunchConfig = Field(
        LaunchConfig(), description="Process launch of training stages (distributed training)."
    )
    promotion: PromotionConfig = Field(
        PromotionConfig(), description="Promotion gate after evaluation."
    )
    retrain: RetrainConfig = Field(
        RetrainConfig(), description="Retraining schedule and event trigger."
    )

    # The graph is checked apart from field validation (`check`, called by `validate` and the
    # flows): a deployment run given only some sections (say, a new `stages` list) is valid
    # field by field but refers to sources that only the served config has, until the flow
    # merges the two.
    def graph_problems(self) -> list[str]:
        """What is wrong with how the stages, data sources and evaluation refer to each other."""
        problems = [f"data.{n}: source names are letters, digits, '-' and '_'"
                    for n in self.data if not re.fullmatch(SOURCE_NAME, n)]
        seen: dict[str, StageConfig] = {}
        for s in self.stages:
            problems += [f"stages.{s.name}.{p}" for p in _stage_problems(self, s, seen)]
            seen[s.name] = s
        return problems + _evaluation_problems(self)

    def check(self, where: str = "config") -> PipelineConfig:
        """`self`, or a ConfigError listing every graph problem."""
        problems = self.graph_problems()
        if problems:
            raise ConfigError("\n".join([f"invalid configuration ({where}):"]
                                        + [f"  {p}" for p in problems]))
        return self

    def stage(self, name: str) -> StageConfig:
        """The stage named `name`; KeyError listing the stages otherwise."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def eval_source(self) -> str | None:
        """The data source evaluation reads: evaluate.data, else the first stage's source."""
        if self.evaluate.data is not None:
            return self.evaluate.data
        return self.stages[0].data if self.stages else None

    @property
    def eval_reward(self) -> str | None:
        """The reward stage evaluation scores with: evaluate.reward, or the only one."""
        if self.evaluate.reward is not None:
            return self.evaluate.reward
        rewards = [s.name for s in self.stages if s.trains_reward_model]
        return rewards[0] if len(rewards) == 1 else None

    @property
    def used_sources(self) -> list[str]:
        """The data sources some stage or the evaluation reads, in the config's order."""
        used = {s.data for s in self.stages} | {self.eval_source}
        return [n for n in self.data if n in used]


def _stage_problems(cfg: PipelineConfig, s, earlier: dict) -> list[str]:
    """What is wrong with stage `s` given the stages before it (`earlier`, by name)."""
    out = []
    if s.name in earlier:
        out.append("name: another stage already has this name")
    if s.name in RESERVED_NAMES:
        out.append(f"name: {s.name!r} is reserved ({', '.join(RESERVED_NAMES)})")
    if s.start != "base":
        if s.start not in earlier:
            out.append(f"start: {s.start!r} is neither 'base' nor an earlier stage "
                       f"(earlier: {', '.join(earlier) or 'none'})")
        elif earlier[s.start].trains_reward_model:
            out.append(f"start: {s.start!r} is a reward model; start from a language model")
    if s.data is None:
        out.append(f"data: name the data source this {s.method} stage trains on "
                   f"(sources: {', '.join(cfg.data) or 'none configured under `data`'})")
    elif s.data not in cfg.data:
        out.append(f"data: no data source named {s.data!r} "
                   f"(sources: {', '.join(cfg.data) or 'none configured under `data`'})")
    wants_reward = s.uses_reward_stage
    if wants_reward and s.reward is None:
        out.append("reward: name the reward stage that scores this stage's completions")
    elif s.reward is not None and not wants_reward:
        out.append("reward: only PPO, and GRPO with 'reward_model' in reward_functions, use a "
                   "reward stage (RLOO and online DPO as GRPO)")
    elif s.reward is not None and (s.reward not in earlier
                                   or not earlier[s.reward].trains_reward_model):
        out.append(f"reward: {s.reward!r} is not an earlier reward stage")
    if getattr(s, "reward_functions", None) == {} and getattr(s, "environment", None) is None:
        out.append("reward_functions: name at least one, e.g. {'my_pkg.rewards:accuracy': 1.0} "
                   "or {reward_model: 1.0}, or an environment that gives rewards")
    if hasattr(s, "teacher_problems"):
        out += s.teacher_problems(earlier)
    if getattr(s, "reference", None) == "adapter" and cfg.model.lora is None:
        out.append("reference: 'adapter' needs model.lora")
    return out


def _evaluation_problems(cfg: PipelineConfig) -> list[str]:
    e, names = cfg.evaluate, {s.name: s for s in cfg.stages}
    out = []
    if e.data is not None and e.data not in cfg.data:
        out.append(f"evaluate.data: no data source named {e.data!r}")
    if e.reference != "base" and (e.reference not in names
                                  or names[e.reference].trains_reward_model):
        out.append(f"evaluate.reference: {e.reference!r} is neither 'base' nor a language-model "
                   "stage")
    if e.reward is not None and (e.reward not in names or not names[e.reward].trains_reward_model):
        out.append(f"evaluate.reward: {e.reward!r} is not a reward stage")
    for c in cfg.promotion.candidates or ():
        if c not in names or names[c].trains_reward_model:
            out.append(f"promotion.candidates: {c!r} is not a language-model stage")
    if cfg.promotion.require_significance and e.bootstrap_samples == 0:
        out.append("promotion.require_significance needs confidence intervals: set "
                   "evaluate.bootstrap_samples above 0 (default 1000), or "
                   "require_significance=false")
    return out
