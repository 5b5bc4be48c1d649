"""Evaluation, promotion and retraining settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
)

from posttrain.config.base import _Frozen


class EvalConfig(_Frozen):
    """The evaluation stage: the base model and every trained stage on the same held-out rows."""

    enabled: bool = Field(True, description="Evaluate (and then promote); false: train only.")
    data: str | None = Field(
        None,
        description="Data source whose held-out rows give the prompts (and reference "
        "completions, where the format has them); null: the first stage's source.",
    )
    reference: str = Field(
        "base",
        description="The model win rate and KL are measured against: 'base' or a stage name.",
    )
    reward: str | None = Field(
        None,
        description="Reward stage that scores every generation (reward_score, win rate); null: "
        "the pipeline's reward stage when it has exactly one.",
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation budget per held-out prompt.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    max_length: int = Field(
        128, ge=8, description="Longest held-out example (prompt + reference) for the loss."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Evaluate at most this many held-out prompts; null: all."
    )
    num_samples: int = Field(
        12, ge=0, description="Sample generations shown in the table logged to MLflow."
    )
    bootstrap_samples: int = Field(
        1000, ge=0, description="Bootstrap resamples of the held-out prompts for each metric's "
        "95% confidence interval (<metric>_ci_low/_ci_high); 0: no intervals."
    )
    bootstrap_seed: int = Field(
        0, description="Seed of the bootstrap resampling (the same for every model, so that "
        "models evaluated on the same prompts are paired)."
    )
    tasks: tuple[str, ...] = Field(
        (),
        description="lm-evaluation-harness tasks or groups run on every model (results logged "
        "as lm_eval/<task>/<metric>), e.g. ['gsm8k', 'ifeval']; 'posttrain_demo' is the local "
        "exact-match task over this evaluation's own held-out prompts (offline). Empty: none.",
    )
    limit: int | float | None = Field(
        None, gt=0, description="Harness documents per task: a count, or a share below 1.0; "
        "null: all."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per harness prompt; null: each task's own."
    )
    harness_max_gen_toks: int | None = Field(
        None, ge=1, description="Generation budget of the harness's generate_until tasks; "
        "null: each task's own (posttrain_demo: max_new_tokens)."
    )
    gen_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Generation settings passed to every harness "
        "generate_until task (e.g. {temperature: 0.0}); empty: each task's own."
    )
    apply_chat_template: bool | None = Field(
        None, description="Render harness prompts with the tokenizer's chat template; null: "
        "when the held-out prompts are messages."
    )
    include_path: tuple[str, ...] = Field(
        (), description="Folders of harness task YAMLs of your own, beside lm-eval's tasks."
    )


class MetricGuard(_Frozen):
    """A metric that may not get worse than the reference by more than a tolerance."""

    metric: str = Field(
        description="Comparison metric name, e.g. 'eval_loss' or 'kl_to_reference'."
    )
    direction: Literal["max", "min"] = Field(
        description="'max': higher is better; 'min': lower is better."
    )
    tolerance: float = Field(
        0.0, ge=0.0, description="Largest allowed regression, in the metric's own units."
    )


class PromotionConfig(_Frozen):
    """The promotion gate: which evaluated stage (if any) becomes the registry's champion.

    Fail-closed: a candidate or champion missing a metric the gate reads, a non-finite value, or
    a failed evaluation promotes nothing.
    """

    enabled: bool = Field(True, description="Run the gate after evaluation; false: never promote.")
    metric: str | None = Field(
        None,
        description="Primary comparison metric; the best candidate on it is the one considered. "
        "null: the first of checker_accuracy, reward_score, eval_loss that this pipeline's "
        "evaluation produces (`posttrain plan` shows which).",
    )
    direction: Literal["max", "min"] | None = Field(
        None,
        description="'max': higher primary metric is better; 'min': lower is better; null: the "
        "metric's own (max for accuracies, scores and win rates; min for losses, perplexity, KL).",
    )
    min_margin: float = Field(
        0.0,
        ge=0.0,
        description="The winner must beat the current champion's primary metric by at least this "
        "much (and by more than 0); without a champion, any candidate passing the guards wins.",
    )
    require_significance: bool = Field(
        False,
        description="Also require the lower bound of the bootstrap 95% interval of the winner's "
        "improvement over the champion (paired by prompt when both were evaluated on the same "
        "prompts) to clear min_margin and 0; a champion without stored per-prompt values then "
        "promotes nothing.",
    )
    guards: tuple[MetricGuard, ...] | None = Field(
        None,
        description="Metrics that may not regress beyond their tolerance against the champion "
        "(or against evaluate.reference when there is no champion yet); null: eval_loss with a "
        "tolerance of 0.5 when the evaluation has reference completions, else none.",
    )
    candidates: tuple[str, ...] | None = Field(
        None,
        description="Stages that may be promoted, e.g. [dpo, grpo]; null: every evaluated stage "
        "except the untrained base model.",
    )
    registered_model: str | None = Field(
        None, description="MLflow registered model name; null: the pipeline's name."
    )
    alias: str = Field("champion", description="Registry alias moved to the promoted version.")


class RetrainConfig(_Frozen):
    """Scheduled and event-triggered retraining (`posttrain serve`)."""

    cron: str | None = Field(
        "0 3 * * 1",
        description="Cron schedule of the retraining deployment (Prefect syntax); null: no "
        "schedule, only manual and event-triggered runs.",
    )
    timezone: str = Field("UTC", description="Time zone the cron schedule is read in.")
    on_dataset_updated: bool = Field(
        True,
        description="Also retrain when a 'posttrain.dataset.updated' event for this pipeline "
        "is emitted (by `posttrain emit-dataset-updated`, or by data preparation when a "
        "source's content fingerprint changes).",
    )
    emit_events: bool = Field(
        True,
        description="Data preparation in the pipeline flow emits 'posttrain.dataset.updated' "
        "when a source's fingerprint differs from the one seen last time.",
    )
