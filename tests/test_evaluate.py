"""Evaluation suite: win rate, KL estimate, completion log-probs, chosen perplexity, and
held-out rows from any format (with or without a reference completion)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import evaluate
from posttrain.config import DemoTaskConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.formats import eval_rows
from posttrain.data.validation import LANGUAGE_MODELING, PROMPT_ONLY, UNPAIRED_PREFERENCE
from posttrain.models import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer)
    return model.eval(), tokenizer


def test_win_rate_counts_ties_half_and_skips_missing_scores():
    """Prompts: 2 > 1 win, 1 = 1 tie, 0 < 3 loss, None skipped -> (1 + 0.5 + 0) / 3 = 0.5."""
    assert evaluate.win_rate([2.0, 1.0, 0.0, None], [1.0, 1.0, 3.0, 5.0]) == pytest.approx(0.5)
    assert evaluate.win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5  # a model against itself
    assert math.isnan(evaluate.win_rate([None], [1.0]))


def test_the_kl_to_reference_is_the_mean_log_ratio():
    """log pi - log ref = [-1 - (-3), -2 - (-2)] = [2, 0] -> mean 1."""
    assert evaluate.mean_log_ratio(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])) == 1.0
    assert math.isnan(evaluate.mean_log_ratio(torch.zeros(0), torch.zeros(0)))


def test_completion_logps_match_a_naive_forward(tiny):
    model, tokenizer = tiny
    rows = demo.generate_sft(DemoTaskConfig(num_train=10, num_eval=4), 0, "eval")
    completions = evaluate.greedy_completions(model, tokenizer, [r["prompt"] for r in rows],
                                              max_new_tokens=5, batch_size=3)
    fast = evaluate.summed_logps(evaluate.completion_token_logps(
        model, completions, tokenizer.pad_token_id, batch_size=3))
    for c, got in zip(completions, fast):
        ids = torch.tensor([c["prompt_ids"] + c["completion_ids"]])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        per_token = logps.gather(-1, targets[:, None]).squeeze(-1)
        want = per_token[len(c["prompt_ids"]) - 1 :].sum()
        assert got.item() == pytest.approx(want.item(), abs=1e-4)
    # A model compared with itself: KL exactly 0.
    assert evaluate.mean_log_ratio(fast, fast.clone()) == 0.0


def test_evaluate_candidate_reports_chosen_perplexity(tiny):
    model, tokenizer = tiny
    cfg = DemoTaskConfig(num_train=10, num_eval=6)
    rows = demo.generate_sft(cfg, 0, "eval")
    pairs = demo.generate_preference(cfg, 0, "eval")
    result = evaluate.evaluate_candidate(
        model, tokenizer, rows, max_new_tokens=4, batch_size=4, max_length=64, num_samples=2,
        checker=lambda p, c: demo.check(demo.prompt_text(p), c), preference_rows=pairs,
    )
    m = result.metrics
    assert {"eval_loss", "perplexity", "chosen_perplexity", "checker_accuracy",
            "mean_completion_length", "eos_rate"} <= set(m)
    assert m["chosen_perplexity"] > 1.0 and math.isfinite(m["chosen_perplexity"])
    assert len(result.completions) == len(rows) and len(result.samples) == 2
    # Nothing fits in max_length: the metric is left out rather than guessed.
    short = evaluate.chosen_perplexity(model, tokenizer, pairs, max_length=3, batch_size=4)
    assert short is None


def _evaluate(model, tokenizer, rows, **kw):
    return evaluate.evaluate_candidate(model, tokenizer, rows, max_new_tokens=4, batch_size=4,
                                       max_length=64, num_samples=3, **kw)


def test_prompt_only_eval_has_no_loss_but_completion_metrics(tiny):
    """gsm8k-style prompt-only rows have no reference: eval_loss and perplexity are absent
    (not NaN), generation metrics are there, and samples' reference is ""."""
    model, tokenizer = tiny
    prompts = demo.generate_prompts(DemoTaskConfig(num_train=10, num_eval=5), 0, "eval")
    rows = eval_rows(prompts, PROMPT_ONLY, "prompts_eval")
    result = _evaluate(model, tokenizer, rows)
    m = result.metrics
    assert "eval_loss" not in m and "perplexity" not in m
    assert m["mean_completion_length"] > 0 and 0.0 <= m["eos_rate"] <= 1.0
    assert [s["reference"] for s in result.samples] == ["", "", ""]
    assert len(result.completions) == len(rows)


