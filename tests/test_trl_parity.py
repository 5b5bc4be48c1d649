"""Parity with TRL (issue 18, item 7): each method TRL has follows TRL's loss trajectory within
1e-4 with the TRL-compatible switches on.

Every case builds its tiny model (a 2-layer Qwen2, hidden 32) and data here, gives both sides the
same initial weights (copies of one model), the same rows and 5 optimizer steps of AdamW at a
constant learning rate without warm-up, one batch = the whole dataset (so the sampler's order
cannot matter), clipping 1.0, no dropout, fp32, and compares the loss of every step (and, where
the names agree, a logged metric) within 1e-4. GRPO and RLOO train on a fixed batch of
completions: TRL's generation step and ours are replaced by a lookup in one table of token ids
(TRL: the trainer's own `_generate_single_turn`; ours: `posttrain.recipes.grpo._sample`), so
both sides score, weigh and train on exactly the same completions, some of them truncated.

Settings on TRL's side that are not its defaults, and why: `bf16=False` (TRL's configs turn bf16
autocast on by default, also on a CPU; ours train in fp32 here), `lr_scheduler_type="constant"`
and `warmup_steps=0`, KTO's `train_sampling_strategy="sequential"` (TRL requires it for its
in-batch rotation). The switches on our side: RM `head_init: transformers`, ORPO
`nll_tokens: prompt_and_completion`, KTO `kl_partners: rotate`, DPO `ipo_metrics: summed`, GRPO
`loss_type: dapo` with `use_bias_correction_kl` and `mask_truncated_completions`, RLOO
`mask_truncated_completions`. Two checks show that the comparison is not vacuous: ORPO with our
default `nll_tokens` and KTO with our default `kl_partners` do NOT follow TRL.

Why in-process (`pytest.importorskip("trl")`, TRL in the `bench` extra that `make install`
installs) rather than TRL in a subprocess with its own interpreter: measured on this machine
(2026-12-03), on top of `pip install -e .[dev]` the extra adds one package, trl 1.16.0 (a 0.9 MB
wheel; every dependency of it is one of ours already, torch and transformers stay as pinned), in
about 14 s once per fresh environment, where a second environment would install torch,
transformers and the rest again (minutes) and keep them in step with ours; in one process both
sides start from one model object and TRL's generation hook takes a Python function. Without
trl the whole file is skipped. The file takes about 55 s here (27 s of CPU): slow.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections import Counter

import pytest
import torch

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow

from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from posttrain.config import (
    CPOConfig,
    DemoTaskConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ORPOConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    SimPOConfig,
    TinyModelConfig,
)
from posttrain.data import demo
from posttrain.data.preference import (
    tokenize_preference_rows,
    tokenize_unpaired_rows,
)
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import grpo, kto, online_common, preference, reward, sft
from posttrain.rewards import load_reward_model
from posttrain.rollout import Rollout

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)
ROWS, STEPS, LR, TOL = 8, 5, 1e-3, 1e-4
OURS = {"max_steps": STEPS, "per_device_batch_size": ROWS, "learning_rate": LR,
        "warmup_steps": 0, "lr_scheduler": "constant", "max_grad_norm": 1.0,
        "weight_decay": 0.0, "max_length": 64, "eval_every": STEPS, "log_every": 1}


# ------------------------------------------------------------------------------- harness


class _Logs(TrainerCallback):
    """Every training log of a TRL trainer (one per step with logging_steps=1)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(dict(logs))


def _trl_args(config_cls, out, **settings):
    return config_cls(**{
        "output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": ROWS,
        "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "max_grad_norm": 1.0, "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no",
        "eval_strategy": "no", "report_to": "none", "seed": 0, "use_cpu": True,
        "disable_tqdm": True, "dataloader_num_workers": 0, "bf16": False, **settings})


def trl_logs(trainer_cls, config_cls, tmp_path, *, patch=None, **kwargs) -> list[dict]:
    """Train with TRL; return its per-step logs. `patch(trainer)` runs before training."""
    settings = kwargs.pop("settings", {})
    logs = _Logs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(args=_trl_args(config_cls, tmp_path / "trl", **settings),
                              callbacks=[logs], **kwargs)
        if patch is not None:
            patch(trainer)
        trainer.train()
    assert len(logs.steps) == STEPS
    return logs.steps


