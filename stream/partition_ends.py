"""``PartitionEnds``: whether a consumer has read a topic partition to its end, as of when.

The event-time gate (``stream.gate``) lets a held record pass an idle topic only if that
topic's partition was read to its end at a moment at least the grace after the hold
(``ReadToEnd``). A consumer's own high-water marks cannot say when: kafka-python sets a
partition's mark when it parses the fetch response, which can sit in its read-ahead queue
behind other partitions' responses, and a fetch is sent only from ``poll``, so after a slow
loop pass the newest mark can be older than any grace. ``PartitionEnds`` asks the broker
instead: one ``ListOffsets`` for every assigned input partition, sent only when the gate asks
about a moment later than the last answer, and at most once per ``min_interval_s``; the
answer is true as of the clock reading taken before the request was sent. The request goes
through a client of its own (``lister``): on the consumer's connection it would queue behind
the consumer's long-poll fetch (measured: 400 ms per check instead of 0.6 ms with the
default ``fetch_max_wait_ms`` of 500).

A partition is read to its end when the consumer's position (one past the last record
polled) is at or past both the listed end offset and the partition's fetched high-water
mark. The broker's end offset is what Kafka lists; the embedded broker (Tansu 0.6.0) lists
the base offset of the last record batch plus one instead (``stream.topics``), but a position
past that base means the batch was fetched, and that fetch's high-water mark covers the
whole batch, so the larger of the two is the end either way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.1
"""At most one broker check per this many seconds."""


class PartitionEnds:
    """Answers ``stream.gate.ReadToEnd`` for ``consumer``.

    ``lister``: the client whose ``end_offsets`` asks the broker (a consumer outside any group,
    not ``consumer`` itself: see the module docstring). ``topic_of(kind)``: the topic of a gate
    kind. ``partitions()``: the topic partitions to check (the assigned input partitions).
    ``position(tp)``: one past the last record polled from ``tp``, or None if not known.
    ``clock`` must be the gate's.
    """

    def __init__(self, consumer: KafkaConsumer, lister: KafkaConsumer,
                 topic_of: Callable[[str], str],
                 partitions: Callable[[], Iterable[TopicPartition]],
                 position: Callable[[TopicPartition], int | None],
                 min_interval_s: float = CHECK_INTERVAL_S, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.lister = lister
        self.topic_of = topic_of
        self.partitions = partitions
        self.position = position
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.checks = 0  # broker checks answered
        self.failures = 0  # checks failed since the last answer
        self._ends: dict[TopicPartition, int] = {}
        self._as_of = -math.inf  # the clock reading the ends are true of
        self._tried = -math.inf

    def __call__(self, kind: str, partition: int, as_of: float) -> bool:
        """Whether ``kind``'s partition ``partition`` was read to its end at a clock reading at
        or after ``as_of`` (checks the broker if the last answer is older)."""
        tp = TopicPartition(self.topic_of(kind), partition)
        if self._as_of < as_of or tp not in self._ends:
            self.check()
            if self._as_of < as_of:
                return False
        end = self._ends.get(tp)
        position = self.position(tp)
        if end is None or position is None:
            return False
        try:
            high = self.consumer.highwater(tp)
        except Exception:  # not assigned (rebalancing): nothing is known of it
            return False
        return position >= max(end, high if high is not None else 0)

    def check(self) -> None:
        """Ask the broker for the end offsets of ``partitions()``, unless it was asked less
        than ``min_interval_s`` ago; a failed check (logged) leaves the last answer."""
        now = self.clock()
        if now - self._tried < self.min_interval_s:
            return
        self._tried = now
        tps = list(self.partitions())
        if not tps:
            return
        try:
            ends = self.lister.end_offsets(tps, timeout_ms=int(self.timeout_s * 1000))
        except Exception as exc:  # the gate waits (records released by max_held at worst)
            self.failures += 1
            if self.failures == 1:  # once per streak: a check may come every min_interval_s
                log.warning("checking the input partitions' end offsets failed: %s", exc)
            return
        if self.failures:
            log.info("end-offset checks answer again after %d failures", self.failures)
            self.failures = 0
        self._ends = {tp: int(end) for tp, end in ends.items() if end is not None}
        self._as_of = now
        self.checks += 1

    def forget(self, tp: TopicPartition) -> None:
        """Drop what is known of ``tp`` (revoked, or sought)."""
        self._ends.pop(tp, None)
