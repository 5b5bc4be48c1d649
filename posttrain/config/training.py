"""The optimization settings of every training stage, and the fields every stage has."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    model_validator,
)

from posttrain.config.base import _Frozen


class TrainingConfig(_Frozen):
    """Optimization settings shared by every training stage."""

    max_steps: int = Field(
        300, ge=1, description="Optimizer steps (each step = grad_accum micro-batches)."
    )
    per_device_batch_size: int = Field(
        32, ge=1, description="Items per micro-batch per process, in the unit the method's loss "
        "averages over: examples (SFT, GKD; packed rows with packing), pairs (reward model, DPO, "
        "ORPO, SimPO, CPO, and online DPO: one sampled pair per prompt), unpaired examples "
        "(KTO), completions (GRPO and RLOO: num_generations per prompt; PPO: one per prompt).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    warmup_steps: int = Field(
        10,
        ge=0,
        description="Linear warm-up steps from 0 to the peak (longer than max_steps: the peak "
        "is never reached, handy for a shortened smoke run).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm to this value; null disables."
    )
    max_length: int = Field(
        128, ge=8, description="Longest tokenized example; longer ones are truncated or dropped."
    )
    truncation: Literal["error", "drop", "truncate_prompt", "truncate_right"] = Field(
        "drop",
        description="What to do with over-length examples: fail, drop (counted), cut the prompt "
        "from the left, or cut the end.",
    )
    eval_every: int = Field(100, ge=1, description="Held-out loss every this many steps.")
    max_eval_rows: int | None = Field(
        256, ge=1, description="Held-out rows (the first ones) scored at each evaluation during "
        "training; null: all of them."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many steps; null: never."
    )
    checkpoint_keep: int = Field(
        2, ge=1, description="Checkpoints kept: older ones are deleted once a newer one is "
        "written and verified."
    )
    keep_checkpoints: bool = Field(
        False, description="Keep the checkpoint folder after the stage's artifact is complete "
        "(by default it is deleted then: nothing resumes from it)."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        description="Skip an optimizer step whose loss or gradient is NaN/inf; fail the stage "
        "after this many in a row (no NaN weights are ever saved).",
    )
    seed: int = Field(0, description="Seed of data order and dropout.")
    select_best: str | None = Field(
        None,
        description="A held-out metric the stage logs at its evaluations during training "
        "(every eval_every steps and the last): the stage's artifact is the model of the "
        "evaluated step where it was best, that step recorded as best_step; null: the last "
        "step's model. Online methods: eval/reward, eval/rewards/<fn>/mean, "
        "eval/checker_accuracy, eval/completions/mean_length, eval/completions/clipped_ratio; "
        "offline ones their eval_... metrics (e.g. eval_loss, eval_rewards/accuracies).",
    )
    select_best_mode: Literal["max", "min"] | None = Field(
        None,
        description="Whether select_best's metric is best high (max) or low (min); null: min "
        "for losses, perplexities and clipped_ratio, max for rewards, accuracies and margins; "
        "required for any other metric.",
    )

    # The held-out metrics each offline method's evaluation logs during training.
    _PAIR_METRICS: ClassVar[tuple[str, ...]] = (
        "eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
        "eval_rewards/margins")
    EVAL_METRICS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sft": ("eval_loss", "eval_perplexity", "eval_mean_token_accuracy"),
        "reward": ("eval_accuracy", "eval_margin"),
        "kto": ("eval_loss",),
        "dpo": (*_PAIR_METRICS, "eval_logps/chosen", "eval_logps/rejected"),
        "orpo": (*_PAIR_METRICS, "eval_nll_loss", "eval_log_odds_chosen",
                 "eval_log_odds_ratio"),
        "simpo": (*_PAIR_METRICS, "eval_nll_loss", "eval_logps/chosen", "eval_logps/rejected"),
        "cpo": (*_PAIR_METRICS, "eval_nll_loss", "eval_logps/chosen", "eval_logps/rejected"),
        "gkd": ("eval_loss", "eval_jsd"),
    }

    def eval_metric_names(self) -> set[str]:
        """The metrics this stage's evaluation during training logs (what select_best may
        name)."""
        return set(self.EVAL_METRICS.get(getattr(self, "method", None), ()))

    @property
    def best_mode(self) -> str | None:
        """select_best's direction ('max'/'min'); None without select_best or when the
        metric's name does not say (the validator then asks for select_best_mode)."""
        if self.select_best is None:
            return None
        if self.select_best_mode is not None:
            return self.select_best_mode
        name = self.select_best
        if name.endswith(("loss", "perplexity", "clipped_ratio")):
            return "min"
        if name.endswith(("reward", "/mean", "accuracy", "accuracies", "margins", "margin")):
            return "max"
        return None

    @model_validator(mode="after")
    def _select_best_is_logged(self) -> TrainingConfig:
        if self.select_best is None:
            return self
        known = self.eval_metric_names()
        if self.select_best not in known:
            raise ValueError(
                f"select_best: {self.select_best!r} is not a metric this stage's evaluation "
                f"during training logs; one of {', '.join(sorted(known))}"
            )
        if self.best_mode is None:
            raise ValueError(f"select_best: {self.select_best} needs select_best_mode (max or "
                             "min): its name does not say whether higher is better")
        return self


STAGE_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
RESERVED_NAMES = ("base", "data", "evaluate", "promote")


class StageFields(_Frozen):
    """What every stage of the graph declares besides its method's settings."""

    name: str = Field(
        pattern=STAGE_NAME,
        description="Unique stage name (lowercase letters, digits, '-', '_'): the artifact "
        "folder, the MLflow child run and the evaluation candidate are named after it. "
        "Default: the method's name.",
    )
    start: str = Field(
        "base",
        description="The model this stage starts from: 'base' (model.name_or_path) or the name "
        "of an earlier stage.",
    )
    data: str | None = Field(
        None, description="Name of the data source (a key of `data`) this stage trains on."
    )
    reward: str | None = Field(
        None,
        description="Name of the reward stage whose model scores completions (PPO always; GRPO, "
        "RLOO and online DPO when reward_functions lists 'reward_model'); unset for the other "
        "methods.",
    )

    @model_validator(mode="before")
    @classmethod
    def _named_after_method(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("name") is None and "method" in cls.model_fields:
            values = {**values, "name": values.get("method") or cls.model_fields["method"].default}
        return values

    @property
    def uses_reward_stage(self) -> bool:
        """Whether this stage scores completions with the model of the stage in `reward`."""
        return False

    @property
    def trains_reward_model(self) -> bool:
        """Whether this stage's artifact is a reward model (a scorer, not a language model)."""
        return False
