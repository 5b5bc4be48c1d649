"""Pydantic configs for every stage and the whole pipeline.

YAML files in `conf/` only set values; every field is documented here. The models are frozen and
forbid unknown keys, so a typo fails before any work starts, with the dotted field name in the
message. The same models give the Prefect UI its parameter forms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------- data


class DemoTaskConfig(_Frozen):
    """The built-in synthetic task family (see posttrain.data.demo)."""

    tasks: tuple[Literal["add", "reverse", "sort"], ...] = Field(
        ("add", "reverse", "sort"), description="Which task kinds the generator mixes."
    )
    num_train: int = Field(4000, ge=1, description="Number of training prompts generated.")
    num_eval: int = Field(200, ge=1, description="Number of held-out prompts generated.")
    bug_rate: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Share of SFT demonstrations inside each task's 'bug region' that carry the "
        "task's systematic mistake; above 0.5 the SFT model learns the mistake, which leaves "
        "preference optimization measurable room.",
    )
    conversational: bool = Field(
        True, description="Emit chat messages (rendered by the chat template) instead of strings."
    )


class DatasetSource(_Frozen):
    """Where one dataset comes from."""

    path: str = Field(
        description="'demo' for the built-in synthetic task, a local .jsonl/.json/.parquet/.csv "
        "file, or a Hugging Face hub dataset id."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name, if any.")
    revision: str | None = Field(None, description="Hub dataset revision (commit or tag).")
    eval_path: str | None = Field(
        None,
        description="Separate held-out file or hub split name; when unset, eval_fraction of the "
        "rows is held out.",
    )


class DataConfig(_Frozen):
    """Data preparation: loading, validation and the train/eval split."""

    sft: DatasetSource = Field(
        DatasetSource(path="demo"), description="The supervised fine-tuning dataset."
    )
    preference: DatasetSource | None = Field(
        None,
        description="Preference pairs (prompt/chosen/rejected, or chosen/rejected with the prompt "
        "as shared prefix) for the reward model, DPO and ORPO; null: no preference stages.",
    )
    kto: DatasetSource | None = Field(
        None,
        description="Unpaired data (prompt/completion/label) for KTO; null: KTO uses the "
        "preference pairs converted (chosen -> True, rejected -> False).",
    )
    prompts: DatasetSource | None = Field(
        None,
        description="Prompt-only data (a `prompt` column plus any columns the reward functions "
        "read) for GRPO and PPO; null: the prompts of the SFT dataset.",
    )
    demo: DemoTaskConfig = Field(
        DemoTaskConfig(), description="Generator settings used when a source path is 'demo'."
    )
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of rows held out when no eval_path is given."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows per source (after shuffling)."
    )
    on_bad_rows: Literal["error", "drop"] = Field(
        "error",
        description="'error' stops at the first invalid row; 'drop' removes invalid rows, counts "
        "and reports them.",
    )
    max_drop_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="With on_bad_rows='drop', fail when more than this share of rows is dropped.",
    )
    seed: int = Field(0, description="Seed of the demo generator and of the train/eval split.")


# -------------------------------------------------------------------------------------- model


class TinyModelConfig(_Frozen):
    """A small Qwen2-style causal LM built from scratch (no download)."""

    hidden_size: int = Field(64, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads per layer.")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads per layer (GQA).")
    intermediate_size: int = Field(256, ge=8, description="Width of the MLP.")
    max_position_embeddings: int = Field(128, ge=16, description="Longest supported sequence.")
    seed: int = Field(0, description="Seed of the random initialization.")


class LoraConfig(_Frozen):
    """Low-rank adapters through peft."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelConfig(_Frozen):
    """Which model to start from and how to load it."""

    name_or_path: str = Field(
        "tiny",
        description="'tiny' builds the built-in model and tokenizer; otherwise a hub model id or "
        "a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype; float32 is the right choice on CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub; off unless you trust the repository."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    tiny: TinyModelConfig = Field(
        TinyModelConfig(), description="Architecture of the built-in model (name_or_path='tiny')."
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters instead of all weights when set."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast of the training forward (accelerate): 'auto' is bf16 on a GPU "
        "that supports it, fp16 on an older GPU and 'no' (fp32) on CPU.",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory; 'auto' turns it "
        "on with a GPU and off on CPU (where memory is rarely the limit and it costs time).",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template replacing the tokenizer's own; part of every "
        "downstream stage's cache key.",
    )

    @model_validator(mode="after")
    def _remote_code_is_pinned(self) -> ModelConfig:
        # Remote code runs on load: it must be an explicit choice AND the exact code reviewed,
        # so a moving branch name is refused.
        local = Path(self.name_or_path).is_dir()
        pinned = self.revision is not None and re.fullmatch(r"[0-9a-f]{40}", self.revision)
        if self.trust_remote_code and not local and not pinned:
            raise ValueError(
                "trust_remote_code=true needs revision pinned to a full 40-character commit "
                f"hash (got {self.revision!r})"
            )
        return self


# ------------------------------------------------------------------------------------ training


class TrainingConfig(_Frozen):
    """Optimization settings shared by every training stage."""

    max_steps: int = Field(
        300, ge=1, description="Optimizer steps (each step = grad_accum micro-batches)."
    )
    per_device_batch_size: int = Field(32, ge=1, description="Rows per micro-batch per process.")
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
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many steps; null: never."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every this many steps.")
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        description="Skip an optimizer step whose loss or gradient is NaN/inf; fail the stage "
        "after this many in a row (no NaN weights are ever saved).",
    )
    seed: int = Field(0, description="Seed of data order and dropout.")


