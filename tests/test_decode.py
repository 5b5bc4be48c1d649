"""Decoding paths (posttrain/decoding.py) of posttrain.rollout.generate: the static-cache and compiled steps give the
loop's tokens for the same seed, record the same log-probs as a forward pass, and "auto" picks
and falls back as documented."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from pydantic import ValidationError
from transformers import CompileConfig

from posttrain import decoding
from posttrain import rollout as rollout_module
from posttrain.config import GRPOConfig, TinyModelConfig
from posttrain.logprobs import position_ids_from_mask
from posttrain.models import build_tiny_model, build_tiny_tokenizer
from posttrain.rollout import Rollout, generate, resolve_backend

PAD = 0
STOPS = set(range(40, 55))  # ~15% of the tiny model's mass: rows end at many different steps


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


def _sample(model, prompts, backend, seed=0, **kwargs) -> Rollout:
    args = {"num_samples": 8, "max_new_tokens": 10, "eos_token_ids": STOPS, "pad_token_id": PAD,
            "temperature": 0.7, "top_k": 50, "top_p": 0.95}
    args.update(kwargs)
    return generate(model, prompts, generator=torch.Generator().manual_seed(seed),
                    backend=backend, **args)


def _forward_logps(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of the sampled tokens from one forward over the sequences."""
    input_ids, attention_mask, _ = rollout.sequences()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits.float()
    per_token = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(
        -1, input_ids[:, 1:, None]).squeeze(-1)
    width = rollout.prompt_ids.shape[1]
    return per_token[:, width - 1 :] * rollout.completion_mask


def _assert_same(a: Rollout, b: Rollout) -> None:
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated",
                 "lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.logps - b.logps).abs().max().item() < 1e-5


def test_static_cache_gives_the_loops_tokens_for_the_same_seed(model, prompts):
    """Sampling at T = 0.7 with top-k/top-p, left-padded prompts, rows ending at different
    steps, three seeds: the same tokens, masks and flags on both paths, and on both the recorded
    log-probs equal one forward over the final sequences."""
    for seed in (0, 1, 2):
        loop = _sample(model, prompts, "loop", seed)
        static = _sample(model, prompts, "static", seed)
        _assert_same(loop, static)
        assert len(set(static.lengths.tolist())) >= 4 and static.truncated.any()
        for r in (loop, static):
            assert (r.logps - _forward_logps(model, r, 0.7)).abs().max().item() < 1e-4
    other = _sample(model, prompts, "static", seed=3)
    assert not torch.equal(other.completion_ids[:, :3], static.completion_ids[:, :3])


def test_static_cache_across_the_64_token_bucket_and_greedy(model, prompts):
    """8 prompt + 60 new tokens need a cache of 128 (two buckets of 64); greedy, no stop."""
    kwargs = {"temperature": 0.0, "max_new_tokens": 60, "eos_token_ids": 10_000}
    loop, static = _sample(model, prompts, "loop", **kwargs), _sample(model, prompts, "static",
                                                                          **kwargs)
    _assert_same(loop, static)
    assert static.completion_ids.shape == (24, 60) and static.truncated.all()
    assert (static.logps - _forward_logps(model, static, 1.0)).abs().max().item() < 1e-4


def test_static_prefix_is_encoded_once_and_mode_restored(model, prompts):
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    model.train()
    try:
        _sample(model, prompts, "static", eos_token_ids=10_000, max_new_tokens=4, num_samples=2)
        assert model.training
    finally:
        hook.remove()
        model.eval()
    assert shapes == [(6, 8), (6, 1), (6, 1), (6, 1)]


def _eager_dynamo(device):
    # Dynamo's whole-graph capture (fullgraph=True) without inductor's C++ build: what can break
    # the compiled path (graph breaks, guards on the cache) shows here in seconds.
    return CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)


