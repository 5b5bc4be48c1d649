"""`select_best`: keep the weights of the evaluated step where a metric was best.

After every evaluation during training the loop calls `BestState.update(metrics, step)`; when
the metric beats the best so far (strictly: a tie keeps the earlier step), a CPU copy of the
trainable parameters is taken (with LoRA only the adapter's, which is all that trains). At the
end `restore()` copies them back into the model, so the stage saves the best step's policy.

The state (metric, direction, best step and value, and the copied weights) is registered for
checkpointing (`accelerator.register_for_checkpointing`), so a resumed run selects the same
step as an uninterrupted one even when the best step's checkpoint is long deleted.
"""

from __future__ import annotations

import math

import torch


class BestState:
    """The best evaluated step of `metric` ('max' or 'min' is best) and its weights."""

    def __init__(self, model: torch.nn.Module, metric: str, mode: str):
        if mode not in ("max", "min"):
            raise ValueError(f"select_best mode must be 'max' or 'min', got {mode!r}")
        self.model = model
        self.metric = metric
        self.mode = mode
        self.step: int | None = None
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def _trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Take `step`'s weights when its `metric` is the best so far; whether it was. A step
        without the metric (not evaluated) or with a NaN is never the best."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)) or not self.better(float(value)):
            return False
        self.step, self.value = int(step), float(value)
        self.weights = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()}
        return True

    @torch.no_grad()
    def restore(self) -> int | None:
        """Copy the best step's weights back into the model; the step (None: nothing was
        evaluated, the model stays as it is)."""
        if self.step is None:
            return None
        for name, param in self._trainable():
            param.copy_(self.weights[name].to(param.device, param.dtype))
        return self.step

    def summary(self) -> dict[str, float]:
        """`best_step` and `best/<metric>` for the stage's final metrics; {} before any
        evaluation."""
        if self.step is None:
            return {}
        return {"best_step": self.step, f"best/{self.metric}": self.value}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "step": self.step,
                "value": self.value, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            raise ValueError(f"checkpoint selects the best {state['mode']} of "
                             f"{state['metric']!r}, this run {self.mode} of {self.metric!r}")
        self.step, self.value, self.weights = state["step"], state["value"], state["weights"]


def best_state(model: torch.nn.Module, config, accelerator) -> BestState | None:
    """The stage's BestState when its config has `select_best`, registered for checkpointing
    (after the recipe's other registered objects); None otherwise."""
    if getattr(config, "select_best", None) is None:
        return None
    state = BestState(model, config.select_best, config.best_mode)
    accelerator.register_for_checkpointing(state)
    return state
