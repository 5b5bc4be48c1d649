"""Pydantic configs for every stage and the whole pipeline.

YAML files in `conf/` only set values; every field is documented here. The models are frozen and
forbid unknown keys, so a typo fails before any work starts, with the dotted field name in the
message. The same models give the Prefect UI its parameter forms.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _word(value: str):
    """A one-word alternative of a union (`bool | _word("auto")`). A one-value Literal's JSON
    schema is a `const`, which the Prefect UI's form shows as "cannot be changed" even where the
    other alternatives could be picked; a one-option `enum` is offered as a choice instead."""
    return Annotated[Literal[value], WithJsonSchema({"type": "string", "enum": [value]})]


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
    seed: int = Field(0, description="Seed of the generator (which prompts, which mistakes).")


DEMO_SOURCES = ("demo:sft", "demo:preference", "demo:kto", "demo:prompts")


class DatasetSource(_Frozen):
    """One named dataset: where it comes from and how its rows are checked and split."""

    path: str = Field(
        description="A local .jsonl/.json/.parquet/.csv file, a Hugging Face hub dataset id, or "
        "the built-in synthetic data: 'demo:sft' (prompt-completion), 'demo:preference' "
        "(prompt/chosen/rejected), 'demo:kto' (prompt/completion/label) or 'demo:prompts' "
        "(prompt-only)."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name, if any.")
    revision: str | None = Field(None, description="Hub dataset revision (commit or tag).")
    eval_path: str | None = Field(
        None,
        description="Separate held-out file or hub split name; when unset, eval_fraction of the "
        "rows is held out.",
    )
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of rows held out when no eval_path is given."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows (after shuffling)."
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
        description="With on_bad_rows='drop', fail when more than this share of rows is dropped "
        "(also the share of pairs a preference stage may drop while tokenizing).",
    )
    seed: int = Field(0, description="Seed of the train/eval split and of KTO's pair shuffle.")

    @model_validator(mode="after")
    def _demo_names_its_kind(self) -> DatasetSource:
        if self.path == "demo" or (self.path.startswith("demo:")
                                   and self.path not in DEMO_SOURCES):
            raise ValueError(
                f"path {self.path!r}: the built-in data is one of {', '.join(DEMO_SOURCES)}"
            )
        return self

    @property
    def is_demo(self) -> bool:
        return self.path in DEMO_SOURCES


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
    target_modules: tuple[str, ...] | _word("all-linear") = Field(
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel passed to transformers. Packed SFT rows keep their "
        "examples apart with flash-attention's varlen kernels (flash_attention_2) or a "
        "FlexAttention block mask (flex_attention, on a GPU); sdpa and eager (and flex_attention "
        "on CPU, which has no FlexAttention backward) use a dense (B, 1, T, T) mask.",
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
    gradient_checkpointing: bool | _word("auto") = Field(
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


class SFTConfig(StageFields, TrainingConfig):
    """Supervised fine-tuning."""

    method: Literal["sft"] = Field("sft", description="The method; selects these settings.")

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


class RewardConfig(StageFields, TrainingConfig):
    """Bradley-Terry reward model: a sequence classifier with one output."""

    method: Literal["reward"] = Field("reward", description="The method; selects these settings.")

    @property
    def trains_reward_model(self) -> bool:
        return True

    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW.")

    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Weight c of c*(r_c + r_r)^2, keeping rewards centred at 0."
    )
    head_init: Literal["scaled", "transformers"] = Field(
        "scaled",
        description="Initialization of the fresh one-output score head, seeded by `seed`: "
        "'scaled' draws it from N(0, 1/(hidden_size + 1)) (LeCun-style, the default: the "
        "initial score has about the spread of one hidden feature at any width, so the first "
        "gradients reach the body at the same scale whatever the model size); 'transformers' "
        "draws it from N(0, initializer_range^2) as transformers' own initialization does "
        "(TRL's RewardTrainer; std 0.02 on most models, so the first losses sit closer to "
        "ln 2). The default stays 'scaled' so existing results keep their numbers.",
    )


class DPOConfig(StageFields, TrainingConfig):
    """Direct Preference Optimization and its loss variants."""

    method: Literal["dpo"] = Field("dpo", description="The method; selects these settings.")
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
    ipo_metrics: Literal["averaged", "summed"] = Field(
        "averaged",
        description="Which log-probs loss_type 'ipo' logs as rewards/* and logps/*: "
        "'averaged' per-token averages, the ones its loss uses (the default: rewards/margins "
        "is then exactly the beta * delta of the loss); 'summed' summed log-probs, as TRL "
        "logs them (its rewards/* are beta * summed log-ratios even for IPO). The loss is the "
        "same either way; other loss types always log summed log-probs.",
    )

    @model_validator(mode="after")
    def _smoothing_is_robust_only(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing applies to loss_type 'robust' only (got {self.loss_type!r})"
            )
        return self


class ORPOConfig(StageFields, TrainingConfig):
    """Odds-Ratio Preference Optimization (no reference model)."""

    method: Literal["orpo"] = Field("orpo", description="The method; selects these settings.")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(
        0.1, gt=0.0, description="Weight lambda of the odds-ratio term (TRL calls it beta)."
    )
    nll_tokens: Literal["completion", "prompt_and_completion"] = Field(
        "completion",
        description="Tokens of the chosen sequence the NLL term averages over: 'completion' the "
        "chosen response only (the default: the paper's L_SFT is the NLL of the response given "
        "the prompt, and a prompt shared by both sides teaches no preference); "
        "'prompt_and_completion' every non-pad token of prompt and response, as TRL's "
        "ORPOTrainer does (one forward either way).",
    )


class SimPOConfig(StageFields, TrainingConfig):
    """Simple Preference Optimization (no reference model): length-normalized implicit reward
    with a target margin. Defaults are the paper's (TRL's CPOConfig defaults differ: beta 0.1,
    simpo_gamma 0.5, cpo_alpha 1.0)."""

    method: Literal["simpo"] = Field("simpo", description="The method; selects these settings.")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(
        2.0, gt=0.0, description="Scale beta of the implicit reward beta * (mean token log-prob)."
    )
    gamma: float = Field(
        1.0, ge=0.0, description="Target reward margin gamma: the loss is "
        "-log sigmoid(beta * (lp_chosen - lp_rejected) - gamma) (TRL's simpo_gamma)."
    )
    cpo_alpha: float = Field(
        0.0, ge=0.0, description="Weight of an NLL term on the chosen responses; 0 is SimPO, "
        "above 0 is CPO-SimPO (TRL's cpo_alpha, whose default there is 1.0)."
    )


class CPOConfig(StageFields, TrainingConfig):
    """Contrastive Preference Optimization (no reference model): the DPO loss without a
    reference on summed log-probs, plus an NLL term on the chosen responses."""

    method: Literal["cpo"] = Field("cpo", description="The method; selects these settings.")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(
        0.1, gt=0.0, description="Temperature beta of the reward beta * (summed log-prob)."
    )
    cpo_alpha: float = Field(
        1.0, ge=0.0, description="Weight alpha of the NLL (behaviour cloning) term on the "
        "chosen responses; 0 leaves the preference term alone."
    )


class KTOConfig(StageFields, TrainingConfig):
    """Kahneman-Tversky Optimization on unpaired desirable/undesirable completions."""

    method: Literal["kto"] = Field("kto", description="The method; selects these settings.")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate of AdamW.")

    beta: float = Field(0.1, gt=0.0, description="Temperature beta of the implicit reward.")
    desirable_weight: float = Field(1.0, gt=0.0, description="Weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="Weight of undesirable examples.")
    reference: ReferenceMode = Field("precomputed", description=_REFERENCE_DOC)
    kl_partners: Literal["shuffle", "rotate"] = Field(
        "shuffle",
        description="How each example's mismatched completion for the KL estimate is chosen, "
        "once before training: 'shuffle' a seeded derangement of the whole split (the default: "
        "no example is ever its own partner, and partners do not depend on the file's row "
        "order); 'rotate' TRL's rule, completions rotated by one within consecutive chunks of "
        "per_device_batch_size rows in data order (row i gets row i-1's completion, the "
        "chunk's first row its last row's; a one-row last chunk pairs a row with itself).",
    )

    @model_validator(mode="after")
    def _kl_needs_a_batch(self) -> KTOConfig:
        if self.per_device_batch_size < 2:
            raise ValueError(
                "per_device_batch_size must be at least 2: KTO estimates its KL term from "
                "mismatched (prompt, completion) pairs within a batch"
            )
        return self


class GKDConfig(StageFields, TrainingConfig):
    """On-policy distillation (GKD, Agarwal et al. 2024): the student (the model the stage
    starts from, or `student`) learns the teacher's token distributions through the generalized
    Jensen-Shannon divergence, on the data's completions and on its own samples. Defaults are
    TRL's GKDConfig's (lmbda 0.5, beta 0.5, temperature 0.9, 128 new tokens); the learning rate
    is the shared default (TRL's is SFT's 2e-5). Data: prompt-completion."""

    method: Literal["gkd"] = Field("gkd", description="The method; selects these settings.")

    teacher: str | None = Field(
        None,
        description="The teacher: the name of an earlier language-model stage, or a model "
        "folder (a saved causal LM). It is frozen; its tokenizer must be the student's.",
    )
    student: ModelConfig | None = Field(
        None,
        description="A model section for the student when it is not the pipeline's model: the "
        "stage builds (or loads) the student from it instead of from `start` (which must then "
        "be 'base'), e.g. a narrower tiny model distilled from a wider teacher stage. Unset: "
        "the student is the model `start` names.",
    )
    lmbda: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of micro-batches whose completions the student samples itself "
        "(on-policy); the others use the data's completions. 0: supervised distillation, "
        "never generates; 1: fully on-policy.",
    )
    beta: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Interpolation of the generalized JSD: 0 is the forward KL(teacher || "
        "student), 1 the reverse KL(student || teacher), 0.5 the Jensen-Shannon divergence.",
    )
    temperature: float = Field(
        0.9, gt=0.0, description="Temperature of the student's sampling and of both models' "
        "distributions in the divergence."
    )
    max_new_tokens: int = Field(128, ge=1, description="New tokens per on-policy completion.")
    generation_backend: Literal["auto", "loop", "static", "compiled"] = Field(
        "auto", description="How on-policy completions decode (see GRPO's generation_backend)."
    )

    @model_validator(mode="after")
    def _student_starts_fresh(self) -> GKDConfig:
        if self.student is not None and self.start != "base":
            raise ValueError(f"student: a student model section builds the student itself, so "
                             f"start must be 'base' (got {self.start!r})")
        return self

    def teacher_problems(self, earlier: dict) -> list[str]:
        """What is wrong with `teacher` given the stages before this one."""
        if self.teacher is None:
            return ["teacher: name the teacher, an earlier language-model stage or a model "
                    "folder"]
        if self.teacher in earlier:
            if earlier[self.teacher].trains_reward_model:
                return [f"teacher: {self.teacher!r} is a reward model; name a language model"]
            return []
        if not Path(self.teacher).is_dir():
            return [f"teacher: {self.teacher!r} is neither an earlier stage (earlier: "
                    f"{', '.join(earlier) or 'none'}) nor an existing model folder"]
        return []


class RolloutConfig(TrainingConfig):
    """Sampling settings shared by the online methods (GRPO, RLOO, PPO)."""

    max_completion_length: int = Field(256, ge=1, description="New tokens per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0: no limit.")
    generation_backend: Literal["auto", "loop", "static", "compiled"] = Field(
        "auto",
        description="How rollouts decode: 'loop' (dynamic KV cache, one eager forward per token), "
        "'static' (transformers' StaticCache, fixed shapes), 'compiled' (static cache and a "
        "torch.compile'd step, CUDA graphs on a GPU); 'auto': compiled on a GPU (loop if the "
        "model has no static-cache support or the compile fails), loop on the CPU, where the "
        "other paths are no faster. Same tokens for the same seed.",
    )
    reference: Literal["copy", "adapter"] = Field(
        "copy",
        description="Reference for the KL term: a frozen copy of the starting policy, or the "
        "policy with its LoRA adapter disabled (needs model.lora).",
    )
    eval_reward_functions: dict[str, float] | None = Field(
        None,
        description="Reward functions (dotted paths with weights, as reward_functions; "
        "'reward_model': the stage named in `reward`) that score the greedy completions of the "
        "held-out prompts every eval_every steps (eval/reward, eval/rewards/<fn>/mean); null: "
        "the training reward functions (PPO: its reward model).",
    )

    def eval_functions(self) -> dict[str, float]:
        """The reward functions of the evaluation during training, by path, with weights."""
        if self.eval_reward_functions is not None:
            return dict(self.eval_reward_functions)
        if getattr(self, "environment", None) is not None:  # the environment's reward scores
            return dict(self.reward_functions)
        return dict(getattr(self, "reward_functions", None) or {"reward_model": 1.0})

    def eval_metric_names(self) -> set[str]:
        """The eval/... metrics the evaluation during training can log (eval/checker_accuracy
        only where the data has a checker)."""
        names = {path if path == "reward_model" else path.replace(":", ".").rsplit(".", 1)[-1]
                 for path in self.eval_functions()}
        return {"eval/reward", "eval/checker_accuracy", "eval/completions/mean_length",
                "eval/completions/clipped_ratio", *(f"eval/rewards/{n}/mean" for n in names)}


class EnvironmentConfig(_Frozen):
    """Multi-turn episodes with tools (posttrain/multiturn.py): the model writes a turn, tools
    and the environment answer, up to max_turns; the loss covers only the model's tokens.
    The tokens of one model turn are bounded by the stage's max_completion_length."""

    path: str | None = Field(
        None,
        description="The environment class or factory by dotted path ('package.module:Class'), "
        "called with no arguments once per episode; it has reset(row) -> first messages and "
        "step(messages) -> posttrain.environments.Step (posttrain/environments.py). null: the "
        "built-in posttrain.environments:ToolEnvironment, which runs `tools` and ends the "
        "episode at the first model turn without a tool call.",
    )
    tools: tuple[str, ...] = Field(
        (),
        description="Tool functions by dotted path ('package.module:function'), with type hints "
        "and a Google-style docstring (their JSON schema goes into the prompt through the chat "
        "template's `tools=`), added to the environment's own `tools`.",
    )
    max_turns: int = Field(4, ge=1, description="Model turns per episode at most.")
    max_episode_tokens: int = Field(
        64, ge=1, description="Tokens after the prompt per episode at most (the model's and "
        "the observations'); an episode that would exceed it ends, counted as truncated.",
    )
    tool_timeout: float = Field(
        10.0, gt=0.0, description="Seconds one tool call may run; a call past it answers the "
        "model with an error and the rollout goes on.",
    )
    reward_weight: float = Field(
        1.0, description="Weight of the environment's episode reward (the sum of the rewards "
        "its steps return) in the total, next to the reward_functions' weights.",
    )
    sample_episodes: int = Field(
        4, ge=0, description="Episodes logged as an MLflow table (episodes/step_<n>.json) at "
        "the first step and every eval_every steps; 0: none.",
    )

    @field_validator("path")
    @classmethod
    def _path_is_dotted(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.]+[:.][\w.]+", value):
            raise ValueError(f"{value!r} is not a dotted path; write 'package.module:Class' "
                             "(an importable module, then the class or factory in it)")
        return value

    @field_validator("tools")
    @classmethod
    def _tools_are_dotted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in value if not re.fullmatch(r"[\w.]+[:.][\w.]+", t)]
        if bad:
            raise ValueError(f"{bad} are not dotted paths; write 'package.module:function'")
        return value


