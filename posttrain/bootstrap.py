"""Percentile-bootstrap confidence intervals for evaluation metrics, over prompts.

Every comparison metric is a ratio of sums over held-out items (prompts, or preference pairs
for `chosen_perplexity`): `sum(num) / sum(den)`. A plain mean (accuracy, reward, EOS rate,
completion length, win rate, KL) has `den` 1 per item; a token-weighted mean (held-out loss)
has the item's loss sum as `num` and its token count as `den`, so a resample weighs each row by
its tokens exactly as the metric does; perplexity is `exp` of that loss. An item without a
value (a row without a reference, a prompt without both reward scores) is `None`: it weighs 0
in every resample.

Resampling draws item indices with replacement, `samples` times, from
`numpy.random.default_rng(seed)`. Two models evaluated on the same items with the same seed
draw the same indices, so a *paired* difference (`paired_difference`) resamples items once and
applies them to both: the noise the two share (an easy prompt is easy for both) cancels. An
*unpaired* difference (`unpaired_difference`, items not known to be the same) resamples each
side independently.

The interval is the (1 - level) / 2 and (1 + level) / 2 percentiles of the resampled statistic
(numpy's default linear interpolation), over the resamples where it is defined.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
MAX_LOG = 50.0  # as posttrain.recipes.sft.evaluate_loss caps exp(loss) for perplexity


def per_item(num: list, den: list | None = None, *, group: str = "prompts",
             transform: str | None = None) -> dict:
    """A metric's per-item record (JSON-ready): `num`/`den` lists (None where an item has no
    value; `den` None means 1 per item), the item `group` it indexes ("prompts" or "pairs"),
    and `transform` ("exp" for a perplexity, else None)."""
    return {"num": [None if v is None else float(v) for v in num],
            "den": None if den is None else [None if v is None else float(v) for v in den],
            "group": group, "transform": transform}


def _arrays(record: dict) -> tuple[np.ndarray, np.ndarray]:
    num = record["num"]
    den = record["den"] if record.get("den") is not None else [1.0] * len(num)
    missing = [a is None or b is None for a, b in zip(num, den)]
    n = np.array([0.0 if m else a for a, m in zip(num, missing)], dtype=np.float64)
    d = np.array([0.0 if m else b for b, m in zip(den, missing)], dtype=np.float64)
    return n, d


def _finish(values: np.ndarray, transform: str | None) -> np.ndarray:
    if transform == "exp":
        return np.exp(np.minimum(values, MAX_LOG))
    if transform is not None:
        raise ValueError(f"unknown transform {transform!r}")
    return values


def value(record: dict) -> float:
    """The metric itself: sum(num) / sum(den) over every item (then the transform)."""
    n, d = _arrays(record)
    total = d.sum()
    if total <= 0:
        return math.nan
    return float(_finish(np.array([n.sum() / total]), record.get("transform"))[0])


def indices(n: int, samples: int, seed: int) -> np.ndarray:  # (samples, n) int64
    """The resampled item indices: `samples` draws of n indices with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _resampled(record: dict, idx: np.ndarray) -> np.ndarray:  # (samples,) before the transform
    n, d = _arrays(record)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n[idx].sum(axis=1) / d[idx].sum(axis=1)  # NaN where a resample has no item


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def interval(record: dict, *, samples: int, seed: int, level: float = LEVEL) -> tuple[float, float]:
    """The percentile-bootstrap interval of the metric over its items; (nan, nan) without items
    or resamples."""
    size = len(record["num"])
    if size == 0 or samples < 1:
        return math.nan, math.nan
    stats = _finish(_resampled(record, indices(size, samples, seed)), record.get("transform"))
    return _percentiles(stats, level)


def paired_difference(a: dict, b: dict, *, samples: int, seed: int,
                      level: float = LEVEL) -> dict:
    """metric(a) - metric(b) for two models evaluated on the same items (same order), with the
    interval of the difference from one set of resampled indices applied to both."""
    if len(a["num"]) != len(b["num"]):
        raise ValueError(f"paired bootstrap needs the same items: {len(a['num'])} vs "
                         f"{len(b['num'])}")
    diff = value(a) - value(b)
    if not a["num"] or samples < 1:
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "paired": True}
    idx = indices(len(a["num"]), samples, seed)
    stats = (_finish(_resampled(a, idx), a.get("transform"))
             - _finish(_resampled(b, idx), b.get("transform")))
    low, high = _percentiles(stats, level)
    return {"diff": diff, "ci_low": low, "ci_high": high, "paired": True}


def unpaired_difference(a: dict, b: dict, *, samples: int, seed: int,
                        level: float = LEVEL) -> dict:
    """metric(a) - metric(b) for two models evaluated on different (or unknown) items: each
    side resampled independently (seeds `seed` and `seed + 1`)."""
    diff = value(a) - value(b)
    if not a["num"] or not b["num"] or samples < 1:
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "paired": False}
    stats = (_finish(_resampled(a, indices(len(a["num"]), samples, seed)), a.get("transform"))
             - _finish(_resampled(b, indices(len(b["num"]), samples, seed + 1)),
                       b.get("transform")))
    low, high = _percentiles(stats, level)
    return {"diff": diff, "ci_low": low, "ci_high": high, "paired": False}


def flip(d: dict) -> dict:
    """A difference a - b as b - a (the interval mirrored): for 'lower is better' metrics."""
    return {**d, "diff": -d["diff"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"]}
