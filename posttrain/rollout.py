"""Batched, KV-cached sampling for GRPO/PPO that records the log-prob of every sampled token.

`generate` runs the model's own forward with a transformers KV cache instead of
`model.generate`, so the sampling distribution is the model's own (the recorded log-probs equal
a forward pass in the same mode and precision, tested). The losses do not take π_old from these
recorded values, though: sampling runs in eval mode and, on a GPU, in another precision than the
training forward (bf16 autocast differs by ~1e-2), so GRPO and PPO take π_old from the training
forward itself (first-pass ratio exactly 1); the recorded values give GRPO's `entropy` metric.
All prompts × `num_samples` rows are decoded at once: one
prefill forward over the left-padded prompts, then one forward per new token that feeds only the
last token and reuses the cache (the prefix is never re-encoded). Position ids come from the
attention mask, so a left-padded prompt sees the same positions as an unpadded one, as in the
training forward (`posttrain.logprobs.position_ids_from_mask`).

Which log-probs are recorded: log softmax(logits / temperature) of the sampled token, i.e. under
the temperature-scaled model distribution but BEFORE top-k / top-p filtering. That is the
distribution TRL and verl use for π_old when the temperature is not 1 (their training forward
divides the logits by the same temperature and knows nothing of the filters);
`completion_logps` is that training forward.
Temperature 0 means greedy decoding; its log-probs are taken at temperature 1.

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
from dataclasses import dataclass

import torch
from transformers import CompileConfig, DynamicCache, StaticCache

from posttrain.logprobs import SelectedLogits, position_ids_from_mask, token_logps

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """Sampled completions, row i·G + g being sample g of prompt i (G = num_samples).

    C is the longest completion actually generated (at most max_new_tokens): decoding stops as
    soon as every row has ended.
    """

    prompt_ids: torch.Tensor  # (N, P) long, left-padded with the pad id
    prompt_mask: torch.Tensor  # (N, P) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, C) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (N, C) long, 1 on generated tokens up to and including EOS
    logps: torch.Tensor  # (N, C) float32, log-probs of the sampled tokens (0 on padding)
    truncated: torch.Tensor  # (N,) bool, no EOS within max_new_tokens
    lengths: torch.Tensor  # (N,) long, completion_mask.sum(-1)
    # Multi-turn rollouts (posttrain/multiturn.py) only: 1 on the tokens the model wrote, 0 on
    # tool results and environment messages (TRL's tool_mask); None: every completion token is
    # the model's. `episodes` holds their conversations.
    tool_mask: torch.Tensor | None = None  # (N, C) long
    episodes: list | None = None

    @property
    def model_mask(self) -> torch.Tensor:
        """(N, C): the completion tokens the model wrote (completion_mask · tool_mask)."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * self.tool_mask

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, completion_mask), each (N, P + C), for training forwards.

        The completion mask is aligned with input_ids (0 over the prompt), the convention of
        `posttrain.logprobs.sequence_logps`.
        """
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        completion_mask = torch.cat(
            [torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1
        )
        return input_ids, attention_mask, completion_mask


def left_pad(
    prompt_ids: list[list[int]], pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, mask), each (B, P), left-padded to the longest prompt."""
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    width = max(len(ids) for ids in prompt_ids)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompt_ids]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(N, V) logits with tokens outside the top-k / top-p (nucleus) set at -inf.

    top_k = 0 and top_p = 1 leave the logits as they are. Nucleus keeps the smallest set of most
    probable tokens whose probability reaches top_p (always at least the most probable one).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # A token is dropped when the tokens before it already reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's cache argument: `cache` in recent transformers 5, `past_key_values` before."""
    params = inspect.signature(_base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _next_tokens(
    logits: torch.Tensor,  # (N, V) float32
    temperature: float,
    top_k: int,
    top_p: float,
    noise,  # vocab -> (N, V) float32 Exp(1) draws
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens (N,), logps (N,)
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, token_logps(logits, tokens)
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k=top_k, top_p=top_p).softmax(-1)
    tokens = (probs / noise(probs.shape[-1])).argmax(-1)
    return tokens, token_logps(scaled, tokens)


def _row_noise(rows: slice, total: int, device, generator):
    """The Exp(1) noise of this call's rows for one decoding step: drawn for all `total` rows of
    the global batch (so that every process of a launch draws the same numbers), sliced."""

    def draw(vocab: int) -> torch.Tensor:
        e = torch.empty(total, vocab, device=device).exponential_(generator=generator)
        # exponential_ may return exactly 0: 0 / tiny stays 0 for a filtered token (no NaN).
        return e[rows].clamp_(min=torch.finfo(torch.float32).tiny)

    return draw


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of the rollout of training step `step` (1-based) of a run seeded
    `seed`: the recipes reseed their generator with it before every rollout, so that the draws
    depend only on (seed, step, global row) and not on how far earlier rollouts decoded."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


# ------------------------------------------------------------------------------ decoding paths

BACKENDS = ("auto", "loop", "static", "compiled")
# Models (by identity) whose compiled decode step failed under "auto": they stay on "loop".
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()
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
    base = _base_model(model)
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
    usable = static_ok and compile_available(device) is None and base not in _COMPILE_FAILED
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


class _DynamicDecoder:
    """Today's loop: a `DynamicCache` and a 2-D mask that grows by one column per step."""

    def __init__(self, model, prompt, prompt_mask, max_new_tokens: int):
        self.model, self.cache_kwarg = model, _cache_kwarg(model)
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


class _StaticDecoder:
    """A transformers `StaticCache` of fixed length and a preallocated (N, L) mask filled one
    column per step, so every decode step has the same shapes and tensor addresses (what
    torch.compile and CUDA graphs need). Positions equal the loop's: real tokens seen so far - 1.
    """

    def __init__(self, model, prompt, prompt_mask, max_new_tokens: int, compiled: bool):
        n, self.width = prompt.shape
        base = _base_model(model)
        self.model, self.cache_kwarg, self.t = model, _cache_kwarg(model), 0
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


def _decode(decoder, prompt, max_new_tokens, sample, eos, pad_token_id):
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


def _log_path(model, backend: str) -> None:
    seen = _LOGGED.setdefault(model, set())
    level = logging.DEBUG if backend in seen else logging.INFO
    seen.add(backend)
    device = next(model.parameters()).device
    how = {"loop": "DynamicCache, eager steps", "static": "StaticCache, eager steps",
           "compiled": f"StaticCache, torch.compile(mode={_compile_config(device).mode!r})"}
    log.log(level, "rollout decoding on %s: %s (%s)", device, backend, how[backend])


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: set[int] | int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    prompt_offset: int = 0,
    global_prompts: int | None = None,
) -> Rollout:
    """Sample `num_samples` completions of every prompt in one batch, with a KV cache.

    Rows stop at their first token in `eos_token_ids` (included in the completion); later steps
    give them pad tokens, masked out. `generator` (on the model's device) makes sampling
    reproducible, with the same tokens on every `backend` (see `resolve_backend`; the path taken
    is logged, at INFO the first time a model uses it). The model runs in eval mode (no
    dropout) and gets its previous mode back.

    Sampling is the Gumbel-max form of multinomial sampling: token = argmax_v p_v / E_v with
    E_v ~ Exp(1) i.i.d. (equal in distribution to `torch.multinomial(p)`, p the temperature-
    scaled, top-k / top-p filtered probabilities). Each step draws E for a GLOBAL batch of
    `global_prompts` × num_samples rows (default: this call's prompts) and uses the rows of
    prompts prompt_offset .. prompt_offset + len(prompt_ids): the processes of a launch that
    hold consecutive shards of a global batch, each with a generator in the same state, then
    sample exactly the completions one process sampling the whole batch would (the noise of
    row (prompt i, sample g) at step t depends only on the generator state, i and g).
    """
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    path = resolve_backend(model, backend)
    device = next(model.parameters()).device
    eos = torch.tensor(sorted({eos_token_ids} if isinstance(eos_token_ids, int) else eos_token_ids))
    eos = eos.to(device)
    prompt, prompt_mask = left_pad(prompt_ids, pad_token_id, device)
    prompt = prompt.repeat_interleave(num_samples, dim=0)  # (N, P)
    prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # (N, P)

    total = len(prompt_ids) if global_prompts is None else global_prompts
    if prompt_offset < 0 or prompt_offset + len(prompt_ids) > total:
        raise ValueError(f"prompts {prompt_offset}..{prompt_offset + len(prompt_ids)} are not "
                         f"within a global batch of {total}")
    rows = slice(prompt_offset * num_samples, (prompt_offset + len(prompt_ids)) * num_samples)
    noise = _row_noise(rows, total * num_samples, device, generator)

    def sample(logits):
        return _next_tokens(logits, temperature, top_k, top_p, noise)

    def run(path: str):
        _log_path(model, path)
        decoder = (_DynamicDecoder(model, prompt, prompt_mask, max_new_tokens) if path == "loop"
                   else _StaticDecoder(model, prompt, prompt_mask, max_new_tokens,
                                       compiled=path == "compiled"))
        return _decode(decoder, prompt, max_new_tokens, sample, eos, pad_token_id)

    was_training = model.training
    model.eval()
    state = generator.get_state() if generator is not None else None
    try:
        try:
            tokens, logps, masks, done = run(path)
        except Exception as error:  # any compile failure: "auto" falls back
            if backend != "auto" or path != "compiled":
                raise
            _COMPILE_FAILED.add(_base_model(model))
            log.warning("rollout decoding: the compiled step failed (%s: %s); using 'loop'",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            if state is not None:
                generator.set_state(state)  # the same draws as if "loop" had run first
            path = "loop"
            tokens, logps, masks, done = run(path)
    finally:
        model.train(was_training)

    completion_mask = torch.stack(masks, dim=1)  # (N, C)
    return Rollout(
        prompt_ids=prompt,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens, dim=1),
        completion_mask=completion_mask,
        logps=torch.stack(logps, dim=1),
        truncated=~done,
        lengths=completion_mask.sum(-1),
    )


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P) left-padded
    prompt_mask: torch.Tensor,  # (B, P)
    completion_ids: torch.Tensor,  # (B, C) right-padded
    completion_mask: torch.Tensor,  # (B, C)
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:  # (B, C) float32, 0 where completion_mask is 0
    """Per-token log-probs of the completions under log softmax(logits / temperature).

    The training-side twin of the log-probs `generate` records (temperature 0 counts as 1, as
    there): one forward over prompt + completion, LM head only at the positions that predict a
    completion token, gradients flowing when enabled. Slice rows for micro-batches. `model` is a
    causal LM or a `SelectedLogits` (possibly inside a DDP/FSDP wrapper).
    """
    is_selected = isinstance(getattr(model, "module", model), SelectedLogits)
    net = model if is_selected else SelectedLogits(model)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_mask.bool()  # (B, C)
    # Completion token j sits at position P + j and is predicted by position P + j - 1.
    width = prompt_ids.shape[1]
    select = torch.zeros_like(input_ids, dtype=torch.bool)
    select[:, width - 1 : width - 1 + keep.shape[1]] = keep
    logits = net(input_ids, attention_mask, select, position_ids_from_mask(attention_mask))
    if temperature > 0:
        logits = logits / temperature
    per_token = token_logps(logits, completion_ids[keep], chunk_size)  # (N,)
    # Boolean indexing enumerates (row, position) in row-major order on both sides.
    out = per_token.new_zeros(completion_ids.shape)
    out[keep] = per_token
    return out
