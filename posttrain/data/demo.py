"""The built-in synthetic task family: tiny verifiable tasks with a planted systematic mistake.

Every later stage gets its data from this one generator, deterministic from a seed: SFT
demonstrations, preference pairs for the reward model / DPO / ORPO, KTO labels, and prompts whose
completions `check` scores for GRPO/PPO.

Tasks (prompt text -> answer), short and character-level friendly:

- ``add``:     ``"a+b="`` with single digits a, b           -> ``str(a + b)``
- ``reverse``: ``"rev xxxx"`` with 4 lowercase letters     -> the word reversed
- ``sort``:    ``"sort dddd"`` with 4 digits                -> the digits sorted ascending

Why a planted mistake: random wrong demonstrations would not survive greedy decoding (it returns the
majority answer, so SFT would learn the right one anyway). Instead each task has a *bug region*, a
learnable rule on the input, where a share ``bug_rate`` of the SFT demonstrations carries the same
systematic mistake. With bug_rate > 0.5 the SFT model learns the mistake there, which leaves
preference optimization and RL measurable room to fix it:

- ``add``:     a + b >= 13 (21% of prompts)            -> forgets the carry, e.g. 7+6= -> "3"
- ``reverse``: starts with a vowel, not a palindrome (~19%) -> returns the word unchanged
- ``sort``:    contains a 9, not all 9s (~34%)          -> puts the 9s first, the rest ascending

Inside the region the buggy answer always differs from the correct one (that is why palindromes and
"9999" are excluded), so ``check`` separates them.

Train and eval prompts are disjoint. ``add`` has only 100 distinct prompts: at most a fifth of each
task's prompt space is held out for eval, and training samples with replacement from the rest when
it asks for more prompts than remain.
"""

from __future__ import annotations

import copy
import random
import re
from typing import Any, Literal

from posttrain.config import DemoTaskConfig

Split = Literal["train", "eval"]
Message = dict[str, str]
Prompt = str | list[Message]

# No system prompt: it would add a dozen tokens to every sequence of a model that learns in a minute.
DEMO_SYSTEM_PROMPT: str | None = None

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_VOWELS = frozenset("aeiou")
_WORD_LEN = 4
# Size of each task's prompt space; prompts are addressed by an index into it.
_SPACE = {"add": 100, "reverse": len(_LETTERS) ** _WORD_LEN, "sort": 10**_WORD_LEN}
# Never hold out more than this share of a task's prompt space for eval (matters for "add").
_MAX_EVAL_SHARE = 0.2
_PATTERNS = {
    "add": re.compile(r"(\d)\+(\d)="),
    "reverse": re.compile(rf"rev ([a-z]{{{_WORD_LEN}}})"),
    "sort": re.compile(rf"sort (\d{{{_WORD_LEN}}})"),
}


# ------------------------------------------------------------------------------ prompts, checker


def prompt_text(prompt: Prompt) -> str:
    """The user text of a standard (string) or conversational (messages) prompt.

    Checkers and reward functions receive either format, so they all go through this.
    """
    if isinstance(prompt, str):
        return prompt.strip()
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError(f"conversational prompt has no user message: {prompt!r}")
    return users[-1].strip()


def parse_prompt(prompt: Prompt) -> tuple[str, str]:
    """(task, operand) of a demo prompt; the operand is "ab" for add, the word or digits otherwise."""
    text = prompt_text(prompt)
    for task, pattern in _PATTERNS.items():
        match = pattern.fullmatch(text)
        if match:
            return task, "".join(match.groups())
    raise ValueError(f"not a demo task prompt: {text!r}")


def task_of(prompt: Prompt) -> str:
    """Which demo task a prompt belongs to."""
    return parse_prompt(prompt)[0]


def correct_answer(prompt: Prompt) -> str:
    """The right answer to a demo prompt (standard or conversational)."""
    task, arg = parse_prompt(prompt)
    if task == "add":
        return str(int(arg[0]) + int(arg[1]))
    if task == "reverse":
        return arg[::-1]
    return "".join(sorted(arg))


def buggy_answer(prompt: Prompt) -> str:
    """The task's systematic mistake applied to the prompt.

    Demonstrations use it only inside the bug region, where it always differs from the correct
    answer; outside the region it may coincide with it (e.g. no carry to forget).
    """
    task, arg = parse_prompt(prompt)
    if task == "add":
        return str((int(arg[0]) + int(arg[1])) % 10)
    if task == "reverse":
        return arg
    nines = arg.count("9")
    return "9" * nines + "".join(sorted(c for c in arg if c != "9"))


