"""The static student: an upper bound on the paper's infimum over static predictors.

docs/model.md defines D_T against the best static predictor; we approximate it from above with a
student that sees everything the dynamic model sees except its user state (u_t = 0: same
architecture, the state token fed zeros), trained online by distillation: an ``OnlineTrainer``
step (``served=False``: the zero state) on BCE against the dynamic model's probabilities as soft
targets. Its imitation loss, the mean symmetric binary KL between the dynamic model's and the
student's probabilities over the last T predictions (test-then-train: each prediction is made
before the student trains on it), is the reported approximation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

from model.backbone import UniRecModel
from model.drift import DriftMonitor
from model.online import OnlineConfig, OnlineExample, OnlineTrainer, StepReport, predict


class StaticStudent:
    """Distils ``model`` (copied at construction) into a stateless imitator.

    ``observe(examples)``: each example's ``target`` is the dynamic model's probability for
    it; the student predicts it first (the imitation gap is recorded), then buffers it.
    ``step()``: one training step on the buffered examples (None while too few wait); the
    buffer is bounded (``OnlineConfig.fresh_capacity``: past it the oldest are dropped and
    counted in ``trainer.dropped``), so a student left behind skips the oldest.
    ``imitation``: a ``DriftMonitor`` of (p_dyn, p_student) whose D_T is the imitation loss.
    Call from one thread (the trainer's).
    """

    def __init__(self, model: UniRecModel, cfg: OnlineConfig | None = None,
                 windows: Sequence[int] = (1000, 10_000)) -> None:
        self.model = copy.deepcopy(model)
        cfg = replace(cfg or OnlineConfig(), count_item_labels=False)  # its targets: scores
        self.trainer = OnlineTrainer(self.model, cfg, served=False)
        self.imitation = DriftMonitor(windows)

    def predict(self, examples: Sequence[OnlineExample]) -> list[float]:
        """[B] student probabilities (zero user state)."""
        p = predict(self.model, self.trainer.featurizer, examples, served=False,
                    task=self.trainer.cfg.task)
        return p.tolist()

    def observe(self, examples: Sequence[OnlineExample]) -> None:
        """Score ``examples`` with the student, record the imitation gap, buffer them."""
        if examples:
            self.imitation.update([e.target for e in examples], self.predict(examples))
            self.trainer.add(examples)

    def step(self) -> StepReport | None:
        """One distillation step, or None while too few examples are buffered."""
        return self.trainer.step()

    def imitation_loss(self, window: int) -> float | None:
        """D_T(dynamic, student) over the last ``window`` predictions (None while empty)."""
        return self.imitation.distance(window)