class SFTConfig(TrainingConfig):
    """Supervised fine-tuning."""

    packing: bool = Field(
        True,
        description="Pack examples best-fit-decreasing into rows of max_length tokens, with a "
        "block-diagonal attention mask so that packed examples never attend to each other.",
    )
    completion_only_loss: bool = Field(
        True,
        description="Train on completion tokens only (prompt-completion data); language-modeling "
        "data always trains on every token.",
    )


ReferenceMode = Literal["precomputed", "copy", "adapter"]
_REFERENCE_DOC = (
    "Where reference log-probs come from: 'precomputed' once before training (no reference "
    "model in memory during training), 'copy' a frozen copy of the starting model, 'adapter' "
    "the policy with its LoRA adapter disabled (needs model.lora). All three give the same loss."
)


class RewardConfig(TrainingConfig):
    """Bradley-Terry reward model: a sequence classifier with one output."""

    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW.")

    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Weight c of c*(r_c + r_r)^2, keeping rewards centred at 0."
    )


class DPOConfig(TrainingConfig):
    """Direct Preference Optimization and its loss variants."""

    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(0.1, gt=0.0, description="Temperature beta of the implicit reward.")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), hinge (SLiC), ipo (IPO), robust (cDPO/rDPO)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Label-noise rate epsilon of the robust loss."
    )
    length_normalize: bool = Field(
        False, description="Divide each log-ratio by its completion length (SimPO-style)."
    )
    reference: ReferenceMode = Field("precomputed", description=_REFERENCE_DOC)

    @model_validator(mode="after")
    def _smoothing_is_robust_only(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing applies to loss_type 'robust' only (got {self.loss_type!r})"
            )
        return self


class ORPOConfig(TrainingConfig):
    """Odds-Ratio Preference Optimization (no reference model)."""

    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(
        0.1, gt=0.0, description="Weight lambda of the odds-ratio term (TRL calls it beta)."
    )


