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

The three decoding paths (`backend`: loop, static, compiled) are in posttrain/decoding.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.decoding import (
    COMPILE_FAILED,
    DynamicDecoder,
    StaticDecoder,
    base_model,
    decode,
    log_path,
    resolve_backend,
)
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
    _check_sampling(max_new_tokens, num_samples, temperature, top_p, top_k)
    path = resolve_backend(model, backend)
    device = next(model.parameters()).device
    eos = torch.tensor(sorted({eos_token_ids} if isinstance(eos_token_ids, int) else eos_token_ids))
    eos = eos.to(device)
    prompt, prompt_mask = _repeated_prompts(prompt_ids, num_samples, pad_token_id, device)
    rows, total = _shard_rows(prompt_offset, len(prompt_ids), global_prompts, num_samples)
    noise = _row_noise(rows, total, device, generator)
    sample = partial(_next_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     noise=noise)
    decoding = (prompt, prompt_mask, max_new_tokens, sample, eos, pad_token_id)

    was_training = model.training
    model.eval()
    state = generator.get_state() if generator is not None else None
    try:
        try:
            tokens, logps, masks, done = _run(model, path, *decoding)
        except Exception as error:  # any compile failure: "auto" falls back
            if backend != "auto" or path != "compiled":
                raise
            _fall_back(model, error, generator, state)
            path = "loop"
            tokens, logps, masks, done = _run(model, path, *decoding)
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


def _check_sampling(max_new_tokens: int, num_samples: int, temperature: float, top_p: float,
                    top_k: int) -> None:
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


def _repeated_prompts(prompt_ids: list[list[int]], num_samples: int, pad_token_id: int,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded prompts and their mask, each row repeated num_samples times: (N, P)."""
    prompt, prompt_mask = left_pad(prompt_ids, pad_token_id, device)
    return (prompt.repeat_interleave(num_samples, dim=0),
            prompt_mask.repeat_interleave(num_samples, dim=0))


def _shard_rows(prompt_offset: int, prompts: int, global_prompts: int | None,
                num_samples: int) -> tuple[slice, int]:
    """This call's rows within the global batch, and the global batch's number of rows."""
    total = prompts if global_prompts is None else global_prompts
    if prompt_offset < 0 or prompt_offset + prompts > total:
        raise ValueError(f"prompts {prompt_offset}..{prompt_offset + prompts} are not "
                         f"within a global batch of {total}")
    rows = slice(prompt_offset * num_samples, (prompt_offset + prompts) * num_samples)
    return rows, total * num_samples


def _run(model, path: str, prompt, prompt_mask, max_new_tokens: int, sample, eos,
         pad_token_id: int):
    """The token loop on decoding path `path`: (tokens, logps, masks, done)."""
    log_path(model, path)
    decoder = (DynamicDecoder(model, prompt, prompt_mask, max_new_tokens) if path == "loop"
               else StaticDecoder(model, prompt, prompt_mask, max_new_tokens,
                                  compiled=path == "compiled"))
    return decode(decoder, prompt, max_new_tokens, sample, eos, pad_token_id)


def _fall_back(model, error: Exception, generator, state) -> None:
    """After a failed compiled step under "auto": the model stays on "loop" from now on, with a
    warning, and the generator is rewound so that the loop makes the same draws."""
    COMPILE_FAILED.add(base_model(model))
    log.warning("rollout decoding: the compiled step failed (%s: %s); using 'loop'",
                type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    if state is not None:
        generator.set_state(state)  # the same draws as if "loop" had run first


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
