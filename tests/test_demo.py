"""The built-in demo tasks: determinism, disjoint splits, checker, planted mistake, formats."""

from __future__ import annotations

import itertools
import string

import pytest

from posttrain.config import DemoTaskConfig
from posttrain.data import demo

CFG = DemoTaskConfig(num_train=3000, num_eval=150)
GENERATORS = [demo.generate_sft, demo.generate_preference, demo.generate_kto, demo.generate_prompts]


def _all_prompts(task: str) -> list[str]:
    """The whole prompt space of a task, enumerated independently of the generator."""
    if task == "add":
        return [f"{a}+{b}=" for a in range(10) for b in range(10)]
    if task == "sort":
        return [f"sort {i:04d}" for i in range(10_000)]
    return ["rev " + "".join(w) for w in itertools.product(string.ascii_lowercase, repeat=4)]


@pytest.mark.parametrize("generate", GENERATORS)
def test_generators_are_deterministic_per_seed(generate):
    assert generate(CFG, 3, "train") == generate(CFG, 3, "train")
    assert generate(CFG, 3, "eval") == generate(CFG, 3, "eval")
    assert generate(CFG, 3, "train") != generate(CFG, 4, "train")


def test_train_and_eval_prompts_are_disjoint_for_every_task():
    cfg = DemoTaskConfig(num_train=6000, num_eval=300)  # add: 2000 train rows from 80 prompts
    train = {demo.prompt_text(r["prompt"]) for r in demo.generate_prompts(cfg, 0, "train")}
    evals = [demo.prompt_text(r["prompt"]) for r in demo.generate_prompts(cfg, 0, "eval")]
    assert len(evals) == 300 and len(set(evals)) == 300  # unique eval prompts
    assert not train & set(evals)
    eval_tasks = [demo.task_of(p) for p in evals]
    assert eval_tasks.count("add") == 20  # a fifth of the 100 add prompts is held out
    assert {"add", "reverse", "sort"} == set(eval_tasks)
    assert len({p for p in train if demo.task_of(p) == "add"}) == 80  # all the rest is trained on


def test_eval_set_does_not_depend_on_num_train():
    small, big = DemoTaskConfig(num_train=100), DemoTaskConfig(num_train=5000)
    assert demo.generate_prompts(small, 1, "eval") == demo.generate_prompts(big, 1, "eval")


def test_row_counts_and_task_mix():
    rows = demo.generate_sft(CFG, 0, "train")
    assert len(rows) == 3000
    per_task = {t: sum(r["task"] == t for r in rows) for t in CFG.tasks}
    assert per_task == dict.fromkeys(CFG.tasks, 1000)
    only_add = DemoTaskConfig(tasks=("add",), num_train=10, num_eval=50)
    assert len(demo.generate_sft(only_add, 0, "eval")) == 20  # capped: add has 100 prompts


@pytest.mark.parametrize("task", ["add", "reverse", "sort"])
def test_checker_accepts_correct_and_rejects_buggy_answers(task):
    for prompt in _all_prompts(task)[::97]:
        right = demo.correct_answer(prompt)
        assert demo.check(prompt, right)
        assert demo.check(prompt, f"  {right}\n")  # whitespace is ignored
        assert demo.check([{"role": "user", "content": prompt}], right)
        if demo.in_bug_region(prompt):
            assert not demo.check(prompt, demo.buggy_answer(prompt))


def test_answers_by_hand():
    assert demo.correct_answer("7+6=") == "13" and demo.buggy_answer("7+6=") == "3"
    assert demo.in_bug_region("7+6=") and not demo.in_bug_region("6+6=")
    assert demo.correct_answer("rev abcd") == "dcba" and demo.buggy_answer("rev abcd") == "abcd"
    assert demo.in_bug_region("rev abcd") and not demo.in_bug_region("rev bcda")
    assert not demo.in_bug_region("rev abba")  # palindrome: the mistake would be right
    assert demo.correct_answer("sort 3915") == "1359" and demo.buggy_answer("sort 3915") == "9135"
    assert demo.in_bug_region("sort 3915") and not demo.in_bug_region("sort 9999")
    assert not demo.check("3+4=", "8")
    with pytest.raises(ValueError):
        demo.check("what is 3+4?", "7")


