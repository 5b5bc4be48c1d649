"""KV-cached batched sampling: recorded log-probs equal a training forward, layout, greedy parity."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.logprobs import position_ids_from_mask
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.rollout import Rollout, completion_logps, filter_logits, generate, left_pad

PAD = 0
# The random tiny model is close to uniform over ~105 tokens, so its own EOS would almost never
# come. Treating 15 ids as stop tokens ends ~15% of the rows per step: rows stop at many different
# steps and a few run out of tokens, which is what the tests need.
STOPS = set(range(40, 55))


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    # 1, 4 and 8 tokens: left padding of 7, 4 and 0.
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("x", "3+4=", "rev abcd")]


def _sample(model, prompts, seed=0, **kwargs) -> Rollout:
    args = {"num_samples": 4, "max_new_tokens": 10, "eos_token_ids": STOPS, "pad_token_id": PAD}
    args.update(kwargs)
    return generate(model, prompts, generator=torch.Generator().manual_seed(seed), **args)


def _full_forward_logps(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The simple version: full (N, P+C, V) logits, log_softmax, gather; (N, C) on completions."""
    input_ids, attention_mask, _ = rollout.sequences()
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits.float()
    logps = torch.log_softmax(logits[:, :-1] / temperature, -1)
    per_token = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, P+C-1)
    width = rollout.prompt_ids.shape[1]
    return per_token[:, width - 1 :] * rollout.completion_mask


def test_recorded_logps_equal_one_training_forward(model, prompts):
    """Left-padded prompts of 1, 4 and 8 tokens, 8 samples each, rows ending at different steps:
    the log-probs recorded while sampling (at temperature 0.7, with top-k/top-p filters that
    must not change them) equal log softmax(logits / 0.7) of one forward over the sequences."""
    rollout = _sample(model, prompts, num_samples=8, temperature=0.7, top_k=50, top_p=0.95)
    lengths = rollout.lengths.tolist()
    assert len(set(lengths)) >= 4, lengths  # rows stopped at many different steps
    assert rollout.truncated.any() and not rollout.truncated.all()

    reference = _full_forward_logps(model, rollout, 0.7)
    assert (rollout.logps - reference).abs().max().item() < 1e-4
    with torch.no_grad():
        fast = completion_logps(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=0.7,
        )
    assert (rollout.logps - fast).abs().max().item() < 1e-4
    assert (fast[rollout.completion_mask == 0] == 0).all()


def test_layout_of_prompts_completions_and_masks(model, prompts):
    rollout = _sample(model, prompts)
    n, width = 12, 8
    assert rollout.prompt_ids.shape == (n, width)
    # Rows i*G .. i*G+G-1 belong to prompt i, left-padded.
    for row in range(n):
        ids = prompts[row // 4]
        pad = width - len(ids)
        assert rollout.prompt_ids[row].tolist() == [PAD] * pad + ids
        assert rollout.prompt_mask[row].tolist() == [0] * pad + [1] * len(ids)

    c = rollout.completion_ids.shape[1]
    assert c == rollout.lengths.max().item() <= 10
    for row in range(n):
        length = rollout.lengths[row].item()
        ids = rollout.completion_ids[row].tolist()
        assert rollout.completion_mask[row].tolist() == [1] * length + [0] * (c - length)
        assert ids[length:] == [PAD] * (c - length)
        assert (rollout.logps[row, length:] == 0).all()
        assert (rollout.logps[row, :length] < 0).all()
        stops = [i for i, t in enumerate(ids[:length]) if t in STOPS]
        if rollout.truncated[row]:
            assert stops == [] and length == 10
        else:
            assert stops == [length - 1]  # the EOS is the last completion token, and the only one

    input_ids, attention_mask, completion_mask = rollout.sequences()
    assert input_ids.shape == attention_mask.shape == completion_mask.shape == (n, width + c)
    assert torch.equal(input_ids[:, width:], rollout.completion_ids)
    assert torch.equal(completion_mask.sum(-1), rollout.lengths)
    assert (completion_mask[:, :width] == 0).all()


def _uncached_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The simple version: no padding, no cache, the whole sequence re-encoded every step."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in STOPS:
                break
    return out


def test_cached_greedy_equals_uncached_reference(model, prompts):
    rollout = _sample(model, prompts, num_samples=1, temperature=0.0, max_new_tokens=12)
    for row, ids in enumerate(prompts):
        expected = _uncached_greedy(model, ids, 12)
        length = rollout.lengths[row].item()
        assert rollout.completion_ids[row, :length].tolist() == expected
    # Greedy log-probs are recorded at temperature 1.
    reference = _full_forward_logps(model, rollout, 1.0)
    assert (rollout.logps - reference).abs().max().item() < 1e-4


def test_top_k_1_is_greedy_and_seeds_are_reproducible(model, prompts):
    greedy = _sample(model, prompts, temperature=0.0)
    top1 = _sample(model, prompts, temperature=1.0, top_k=1, seed=5)
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    assert torch.allclose(top1.logps, greedy.logps)  # both at temperature 1

    a, b = _sample(model, prompts, seed=3), _sample(model, prompts, seed=3)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logps, b.logps)
    c = _sample(model, prompts, seed=4)
    assert not torch.equal(a.completion_ids[:, :3], c.completion_ids[:, :3])


