"""Logits and log-probs at the positions that matter, without full-vocabulary work elsewhere.

Running the LM head only on positions that carry a loss (completion tokens) avoids materializing
(B, T, V) logits: with a 150k vocabulary that tensor dominates activation memory. Given the
targets, `SelectedLogits` goes further and never builds the (N, V) logits at all: it runs the LM
head, the float32 upcast and the log-softmax on `chunk_size` hidden rows at a time, and under
autograd recomputes each chunk's logits in the backward pass (torch.utils.checkpoint) instead of
keeping them, so one chunk of (C, V) float32 values is the most that exists at once. At 8k
completion tokens and a 150k vocabulary the full logits would be 4.9 GB in float32 (and the
log-softmax kept for backward as much again). The same chunked log-prob on logits that already
exist (`token_logps`) serves sampling.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def multimodal_backbone(lm: torch.nn.Module) -> torch.nn.Module:
    """The part of a transformers vision-language model (or a peft model around one) that takes
    token ids and image tensors and returns hidden states: its `.model` (LlavaModel,
    Qwen2VLModel...), which holds the vision tower, the projector and the language model."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.model


class SelectedLogits(torch.nn.Module):
    """Wraps a causal LM: decoder on all positions, LM head on selected positions only.

    It is a Module (not a function) so that data-parallel wrappers (DDP via accelerate) wrap the
    call that actually runs the parameters, keeping their gradient hooks intact.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask,  # (B, T) padding mask, (B, 1, T, T) additive mask, a BlockMask or None
        select: torch.Tensor,  # (B, T) bool: positions whose next-token logits are wanted
        position_ids: torch.Tensor | None = None,  # (B, T)
        targets: torch.Tensor | None = None,  # (N,) long: the next token at each selected position
        chunk_size: int | None = None,
        image_inputs: dict[str, torch.Tensor] | None = None,  # pixel_values & co. (VLM rows)
    ):
        """Without `targets`: the (N, V) logits at the selected positions (N = select.sum()).

        With `targets`: `(logps, correct)`, the float32 log-probability (N,) of each target and
        whether it is the argmax (N,) bool, computed `chunk_size` rows at a time (None: sized by
        memory, `default_chunk_rows`) so that no (N, V) tensor exists (module docstring).
        """
        # No KV cache: nothing is decoded after this forward, and with a cache transformers does
        # not derive packed-sequence boundaries from position ids when no mask is given.
        if image_inputs:
            # A vision-language model's backbone encodes the images into its image tokens'
            # places; it derives its own position ids (Qwen2-VL's are 3D), from unpacked,
            # right-padded rows.
            hidden = multimodal_backbone(self.lm)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                **image_inputs,
            ).last_hidden_state  # (B, T, H)
        else:
            hidden = self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state  # (B, T, H)
        if targets is None:
            return self._logits(hidden[select])  # (N, V)
        return self._chunked_logps(hidden[select], targets, chunk_size)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, V)
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-style heads squash logits; keep the model's own distribution
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _chunk_logps(self, hidden: torch.Tensor, targets: torch.Tensor):
        # hidden (C, H), targets (C,) -> logps (C,) float32, correct (C,) bool
        logits = self._logits(hidden).float()  # (C, V)
        logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
        return logps, logits.argmax(-1) == targets

    def _chunked_logps(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None):
        n = targets.shape[0]
        if chunk_size is None:
            chunk_size = default_chunk_rows(self.lm.config.get_text_config().vocab_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        targets = targets.long()
        starts = range(0, n, chunk_size) if n else [0]  # an empty selection: one empty chunk
        if n <= chunk_size or not (torch.is_grad_enabled() and hidden.requires_grad):
            # one chunk (at most CHUNK_ELEMENTS logits by default) or no backward: nothing to
            # recompute, each chunk is freed as soon as its two (C,) results exist
            parts = [self._chunk_logps(hidden[i : i + chunk_size], targets[i : i + chunk_size])
                     for i in starts]
        else:
            # Each chunk's logits are recomputed in the backward pass rather than kept: the
            # saved state per chunk is its (C, H) hidden rows. Non-reentrant checkpointing
            # keeps the LM head's parameters in the one autograd graph (DDP, FSDP, LoRA hooks).
            parts = [checkpoint(self._chunk_logps, hidden[i : i + chunk_size],
                                targets[i : i + chunk_size], use_reentrant=False)
                     for i in starts]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From labels aligned with inputs (-100 = no loss) to (select, targets) for next-token loss.

    Position t predicts token t+1, so position t is selected when label t+1 is a real token.
    labels: (B, T) -> select (B, T) bool, targets (N,) long.
    """
    nxt = labels[:, 1:]  # (B, T-1)
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = nxt != -100
    targets = nxt[nxt != -100]
    return select, targets


