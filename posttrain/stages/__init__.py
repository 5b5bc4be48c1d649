"""Pipeline stages as plain functions: config + upstream manifests -> manifest.

Each stage computes its content key, returns the existing verified artifact when there is one
(idempotent), and otherwise trains/evaluates inside an atomic artifact writer with an MLflow child
run. Prefect is not needed here: `tasks/` wraps these functions with cache keys and locks, and
`posttrain.stages.graph.run_all` runs a whole pipeline without it.
"""

from posttrain.stages.common import run_stage
from posttrain.stages.data import data_stage_key, run_data_stage, source_fingerprint
from posttrain.stages.evaluate import available_metrics, eval_stage_key, run_eval_stage
from posttrain.stages.graph import (
    candidates,
    inputs_for,
    needed,
    run_all,
    run_training_stage,
    stage_key,
)

__all__ = [
    "available_metrics",
    "candidates",
    "data_stage_key",
    "eval_stage_key",
    "inputs_for",
    "needed",
    "run_all",
    "run_data_stage",
    "run_eval_stage",
    "run_stage",
    "run_training_stage",
    "source_fingerprint",
    "stage_key",
]