def in_bug_region(prompt: Prompt) -> bool:
    """Whether the prompt lies in its task's bug region (a rule a small model can learn)."""
    task, arg = parse_prompt(prompt)
    if task == "add":
        return int(arg[0]) + int(arg[1]) >= 13
    if task == "reverse":
        return arg[0] in _VOWELS and arg != arg[::-1]
    return "9" in arg and set(arg) != {"9"}


def check(prompt: Prompt, completion: str | list[Message]) -> bool:
    """True when the completion (surrounding whitespace ignored) is the correct answer."""
    if not isinstance(completion, str):
        completion = "".join(m["content"] for m in completion if m.get("role") == "assistant")
    return completion.strip() == correct_answer(prompt)


def _prompt_at(task: str, index: int) -> str:
    """The index-th prompt of a task's prompt space."""
    if task == "add":
        return f"{index // 10}+{index % 10}="
    if task == "reverse":
        letters = []
        for _ in range(_WORD_LEN):
            index, r = divmod(index, len(_LETTERS))
            letters.append(_LETTERS[r])
        return "rev " + "".join(letters)
    return f"sort {index:0{_WORD_LEN}d}"


def _wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by one for add, one adjacent swap or changed symbol otherwise."""
    task, _ = parse_prompt(prompt)
    right = correct_answer(prompt)
    if task == "add":
        total = int(right)
        return str(total + 1 if total == 0 or rng.random() < 0.5 else total - 1)
    swaps = [i for i in range(len(right) - 1) if right[i] != right[i + 1]]
    if swaps:
        i = rng.choice(swaps)
        return right[:i] + right[i + 1] + right[i] + right[i + 2 :]
    alphabet = _LETTERS if task == "reverse" else "0123456789"
    other = rng.choice([c for c in alphabet if c != right[0]])
    return other + right[1:]


# --------------------------------------------------------------------------------- the splits


def _allocate(total: int, caps: dict[str, int]) -> dict[str, int]:
    """Split `total` as evenly as possible over tasks; what a capped task cannot take goes to the
    others (smallest caps are served first). Less than `total` only when every cap is reached."""
    counts = {}
    remaining = total
    ordered = sorted(caps, key=caps.__getitem__)
    for k, task in enumerate(ordered):
        fair = -(-remaining // (len(ordered) - k))  # ceil: the first tasks take the remainder
        counts[task] = min(caps[task], fair)
        remaining -= counts[task]
    return {task: counts[task] for task in caps}


def _task_indices(task: str, seed: int, n_eval: int, n_train: int) -> tuple[list[int], list[int]]:
    """Disjoint eval and train prompt indices for one task.

    The eval draw comes first from its own stream, so the eval set depends only on the seed and
    num_eval. Train prompts are unique while the rest of the space allows it; beyond that they
    cycle through freshly shuffled copies of the remaining prompts.
    """
    space = _SPACE[task]
    eval_idx = random.Random(f"demo:{seed}:{task}:eval").sample(range(space), n_eval)
    held = set(eval_idx)
    rng = random.Random(f"demo:{seed}:{task}:train")
    if n_train <= (space - n_eval) // 4:  # sparse: rejection sampling is fast
        chosen: dict[int, None] = {}
        while len(chosen) < n_train:
            i = rng.randrange(space)
            if i not in held:
                chosen[i] = None
        return eval_idx, list(chosen)
    pool = [i for i in range(space) if i not in held]
    train_idx: list[int] = []
    while len(train_idx) < n_train:
        rng.shuffle(pool)
        train_idx.extend(pool[: n_train - len(train_idx)])
    return eval_idx, train_idx


def _split_prompts(cfg: DemoTaskConfig, seed: int, split: Split) -> list[tuple[str, str]]:
    """(task, prompt text) pairs of one split, tasks mixed in a seeded order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    tasks = list(dict.fromkeys(cfg.tasks))
    eval_caps = {t: int(_SPACE[t] * _MAX_EVAL_SHARE) for t in tasks}
    n_eval = _allocate(cfg.num_eval, eval_caps)
    n_train = _allocate(cfg.num_train, {t: cfg.num_train for t in tasks})
    rows: list[tuple[str, str]] = []
    for task in tasks:
        eval_idx, train_idx = _task_indices(task, seed, n_eval[task], n_train[task])
        chosen = eval_idx if split == "eval" else train_idx
        rows.extend((task, _prompt_at(task, i)) for i in chosen)
    random.Random(f"demo:{seed}:{split}:order").shuffle(rows)
    return rows


