"""Reward models: a sequence scorer read at the last real token.

transformers' *ForSequenceClassification heads find the last token by searching for the pad id,
which is wrong when pad = EOS (the EOS that ends a completion counts as padding) and with left
padding. `RewardScorer` reads the score at the last position the attention mask marks instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from posttrain.logprobs import position_ids_from_mask


class RewardScorer(torch.nn.Module):
    """Wraps a sequence classifier with one output: (input_ids, attention_mask) -> (B,) scores."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state  # (B, T, H)
        width = attention_mask.shape[1]
        last = width - 1 - attention_mask.flip(1).argmax(dim=1)  # (B,) last real token
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.model.score(picked).squeeze(-1).float()  # (B,)


def load_reward_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, new_head: bool = False,
    seed: int = 0, trust_remote_code: bool = False, head_init: str = "scaled",
) -> PreTrainedModel:
    """A one-output sequence classifier from a saved model directory (safetensors only).

    `new_head=True` starts from a causal LM (e.g. the SFT artifact): its body is reused and the
    score head is freshly initialized (transformers reports it as newly initialized), from
    N(0, 1/(hidden_size + 1)) with `head_init='scaled'` or N(0, initializer_range^2) with
    'transformers' (transformers' own rule; see RewardConfig.head_init), seeded by `seed`.
    """
    if head_init not in ("scaled", "transformers"):
        raise ValueError(f"unknown head_init {head_init!r}; valid: scaled, transformers")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if new_head:
        # A small head keeps initial rewards near 0, so the first losses sit near ln 2; seeded
        # apart from the global RNG so a stage gives the same head whatever ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if head_init == "transformers":
                std = getattr(model.config, "initializer_range", 0.02)
            else:
                std = 1.0 / (model.config.hidden_size + 1) ** 0.5
            torch.nn.init.normal_(model.score.weight, std=std)
            if getattr(model.score, "bias", None) is not None:
                torch.nn.init.zeros_(model.score.bias)
    return model


@torch.no_grad()
def score_texts(
    model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Scores of already collated batches (input_ids, attention_mask), concatenated."""
    scorer = RewardScorer(model).eval()
    device = next(model.parameters()).device
    out = [scorer(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in batches]
    return torch.cat(out) if out else torch.zeros(0)
