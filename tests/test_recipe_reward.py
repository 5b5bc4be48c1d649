"""Reward model: `RewardScorer` reads the score at the last real token whatever the padding (and
transformers' own head does not when pad = EOS), and the Bradley-Terry recipe learns to rank
held-out demo pairs, uses the `margin` column and adds the centering penalty."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, Qwen2Config

from posttrain.config import DemoTaskConfig, RewardConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.preference import collate_pairs, tokenize_preference_rows
from posttrain.models import build_tiny_model, save_model
from posttrain.recipes import reward
from posttrain.rewards import RewardScorer, load_reward_model, score_texts

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    cfg = DemoTaskConfig(num_train=1000, num_eval=100)
    out = {}
    for split in ("train", "eval"):
        rows = demo.generate_preference(cfg, 0, split)
        out[split], report = tokenize_preference_rows(rows, tokenizer, max_length=48)
        assert report["rows_out"] == len(rows)
    return out


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    """A saved tiny causal LM: the reward model's body, as the SFT artifact would be."""
    return save_model(build_tiny_model(TINY, tokenizer), tokenizer,
                      tmp_path_factory.mktemp("rm-base"))


@pytest.fixture(scope="module")
def fresh_rm(base_dir):
    """One freshly headed reward model; tests deep-copy it so that they all start alike."""
    torch.manual_seed(0)
    return load_reward_model(base_dir, new_head=True)


# ---------------------------------------------------------------------------- RewardScorer


@pytest.fixture(scope="module")
def eos_padded():
    """A sequence classifier whose pad id IS the EOS id (as for many base models), and three
    rows that all end with EOS, the last also containing an earlier EOS."""
    eos = 5
    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    rows = [[2, 11, 12, 13, eos], [2, 20, 21, eos, 3, 22, 23, 24, eos], [2, 30, eos]]
    return model, rows, eos


def _pad(rows, pad, side):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_scorer_reads_the_last_real_token_with_pad_equal_to_eos(eos_padded):
    model, rows, eos = eos_padded
    scorer = RewardScorer(model).eval()
    with torch.no_grad():
        alone = torch.cat([scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                           for r in rows])
        # the score is the head applied to the final hidden state: the EOS position
        for r, s in zip(rows, alone):
            hidden = model.base_model(input_ids=torch.tensor([r])).last_hidden_state[0, -1]
            assert float(model.score(hidden)) == pytest.approx(float(s), abs=1e-5)
        for side in ("right", "left"):
            ids, mask = _pad(rows, eos, side)
            assert (ids == eos).sum() > 3  # padding really is made of EOS ids
            torch.testing.assert_close(scorer(ids, mask), alone, atol=1e-5, rtol=0)
    assert len(set(alone.tolist())) == 3  # rows score differently: the check can fail