def our_logs(run) -> list[dict]:
    """`run(log_metrics)` trains with our recipe; return its per-step metrics."""
    steps: list[dict] = []
    run(lambda metrics, step: steps.append(dict(metrics)))
    assert len(steps) == STEPS
    return steps


def assert_follows(ours: list[dict], theirs: list[dict], keys=("loss",),
                   renamed: dict[str, str] | None = None) -> float:
    """Every step's `keys` (ours; TRL's name from `renamed`) within TOL; the largest |delta|.
    A metric TRL logs only on some steps (RLOO's rollout metrics: on generation steps) is
    compared on those."""
    worst = 0.0
    for key in keys:
        trl_key = (renamed or {}).get(key, key)
        steps = [i for i, m in enumerate(theirs) if trl_key in m]
        assert steps, f"TRL never logged {trl_key}"
        a = [float(ours[i][key]) for i in steps]
        b = [float(theirs[i][trl_key]) for i in steps]
        delta = max(abs(x - y) for x, y in zip(a, b, strict=True))
        assert delta <= TOL, f"{key}: ours {a}\n TRL {b}\n max |delta| {delta:.2e} > {TOL}"
        print(f"{key}: max |delta| {delta:.1e} over {len(steps)} steps (TRL {b[0]:.6g} .. {b[-1]:.6g})")
        worst = max(worst, delta)
    return worst


