"""The online methods' settings: rollouts, environments, GRPO, RLOO, online DPO, PPO."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from posttrain.config.base import _Frozen
from posttrain.config.training import StageFields, TrainingConfig


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
        names_out = {"eval/reward", "eval/checker_accuracy", "eval/completions/mean_length",
                     "eval/completions/clipped_ratio", *(f"eval/rewards/{n}/mean" for n in names)}
        if getattr(self, "environment", None) is not None:  # posttrain.environments' metrics
            names_out |= {"eval/rewards/environment/mean", *(f"eval/episodes/{m}" for m in (
                "turns_mean", "tool_calls_mean", "tool_call_parse_failure_rate",
                "tool_error_rate", "truncated_ratio", "reward_mean"))}
        return names_out


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
    pairs, one per prompt (as DPO's count pairs)."""

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
    """PPO for RLHF: policy, frozen reference, frozen reward model, value model. Batch sizes
    count completions, one per prompt."""

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
