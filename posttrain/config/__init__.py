"""Pydantic configs for every stage and the whole pipeline.

YAML files in `conf/` only set values; every field is documented here. The models are frozen and
forbid unknown keys, so a typo fails before any work starts, with the dotted field name in the
message. The same models give the Prefect UI its parameter forms.

One module per concern; every name is importable from `posttrain.config`:
- base.py        ConfigError and the frozen, extra-forbidding base model
- data.py        named data sources and the demo task family
- model.py       the base model, the tiny model, LoRA
- training.py    the optimization settings every training stage shares; the fields every stage has
- offline.py     SFT, reward model, DPO, ORPO, SimPO, CPO, KTO, GKD
- online.py      rollouts, GRPO, RLOO, online DPO, PPO
- evaluation.py  evaluation, promotion, retraining
- pipeline.py    launch, tracking, the stage union and PipelineConfig with the graph's checks
- loading.py     YAML files and dotted overrides into a validated config
"""

from posttrain.config.base import (
    ConfigError,
)
from posttrain.config.data import (
    DEMO_SOURCES,
    VISION_DEMO_SOURCES,
    DatasetSource,
    DemoTaskConfig,
    VisionDemoConfig,
)
from posttrain.config.evaluation import (
    EvalConfig,
    MetricGuard,
    PromotionConfig,
    RetrainConfig,
)
from posttrain.config.loading import (
    DEMO_CONFIG,
    apply_overrides,
    load_pipeline_config,
    merge,
    parse_override,
    read_yaml,
    validate,
)
from posttrain.config.model import (
    LoraConfig,
    ModelConfig,
    TinyModelConfig,
    TinyVisionConfig,
)
from posttrain.config.offline import (
    CPOConfig,
    DPOConfig,
    GKDConfig,
    KTOConfig,
    ORPOConfig,
    ReferenceMode,
    RewardConfig,
    SFTConfig,
    SimPOConfig,
)
from posttrain.config.online import (
    EnvironmentConfig,
    GroupRolloutConfig,
    GRPOConfig,
    OnlineDPOConfig,
    PPOConfig,
    RLOOConfig,
    RolloutConfig,
)
from posttrain.config.pipeline import (
    SOURCE_NAME,
    LaunchConfig,
    PipelineConfig,
    StageConfig,
    TrackingConfig,
)
from posttrain.config.training import (
    RESERVED_NAMES,
    STAGE_NAME,
    StageFields,
    TrainingConfig,
)

__all__ = [
    "DEMO_CONFIG",
    "DEMO_SOURCES",
    "RESERVED_NAMES",
    "SOURCE_NAME",
    "STAGE_NAME",
    "VISION_DEMO_SOURCES",
    "CPOConfig",
    "ConfigError",
    "DPOConfig",
    "DatasetSource",
    "DemoTaskConfig",
    "EnvironmentConfig",
    "EvalConfig",
    "GKDConfig",
    "GRPOConfig",
    "GroupRolloutConfig",
    "KTOConfig",
    "LaunchConfig",
    "LoraConfig",
    "MetricGuard",
    "ModelConfig",
    "ORPOConfig",
    "OnlineDPOConfig",
    "PPOConfig",
    "PipelineConfig",
    "PromotionConfig",
    "RLOOConfig",
    "ReferenceMode",
    "RetrainConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFTConfig",
    "SimPOConfig",
    "StageConfig",
    "StageFields",
    "TinyModelConfig",
    "TinyVisionConfig",
    "TrackingConfig",
    "TrainingConfig",
    "VisionDemoConfig",
    "apply_overrides",
    "load_pipeline_config",
    "merge",
    "parse_override",
    "read_yaml",
    "validate",
]