def test_transformers_head_reads_the_wrong_token_when_pad_is_eos(eos_padded):
    """Qwen2ForSequenceClassification takes the rightmost token that is not the pad id; with
    pad = EOS that is the token BEFORE the closing EOS, hence RewardScorer."""
    model, rows, eos = eos_padded
    ids, mask = _pad(rows, eos, "right")
    with torch.no_grad():
        ours = RewardScorer(model)(ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    if torch.allclose(ours, theirs, atol=1e-5):
        pytest.skip("this transformers version finds the last real token itself")
    assert (ours - theirs).abs().max() > 1e-3


def test_score_texts_matches_the_scorer_on_collated_batches(fresh_rm, pairs, tokenizer):
    model = copy.deepcopy(fresh_rm)
    batches = [collate_pairs(pairs["eval"][i : i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    scores = score_texts(model, batches)
    assert scores.shape == (16,)
    with torch.no_grad():
        one = RewardScorer(model)(batches[1]["input_ids"], batches[1]["attention_mask"])
    torch.testing.assert_close(scores[8:], one, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- recipe


def _train(model, train_pairs, eval_pairs, tokenizer, **overrides):
    cfg = RewardConfig(**{"max_steps": 160, "per_device_batch_size": 16, "learning_rate": 3e-3,
                          "warmup_steps": 2, "eval_every": 40, "log_every": 1, **overrides})
    history: list[dict] = []
    final = reward.train(model, train_pairs, eval_pairs, cfg, pad_token_id=tokenizer.pad_token_id,
                         log_metrics=lambda m, s: history.append(dict(m)))
    return final, history


def test_reward_model_learns_to_rank_held_out_pairs(fresh_rm, pairs, tokenizer):
    """From a random body (no SFT), 160 steps of 16 pairs: held-out pairwise accuracy, chance 0.5,
    ends well above it (0.7-0.8 over seeds), and the training margin r_c - r_r grows."""
    model = copy.deepcopy(fresh_rm)
    final, history = _train(model, pairs["train"], pairs["eval"], tokenizer)
    assert len(history) == 160
    assert all(math.isfinite(m["loss"]) for m in history)
    assert set(final) >= {"loss", "accuracy", "margin", "mean_reward", "min_reward",
                          "max_reward", "eval_accuracy", "eval_margin", "grad_norm"}
    first = sum(m["margin"] for m in history[:20]) / 20
    last = sum(m["margin"] for m in history[-20:]) / 20
    assert first < 0.3 and last > first + 1.0
    assert sum(m["loss"] for m in history[-20:]) < 0.8 * sum(m["loss"] for m in history[:20])
    assert final["eval_accuracy"] > 0.65
    assert final["eval_margin"] > 0


def _first_loss(model, examples, tokenizer, **overrides) -> float:
    """The logged loss of step 1 (computed before the update) on ONE batch holding every pair."""
    _, history = _train(model, examples, examples, tokenizer, max_steps=1, warmup_steps=0,
                        per_device_batch_size=len(examples), eval_every=1, **overrides)
    return history[0]["loss"]


def _initial_scores(model, examples, tokenizer):
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = RewardScorer(model)(batch["input_ids"], batch["attention_mask"])
    return scores[: len(examples)], scores[len(examples) :]


def test_margin_column_enters_the_loss(fresh_rm, tokenizer):
    """Rows with margin m: step-1 loss = mean(-log σ(r_c - r_r - m)), computed here from the
    initial scores; m = 3 raises it by about 2 nats over the loss without a margin."""
    rows = demo.generate_preference(DemoTaskConfig(num_train=200, num_eval=20), 0, "train")[:8]
    plain, _ = tokenize_preference_rows(rows, tokenizer, max_length=48)
    with_margin, _ = tokenize_preference_rows(
        [{**r, "margin": 3.0} for r in rows], tokenizer, max_length=48
    )
    assert [e["margin"] for e in with_margin] == [3.0] * 8

    chosen, rejected = _initial_scores(fresh_rm, plain, tokenizer)
    expected_plain = float(-F.logsigmoid(chosen - rejected).mean())
    expected_margin = float(-F.logsigmoid(chosen - rejected - 3.0).mean())

    got_plain = _first_loss(copy.deepcopy(fresh_rm), plain, tokenizer)
    got_margin = _first_loss(copy.deepcopy(fresh_rm), with_margin, tokenizer)
    assert got_plain == pytest.approx(expected_plain, abs=1e-5)
    assert got_margin == pytest.approx(expected_margin, abs=1e-5)
    assert got_margin > got_plain + 2.0


def test_center_rewards_coefficient_adds_the_penalty(fresh_rm, pairs, tokenizer):
    """Step-1 loss = mean(-log σ(r_c - r_r)) + c·mean((r_c + r_r)²), from the initial scores."""
    model = fresh_rm
    examples = pairs["train"][:8]
    chosen, rejected = _initial_scores(model, examples, tokenizer)
    bt = float(-F.logsigmoid(chosen - rejected).mean())
    penalty = float((chosen + rejected).pow(2).mean())
    assert penalty > 0.05  # large enough that a missing or mis-scaled term fails

    without = _first_loss(copy.deepcopy(model), examples, tokenizer)
    with_c = _first_loss(copy.deepcopy(model), examples, tokenizer,
                         center_rewards_coefficient=0.5)
    assert without == pytest.approx(bt, abs=1e-5)
    assert with_c == pytest.approx(bt + 0.5 * penalty, rel=1e-5)
