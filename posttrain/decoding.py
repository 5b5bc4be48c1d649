"""The decoding paths of `posttrain.rollout.generate`: one KV-cached forward per new token.

Three decoding paths (`backend`), one token loop: sampling, EOS stopping, padding and the
seeded generator's draws are the same code on all of them, so a seed gives the same tokens
(tested; the logits agree to ~1e-6, so only an exact tie between two draws could differ).
- "loop": a `DynamicCache` whose keys/values and 2-D mask grow by one column per step.
- "static": a `StaticCache` preallocated for prompt + max_new_tokens (rounded up to 64) and a
  preallocated mask filled column by column: every decode step has the same shapes and tensor
  addresses. The prefill is always eager (its shape changes with every batch).
- "compiled": the static path with the decode step compiled by transformers'
  `get_compiled_call` (torch.compile, fullgraph, static shapes; mode="reduce-overhead", i.e.
  CUDA graphs, on a GPU). One graph per (rows, cache length): later batches of the same shape
  reuse it, and its cache. Under "auto", a compile failure falls back to "loop" with a warning
  (the generator rewound, so the draws are the same) and the model is not compiled again.
"auto" picks compiled on a GPU and the loop on the CPU, where neither the static cache nor the
compiled step is faster and compiling costs 10-22 s per shape (benchmarks/bench_decode.py).
"""

from __future__ import annotations

import inspect
import logging
import shutil
import weakref

import torch
from transformers import CompileConfig, DynamicCache, StaticCache

from posttrain.logprobs import position_ids_from_mask

# The records keep the name of the module users call (`generate`) and configure logging for.
log = logging.getLogger("posttrain.rollout")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's cache argument: `cache` in recent transformers 5, `past_key_values` before."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


BACKENDS = ("auto", "loop", "static", "compiled")
# Models (by identity) whose compiled decode step failed under "auto": they stay on "loop".
COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()
# The paths each model has decoded with: the first use of a path is logged at INFO, later at DEBUG.
_LOGGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_available(device: torch.device) -> str | None:
    """Why torch.compile cannot build a decode step on `device` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none is on PATH"
    if device.type not in ("cpu", "cuda"):
        return f"no compiled decode step on {device.type}"
    return None


def resolve_backend(model: torch.nn.Module, backend: str = "auto") -> str:
    """The decoding path `generate` takes for `backend` (see the module docstring).

    auto: "compiled" on a GPU (CUDA graphs through mode="reduce-overhead") for models that
    support transformers' static cache, "loop" otherwise: on the CPU neither the static cache
    nor inductor's step beat the loop (0.83-1.01x its tokens/s, plus 10-22 s of compile per
    batch shape: benchmarks/RESULTS.md, "Decoding paths"). An explicit backend that cannot run
    raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"generation backend must be one of {BACKENDS}, got {backend!r}")
    base = base_model(model)
    static_ok = bool(getattr(base, "_can_compile_fullgraph", False)) and hasattr(
        base, "get_compiled_call"
    )
    device = next(model.parameters()).device
    if backend == "loop":
        return "loop"
    if backend in ("static", "compiled") and not static_ok:
        raise ValueError(f"{type(base).__name__} does not support a static KV cache; use "
                         "generation_backend 'loop'")
    if backend == "compiled" and (why := compile_available(device)):
        raise ValueError(f"generation_backend 'compiled': {why}")
    if backend != "auto":
        return backend
    usable = static_ok and compile_available(device) is None and base not in COMPILE_FAILED
    return "compiled" if device.type == "cuda" and usable else "loop"


def _compile_config(device: torch.device) -> CompileConfig:
    # CUDA graphs on the GPU remove the per-kernel launches that bound a small decode step; on the
    # CPU there are none to remove and inductor's default mode is the one that works there.
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return CompileConfig(fullgraph=True, dynamic=False, mode=mode)


# The compiled path keeps its model's last StaticCache (model -> (shape key, cache)) and resets it
# in place for the next batch of the same shape: CUDA graphs replay on fixed addresses, and a new
# cache every step would make them re-record. Costs the cache's memory between rollouts.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_cache(base, rows: int, length: int, device: torch.device, keep: bool) -> StaticCache:
    if not keep:
        return StaticCache(config=base.config, max_cache_len=length)
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    key = (rows, length, str(device), str(autocast))
    held = _CACHES.get(base)
    if held is not None and held[0] == key:
        held[1].reset()
        return held[1]
    cache = StaticCache(config=base.config, max_cache_len=length)
    _CACHES[base] = (key, cache)
    return cache


