"""The worker's per-batch handlers, free of faust: each takes one micro-batch of records.

``WorkerServices`` holds what the handlers (and any HTTP view or metrics collector) share: the
state store, the interactions applier, the impression scorer, the feedback window, the label
buffer, the producer for ``scores`` and ``dead-letters``, and the ``WorkerCounters``.

- ``handle_interactions`` groups a batch by partition (offset order kept) and calls
  ``InteractionApplier.apply`` once per partition; dead letters are published and flushed
  before the store write (at least once, never lost);
- ``handle_impressions`` decodes, scores all valid impressions with ONE multi-get, publishes
  the ``Scores`` keyed by user id and adds each to the feedback window;
- ``handle_labels`` decodes and joins the labels through the ``LabelBuffer``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kafka import KafkaProducer

from eventlog.schema import Impression, Label
from state_store import StateStore
from stream.applier import ApplyReport, InteractionApplier
from stream.dead_letters import ConsumedRecord, DeadLetter, decode_records
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer
from stream.topics import TopicNames

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 30.0


class Record(NamedTuple):
    """One consumed record with its partition (what faust's event gives)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class WorkerCounters:
    """Running totals since the worker started (thread-safe increments via ``add``)."""

    interactions_consumed: int = 0
    interactions_applied: int = 0
    interactions_skipped: int = 0
    impressions_consumed: int = 0
    scores_published: int = 0
    labels_consumed: int = 0
    labels_joined: int = 0
    labels_unmatched: int = 0
    dead_letters: int = 0
    batches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class WorkerServices:
    """What the worker's handlers share; the hook for HTTP views and metrics.

    ``log_ids`` maps each assigned ``interactions`` partition to the identity of the log its
    offsets belong to (``stream.topics.log_identity``): set when the partition is assigned and
    checked, removed when it is revoked; records of a partition without one are not applied.
    ``last_reports`` keeps each partition's latest ``ApplyReport`` (latency, stages).
    """

    store: StateStore
    applier: InteractionApplier
    scorer: ImpressionScorer
    window: FeedbackWindow
    labels: LabelBuffer
    producer: KafkaProducer
    topics: TopicNames
    model_version: int
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    log_ids: dict[int, str] = field(default_factory=dict)
    last_reports: dict[int, ApplyReport] = field(default_factory=dict)

    def publish_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Send ``dead`` to ``dead-letters`` and wait until the broker has them."""
        for letter in dead:
            self.producer.send(self.topics.dead_letters, key=letter.key, value=letter.encode())
        self.producer.flush(timeout=FLUSH_TIMEOUT_S)
        self.counters.add(dead_letters=len(dead))


def by_partition(records: Iterable[Record]) -> dict[int, list[ConsumedRecord]]:
    """``{partition: records in increasing offset order}``; a repeated offset keeps its first
    record (a redelivery within one batch)."""
    grouped: dict[int, dict[int, ConsumedRecord]] = {}
    for r in records:
        grouped.setdefault(r.partition, {}).setdefault(
            r.offset, ConsumedRecord(r.offset, r.key, bytes(r.value))
        )
    return {p: [rs[o] for o in sorted(rs)] for p, rs in sorted(grouped.items())}


def handle_interactions(services: WorkerServices, records: Sequence[Record]) -> list[ApplyReport]:
    """Apply one micro-batch of ``interactions`` records, partition by partition."""
    topic = services.topics.interactions
    reports = []
    for partition, consumed in by_partition(records).items():
        log_id = services.log_ids.get(partition)
        if log_id is None:
            # Revoked, or not yet checked since the last assignment: nothing is written, and
            # the seek that follows the assignment reads these records again if still ours.
            log.warning("%s[%d]: %d records dropped: the partition's log is not checked "
                        "(rebalancing)", topic, partition, len(consumed))
            continue
        report = services.applier.apply(
            topic, partition, log_id, consumed, consumed[-1].offset,
            on_dead_letters=services.publish_dead_letters,
        )
        services.last_reports[partition] = report
        services.counters.add(
            interactions_consumed=len(consumed), interactions_applied=report.applied,
            interactions_skipped=report.skipped, batches=1,
        )
        reports.append(report)
    return reports


def handle_impressions(services: WorkerServices, records: Sequence[Record]) -> int:
    """Score one micro-batch of ``impressions``; returns the number of scores published."""
    topic = services.topics.impressions
    impressions: list[Impression] = []
    for partition, consumed in by_partition(records).items():
        valid, dead = decode_records(Impression, topic, partition, consumed)
        impressions.extend(message for _, message in valid)
        if dead:
            services.publish_dead_letters(dead)
    services.counters.add(impressions_consumed=len(records))
    if not impressions:
        return 0
    scored = services.scorer.score_many(impressions)
    for item in scored:
        services.producer.send(
            services.topics.scores, key=item.scores.user_id.encode(), value=item.scores.encode()
        )
        services.window.add(item)
    services.producer.flush(timeout=FLUSH_TIMEOUT_S)
    services.counters.add(scores_published=len(scored))
    return len(scored)


def handle_labels(services: WorkerServices, records: Sequence[Record]) -> int:
    """Join one micro-batch of ``labels`` with the scored impressions; returns joined count."""
    topic = services.topics.labels
    joined = unmatched = 0
    for partition, consumed in by_partition(records).items():
        valid, dead = decode_records(Label, topic, partition, consumed)
        if dead:
            services.publish_dead_letters(dead)
        for _, label in valid:
            if services.labels.offer(label) is None:
                unmatched += 1
            else:
                joined += 1
    services.counters.add(labels_consumed=len(records), labels_joined=joined,
                          labels_unmatched=unmatched)
    return joined