class _TokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits), row chunk by row chunk.

    Plain autograd would keep every float32 chunk alive for the backward pass, which for bf16
    logits is an (N, V) float32 copy, as large as the log-softmax this function avoids. Saving
    only the logits (already alive) and the (N,) logsumexp, and recomputing the softmax per chunk
    in backward, keeps the extra memory at one chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        # logits (N, V), targets (N,) -> (N,) float32
        n = targets.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = logits[rows].float()  # (C, V)
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            out[rows] = chunk.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, targets.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            go = grad_out[rows, None].float()  # (C, 1)
            # d/dlogits go * (logit[t] - lse) = go * (onehot(t) - softmax(logits)), built in
            # place: float32 logits write straight into their gradient's rows (no temporary,
            # three passes over the chunk); lower precision goes through one float32 chunk.
            if logits.dtype == torch.float32:
                g = torch.sub(logits[rows], lse[rows, None], out=grad[rows])
            else:
                g = logits[rows].float().sub_(lse[rows, None])  # (C, V)
            g.exp_().mul_(go.neg())
            g.scatter_add_(-1, targets[rows, None], go)
            if g.data_ptr() != grad[rows].data_ptr():
                grad[rows] = g
        return grad, None, None


CHUNK_ELEMENTS = 2**24  # default chunk budget: 16M float32 values = 64 MiB per temporary


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk when none is given: as many as fit CHUNK_ELEMENTS (V=32k: 524,
    V=150k: 111), so the float32 temporaries stay ~64 MiB each at any vocabulary size."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def token_logps(
    logits: torch.Tensor,  # (..., V)
    targets: torch.Tensor,  # (...) long
    chunk_size: int | None = None,
) -> torch.Tensor:  # (...) float32
    """Log-probability of each target token under its row of logits, in float32.

    Equal to `log_softmax(logits.float(), -1).gather(-1, targets[..., None])` (gradients
    included), but computed `chunk_size` rows at a time without an (N, V) log-softmax tensor.
    `chunk_size=None` sizes the chunk by memory (`default_chunk_rows`), not by a row count.
    """
    if chunk_size is None:
        chunk_size = default_chunk_rows(logits.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1).long()  # (N,)
    return _TokenLogps.apply(flat_logits, flat_targets, chunk_size).reshape(targets.shape)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> (B, T) positions counting real tokens only.

    With left padding the first real token gets position 0, exactly as without padding, so a
    sequence's log-probs do not depend on the side it was padded on. Pad positions get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T) 1 = real token, 0 = padding (either side)
    completion_mask: torch.Tensor,  # (B, T) 1 = a token whose log-prob is wanted
    *,
    average: bool = False,
    chunk_size: int | None = None,
    image_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # logps (B,) float32, num_tokens (B,) long
    """Summed (or, with `average`, per-token averaged) log-probs of each row's completion tokens.

    `completion_mask` is aligned with `input_ids`: a marked token t is scored by the logits at
    position t-1 (a mark on position 0 is ignored: nothing predicts the first token). The LM head
    runs only on those positions, in row chunks (no (B, T, V) nor (N, V) tensor), and position
    ids come from the attention mask, so left- and right-padded batches give the same numbers.

    `model` is a causal LM, or a `SelectedLogits` (possibly inside a DDP/FSDP wrapper exposing it
    as `.module`), which is then called as is so that the wrapper's gradient hooks run.
    Returns the log-probs and the number of completion tokens of each row; a row without any gets
    0 (and 0 for its average). `image_inputs`: the rows' image tensors (a vision-language model).
    """
    is_selected = isinstance(getattr(model, "module", model), SelectedLogits)
    net = model if is_selected else SelectedLogits(model)
    select = torch.zeros_like(completion_mask, dtype=torch.bool)  # (B, T)
    select[:, :-1] = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][select[:, :-1]]  # (N,)
    per_token, _ = net(input_ids, attention_mask, select, position_ids_from_mask(attention_mask),
                       targets=targets, chunk_size=chunk_size,
                       image_inputs=image_inputs)  # (N,) float32, no (N, V) logits
    # Boolean indexing and nonzero() both enumerate in row-major order: row i of `per_token`
    # belongs to sequence batch_index[i].
    batch_index = select.nonzero()[:, 0]  # (N,)
    logps = per_token.new_zeros(input_ids.shape[0]).index_add(0, batch_index, per_token)  # (B,)
    num_tokens = select.sum(-1)  # (B,)
    if average:
        logps = logps / num_tokens.clamp(min=1)
    return logps, num_tokens