class KTOConfig(TrainingConfig):
    """Kahneman-Tversky Optimization on unpaired desirable/undesirable completions."""

    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(0.1, gt=0.0, description="Temperature beta of the implicit reward.")
    desirable_weight: float = Field(1.0, gt=0.0, description="Weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="Weight of undesirable examples.")
    reference: ReferenceMode = Field("precomputed", description=_REFERENCE_DOC)

    @model_validator(mode="after")
    def _kl_needs_a_batch(self) -> KTOConfig:
        if self.per_device_batch_size < 2:
            raise ValueError(
                "per_device_batch_size must be at least 2: KTO estimates its KL term from "
                "mismatched (prompt, completion) pairs within a batch"
            )
        return self


class RolloutConfig(TrainingConfig):
    """Sampling settings shared by the online methods (GRPO, PPO)."""

    max_completion_length: int = Field(256, ge=1, description="New tokens per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0: no limit.")
    reference: Literal["copy", "adapter"] = Field(
        "copy",
        description="Reference for the KL term: a frozen copy of the starting policy, or the "
        "policy with its LoRA adapter disabled (needs model.lora).",
    )


class GRPOConfig(RolloutConfig):
    """Group Relative Policy Optimization. Batch sizes count completions, not prompts."""

    learning_rate: float = Field(1e-6, gt=0.0, description="Peak learning rate of AdamW.")
    num_generations: int = Field(
        8, ge=2, description="Completions sampled per prompt (the group size G)."
    )
    epsilon: float = Field(0.2, gt=0.0, description="Lower clip range: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="Upper clip range (DAPO's clip-higher); null: epsilon."
    )
    beta: float = Field(
        0.0, ge=0.0, description="Weight of the k3 KL to the reference; 0 loads no reference."
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="How per-token losses are normalized (see ALGORITHMS.md)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide centred rewards by the group's std, the batch's, or not."
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimizer passes over each generation batch (mu)."
    )
    reward_functions: dict[str, float] = Field(
        {"posttrain.reward_functions:demo_checker": 1.0},
        description="Reward functions by dotted path with their weights; the name "
        "'reward_model' uses the trained reward model.",
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> GRPOConfig:
        if self.per_device_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_batch_size ({self.per_device_batch_size}) counts completions and "
                f"must be a multiple of num_generations ({self.num_generations})"
            )
        return self


class PPOConfig(RolloutConfig):
    """PPO for RLHF: policy, frozen reference, frozen reward model, value model."""

    learning_rate: float = Field(3e-6, gt=0.0, description="Peak learning rate of AdamW.")
    num_ppo_epochs: int = Field(4, ge=1, description="Optimization epochs per rollout batch.")
    num_mini_batches: int = Field(1, ge=1, description="Mini-batches per PPO epoch.")
    kl_coef: float = Field(0.05, ge=0.0, description="Per-token KL penalty in the reward.")
    cliprange: float = Field(0.2, gt=0.0, description="Policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0.0, description="Value clip epsilon_v.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="lambda of GAE.")
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the score of completions without EOS."
    )

    @model_validator(mode="after")
    def _minibatches_fit(self) -> PPOConfig:
        if self.per_device_batch_size % self.num_mini_batches:
            raise ValueError(
                f"per_device_batch_size ({self.per_device_batch_size}) must be a multiple of "
                f"num_mini_batches ({self.num_mini_batches})"
            )
        return self


class EvalConfig(_Frozen):
    """The evaluation stage."""

    max_new_tokens: int = Field(16, ge=1, description="Generation budget per held-out prompt.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    max_prompts: int | None = Field(
        None, ge=1, description="Evaluate at most this many held-out prompts; null: all."
    )
    num_samples: int = Field(
        12, ge=0, description="Sample generations shown in the table logged to MLflow."
    )
    reward_model: bool = Field(
        True,
        description="Score generations with the reward model (trains the RM stage when "
        "preference data is configured).",
    )


class MetricGuard(_Frozen):
    """A metric that may not get worse than the reference by more than a tolerance."""

    metric: str = Field(description="Comparison metric name, e.g. 'eval_loss' or 'kl_to_sft'.")
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
    metric: str = Field(
        "checker_accuracy",
        description="Primary comparison metric; the best candidate on it is the one considered.",
    )
    direction: Literal["max", "min"] = Field(
        "max", description="'max': higher primary metric is better; 'min': lower is better."
    )
    min_margin: float = Field(
        0.0,
        ge=0.0,
        description="The winner must beat the current champion's primary metric by at least this "
        "much (and by more than 0); without a champion, any candidate passing the guards wins.",
    )
    guards: tuple[MetricGuard, ...] = Field(
        (MetricGuard(metric="eval_loss", direction="min", tolerance=0.5),),
        description="Metrics that may not regress beyond their tolerance against the champion "
        "(or against the SFT model when there is no champion yet).",
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


class PipelineConfig(_Frozen):
    """A whole pipeline run: data, model, stages, tracking."""

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
    data: DataConfig = Field(DataConfig(), description="Data preparation.")
    model: ModelConfig = Field(ModelConfig(), description="Base model.")
    sft: SFTConfig = Field(SFTConfig(), description="Supervised fine-tuning stage.")
    methods: tuple[Literal["dpo", "orpo", "kto", "grpo", "ppo"], ...] = Field(
        (), description="Methods to run, each from the SFT model, e.g. [dpo, kto, grpo]."
    )
    reward: RewardConfig = Field(RewardConfig(), description="Reward-model stage.")
    dpo: DPOConfig = Field(DPOConfig(), description="DPO stage.")
    orpo: ORPOConfig = Field(ORPOConfig(), description="ORPO stage.")
    kto: KTOConfig = Field(KTOConfig(), description="KTO stage.")
    grpo: GRPOConfig = Field(GRPOConfig(), description="GRPO stage.")
    ppo: PPOConfig = Field(PPOConfig(), description="PPO stage.")
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


    @model_validator(mode="after")
    def _stages_fit_together(self) -> PipelineConfig:
        problems = []
        offline = [m for m in self.methods if m in ("dpo", "orpo", "kto")]
        if offline and self.data.preference is None and not (
            offline == ["kto"] and self.data.kto is not None
        ):
            problems.append(f"methods {offline} need data.preference")
        if "ppo" in self.methods and self.data.preference is None:
            problems.append("ppo needs data.preference to train its reward model")
        uses_rm = "reward_model" in self.grpo.reward_functions
        if "grpo" in self.methods and uses_rm and self.data.preference is None:
            problems.append("grpo.reward_functions uses reward_model, which needs data.preference")
        if len(set(self.methods)) != len(self.methods):
            problems.append(f"methods lists a method twice: {list(self.methods)}")
        for name in ("dpo", "kto", "grpo", "ppo"):
            if name in self.methods and getattr(self, name).reference == "adapter" \
                    and self.model.lora is None:
                problems.append(f"{name}.reference='adapter' needs model.lora")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def needs_reward_model(self) -> bool:
        """The RM stage runs when evaluation scores with it or an online method trains on it."""
        if self.data.preference is None:
            return False
        return (
            self.evaluate.reward_model
            or "ppo" in self.methods
            or ("grpo" in self.methods and "reward_model" in self.grpo.reward_functions)
        )


# ------------------------------------------------------------------------------ load/overrides


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"invalid configuration ({where}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sft.learning_rate=1e-3` -> (['sft', 'learning_rate'], 0.001). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form field.path=value")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} names no field")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set dotted fields in a nested dict (a copy); unknown fields are caught by validation."""
    out = _deep_copy(values)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields")
    return values


def validate(model: type[BaseModel], values: dict, where: str = "config") -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where)) from None


def load_pipeline_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Read a YAML file (or the defaults), apply `a.b=value` overrides, validate."""
    values = read_yaml(path) if path else {}
    values = apply_overrides(values, list(overrides))
    where = str(path) if path else "defaults"
    if overrides:
        where += " + overrides"
    return validate(PipelineConfig, values, where)