def test_messages_eval_scores_the_last_assistant_turn(tiny):
    """Conversations (ultrachat-style `messages`) give a finite held-out loss over their last
    assistant turn; the same as the prompt-completion rows they were built from."""
    model, tokenizer = tiny
    sft = demo.generate_sft(DemoTaskConfig(num_train=10, num_eval=6, conversational=True), 0,
                            "eval")
    conversations = [{"messages": r["prompt"] + r["completion"], "task": r["task"]} for r in sft]
    rows = eval_rows(conversations, LANGUAGE_MODELING, "chat_eval")
    result = _evaluate(model, tokenizer, rows)
    assert math.isfinite(result.metrics["eval_loss"]) and result.metrics["perplexity"] > 1.0
    assert result.metrics["eval_loss"] == pytest.approx(
        _evaluate(model, tokenizer, sft).metrics["eval_loss"])
    assert result.samples[0]["reference"] == sft[0]["completion"][0]["content"]


def test_loss_is_over_the_rows_with_a_reference_only(tiny):
    """KTO rows: only label-True completions are references, so the loss equals the loss of
    those rows alone, while every prompt is generated for."""
    model, tokenizer = tiny
    kto = demo.generate_kto(DemoTaskConfig(num_train=10, num_eval=4), 0, "eval")
    rows = eval_rows(kto, UNPAIRED_PREFERENCE, "kto_eval")
    with_reference = [r for r in rows if "completion" in r]
    assert 0 < len(with_reference) < len(rows)
    mixed = _evaluate(model, tokenizer, rows)
    alone = _evaluate(model, tokenizer, with_reference)
    assert mixed.metrics["eval_loss"] == pytest.approx(alone.metrics["eval_loss"])
    assert len(mixed.completions) == len(rows)


def test_per_prompt_values_give_back_every_metric_and_the_loss_by_tokens(tiny):
    """Each metric's per-row record sums back to the metric (eval_loss exactly the token mean
    of posttrain.recipes.sft.evaluate_loss over the same rows), a row that does not fit
    max_length has no loss value, and each part's time is recorded."""
    from posttrain import bootstrap
    from posttrain.data.packing import collate_padded
    from posttrain.data.tokenize import tokenize_sft_example
    from posttrain.logprobs import SelectedLogits
    from posttrain.recipes.sft import evaluate_loss

    model, tokenizer = tiny
    cfg = DemoTaskConfig(num_train=10, num_eval=7)
    rows = demo.generate_sft(cfg, 0, "eval")
    long = [{**m, "content": m["content"] + " 1" * 80} for m in rows[2]["completion"]]
    rows[2] = {**rows[2], "completion": long}  # too long for max_length: no loss value
    result = evaluate.evaluate_candidate(
        model, tokenizer, rows, max_new_tokens=4, batch_size=3, max_length=48, num_samples=1,
        checker=lambda p, c: demo.check(demo.prompt_text(p), c),
        preference_rows=demo.generate_preference(cfg, 0, "eval"))
    for name, value in result.metrics.items():
        assert bootstrap.value(result.per_prompt[name]) == pytest.approx(value, rel=1e-6), name
    loss = result.per_prompt["eval_loss"]
    assert loss["num"][2] is None and all(v is not None for i, v in enumerate(loss["num"])
                                          if i != 2)
    examples = [e for e in (tokenize_sft_example(r, tokenizer, max_length=48, truncation="drop")
                            for r in rows) if e is not None]
    batches = [collate_padded(examples[i:i + 4], tokenizer.pad_token_id)
               for i in range(0, len(examples), 4)]
    want = evaluate_loss(SelectedLogits(model), batches, torch.device("cpu"))
    assert result.metrics["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert sum(n for n in loss["den"] if n) == sum(int((b["labels"][:, 1:] != -100).sum())
                                                   for b in batches)
    assert result.per_prompt["chosen_perplexity"]["group"] == "pairs"
    assert {"generate", "loss", "chosen_perplexity"} <= set(result.seconds)
    assert all(s >= 0 for s in result.seconds.values())
