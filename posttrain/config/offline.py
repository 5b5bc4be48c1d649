"""The offline methods' settings: SFT, reward model, DPO, ORPO, SimPO, CPO, KTO, GKD."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from posttrain.config.model import ModelConfig
from posttrain.config.training import StageFields, TrainingConfig


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
            return [("teacher: name the teacher, an earlier language-model stage or a model "
                    "folder")]
        if self.teacher in earlier:
            if earlier[self.teacher].trains_reward_model:
                return [f"teacher: {self.teacher!r} is a reward model; name a language model"]
            return []
        if not Path(self.teacher).is_dir():
            return [(f"teacher: {self.teacher!r} is neither an earlier stage (earlier: "
                    f"{', '.join(earlier) or 'none'}) nor an existing model folder")]
        return []
