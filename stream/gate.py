"""``EventTimeGate``: merge a partition's impressions, interactions and labels in time order.

Impressions, interactions and labels of one user live in the same partition number of three
topics, fetched independently: under a backlog one fetch can bring a thousand interactions of
partition p and none of p's impressions, or the reverse. Processed as fetched, an impression
could be scored before the interactions that precede it were applied (a history missing its
newest events), or after the interaction it predicts was applied (a leak that inflates
online AUC). The gate orders the three by the records' Kafka timestamps, as a stream
processor joining co-partitioned topics does. Order of one millisecond's records across
topics: impression, then interaction, then label (an impression never sees an interaction of
its own millisecond; a label always follows its impression).

A held record of partition p is released once every other topic's partition p has shown a
record at or after it in that order, or was read to its end as of a moment at least
``idle_grace_s`` after the record was held (e.g. a deployment that produces no impressions):
the record can no longer be overtaken. "Read to its end as of t" is the caller's answer
(``ReadToEnd``), and it must be true of the broker at t, not of a high-water mark fetched
before t: the consumer reads ahead, and a loop pass slower than any grace would otherwise
let an idle mark older than the held record release it. The grace covers the producer: a
record may reach the broker up to ``idle_grace_s`` after a record of another topic that
follows it in time (the producer batches each partition separately). Release keeps offset
order within a topic and partition. The caller processes what one ``release`` returns as the
worker does: the impressions first, each scored with the interactions of the same release
ordered before it (``preceding_interactions``), then the interactions, then the labels.

The gate holds at most ``max_held`` records per topic and partition: past that, the oldest
are released anyway (one topic far behind, or silent for a while) and counted in
``released_early``, so memory stays bounded and the stream never stalls. (Pausing the
partition instead was tried: kafka-python 3.0 did not fetch a resumed partition again from
the embedded broker.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from stream.records import ConsumedRecord

KINDS = ("impressions", "interactions", "labels")  # the order of one millisecond's records
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}
IDLE_GRACE_S = 0.3
"""Seconds after a record's hold as of which an idle topic must be read to its end to let it
pass (module docstring)."""

ReadToEnd = Callable[[str, int, float], bool]
"""``read_to_end(kind, partition, as_of)``: whether, at some clock reading at or after
``as_of``, every record then on the broker in ``kind``'s topic partition had been held."""


def order_key(kind: str, record: ConsumedRecord) -> tuple[int, int, int]:
    """Sort key of a record in time order: timestamp, then kind (``KINDS``), then offset."""
    return record.timestamp, _RANK[kind], record.offset


class EventTimeGate:
    """Per topic kind and partition: held records and the newest order key seen."""

    def __init__(self, max_held: int = 8192, idle_grace_s: float = IDLE_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_held < 1 or idle_grace_s < 0:
            raise ValueError(f"max_held ({max_held}) must be positive and idle_grace_s "
                             f"({idle_grace_s}) >= 0")
        self.max_held = max_held
        self.idle_grace_s = idle_grace_s
        self.clock = clock
        self.released_early: dict[str, int] = dict.fromkeys(KINDS, 0)
        # each held record with the clock reading when it was held
        self._held: dict[str, dict[int, deque[tuple[float, ConsumedRecord]]]] = {
            kind: {} for kind in KINDS}
        self._newest: dict[str, dict[int, tuple[int, int, int]]] = {kind: {} for kind in KINDS}

    def hold(self, kind: str, records: Iterable[ConsumedRecord]) -> None:
        """Buffer ``records`` of ``kind`` (one of ``KINDS``), given in offset order."""
        held, newest, now = self._held[kind], self._newest[kind], self.clock()
        for r in records:
            held.setdefault(r.partition, deque()).append((now, r))
            newest[r.partition] = order_key(kind, r)

    def release(self, read_to_end: ReadToEnd) -> dict[str, list[ConsumedRecord]]:
        """``{kind: records}`` that can no longer be overtaken, in offset order per partition.

        ``read_to_end`` is asked only about a topic partition that holds a record back, and
        only once that record was held ``idle_grace_s`` ago.
        """
        out: dict[str, list[ConsumedRecord]] = {kind: [] for kind in KINDS}
        now = self.clock()
        partitions = {p for held in self._held.values() for p, queue in held.items() if queue}
        for partition in sorted(partitions):
            queues = {kind: queue for kind in KINDS
                      if (queue := self._held[kind].get(partition))}
            # in time order across the kinds: a record held back holds back every later one
            # (an idle topic lets a record pass, but not ahead of an earlier held record)
            while queues:
                key, kind = min((order_key(k, q[0][1]), k) for k, q in queues.items())
                as_of = queues[kind][0][0] + self.idle_grace_s
                if not all(key < self._newest[k].get(partition, (-1, 0, 0))
                           or (as_of <= now and read_to_end(k, partition, as_of))
                           for k in KINDS if k != kind):
                    break
                out[kind].append(queues[kind].popleft()[1])
                if not queues[kind]:
                    del queues[kind]
            for kind, queue in queues.items():
                while len(queue) > self.max_held:
                    out[kind].append(queue.popleft()[1])
                    self.released_early[kind] += 1
        return out

    def held(self, kind: str, partition: int) -> int:
        """How many records of ``kind`` partition ``partition`` holds."""
        return len(self._held[kind].get(partition, ()))

    def forget(self, kind: str, partition: int) -> None:
        """Drop what is held and known of ``kind``'s ``partition`` (revoked, or sought)."""
        self._held[kind].pop(partition, None)
        self._newest[kind].pop(partition, None)


def preceding_interactions(impressions: Iterable[ConsumedRecord],
                           interactions: Iterable[ConsumedRecord]
                           ) -> dict[tuple[int, int], list[ConsumedRecord]]:
    """For each impression (``(partition, offset)``): the interactions of one release with
    its key (user) ordered before it (``order_key``), oldest first. The caller applies those
    interactions after scoring the batch, so the impression is scored against its user's
    stored state and history advanced by them (``ImpressionScorer.score_many(pending=...)``).
    """
    merged = sorted([(order_key("impressions", r), "impressions", r) for r in impressions]
                    + [(order_key("interactions", r), "interactions", r) for r in interactions],
                    key=lambda item: (item[2].partition, item[0]))
    pending: dict[tuple[int, bytes | None], list[ConsumedRecord]] = {}
    out: dict[tuple[int, int], list[ConsumedRecord]] = {}
    for _, kind, r in merged:
        user = (r.partition, r.key)
        if kind == "interactions":
            pending.setdefault(user, []).append(r)
        else:
            out[(r.partition, r.offset)] = list(pending.get(user, ()))
    return out