@pytest.mark.parametrize("task", ["add", "reverse", "sort"])
def test_bug_region_share_is_in_band_and_buggy_always_differs(task):
    """Exact over the prompt space: add 21/100, reverse 5/26 minus palindromes, sort 1-0.9^4-1e-4."""
    prompts = _all_prompts(task)
    region = [p for p in prompts if demo.in_bug_region(p)]
    share = len(region) / len(prompts)
    assert 0.15 <= share <= 0.35, share
    assert all(demo.buggy_answer(p) != demo.correct_answer(p) for p in region)
    expected = {"add": 0.21, "reverse": (5 * 26**3 - 5 * 26) / 26**4, "sort": 0.3438}
    assert share == pytest.approx(expected[task])


def test_sft_train_carries_the_bug_at_bug_rate_inside_region_only():
    for bug_rate in (0.8, 0.3):
        cfg = DemoTaskConfig(num_train=6000, bug_rate=bug_rate)
        inside = wrong_inside = 0
        for row in demo.generate_sft(cfg, 0, "train"):
            correct = demo.check(row["prompt"], row["completion"])
            if demo.in_bug_region(row["prompt"]):
                inside += 1
                wrong_inside += not correct
                if not correct:  # the wrong answer is the systematic one, not noise
                    assert row["completion"][0]["content"] == demo.buggy_answer(row["prompt"])
            else:
                assert correct
        # ~1500 in-region rows: binomial std ~0.011, so 0.04 is > 3.5 sigma
        assert wrong_inside / inside == pytest.approx(bug_rate, abs=0.04)


def test_sft_eval_rows_are_always_correct():
    rows = demo.generate_sft(DemoTaskConfig(bug_rate=1.0), 0, "eval")
    assert all(demo.check(r["prompt"], r["completion"]) for r in rows)


def test_preference_chosen_passes_and_rejected_fails():
    for row in demo.generate_preference(CFG, 0, "train"):
        assert demo.check(row["prompt"], row["chosen"])
        assert not demo.check(row["prompt"], row["rejected"])
        if demo.in_bug_region(row["prompt"]):
            assert row["rejected"][0]["content"] == demo.buggy_answer(row["prompt"])


def test_some_preference_pairs_reject_an_answer_cut_off_half_way():
    """A reward model that never saw a short answer scored an empty one above the correct one
    (and PPO learned to answer nothing): a tenth of the pairs outside the bug region reject the
    correct answer cut off half-way."""
    rows = demo.generate_preference(CFG, 0, "train")
    cut = [r for r in rows if demo.correct_answer(r["prompt"][0]["content"]).startswith(
        r["rejected"][0]["content"])]
    assert cut and all(not demo.in_bug_region(r["prompt"]) for r in cut)
    assert 0.05 < len(cut) / len(rows) < 0.1
    assert all(len(r["rejected"][0]["content"]) * 2 <= len(r["chosen"][0]["content"])
               for r in cut)


def test_kto_labels_agree_with_checker_and_are_balanced():
    rows = demo.generate_kto(CFG, 0, "train")
    assert len(rows) == 2 * CFG.num_train
    assert all(demo.check(r["prompt"], r["completion"]) == r["label"] for r in rows)
    assert sum(r["label"] for r in rows) == CFG.num_train


def test_conversational_and_standard_shapes():
    conv = DemoTaskConfig(num_train=30, num_eval=9)
    std = DemoTaskConfig(num_train=30, num_eval=9, conversational=False)
    row = demo.generate_sft(conv, 0, "train")[0]
    assert set(row) == {"prompt", "completion", "task"}
    assert [m["role"] for m in row["prompt"]] == ["user"]  # no system prompt
    assert [m["role"] for m in row["completion"]] == ["assistant"]
    plain = demo.generate_sft(std, 0, "train")[0]
    assert plain["prompt"] == row["prompt"][0]["content"]
    assert plain["completion"] == " " + row["completion"][0]["content"]
    pref = demo.generate_preference(std, 0, "eval")[0]
    assert set(pref) == {"prompt", "chosen", "rejected", "task"}
    assert all(isinstance(pref[k], str) for k in ("prompt", "chosen", "rejected"))
    kto = demo.generate_kto(conv, 0, "train")[0]
    assert set(kto) == {"prompt", "completion", "label", "task"} and isinstance(kto["label"], bool)
    prompt_row = demo.generate_prompts(std, 0, "train")[0]
    assert set(prompt_row) == {"prompt", "task"} and isinstance(prompt_row["prompt"], str)
    assert demo.prompt_text(row["prompt"]) == demo.prompt_text(plain["prompt"])
    for r in demo.generate_sft(std, 0, "train"):
        assert demo.task_of(r["prompt"]) == r["task"]
