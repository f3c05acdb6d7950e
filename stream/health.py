"""The consume loop's liveness, as ``GET /healthz`` reports it.

The loop calls ``LoopHealth.beat(assigned)`` once per iteration with the partitions its
consumer is assigned; the HTTP API's thread reads ``report()``. A worker is ready when the loop
beat within ``stall_after_s`` and holds at least one partition; otherwise it is not ready, and
the report says why (not started, stalled, or no partitions assigned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_STALL_AFTER_S = 30.0


@dataclass(frozen=True)
class HealthReport:
    """One reading of the loop's health.

    ready: the loop beat within ``stall_after_s`` and holds at least one partition.
    reason: why it is not ready (None when ready).
    since_beat_s: seconds since the last beat (None before the first).
    partitions: ``{topic: sorted partition numbers}`` assigned at the last beat.
    """

    ready: bool
    reason: str | None
    since_beat_s: float | None
    stall_after_s: float
    partitions: dict[str, list[int]]

    def to_json(self) -> dict[str, Any]:
        """The ``loop`` object of the ``/healthz`` body."""
        return {
            "since_last_iteration_s": self.since_beat_s,
            "stall_after_s": self.stall_after_s,
            "assigned_partitions": self.partitions,
        }


class LoopHealth:
    """Thread-safe record of the consume loop's last iteration and its assignment.

    ``clock`` (default ``time.monotonic``) is read at each beat and report.
    """

    def __init__(self, stall_after_s: float = DEFAULT_STALL_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}")
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: float | None = None
        self._partitions: dict[str, list[int]] = {}

    def beat(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Record one completed loop iteration; ``assigned``: ``(topic, partition)`` pairs
        (kafka-python's ``TopicPartition`` is one)."""
        partitions: dict[str, list[int]] = {}
        for topic, partition in assigned:
            partitions.setdefault(topic, []).append(partition)
        for numbers in partitions.values():
            numbers.sort()
        now = self._clock()
        with self._lock:
            self._last_beat = now
            self._partitions = partitions

    def report(self) -> HealthReport:
        """The loop's health now."""
        with self._lock:
            last, partitions = self._last_beat, self._partitions
        if last is None:
            return HealthReport(False, "the consume loop has not completed an iteration yet",
                                None, self.stall_after_s, {})
        since = max(0.0, self._clock() - last)
        reason = None
        if since > self.stall_after_s:
            reason = (f"the consume loop is stalled: no iteration for {since:.1f} s "
                      f"(threshold {self.stall_after_s} s)")
        elif not partitions:
            reason = "no partitions assigned to this worker"
        return HealthReport(reason is None, reason, since, self.stall_after_s, partitions)
