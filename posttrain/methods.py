"""The table of methods: what each method is, reads and needs. Everything that must know a
method's traits (flows, tasks, the stage runner, the launcher, preflight, the CLI) reads them
here instead of testing the method's name.

The function that runs a method's stage is the stage layer's to know
(`posttrain.stages.graph.STAGE_FUNCTIONS`): the stages read this table, not the other way
round, so reading it (a CLI starting, a Prefect flow importing) loads no stage code at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import (
    CPOConfig,
    DPOConfig,
    GKDConfig,
    GRPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    ORPOConfig,
    PPOConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    SimPOConfig,
)
from posttrain.data.formats import PROMPT_FORMATS
from posttrain.data.validation import (
    LANGUAGE_MODELING,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    PROMPT_COMPLETION,
    UNPAIRED_PREFERENCE,
)

PAIRS = (PREFERENCE, PREFERENCE_IMPLICIT)
PROMPTS = PROMPT_FORMATS  # online methods sample their own completions from any prompt


@dataclass(frozen=True)
class Method:
    """One post-training method.

    formats: the data formats its `data` source may be in (KTO converts pairs, the online methods
    take the prompts of any format with prompts); reference: it compares against a frozen copy
    of the model it starts from (always, or only when the stage says so, see `uses_reference`);
    (a stage scores with a reward stage when its config's `uses_reward_stage` says so: PPO
    always, GRPO, RLOO and online DPO with 'reward_model' among their reward functions); generates: it samples
    completions while training; produces: what its artifact holds ('policy' or 'reward_model');
    unit: what `per_device_batch_size` counts, in every method the items its loss averages over
    ('examples': SFT rows, packed rows with packing; 'pairs': reward model, DPO & co., and
    online DPO, one sampled pair per prompt; 'unpaired': KTO's examples, which also form
    mismatched pairs; 'completions': GRPO and RLOO, num_generations per prompt, and PPO, one
    per prompt).
    """

    name: str
    config: type
    formats: tuple[str, ...]
    summary: str
    reference: bool = False
    generates: bool = False
    produces: str = "policy"
    unit: str = "examples"
    key_metrics: tuple[str, ...] = ()


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", SFTConfig, (LANGUAGE_MODELING, PROMPT_COMPLETION), "supervised fine-tuning",
           key_metrics=("loss", "eval_loss", "mean_token_accuracy", "tokens_per_second")),
    Method("reward", RewardConfig, PAIRS,
           "Bradley-Terry reward model", produces="reward_model", unit="pairs",
           key_metrics=("loss", "eval_accuracy", "eval_margin")),
    Method("dpo", DPOConfig, PAIRS,
           "direct preference optimization", reference=True, unit="pairs",
           key_metrics=("loss", "rewards/accuracies", "rewards/margins",
                        "eval_rewards/accuracies")),
    Method("orpo", ORPOConfig, PAIRS,
           "odds-ratio preference optimization (no reference)", unit="pairs",
           key_metrics=("loss", "nll_loss", "rewards/accuracies", "eval_rewards/accuracies")),
    Method("simpo", SimPOConfig, PAIRS,
           "simple preference optimization: length-normalized reward, target margin "
           "(no reference)", unit="pairs",
           key_metrics=("loss", "rewards/accuracies", "rewards/margins",
                        "eval_rewards/accuracies")),
    Method("cpo", CPOConfig, PAIRS,
           "contrastive preference optimization: reference-free DPO plus NLL on chosen "
           "(no reference)", unit="pairs",
           key_metrics=("loss", "nll_loss", "rewards/accuracies", "eval_rewards/accuracies")),
    Method("kto", KTOConfig, (UNPAIRED_PREFERENCE, *PAIRS),
           "Kahneman-Tversky optimization (pairs are split into desirable/undesirable)",
           reference=True, unit="unpaired",
           key_metrics=("loss", "kl", "rewards/margins", "eval_loss")),
    Method("gkd", GKDConfig, (PROMPT_COMPLETION,),
           "on-policy distillation (GKD): generalized JSD to a frozen teacher on data and "
           "student-sampled completions", generates=True,
           key_metrics=("loss", "jsd", "on_policy_fraction", "eval_jsd")),
    Method("grpo", GRPOConfig, PROMPTS,
           "group relative policy optimization", reference=True, generates=True,
           unit="completions",
           key_metrics=("reward", "reward_std", "eval/reward", "completions/mean_length")),
    Method("rloo", RLOOConfig, PROMPTS,
           "REINFORCE leave-one-out (k samples per prompt, the others' mean as baseline)",
           reference=True, generates=True, unit="completions",
           key_metrics=("reward", "reward_std", "eval/reward", "kl")),
    Method("online_dpo", OnlineDPOConfig, PROMPTS,
           "online DPO: two fresh completions per prompt ranked by reward functions or a reward "
           "stage, DPO loss on the pair", reference=True, generates=True, unit="pairs",
           key_metrics=("objective/scores", "objective/scores_margin", "rewards/accuracies",
                        "eval/reward")),
    Method("ppo", PPOConfig, PROMPTS,
           "PPO against a reward stage", reference=True, generates=True, unit="completions",
           key_metrics=("objective/scores", "objective/kl", "objective/rlhf_reward",
                        "loss/value_avg")),
)}


def method(stage) -> Method:
    """The table row of a stage config (or a method name)."""
    return METHODS[stage if isinstance(stage, str) else stage.method]


def uses_reference(stage) -> bool:
    """Whether the stage loads a frozen reference: always for DPO, KTO and PPO, for GRPO and
    RLOO only with a KL term (beta > 0)."""
    if not method(stage).reference:
        return False
    return stage.method not in ("grpo", "rloo") or stage.beta > 0


def is_policy(stage) -> bool:
    """A stage whose artifact is a language model (an evaluation and promotion candidate)."""
    return method(stage).produces == "policy"