def _bucket(length: int) -> int:
    """Cache lengths are rounded up to a multiple of 64 so that a compiled step (one graph per
    shape) is reused across batches whose longest prompts differ by a few tokens."""
    return -(-length // 64) * 64


class DynamicDecoder:
    """Today's loop: a `DynamicCache` and a 2-D mask that grows by one column per step."""

    def __init__(self, model, prompt, prompt_mask, max_new_tokens: int):
        self.model, self.cache_kwarg = model, cache_kwarg(model)
        self.cache = DynamicCache(config=model.config)
        self.attention = prompt_mask

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.attention,
            position_ids=position_ids_from_mask(self.attention)[:, -ids.shape[1] :],
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        return out.logits[:, -1].float()

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:  # (N, V)
        return self._forward(prompt)

    def step(self, ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:  # (N, 1), (N,)
        self.attention = torch.cat([self.attention, alive.long()[:, None]], dim=1)
        return self._forward(ids)


class StaticDecoder:
    """A transformers `StaticCache` of fixed length and a preallocated (N, L) mask filled one
    column per step, so every decode step has the same shapes and tensor addresses (what
    torch.compile and CUDA graphs need). Positions equal the loop's: real tokens seen so far - 1.
    """

    def __init__(self, model, prompt, prompt_mask, max_new_tokens: int, compiled: bool):
        n, self.width = prompt.shape
        base = base_model(model)
        self.model, self.cache_kwarg, self.t = model, cache_kwarg(model), 0
        length, device = _bucket(self.width + max_new_tokens), prompt.device
        self.cache = _static_cache(base, n, length, device, keep=compiled)
        self.attention = prompt_mask.new_zeros(n, length)
        self.attention[:, : self.width] = prompt_mask
        self.seen = prompt_mask.sum(-1)  # (N,) real tokens so far
        self.call = base.get_compiled_call(_compile_config(device)) if compiled else model
        self.mark_step = compiled and device.type == "cuda"

    def _forward(self, call, ids, positions) -> torch.Tensor:
        out = call(input_ids=ids, attention_mask=self.attention, position_ids=positions,
                   use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1].float()

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        # The prefill runs eagerly: its shape changes with every batch of prompts.
        positions = position_ids_from_mask(self.attention[:, : self.width])
        return self._forward(self.model, prompt, positions)

    def step(self, ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        self.attention[:, self.width + self.t] = alive.long()
        self.t += 1
        self.seen = self.seen + alive.long()
        positions = (self.seen - 1).clamp(min=0)[:, None]
        if self.mark_step:  # a new CUDA-graph replay; the previous step's logits are consumed
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._forward(self.call, ids, positions)
        # A CUDA-graph replay reuses its output buffers: keep a copy of its logits.
        return logits.clone() if self.mark_step else logits


def decode(decoder, prompt, max_new_tokens, sample, eos, pad_token_id):
    """The token loop shared by every path: sampling, EOS stopping and padding of ended rows."""
    n = prompt.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=prompt.device)
    tokens, logps, masks = [], [], []
    logits = decoder.prefill(prompt)
    for _ in range(max_new_tokens):
        token, logp = sample(logits)
        alive = ~done
        tokens.append(torch.where(alive, token, pad_token_id))
        logps.append(torch.where(alive, logp, 0.0))
        masks.append(alive.long())
        done = done | torch.isin(token, eos)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        # Rows that ended keep feeding (masked) pad tokens: the batch shape stays fixed.
        logits = decoder.step(tokens[-1][:, None], masks[-1])
    return tokens, logps, masks, done


def log_path(model, backend: str) -> None:
    seen = _LOGGED.setdefault(model, set())
    level = logging.DEBUG if backend in seen else logging.INFO
    seen.add(backend)
    device = next(model.parameters()).device
    how = {"loop": "DynamicCache, eager steps", "static": "StaticCache, eager steps",
           "compiled": f"StaticCache, torch.compile(mode={_compile_config(device).mode!r})"}
    log.log(level, "rollout decoding on %s: %s (%s)", device, backend, how[backend])


