"""The evaluation's per-token k3 KL estimate: by hand, never negative where the summed log-ratio
is, zero against itself, and its per-token log-probs sum to the summed ones."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import TinyModelConfig
from posttrain.evaluate import (
    completion_token_logps,
    k3_kl_items,
    k3_kl_per_token,
    mean_log_ratio,
    summed_logps,
)
from posttrain.models import build_tiny_model


def test_k3_per_token_by_hand_is_positive_where_the_summed_ratio_is_negative():
    own = [torch.tensor([-1.0, -2.0])]
    ref = [torch.tensor([-1.5, -1.0])]  # r = -0.5, +1.0
    expected = ((math.exp(-0.5) + 0.5 - 1) + (math.exp(1.0) - 2)) / 2  # 0.412406
    assert k3_kl_per_token(own, ref) == pytest.approx(expected, rel=1e-9)
    assert mean_log_ratio(torch.tensor([-3.0]), torch.tensor([-2.5])) == pytest.approx(-0.5)
    record = k3_kl_items(own + [torch.tensor([-0.1])], ref + [torch.tensor([-0.1])])
    assert record["den"] == [2.0, 1.0] and record["num"][1] == 0.0
    assert record["num"][0] == pytest.approx(2 * expected, rel=1e-9)
    assert math.isnan(k3_kl_per_token([], []))


def test_completion_token_logps_do_not_depend_on_the_batching(tokenizer):
    a = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0), tokenizer)
    b = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, seed=1), tokenizer)
    completions = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]},
                   {"prompt_ids": [5], "completion_ids": [10, 11, 12, 13]},
                   {"prompt_ids": [4, 4], "completion_ids": []}]
    per_token = completion_token_logps(a, completions, tokenizer.pad_token_id, batch_size=2)
    assert [t.numel() for t in per_token] == [2, 4, 0]
    sums = summed_logps(completion_token_logps(a, completions, tokenizer.pad_token_id,
                                               batch_size=3))
    assert sums.shape == (3,) and sums[2] == 0.0  # an empty completion: log 1
    torch.testing.assert_close(summed_logps(per_token), sums,
                               rtol=1e-5, atol=1e-5)  # batching does not change them
    assert k3_kl_per_token(per_token, per_token) == 0.0
    other = completion_token_logps(b, completions, tokenizer.pad_token_id, batch_size=2)
    assert k3_kl_per_token(per_token, other) > 0.0
