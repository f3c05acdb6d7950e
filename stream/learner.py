"""The online learner: fine-tunes a private copy of the model on joined labels and publishes
model versions.

``OnlineLearner`` runs on a thread of its own. Each round it takes up to ``take_max`` joined
examples from the ``LabelBuffer``, adds them to its ``OnlineTrainer`` (``model.online``: replay,
clipping, the guard that refuses NaN/inf/exploding updates) and takes every step that is
ready; the static student (``model.student``) distils the live scores of the same examples,
one step per round after the live model's. The live model comes first because a label's
delay to a live version is what the stream feels: when labels come faster than both can
train, the live model keeps up and the student falls behind (its buffer keeps the newest
``fresh_capacity`` examples; the oldest are dropped and counted, ``StaticStudent``). The student's
imitation is recorded when the examples arrive, so it stays a prediction made before training.
Every ``checkpoint_every`` accepted steps the trained copy is published as the next version
(``VersionStore.publish``: write, fsync, rename) and announced through ``announce`` (the
worker sends it to ``model-updates``; scorers swap it in,
``stream.model_updates``). The learner trains its own deep copy: no scorer ever reads the
object being trained.

One trainer per topic (``stream.trainer_claim``): every announcement carries the learner's
``TrainerIdentity``; with a ``RivalWatch``, the learner checks the topic before each publish
and numbers the version above every one announced since its start. When an outranking trainer
announces, the learner publishes nothing more: it logs the conflict, counts it
(``unirec_trainer_refused_total{reason="rival_trainer"}``), keeps it in ``refused``, stops its
rounds and calls ``on_refused`` (``start``).

Metrics: steps and last loss (``unirec_train_steps_total``, ``unirec_train_loss``), refusals
by reason (``unirec_train_refused_total``), examples waiting and dropped by model
(``unirec_train_backlog``, ``unirec_train_examples_dropped_total``; live, student); the
student's imitation loss goes to the ``DriftTracker``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model.backbone import UniRecModel
from model.online import OnlineConfig, OnlineExample, OnlineTrainer
from model.student import StaticStudent
from model.versions import VersionStore
from stream.drift_tracker import DriftTracker
from stream.metrics import WorkerMetrics
from stream.model_updates import ModelUpdate
from stream.serving import JoinedExample, LabelBuffer
from stream.trainer_claim import RivalWatch, TrainerConflict, TrainerIdentity

log = logging.getLogger(__name__)


def _is_set(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def online_example(joined: JoinedExample) -> OnlineExample:
    """The training example of a joined label (target: the label)."""
    return OnlineExample(joined.impression, joined.candidate, joined.history, joined.profile,
                         float(joined.label.label), joined.state)


def student_example(joined: JoinedExample) -> OnlineExample:
    """The student's example of a joined label (target: the live model's served score)."""
    return OnlineExample(joined.impression, joined.candidate, joined.history, joined.profile,
                         joined.score, joined.state)


@dataclass(frozen=True)
class LearnerConfig:
    """The trainer's hyperparameters (``online``; its ``checkpoint_every`` sets the version
    cadence), whether a static student is trained, the most examples taken per round, the
    seconds to wait when no label is waiting, and the versions kept on disk."""

    online: OnlineConfig = field(default_factory=OnlineConfig)
    student: bool = True
    take_max: int = 1024
    idle_s: float = 0.05
    keep_versions: int = 5


class OnlineLearner:
    """Fine-tunes a copy of ``model`` on ``labels`` and publishes versions (module docstring).

    Readable state: ``trainer`` (steps, refusals, pending), ``version`` (the last published,
    or None), ``examples`` (joined examples taken so far), ``refused`` (why it stopped
    publishing: another trainer, or None). ``watch``: the rival check before each publish
    (None: none); its identity, or a new one, goes into every announcement.
    """

    def __init__(
        self,
        model: UniRecModel,
        labels: LabelBuffer,
        versions: VersionStore,
        announce: Callable[[ModelUpdate], None],
        metrics: WorkerMetrics,
        cfg: LearnerConfig | None = None,
        drift: DriftTracker | None = None,
        watch: RivalWatch | None = None,
    ) -> None:
        self.cfg = cfg = cfg or LearnerConfig()
        self.model = copy.deepcopy(model)
        self.labels = labels
        self.versions = versions
        self.announce = announce
        self.metrics = metrics
        self.drift = drift
        self.trainer = OnlineTrainer(self.model, cfg.online)
        self.student = StaticStudent(model, cfg.online, drift.cfg.windows) \
            if cfg.student and drift is not None else None
        self.watch = watch
        self.identity = watch.identity if watch is not None else TrainerIdentity.new()
        self.version: int | None = None
        self.examples = 0
        self.refused: str | None = None

    def round(self, stop: threading.Event | None = None) -> int:
        """Take waiting examples, take every live step that is ready (publishing when due),
        then one step of the student if it has one; returns examples taken.
        Once ``refused`` is set, takes nothing (the labels are left to the buffer's bound).
        Once ``stop`` is set, takes no further step: a stopping process is not held by a
        backlog, and its thread is not mid-step when the interpreter exits (what is left
        untrained is lost, as in a crash; the versions already published stand)."""
        if self.refused is not None:
            return 0
        joined = self.labels.take(self.cfg.take_max)
        if joined:
            self.examples += len(joined)
            self.trainer.add(online_example(j) for j in joined)
            self._observe(joined)
        while not _is_set(stop) and (report := self.trainer.step()) is not None:
            if report.accepted:
                self.metrics.observe_train_step(report.loss)
            else:
                self.metrics.count_refused(report.refused or "")
            if report.version_due:
                try:
                    self.publish()
                except TrainerConflict as exc:
                    self.refused = str(exc)
                    self.metrics.count_trainer_refused("rival_trainer")
                    log.error("not publishing: %s; online learning stops here", exc)
                    return len(joined)
        if self.student is not None and not _is_set(stop):
            self.student.step()
        self._observe_backlog()
        return len(joined)

    def _observe_backlog(self) -> None:
        trainers = [("live", self.trainer)]
        if self.student is not None:
            trainers.append(("student", self.student.trainer))
        for name, trainer in trainers:
            self.metrics.observe_backlog(name, trainer.pending, trainer.dropped)

    @property
    def student_ready(self) -> bool:
        """Whether the student has a step to take."""
        return self.student is not None and self.student.trainer.ready

    def _observe(self, joined: Sequence[JoinedExample]) -> None:
        if self.student is None or self.drift is None:
            return
        self.student.observe([student_example(j) for j in joined])
        self.drift.set_imitation({t: self.student.imitation_loss(t)
                                  for t in self.drift.cfg.windows})

    def publish(self) -> ModelUpdate:
        """Publish the trained copy as the next version and announce it; ``TrainerConflict``
        (nothing written) if the watch saw an outranking trainer."""
        at_least = self.watch.check() if self.watch is not None else 1
        steps = self.trainer.steps
        self.model.spec = self.trainer.counted_spec()
        version = self.versions.publish(self.model, {"online_steps": steps}, at_least)
        update = ModelUpdate(version, str(self.versions.path(version)), steps, time.time(),
                             self.identity.trainer_id, self.identity.started)
        self.version = version
        self.announce(update)
        log.info("published model version %d after %d online steps (%d examples)",
                 version, steps, self.examples)
        return update

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set or ``refused``; waits ``idle_s`` when nothing was
        waiting and the student has no step to take."""
        while not stop.is_set() and self.refused is None:
            if not self.round(stop) and not self.student_ready:
                stop.wait(self.cfg.idle_s)

    def start(self, stop: threading.Event,
              on_refused: Callable[[str], None] | None = None) -> threading.Thread:
        """Run on a daemon thread named ``online-learner``; an exception there is logged.
        ``on_refused(reason)`` is called there when the learner stops for another trainer."""

        def target() -> None:
            try:
                self.run(stop)
            except Exception:
                log.exception("online learner stopped")
            if self.refused is not None and on_refused is not None:
                on_refused(self.refused)

        thread = threading.Thread(target=target, name="online-learner", daemon=True)
        thread.start()
        return thread
