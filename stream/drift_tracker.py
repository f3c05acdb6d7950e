"""The worker's drift figures: a ``DriftMonitor`` shared by the consumer loop, the online
trainer and the HTTP API.

``DriftTracker.update(examples)`` (the consumer loop, after a label batch is joined) feeds the
monitor with each joined example's (live score, static twin's score, label): the two scores
are those the impression was served with. Unlabelled impressions are not fed: the monitor adds
every update to its distance windows, so feeding an impression when scored and again when
labelled would count it twice. ``set_imitation`` (the trainer thread) records the static
student's imitation loss per window. ``report()`` (``GET /drift``) and the Prometheus export
(``WorkerMetrics.set_drift``, at most every ``export_every_s`` seconds and on every report)
read the monitor under the same lock, since a ``DriftMonitor`` is not thread-safe.

When D_T of the alert window rises above ``threshold`` the tracker logs one warning per
upward crossing and ``unirec_drift_alert`` is 1 until it falls back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.drift import DriftMonitor
from stream.metrics import WorkerMetrics
from stream.serving import JoinedExample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftConfig:
    """Windows T (predictions), the alert threshold on D_T of the first window (None: no
    alert), and the seconds between two Prometheus exports."""

    windows: tuple[int, ...] = (1000, 10_000)
    threshold: float | None = None
    export_every_s: float = 1.0


class DriftTracker:
    """Thread-safe drift figures of the live model against its static twin (module docstring)."""

    def __init__(self, metrics: WorkerMetrics, cfg: DriftConfig | None = None) -> None:
        self.cfg = cfg = cfg or DriftConfig()
        self.metrics = metrics
        self.monitor = DriftMonitor(cfg.windows, threshold=cfg.threshold,
                                    on_alert=self._alerted)
        self.imitation: dict[int, float | None] = {t: None for t in cfg.windows}
        self._lock = threading.Lock()
        self._next_export = 0.0
        self._unexported = False  # fed since the last export

    def _alerted(self, distance: float) -> None:
        log.warning("surrogate distance D_%d = %.4g crossed the alert threshold %.4g",
                    self.monitor.alert_window, distance, self.cfg.threshold)

    def update(self, examples: Sequence[JoinedExample]) -> None:
        """Feed the joined examples that carry a static score, in stream order (an example
        with a non-finite score, which the worker never publishes, is left out)."""
        rows = [e for e in examples if e.static_score is not None
                and math.isfinite(e.score) and math.isfinite(e.static_score)]
        if not rows:
            return
        with self._lock:
            self.monitor.update([e.score for e in rows], [e.static_score for e in rows],
                                [e.label.label for e in rows])
            self._unexported = True
            if time.monotonic() >= self._next_export:
                self._export()

    def export_due(self) -> None:
        """Export what was fed since the last export once ``export_every_s`` has passed: the
        consume loop calls it on its timer, so the last labels of a burst reach Prometheus
        even when no label follows them."""
        with self._lock:
            if self._unexported and time.monotonic() >= self._next_export:
                self._export()

    def set_imitation(self, losses: dict[int, float | None]) -> None:
        """The static student's imitation loss per window (the trainer thread)."""
        with self._lock:
            self.imitation = dict(losses)

    def _export(self) -> dict[str, Any]:
        """Report and export to Prometheus; lock held."""
        report = self.monitor.report()
        self.metrics.set_drift(report, self.imitation)
        self._next_export = time.monotonic() + self.cfg.export_every_s
        self._unexported = False
        return report

    def report(self) -> dict[str, Any]:
        """The monitor's report (windows keyed by str(T), as JSON keys are) with each window's
        ``student_imitation_loss``; exported to Prometheus as well."""
        with self._lock:
            report = self._export()
            imitation = dict(self.imitation)
        report["windows"] = {
            str(t): {**figures, "student_imitation_loss": imitation.get(t)}
            for t, figures in report["windows"].items()
        }
        return report