def test_compiled_step_captures_one_graph_and_gives_the_loops_tokens(model, prompts, monkeypatch):
    monkeypatch.setattr(decoding, "_compile_config", _eager_dynamo)
    torch._dynamo.reset()
    loop = _sample(model, prompts, "loop", max_new_tokens=6)
    compiled = _sample(model, prompts, "compiled", max_new_tokens=6)
    _assert_same(loop, compiled)
    cache = decoding._CACHES[model][1]
    keys = cache.layers[0].keys.data_ptr()
    again = _sample(model, prompts, "compiled", seed=1, max_new_tokens=6)  # reuses the graph
    _assert_same(_sample(model, prompts, "loop", seed=1, max_new_tokens=6), again)
    # ... and the cache, reset in place (fixed addresses for CUDA graphs)
    assert decoding._CACHES[model][1] is cache and cache.layers[0].keys.data_ptr() == keys
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the decode step, whole
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_last_compile_config", None)
    decoding._CACHES.pop(model)


@pytest.mark.slow
@pytest.mark.skipif(decoding.compile_available(torch.device("cpu")) is not None,
                    reason="torch.compile cannot build on this CPU")
def test_inductor_compiled_step_gives_the_loops_tokens(tok, prompts):
    """The real compiled path on the CPU (inductor's C++ kernels; 10-90 s to build)."""
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok).eval()
    loop = _sample(model, prompts, "loop", max_new_tokens=6)
    compiled = _sample(model, prompts, "compiled", max_new_tokens=6)
    _assert_same(loop, compiled)
    assert (compiled.logps - _forward_logps(model, compiled, 0.7)).abs().max().item() < 1e-4


def test_auto_picks_the_loop_on_cpu_and_logs_the_path(model, prompts, caplog):
    assert resolve_backend(model, "auto") == "loop"
    assert resolve_backend(model, "static") == "static"
    with caplog.at_level(logging.DEBUG, logger="posttrain.rollout"):
        _sample(model, prompts, "auto", max_new_tokens=2)
        _sample(model, prompts, "static", max_new_tokens=2)
    assert "rollout decoding on cpu: loop (DynamicCache, eager steps)" in caplog.text
    assert "rollout decoding on cpu: static (StaticCache, eager steps)" in caplog.text
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend(model, "fast")


def test_models_without_static_cache_support_use_the_loop(tok, monkeypatch):
    other = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok)
    monkeypatch.setattr(other, "_can_compile_fullgraph", False)
    assert resolve_backend(other, "auto") == "loop"
    with pytest.raises(ValueError, match="static KV cache"):
        resolve_backend(other, "static")


def test_explicit_compiled_without_a_compiler_raises(model, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        resolve_backend(model, "compiled")


def test_auto_falls_back_to_the_loop_with_the_same_draws(tok, prompts, monkeypatch, caplog):
    """A compiled step that fails at the first decode step (after the prefill already drew from
    the generator): "auto" rewinds the generator and gives exactly the loop's rollout,
    warns, and does not try to compile that model again."""
    fresh = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tok).eval()
    calls = []

    def broken(config):
        def call(**kwargs):
            calls.append(1)
            raise RuntimeError("inductor: no luck")
        return call

    monkeypatch.setattr(fresh, "get_compiled_call", broken)
    real = rollout_module.resolve_backend
    monkeypatch.setattr(rollout_module, "resolve_backend",  # as on a GPU
                        lambda m, b="auto": "compiled" if b == "auto" else real(m, b))
    with caplog.at_level(logging.WARNING, logger="posttrain.rollout"):
        fallback = _sample(fresh, prompts, "auto")
    _assert_same(_sample(fresh, prompts, "loop"), fallback)
    assert calls == [1] and "compiled step failed (RuntimeError: inductor: no luck)" in caplog.text
    assert fresh in decoding.COMPILE_FAILED
    assert real(fresh, "auto") == "loop"
    with pytest.raises(RuntimeError, match="no luck"):  # an explicit choice does not fall back
        _sample(fresh, prompts, "compiled")


def test_grpo_config_field_reaches_generate(monkeypatch):
    from posttrain.recipes import grpo

    with pytest.raises(ValidationError):
        GRPOConfig(generation_backend="fast")
    seen = {}
    monkeypatch.setattr(grpo, "generate", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(grpo, "stop_token_ids", lambda *a: {1})
    tokenizer = type("T", (), {"pad_token_id": 0})()
    grpo._sample(None, [{"prompt_ids": [5]}], GRPOConfig(generation_backend="loop"), tokenizer,
                 None)
    assert seen["backend"] == "loop"
