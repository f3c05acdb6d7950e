"""The worker's per-batch handlers: each takes one micro-batch of records of one topic.

``WorkerServices`` holds what the handlers (and any HTTP view or metrics collector) share: the
state store, the interactions applier, the impression scorer, the feedback window, the label
buffer, the producer for ``scores`` and ``dead-letters``, and the ``WorkerMetrics`` (the one
place the worker counts anything: ``summary`` reads its totals back for the closing log line).

- ``handle_interactions`` groups a batch by partition (offset order kept) and calls
  ``InteractionApplier.apply`` once per partition; dead letters are published and flushed
  before the store write (at least once, never lost);
- ``handle_impressions`` decodes, scores all valid impressions with ONE multi-get, publishes
  the ``Scores`` keyed by user id and adds each to the feedback window;
- ``handle_labels`` decodes and joins the labels through the ``LabelBuffer``, and feeds the
  joined examples to the ``DriftTracker`` when the worker has one (a static twin runs).

The user-state norm histogram (``WorkerMetrics.observe_state_norms``) is not fed: an
``ApplyReport`` does not carry the states it wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kafka import KafkaProducer

from eventlog.schema import Impression, Interaction, Label, SchemaError, decode
from state_store import StateStore
from stream.applier import ApplyReport, InteractionApplier
from stream.dead_letters import ConsumedRecord, DeadLetter, decode_records
from stream.drift import DriftTracker
from stream.metrics import WorkerMetrics
from stream.serving import FeedbackWindow, ImpressionScorer, JoinedExample, LabelBuffer
from stream.topics import TopicNames

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 30.0


class Record(NamedTuple):
    """One consumed record of a topic: its partition, offset, key, value and Kafka timestamp
    (milliseconds; the worker orders topics by it, ``stream.gate``)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int = 0


@dataclass
class WorkerServices:
    """What the worker's handlers share; the hook for HTTP views and metrics.

    ``log_ids`` maps each assigned ``interactions`` partition to the identity of the log its
    offsets belong to (``stream.topics.log_identity``): set when the partition is assigned and
    checked, removed when it is revoked; records of a partition without one are not applied.
    ``last_reports`` keeps each partition's latest ``ApplyReport`` (latency, stages).
    ``metrics`` counts everything the handlers do (the HTTP API's ``/metrics`` renders it).
    ``drift``: the live model against its static twin (None: no twin).
    """

    store: StateStore
    applier: InteractionApplier
    scorer: ImpressionScorer
    window: FeedbackWindow
    labels: LabelBuffer
    producer: KafkaProducer
    topics: TopicNames
    model_version: int
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    drift: DriftTracker | None = None
    publish_scores: bool = True  # False in `unirec trainer`: it scores to learn, not to serve
    log_ids: dict[int, str] = field(default_factory=dict)
    last_reports: dict[int, ApplyReport] = field(default_factory=dict)

    def publish_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Send ``dead`` to ``dead-letters`` and wait until the broker has them."""
        for letter in dead:
            self.producer.send(self.topics.dead_letters, key=letter.key, value=letter.encode())
        self.producer.flush(timeout=FLUSH_TIMEOUT_S)
        # Not counted here: the applier's are counted by ``observe_apply`` (its report), the
        # others by their handler (``count_rejected``).

    def summary(self) -> dict[str, int]:
        """Totals since the worker started, read back from ``metrics`` (the closing log line)."""
        t = self.topics
        sample = self.metrics.registry.get_sample_value

        def total(name: str, **labels: str) -> int:
            return int(sample(f"unirec_{name}_total", labels) or 0)

        return {
            "interactions_consumed": total("events_consumed", topic=t.interactions),
            "interactions_applied": total("events_applied", topic=t.interactions),
            "interactions_skipped": total("events_skipped", topic=t.interactions),
            "impressions_consumed": total("events_consumed", topic=t.impressions),
            "labels_consumed": total("events_consumed", topic=t.labels),
            "labels_joined": total("labels_joined"),
            "labels_unmatched": total("labels_unmatched"),
            "rejected": sum(total("events_rejected", topic=topic)
                            for topic in (t.interactions, t.impressions, t.labels)),
        }

    def reject(self, topic: str, dead: Sequence[DeadLetter]) -> None:
        """Publish and count dead letters of a topic the applier does not handle."""
        self.publish_dead_letters(dead)
        for letter in dead:
            self.metrics.count_rejected(topic, letter.reason)


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
        # consumed, applied, skipped, rejected, dead letters by reason, latencies, offset
        services.metrics.observe_apply(topic, partition, report)
        reports.append(report)
    return reports


def handle_impressions(
    services: WorkerServices,
    records: Sequence[Record],
    preceding: Mapping[tuple[int, int], Sequence[Record]] | None = None,
) -> int:
    """Score one micro-batch of ``impressions``; returns the number of scores published.

    ``preceding[(partition, offset)]``: the ``interactions`` records of the impression's user
    that come before it but are applied after this batch (``stream.gate``); the impression
    is scored as if they were applied (undecodable ones are left out: the applier rejects
    them).
    """
    topic = services.topics.impressions
    impressions: list[Impression] = []
    pending: list[list[Interaction]] = []
    for partition, consumed in by_partition(records).items():
        valid, dead = decode_records(Impression, topic, partition, consumed)
        for offset, message in valid:
            impressions.append(message)
            before = (preceding or {}).get((partition, offset), ())
            pending.append(_decodable(before))
        if dead:
            services.reject(topic, dead)
    services.metrics.count_consumed(topic, len(records))
    if not impressions:
        return 0
    scored = services.scorer.score_many(impressions, pending)
    metrics = services.metrics
    if scored:
        metrics.observe_store_read(scored[0].read_s)  # the batch's one multi-get
    metrics.count_stale_rebuilt("score", sum(item.state_rebuilt for item in scored))
    for item in scored:
        metrics.observe_scoring(len(item.impression.candidates), item.score_s)
        if services.publish_scores:
            services.producer.send(services.topics.scores, key=item.scores.user_id.encode(),
                                   value=item.scores.encode())
        services.window.add(item)
    if services.publish_scores:
        services.producer.flush(timeout=FLUSH_TIMEOUT_S)
    return len(scored)


def _decodable(records: Sequence[Record]) -> list[Interaction]:
    events = []
    for r in records:
        try:
            events.append(decode(Interaction, r.value))
        except SchemaError:
            continue
    return events


def handle_labels(services: WorkerServices, records: Sequence[Record]) -> int:
    """Join one micro-batch of ``labels`` with the scored impressions; returns joined count."""
    topic = services.topics.labels
    joined: list[JoinedExample] = []
    unmatched = 0
    for partition, consumed in by_partition(records).items():
        valid, dead = decode_records(Label, topic, partition, consumed)
        if dead:
            services.reject(topic, dead)
        for _, label in valid:
            example = services.labels.offer(label)
            if example is None:
                unmatched += 1
            else:
                joined.append(example)
    if services.drift is not None:
        services.drift.update(joined)
    services.metrics.count_consumed(topic, len(records))
    services.metrics.observe_labels(len(joined), unmatched)
    return len(joined)