def test_top_k_samples_only_from_the_k_most_likely(model, prompts):
    rollout = _sample(model, prompts, top_k=2, temperature=1.0)
    input_ids, attention_mask, _ = rollout.sequences()
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits
    width = rollout.prompt_ids.shape[1]
    top2 = logits[:, width - 1 : -1].topk(2, dim=-1).indices  # (N, C, 2)
    hit = (top2 == rollout.completion_ids[..., None]).any(-1)
    assert hit[rollout.completion_mask.bool()].all()


def test_truncation_flags(model, prompts):
    every_token_stops = _sample(model, prompts, eos_token_ids=set(range(200)))
    assert every_token_stops.completion_ids.shape == (12, 1)
    assert every_token_stops.lengths.tolist() == [1] * 12
    assert not every_token_stops.truncated.any()

    no_stop = _sample(model, prompts, eos_token_ids=10_000, max_new_tokens=5)
    assert no_stop.truncated.all()
    assert no_stop.lengths.tolist() == [5] * 12


def test_prefix_is_encoded_once(model, prompts):
    """One prefill over the (N, P) prompts, then only (N, 1) inputs: the cache carries the rest."""
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        rollout = _sample(model, prompts, eos_token_ids=10_000, max_new_tokens=4, num_samples=2)
    finally:
        hook.remove()
    assert shapes == [(6, 8), (6, 1), (6, 1), (6, 1)]
    assert rollout.completion_ids.shape == (6, 4)


def test_model_mode_is_restored(model, prompts):
    model.train()
    try:
        _sample(model, prompts, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_filter_logits_by_hand():
    """Probabilities (0.5, 0.3, 0.15, 0.05). top_p = 0.7: mass before each token is
    (0, 0.5, 0.8, 0.95), tokens whose preceding mass already reaches 0.7 go -> keep {0, 1}.
    top_k = 3 drops the 0.05 token. Order in the row does not matter (token 0 last here)."""
    probs = torch.tensor([[0.3, 0.15, 0.05, 0.5]])
    logits = probs.log()
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, False, False, True]]
    kept = filter_logits(logits, top_k=3).isfinite()
    assert kept.tolist() == [[True, True, False, True]]
    assert filter_logits(logits, top_p=0.1).isfinite().sum() == 1  # at least the best one
    renormalized = filter_logits(logits, top_p=0.7).softmax(-1)
    assert renormalized[0, 3].item() == pytest.approx(0.5 / 0.8)
    assert math.isclose(renormalized[0, 0].item(), 0.3 / 0.8, rel_tol=1e-6)


def test_validation(model):
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1, 2], []], PAD)
    with pytest.raises(ValueError):
        generate(model, [[5]], max_new_tokens=0, eos_token_ids=1, pad_token_id=PAD)
    with pytest.raises(ValueError):
        generate(model, [[5]], max_new_tokens=2, top_p=0.0, eos_token_ids=1, pad_token_id=PAD)


def test_a_shard_samples_the_rows_of_the_global_batch(model, prompts):
    """prompt_offset / global_prompts: the shards of a global batch, each sampled with its own
    generator in the same state (as the processes of a launch hold it), give exactly the rows
    the whole batch gives, completion for completion, even where a shard stops decoding earlier
    or its prompts are padded to another width; a wrong offset is refused."""
    n = len(prompts)
    assert n >= 2
    kw = {"temperature": 0.9, "top_k": 20, "top_p": 0.95}
    whole = _sample(model, prompts, seed=7, **kw)
    for lo, hi in ((0, 1), (1, n)):
        shard = _sample(model, prompts[lo:hi], seed=7, prompt_offset=lo, global_prompts=n, **kw)
        rows = slice(lo * 4, hi * 4)
        width = shard.completion_ids.shape[1]
        assert torch.equal(shard.completion_ids, whole.completion_ids[rows, :width])
        assert torch.equal(shard.completion_mask, whole.completion_mask[rows, :width])
        assert (whole.completion_mask[rows, width:] == 0).all()  # only padding beyond
        assert torch.allclose(shard.logps, whole.logps[rows, :width], atol=1e-5)
    # Without the offset the second shard draws the first rows' noise: other completions.
    alone = _sample(model, prompts[1:], seed=7, **kw)
    assert not torch.equal(alone.completion_ids[:, :3], whole.completion_ids[4:, :3])
    with pytest.raises(ValueError, match="not within a global batch"):
        _sample(model, prompts[1:], prompt_offset=1, global_prompts=1)