def max_delta(ours: list[dict], theirs: list[dict], key: str = "loss") -> float:
    return max(abs(float(a[key]) - float(b[key])) for a, b in zip(ours, theirs, strict=True))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The initial weights of every case, saved once (TRL loads reference models by path)."""
    folder = tmp_path_factory.mktemp("parity-model")
    save_model(build_tiny_model(TINY, tokenizer), tokenizer, folder)
    return folder


@pytest.fixture
def policy(model_dir):
    """A fresh copy of the initial weights, loaded from the folder (its name_or_path set)."""
    def load():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return load


def _demo(kind: str) -> list[dict]:
    generate = {"sft": demo.generate_sft, "preference": demo.generate_preference,
                "kto": demo.generate_kto}[kind]
    return generate(DemoTaskConfig(num_train=ROWS, num_eval=2), 0, "train")[:ROWS]


# ------------------------------------------------------------------------------- offline


def test_sft(tmp_path, tokenizer, policy):
    rows = _demo("sft")
    examples, _ = tokenize_sft_rows(rows, tokenizer, max_length=64)
    ours = our_logs(lambda log: sft.train(
        policy(), examples, examples[:2], SFTConfig(name="sft", packing=False, **OURS),
        pad_token_id=tokenizer.pad_token_id, log_metrics=log))
    theirs = trl_logs(trl.SFTTrainer, trl.SFTConfig, tmp_path, model=policy(),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      settings={"max_length": 64})
    assert_follows(ours, theirs, ("loss", "mean_token_accuracy"))


def test_reward_model(tmp_path, tokenizer, model_dir):
    rows = _demo("preference")
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=64)
    head = load_reward_model(model_dir, new_head=True, head_init="transformers")
    ours = our_logs(lambda log: reward.train(
        copy.deepcopy(head), pairs, pairs[:2],
        RewardConfig(name="rm", head_init="transformers", **OURS),
        pad_token_id=tokenizer.pad_token_id, log_metrics=log))
    theirs = trl_logs(trl.RewardTrainer, trl.RewardConfig, tmp_path, model=copy.deepcopy(head),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      settings={"max_length": 64})
    assert_follows(ours, theirs, ("loss", "accuracy", "margin", "mean_reward"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo(tmp_path, tokenizer, policy, loss_type):
    rows = _demo("preference")
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=64)
    config = DPOConfig(name="dpo", loss_type=loss_type, ipo_metrics="summed", beta=0.1, **OURS)
    ours = our_logs(lambda log: preference.train(
        "dpo", policy(), pairs, pairs[:2], config, pad_token_id=tokenizer.pad_token_id,
        log_metrics=log))
    theirs = trl_logs(trl.DPOTrainer, trl.DPOConfig, tmp_path, model=policy(),
                      ref_model=policy(), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer,
                      settings={"loss_type": loss_type, "beta": 0.1, "max_length": 64})
    assert_follows(ours, theirs, ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"))


def test_orpo(tmp_path, tokenizer, policy):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer

    rows = _demo("preference")
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=64)

    def ours(nll_tokens):
        return our_logs(lambda log: preference.train(
            "orpo", policy(), pairs, pairs[:2],
            ORPOConfig(name="orpo", nll_tokens=nll_tokens, beta=0.1, **OURS),
            pad_token_id=tokenizer.pad_token_id, log_metrics=log))

    theirs = trl_logs(ORPOTrainer, TRLConfig, tmp_path, model=policy(),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      settings={"beta": 0.1, "max_length": 64})
    assert_follows(ours("prompt_and_completion"), theirs,
                   ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen"))
    assert max_delta(ours("completion"), theirs) > 1e-2  # our default is not TRL's rule


def test_kto(tmp_path, tokenizer, policy):
    rows = _demo("kto")
    assert 0 < sum(r["label"] for r in rows) < ROWS  # both kinds of example
    examples, _ = tokenize_unpaired_rows(rows, tokenizer, max_length=64)

    def ours(kl_partners):
        return our_logs(lambda log: kto.train(
            policy(), examples, examples[:2],
            KTOConfig(name="kto", kl_partners=kl_partners, beta=0.1, **OURS),
            pad_token_id=tokenizer.pad_token_id, log_metrics=log))

    theirs = trl_logs(trl.KTOTrainer, trl.KTOConfig, tmp_path, model=policy(),
                      ref_model=policy(), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer,
                      settings={"beta": 0.1, "max_length": 64,
                                "train_sampling_strategy": "sequential"})
    assert_follows(ours("rotate"), theirs, ("loss", "kl"))
    assert max_delta(ours("shuffle"), theirs, "kl") > 1e-3  # other partners, another estimate


@pytest.mark.parametrize("method", ["cpo", "simpo"])
def test_cpo_and_simpo(tmp_path, tokenizer, policy, method):
    from trl.experimental.cpo import CPOConfig as TRLConfig
    from trl.experimental.cpo import CPOTrainer

    rows = _demo("preference")
    pairs, _ = tokenize_preference_rows(rows, tokenizer, max_length=64)
    if method == "cpo":
        config = CPOConfig(name="cpo", beta=0.1, cpo_alpha=1.0, **OURS)
        settings = {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0}
    else:  # the paper's SimPO (no NLL): TRL's CPO trainer with loss_type simpo, cpo_alpha 0
        config = SimPOConfig(name="simpo", beta=2.0, gamma=1.0, cpo_alpha=0.0, **OURS)
        settings = {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}
    ours = our_logs(lambda log: preference.train(
        method, policy(), pairs, pairs[:2], config, pad_token_id=tokenizer.pad_token_id,
        log_metrics=log))
    theirs = trl_logs(CPOTrainer, TRLConfig, tmp_path, model=policy(),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      settings={**settings, "max_length": 64})
    # TRL logs nll_loss as 0 when cpo_alpha is 0 (it skips the term); ours logs the NLL anyway.
    nll = ("nll_loss",) if method == "cpo" else ("logps/chosen",)
    assert_follows(ours, theirs, ("loss", "rewards/margins", *nll))


# ---------------------------------------------------- online, on a fixed batch of completions

G, NEW_TOKENS = 4, 6


def _completion_table(prompt_ids: list[list[int]], tokenizer) -> dict[tuple, list[list[int]]]:
    """G fixed completions per prompt: random letters, most ending with EOS within NEW_TOKENS
    tokens, one per prompt cut at NEW_TOKENS without it (truncated)."""
    rng = random.Random(0)
    letters = tokenizer.convert_tokens_to_ids(list("abcdefghij"))
    table = {}
    for ids in prompt_ids:
        completions = []
        for g in range(G):
            if g == G - 1:
                completions.append(rng.choices(letters, k=NEW_TOKENS))  # no EOS: truncated
            else:
                n = rng.randint(1, NEW_TOKENS - 1)
                completions.append(rng.choices(letters, k=n) + [tokenizer.eos_token_id])
        table[tuple(ids)] = completions
    return table


def letter_a_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward TRL and we call alike: the count of 'a' and 'b' characters, minus the length/4."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("a") + 0.5 * t.count("b") - len(t) / 4 for t in texts]


def _fixed_rollout(table, tokenizer):
    """Our `_sample` replaced: the table's completions of each row's prompt, as a Rollout."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def sample(policy, rows, config, tokenizer_, generator, shard=(0, 1)):
        prompts = [r["prompt_ids"] for r in rows for _ in range(config.num_generations)]
        completions = [c for r in rows for c in table[tuple(r["prompt_ids"])]]
        width, length = max(map(len, prompts)), max(map(len, completions))
        prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        completion_ids = torch.tensor([c + [pad] * (length - len(c)) for c in completions])
        completion_mask = torch.tensor([[1] * len(c) + [0] * (length - len(c))
                                        for c in completions])
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids, completion_mask=completion_mask,
                       logps=torch.zeros(completion_ids.shape),
                       truncated=torch.tensor([c[-1] != eos for c in completions]),
                       lengths=completion_mask.sum(-1))

    return sample