# ------------------------------------------------------------------------------------ formats


def _user(text: str, conversational: bool) -> Prompt:
    if not conversational:
        return text
    messages = [{"role": "user", "content": text}]
    if DEMO_SYSTEM_PROMPT:
        messages.insert(0, {"role": "system", "content": DEMO_SYSTEM_PROMPT})
    return messages


def _reply(answer: str, conversational: bool) -> str | list[Message]:
    # Standard completions start with a space so that the concatenated text "rev abcd dcba" keeps
    # prompt and answer apart; the checker strips it.
    if not conversational:
        return " " + answer
    return [{"role": "assistant", "content": answer}]


def generate_prompts(cfg: DemoTaskConfig, seed: int, split: Split) -> list[dict[str, Any]]:
    """Prompt-only rows (GRPO, PPO, evaluation): prompt, task."""
    return [
        {"prompt": _user(text, cfg.conversational), "task": task}
        for task, text in _split_prompts(cfg, seed, split)
    ]


def generate_sft(cfg: DemoTaskConfig, seed: int, split: Split) -> list[dict[str, Any]]:
    """Prompt-completion rows: prompt, completion, task.

    Train demonstrations inside the bug region are wrong with probability bug_rate; eval rows are
    always correct, they are the held-out references.
    """
    rng = random.Random(f"demo:{seed}:{split}:sft")
    rows = []
    for task, text in _split_prompts(cfg, seed, split):
        buggy = split == "train" and in_bug_region(text) and rng.random() < cfg.bug_rate
        answer = buggy_answer(text) if buggy else correct_answer(text)
        rows.append(
            {
                "prompt": _user(text, cfg.conversational),
                "completion": _reply(answer, cfg.conversational),
                "task": task,
            }
        )
    return rows


CUT_OFF_EVERY = 10  # outside the bug region, every 10th pair rejects a cut-off answer


def generate_preference(cfg: DemoTaskConfig, seed: int, split: Split) -> list[dict[str, Any]]:
    """Preference rows: prompt, chosen (correct), rejected (the planted mistake in the bug region,
    otherwise a plausible wrong answer, or, in every CUT_OFF_EVERY-th pair, the correct answer
    cut off half-way), task.

    The cut-off answers show the reward model that a short answer is not a good one: trained on
    wrong answers of full length only, it scored an empty answer to a reversal above the correct
    one, and PPO on it learned to answer nothing (checker accuracy 0.69 -> 0.43 on one machine's
    float rounding)."""
    rng = random.Random(f"demo:{seed}:{split}:preference")
    rows = []
    for i, (task, text) in enumerate(_split_prompts(cfg, seed, split)):
        rejected = buggy_answer(text) if in_bug_region(text) else _wrong_answer(text, rng)
        answer = correct_answer(text)
        if i % CUT_OFF_EVERY == CUT_OFF_EVERY - 1 and not in_bug_region(text) and len(answer) > 1:
            rejected = answer[: len(answer) // 2]
        rows.append(
            {
                "prompt": _user(text, cfg.conversational),
                "chosen": _reply(correct_answer(text), cfg.conversational),
                "rejected": _reply(rejected, cfg.conversational),
                "task": task,
            }
        )
    return rows


def generate_kto(cfg: DemoTaskConfig, seed: int, split: Split) -> list[dict[str, Any]]:
    """Unpaired rows: prompt, completion, label, task.

    The preference pairs converted as ALGORITHMS.md says (chosen -> True, rejected -> False), so
    labels are balanced; shuffled so that a batch rarely holds both halves of one pair.
    """
    rows = []
    for pair in generate_preference(cfg, seed, split):
        for column, label in (("chosen", True), ("rejected", False)):
            rows.append(
                {
                    "prompt": copy.deepcopy(pair["prompt"]),  # rows must not share lists
                    "completion": pair[column],
                    "label": label,
                    "task": pair["task"],
                }
            )
    random.Random(f"demo:{seed}:{split}:kto").shuffle(rows)
    return rows
