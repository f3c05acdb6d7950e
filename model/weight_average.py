"""An exponential moving average of a model's parameters over its optimizer steps.

After step t (from 1) every averaged tensor moves towards the parameter by ``1 - d_t`` with
``d_t = min(decay, (1 + t) / (10 + t))``: the first steps count fully instead of averaging
with the untrained start, and from about step ``10 decay / (1 - decay)`` on the decay is
``decay`` (an average over roughly ``1 / (1 - decay)`` steps). Buffers are not averaged.

Why: at a high learning rate the weights' output level moves with each AdamW step, so the
last step's weights are a noisy snapshot (docs/model.md, "Why the checkpoint
over-predicts"); the average is the usual remedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """The average of ``model``'s parameters; ``update()`` after each optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"the decay of a weight average must lie in [0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self._params = [p for p in model.parameters()]
        self._average = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._average, [p.detach() for p in self._params], 1 - decay)

    def _swap(self) -> None:
        for param, average in zip(self._params, self._average, strict=True):
            param.data, average.data = average.data, param.data

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model's parameters hold the average (and the average the trained
        weights); on leaving, each goes back. No copy: the tensors trade places."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def apply(self) -> None:
        """Leave the average in the model for good (the trained weights are dropped)."""
        self._swap()
