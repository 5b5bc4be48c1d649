"""Pipeline stages as plain functions: config + upstream manifests -> manifest.

Each stage computes its content key, returns the existing verified artifact when there is one
(idempotent), and otherwise trains/evaluates inside an atomic artifact writer with an MLflow child
run. Prefect is not needed here: `tasks/` wraps these functions with cache keys and locks, and
`python -m posttrain.recipes.sft` calls them directly.
"""

from posttrain.stages.common import run_stage
from posttrain.stages.data import data_stage_key, run_data_stage, source_fingerprint
from posttrain.stages.evaluate import eval_stage_key, run_eval_stage
from posttrain.stages.online import (
    ONLINE_METHODS,
    online_stage_key,
    run_online_stage,
    uses_reward_model,
)
from posttrain.stages.preference import METHODS, method_stage_key, run_method_stage
from posttrain.stages.reward import reward_stage_key, run_reward_stage
from posttrain.stages.sft import run_sft_stage, sft_stage_key

__all__ = [
    "METHODS",
    "ONLINE_METHODS",
    "data_stage_key",
    "eval_stage_key",
    "method_stage_key",
    "online_stage_key",
    "reward_stage_key",
    "run_data_stage",
    "run_eval_stage",
    "run_method_stage",
    "run_online_stage",
    "run_reward_stage",
    "run_sft_stage",
    "run_stage",
    "sft_stage_key",
    "source_fingerprint",
    "uses_reward_model",
]