class GroupRolloutConfig(RolloutConfig):
    """Settings shared by the methods that sample a group of completions per prompt and score
    them with reward functions (GRPO, RLOO). Batch sizes count completions, not prompts."""

    num_generations: int = Field(
        8, ge=2, description="Completions sampled per prompt (the group size G)."
    )
    epsilon: float = Field(0.2, gt=0.0, description="Lower clip range: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="Upper clip range (DAPO's clip-higher); null: epsilon."
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimizer passes over each generation batch (mu)."
    )
    max_eval_rows: int | None = Field(
        64, ge=1, description="Held-out prompts (the first ones) completed greedily and scored at "
        "each evaluation during training; null: all of them."
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Leave completions that hit max_completion_length without a stop token out "
        "of the loss (and out of dapo's token count), as TRL's mask_truncated_completions; "
        "their rewards still count in the group baselines. Off by default, as in TRL.",
    )
    reward_functions: dict[str, float] = Field(
        {},
        description="Reward functions by dotted path ('package.module:function', called as TRL "
        "calls them: prompts=, completions=, every extra dataset column by name) with their "
        "weights; the name 'reward_model' scores with the stage named in `reward`. At least one.",
    )

    environment: EnvironmentConfig | None = Field(
        None, description="Multi-turn episodes with tools and an environment (see "
        "EnvironmentConfig); null: single-turn completions."
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> GroupRolloutConfig:
        if self.per_device_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_batch_size ({self.per_device_batch_size}) counts completions and "
                f"must be a multiple of num_generations ({self.num_generations})"
            )
        env = self.environment
        if env is not None and env.max_episode_tokens >= self.max_length:
            raise ValueError(
                f"environment.max_episode_tokens ({env.max_episode_tokens}) must leave room for "
                f"the prompt within max_length ({self.max_length}): lower it or raise max_length"
            )
        return self


class GRPOConfig(StageFields, GroupRolloutConfig):
    """Group Relative Policy Optimization. Batch sizes count completions, not prompts."""

    method: Literal["grpo"] = Field("grpo", description="The method; selects these settings.")
    learning_rate: float = Field(1e-6, gt=0.0, description="Peak learning rate of AdamW.")
    beta: float = Field(
        0.0, ge=0.0, description="Weight of the k3 KL to the reference; 0 loads no reference."
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="How per-token losses are normalized (see ALGORITHMS.md). The default "
        "stays 'grpo' (the paper's eq. 3: each completion's token mean, averaged), which the "
        "demo's numbers were tuned with; TRL's default is 'dapo' (every token of the "
        "accumulated step weighs the same, no length bias): set loss_type: dapo to match it.",
    )
    use_bias_correction_kl: bool = Field(
        False,
        description="Multiply each token's k3 KL by the importance ratio pi/pi_old (with its "
        "gradient), TRL's use_bias_correction_kl (DeepSeek-V3.2): the KL estimate then stays "
        "unbiased for samples from pi_old once the policy has moved (num_iterations > 1 or "
        "later micro-batches). Off by default (the paper's and TRL's default); on, GRPO with "
        "beta > 0 follows a TRL run that turns it on. No effect with beta = 0.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide centred rewards by the group's std, the batch's, or not."
    )

    @property
    def uses_reward_stage(self) -> bool:  # here, not on the base: StageFields' comes first
        return "reward_model" in self.reward_functions or "reward_model" in self.eval_functions()


class RLOOConfig(StageFields, GroupRolloutConfig):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): k completions per prompt, each one's
    baseline the mean reward of the other k - 1; a clipped sequence-level importance ratio.
    Defaults are TRL's RLOOConfig's. Batch sizes count completions, not prompts."""

    method: Literal["rloo"] = Field("rloo", description="The method; selects these settings.")
    learning_rate: float = Field(1e-6, gt=0.0, description="Peak learning rate of AdamW.")
    num_generations: int = Field(
        2, ge=2, description="Completions sampled per prompt (k of the paper)."
    )
    beta: float = Field(
        0.05, ge=0.0, description="Weight of the KL to the reference; 0 loads no reference."
    )
    kl_placement: Literal["reward", "loss"] = Field(
        "reward",
        description="'reward': subtract beta * sum_t (log pi_old - log pi_ref) from each "
        "completion's reward before the leave-one-out baseline (the paper's and TRL's, the only "
        "mode TRL has); 'loss': add beta * sum_t k3 KL_t of each completion to its loss "
        "(GRPO's estimator, with a gradient), leaving the rewards alone.",
    )
    normalize_advantages: bool = Field(
        False, description="Whiten the advantages over the generation batch: (A - mean) / "
        "(std + 1e-4) (TRL's normalize_advantages)."
    )

    @property
    def uses_reward_stage(self) -> bool:  # here, not on the base: StageFields' comes first
        return "reward_model" in self.reward_functions or "reward_model" in self.eval_functions()


class OnlineDPOConfig(StageFields, RolloutConfig):
    """Online DPO (Guo et al. 2024): two fresh completions of each prompt from the current
    policy, ranked by reward functions or a reward stage's model, and the DPO loss on that pair
    against the frozen reference. Defaults are TRL's OnlineDPOConfig's. Batch sizes count
    prompts, each giving one pair."""

    method: Literal["online_dpo"] = Field(
        "online_dpo", description="The method; selects these settings."
    )
    learning_rate: float = Field(5e-7, gt=0.0, description="Peak learning rate of AdamW.")
    max_completion_length: int = Field(64, ge=1, description="New tokens per completion.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling temperature.")
    beta: float = Field(0.1, gt=0.0, description="Temperature beta of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid (DPO) or ipo (IPO on per-token averaged log-ratios, as our offline "
        "DPO's IPO; TRL's online IPO uses summed ones).",
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the reward of a completion without a stop "
        "token, before the pair is ranked (TRL's missing_eos_penalty)."
    )
    max_eval_rows: int | None = Field(
        64, ge=1, description="Held-out prompts (the first ones) completed greedily and scored at "
        "each evaluation during training; null: all of them."
    )
    reward_functions: dict[str, float] = Field(
        {},
        description="What ranks the two completions: reward functions by dotted path "
        "('package.module:function', called as GRPO calls them) with their weights; the name "
        "'reward_model' scores with the stage named in `reward`. At least one.",
    )

    @property
    def uses_reward_stage(self) -> bool:  # here, not on the base: StageFields' comes first
        return "reward_model" in self.reward_functions or "reward_model" in self.eval_functions()


class PPOConfig(StageFields, RolloutConfig):
    """PPO for RLHF: policy, frozen reference, frozen reward model, value model."""

    method: Literal["ppo"] = Field("ppo", description="The method; selects these settings.")
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

    @property
    def uses_reward_stage(self) -> bool:
        return True

    @field_validator("grad_accum")
    @classmethod
    def _no_accumulation(cls, value: int) -> int:
        # A PPO step is a rollout batch of per_device_batch_size prompts, optimized in
        # num_mini_batches minibatches: accumulation has nothing to add there, and a value that
        # is accepted and ignored would only mislead. Refused rather than ignored.
        if value != 1:
            raise ValueError("PPO does not accumulate gradients: its step is one rollout batch "
                             "of per_device_batch_size prompts, split into num_mini_batches "
                             "updates; set grad_accum: 1 and use per_device_batch_size / "
                             "num_mini_batches instead")
        return value

    @model_validator(mode="after")
    def _minibatches_fit(self) -> PPOConfig:
        if self.per_device_batch_size % self.num_mini_batches:
            raise ValueError(
                f"per_device_batch_size ({self.per_device_batch_size}) must be a multiple of "
                f"num_mini_batches ({self.num_mini_batches})"
            )
        return self


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


# ------------------------------------------------------------------------------ load/overrides


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "demo.yaml"


def _format_validation_error(err: ValidationError, where: str, values: dict) -> str:
    lines = [f"invalid configuration ({where}):"]
    for e in err.errors():
        field = _field_name(e["loc"], values)
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _field_name(loc: tuple, values: dict) -> str:
    """Dotted field path, with a stage's list index replaced by its name: stages.dpo.beta."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = values.get("stages") or []
        stage = stages[loc[1]] if loc[1] < len(stages) else None
        name = stage.get("name") if isinstance(stage, dict) else None
        name = name if isinstance(name, str) else None
        rest = [str(p) for p in loc[2:]]
        if rest and isinstance(stage, dict) and rest[0] == stage.get("method"):
            rest = rest[1:]  # pydantic's union tag: the method, already known from the stage
        parts = ["stages", name or f"[{loc[1]}]", *rest]
    return ".".join(parts) or "<root>"


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
    """Set dotted fields in a nested dict (a copy); unknown fields are caught by validation.

    A stage is addressed by its name: `stages.dpo.beta=0.5`.
    """
    out = copy.deepcopy(values)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            node = _child(node, p, text)
        if isinstance(node, list):
            raise ConfigError(f"override {text!r}: {parts[-2]!r} is a list of stages; name a "
                              "stage and a field, e.g. stages.dpo.beta=0.5")
        node[parts[-1]] = value
    return out


def _child(node: dict | list, part: str, text: str) -> dict | list:
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == part:
                return item
        names = [i.get("name") for i in node if isinstance(i, dict)]
        if not names:
            raise ConfigError(f"override {text!r}: {part!r} indexes a list of values; set the "
                              "whole list instead, e.g. demo.tasks=[add,sort]")
        raise ConfigError(f"override {text!r}: no stage named {part!r} (stages: {names})")
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    elif not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
    return child


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
    """`values` as a `model`, or a ConfigError naming every bad field (and, for a pipeline,
    every problem of its graph)."""
    try:
        validated = model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, values)) from None
    return validated.check(where) if isinstance(validated, PipelineConfig) else validated


def load_pipeline_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Read a YAML file (default: the demo, conf/demo.yaml), apply `a.b=value` overrides,
    validate."""
    path = DEMO_CONFIG if path is None else path
    values = apply_overrides(read_yaml(path), list(overrides))
    where = str(path) + (" + overrides" if overrides else "")
    return validate(PipelineConfig, values, where)


def merge(base: dict, update: dict) -> dict:
    """`update` deep-merged onto `base` (a copy): mappings merge key by key, anything else
    (values, lists such as `stages`) replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