def _trl_fixed_generation(table, *, with_logprobs: bool):
    """TRL's generation replaced by the same table: the k-th request for a prompt in one call
    gets its k-th completion (TRL asks once per repeated prompt row)."""
    def patch(trainer):
        def generate(prompt_ids, *args, **kwargs):
            seen: Counter = Counter()
            out = []
            for ids in prompt_ids:
                out.append(list(table[tuple(ids)][seen[tuple(ids)]]))
                seen[tuple(ids)] += 1
            return (out, None) if with_logprobs else out
        trainer._generate_single_turn = generate
    return patch


@pytest.fixture
def prompts():
    """Two demo prompts: one generation batch of 2 x G completions = the whole dataset."""
    rows = demo.generate_prompts(DemoTaskConfig(num_train=ROWS, num_eval=2), 0, "train")[:2]
    return [{"prompt": r["prompt"]} for r in rows]



@pytest.mark.parametrize(("method", "mask_truncated"), [
    ("grpo", True),
    ("rloo", False),
    ("rloo", True),  # a truncated completion masked out of the KL in its reward too, as TRL
])
def test_online_on_a_fixed_batch(tmp_path, tokenizer, policy, prompts, monkeypatch, method,
                                 mask_truncated):
    online = {**OURS, "per_device_batch_size": 2 * G, "num_generations": G,
              "max_completion_length": NEW_TOKENS, "temperature": 1.0,
              "mask_truncated_completions": mask_truncated, "num_iterations": 2,
              "epsilon": 0.2}
    trl_settings = {"num_generations": G, "max_completion_length": NEW_TOKENS,
                    "temperature": 1.0, "mask_truncated_completions": mask_truncated,
                    "num_iterations": 2, "epsilon": 0.2,
                    "per_device_train_batch_size": 2 * G}
    if method == "grpo":
        config = GRPOConfig(name="grpo", loss_type="dapo", beta=0.04,
                            use_bias_correction_kl=True, scale_rewards="group", **online)
        trl_settings.update(loss_type="dapo", beta=0.04, use_bias_correction_kl=True,
                            scale_rewards="group")
        trainer_cls, config_cls = trl.GRPOTrainer, trl.GRPOConfig
    else:
        config = RLOOConfig(name="rloo", beta=0.05, kl_placement="reward",
                            normalize_advantages=False, **online)
        trl_settings.update(beta=0.05, normalize_advantages=False)
        trainer_cls, config_cls = trl.RLOOTrainer, trl.RLOOConfig
    rows = online_common.prepare_prompts(prompts, tokenizer, 64 - NEW_TOKENS)
    table = _completion_table([r["prompt_ids"] for r in rows], tokenizer)
    monkeypatch.setattr(grpo, "_sample", _fixed_rollout(table, tokenizer))

    def ours(config):
        return our_logs(lambda log: grpo.train(
            policy(), tokenizer, prompts, prompts, config,
            reward_fns={"letter_a_reward": letter_a_reward}, weights={"letter_a_reward": 1.0},
            log_metrics=log))

    theirs = trl_logs(trainer_cls, config_cls, tmp_path, model=policy(),
                      reward_funcs=[letter_a_reward], train_dataset=Dataset.from_list(prompts),
                      processing_class=tokenizer,
                      patch=_trl_fixed_generation(table, with_logprobs=method == "grpo"),
                      settings=trl_settings)
    assert_follows(ours(config), theirs, ("loss", "reward", "kl"))
    if method == "grpo":  # without the switch, the KL term is not TRL's (measured: 1e-3 in kl)
        plain = config.model_copy(update={"use_bias_correction_kl": False})
        assert max_delta(ours(plain), theirs, "kl") > 3e-4
