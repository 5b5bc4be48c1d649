"""Logits and log-probs at the positions that matter, without full-vocabulary work elsewhere.

Running the LM head only on positions that carry a loss (completion tokens) avoids materializing
(B, T, V) logits: with a 150k vocabulary that tensor dominates activation memory.
"""

from __future__ import annotations

import torch


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
        attention_mask: torch.Tensor,  # (B, T) padding mask or (B, 1, T, T) additive mask
        select: torch.Tensor,  # (B, T) bool: positions whose next-token logits are wanted
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:  # (N, V), N = select.sum()
        decoder = self.lm.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, H)
        logits = self.lm.get_output_embeddings()(hidden[select])  # (N, V)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-style heads squash logits; keep the model's own distribution
            logits = torch.tanh(logits / cap) * cap
        return logits


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
