"""The worker's per-batch handlers: each takes one micro-batch of records of one topic.

``WorkerServices`` holds what the handlers (and any HTTP view or metrics collector) share: the
state store, the interactions applier, the impression scorer, the feedback window, the label
buffer, the producer for ``scores`` and ``dead-letters``, and the ``WorkerMetrics`` (the one
place the worker counts anything: ``summary`` reads its totals back for the closing log line).

- ``handle_interactions`` groups a batch by partition (offset order kept) and calls
  ``InteractionApplier.apply`` once per partition; dead letters are published and flushed
  before the store write (at least once, never lost); after the write, the changed users'
  records go to the ``user-states`` changelog (``stream.changelog``, when configured);
- ``handle_impressions`` decodes and admits (``stream.admission``), scores all admitted
  impressions with ONE multi-get, publishes the ``Scores`` keyed by user id and adds each to
  the feedback window at the record's stream time;
- ``handle_labels`` decodes, admits and joins the labels through the ``LabelBuffer`` at each
  record's stream time, publishes one ``Feedback`` per joined label on ``feedback`` (keyed by
  user id; the fleet monitor's input, ``stream.feedback``), and feeds the joined examples to
  the ``DriftTracker`` when the worker has one (a static twin runs).

Per-record isolation: a record that does not decode or breaks the ``RecordLimits`` is a dead
letter; when scoring a batch raises (or gives a non-finite score), ``stream.isolation``
bisects it down to the impressions that fail on their own, which become dead letters, and
the others are scored together and published. Every output is bounded by construction
(``RecordLimits.scores_bytes_bound``); a send the producer still refuses is a dead letter
of its impression, never an error out of the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from kafka.errors import MessageSizeTooLargeError

from eventlog.schema import Impression, Interaction, Label
from state_store import StateStore
from stream.admission import RecordLimits
from stream.applier import ApplyReport, InteractionApplier
from stream.changelog import ChangelogWriter
from stream.dead_letters import DeadLetter, decode_records
from stream.drift_tracker import DriftTracker
from stream.feedback import feedback_of
from stream.isolation import isolate
from stream.metrics import WorkerMetrics
from stream.publisher import Publisher
from stream.records import ConsumedRecord
from stream.serving import (
    ImpressionScorer,
    JoinedExample,
    LabelBuffer,
    ScoredImpression,
)
from stream.topics import TopicNames

log = logging.getLogger(__name__)



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
    scorer: ImpressionScorer  # the serving model and its version (``scorer.model_version``)
    labels: LabelBuffer  # and, in ``labels.window``, the scored impressions awaiting labels
    publisher: Publisher
    topics: TopicNames
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    drift: DriftTracker | None = None
    publish_scores: bool = True  # False in `unirec trainer`: it scores to learn, not to serve
    limits: RecordLimits = field(default_factory=RecordLimits)
    log_ids: dict[int, str] = field(default_factory=dict)
    last_reports: dict[int, ApplyReport] = field(default_factory=dict)
    # issue #13: the `user-states` changelog, published after every applied batch (None: not
    # published, e.g. benches; stream.changelog)
    changelog: ChangelogWriter | None = None

    def publish_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Send ``dead`` to ``dead-letters`` and wait until the broker has them."""
        for letter in dead:
            self.publisher.publish(self.topics.dead_letters, letter.key, letter.encode())
        self.publisher.flush()
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


def by_partition(records: Iterable[ConsumedRecord]) -> dict[int, list[ConsumedRecord]]:
    """``{partition: records in increasing offset order}``; a repeated offset keeps its first
    record (a redelivery within one batch)."""
    grouped: dict[int, dict[int, ConsumedRecord]] = {}
    for r in records:
        grouped.setdefault(r.partition, {}).setdefault(r.offset, r)
    return {p: [rs[o] for o in sorted(rs)] for p, rs in sorted(grouped.items())}


def handle_interactions(services: WorkerServices, records: Sequence[ConsumedRecord]
                        ) -> list[ApplyReport]:
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
        if services.changelog is not None:  # after the store's write: stream.changelog
            services.changelog.publish_batch(
                services.store, partition, log_id, consumed, report.last_offset,
                changed=report.skipped < len(consumed))
        # consumed, applied, skipped, rejected, dead letters by reason, latencies, offset
        services.metrics.observe_apply(topic, partition, report)
        reports.append(report)
    return reports


class NonFiniteScoreError(ArithmeticError):
    """A model gave an impression a NaN or infinite score."""


def handle_impressions(
    services: WorkerServices,
    records: Sequence[ConsumedRecord],
    preceding: Mapping[tuple[int, int], Sequence[ConsumedRecord]] | None = None,
) -> int:
    """Score one micro-batch of ``impressions``; returns the number of scores published.

    ``preceding[(partition, offset)]``: the ``interactions`` records of the impression's user
    that come before it but are applied after this batch (``stream.gate``); the impression
    is scored as if they were applied (records the applier rejects are left out).
    """
    topic, limits = services.topics.impressions, services.limits
    admitted: list[tuple[ConsumedRecord, Impression, list[Interaction]]] = []
    for partition, consumed in by_partition(records).items():
        valid, dead = decode_records(Impression, topic, consumed, limits)
        raw = {r.offset: r for r in consumed}
        for offset, message in valid:
            before = (preceding or {}).get((partition, offset), ())
            admitted.append((raw[offset], message, _admitted(before, limits)))
        if dead:
            services.reject(topic, dead)
    services.metrics.count_consumed(topic, len(records))
    if not admitted:
        return 0
    isolated = isolate(admitted, lambda some: _score(services.scorer, some))
    if isolated.failed:
        services.reject(topic, [
            DeadLetter.of(topic, r.partition, r.offset, r.key, r.value,
                          f"cannot score the impression: {reason}")
            for (r, _, _), reason in isolated.failed])
    scored = isolated.result
    metrics = services.metrics
    if scored:
        metrics.observe_store_read(scored[0].read_s)  # the batch's one multi-get
    metrics.count_stale_rebuilt("score", sum(item.state_rebuilt for item in scored))
    published = 0
    for (record, _, _), item in zip(isolated.kept, scored, strict=True):
        metrics.observe_scoring(len(item.impression.candidates), item.score_s)
        if services.publish_scores and not _publish_scores(services, record, item):
            continue
        services.labels.window.add(item, limits.stream_time(record.timestamp))
        published += 1
    if services.publish_scores:
        services.publisher.flush()
    return published


def _score(scorer: ImpressionScorer,
           admitted: Sequence[tuple[ConsumedRecord, Impression, list[Interaction]]]
           ) -> list[ScoredImpression]:
    """Score the admitted impressions together; ``NonFiniteScoreError`` if a score is not
    finite (``stream.isolation`` then finds which impression)."""
    if not admitted:
        return []
    scored = scorer.score_many([i for _, i, _ in admitted], [p for _, _, p in admitted])
    for item in scored:
        if not (np.isfinite(item.dynamic).all()
                and (item.static is None or np.isfinite(item.static).all())):
            raise NonFiniteScoreError(
                f"impression {item.impression.request_id[:256]!r} scores NaN or infinite")
    return scored


def _publish_scores(services: WorkerServices, record: ConsumedRecord,
                    item: ScoredImpression) -> bool:
    """Send the impression's ``Scores``; a send the producer refuses is a dead letter of the
    impression (False)."""
    topic = services.topics.impressions
    try:
        services.publisher.publish(services.topics.scores, item.scores.user_id.encode(),
                                   item.scores.encode())
    except MessageSizeTooLargeError as exc:
        services.reject(topic, [DeadLetter.of(
            topic, record.partition, record.offset, record.key, record.value,
            f"cannot publish the scores: {type(exc).__name__}: {exc}")])
        return False
    return True


def _admitted(records: Sequence[ConsumedRecord], limits: RecordLimits) -> list[Interaction]:
    """The interactions among ``records`` that the applier will admit, in order."""
    valid, _ = decode_records(Interaction, "", records, limits)
    return [message for _, message in valid]


def handle_labels(services: WorkerServices, records: Sequence[ConsumedRecord]) -> int:
    """Join one micro-batch of ``labels`` with the scored impressions; returns joined count."""
    topic, limits = services.topics.labels, services.limits
    joined: list[JoinedExample] = []
    unmatched = 0
    for consumed in by_partition(records).values():
        valid, dead = decode_records(Label, topic, consumed, limits)
        if dead:
            services.reject(topic, dead)
        stamp = {r.offset: r.timestamp for r in consumed}
        for offset, label in valid:
            at = limits.stream_time(stamp[offset])
            example = services.labels.offer(label, at)
            if example is None:
                unmatched += 1
            else:
                joined.append(example)
                if services.publish_scores:  # a serving worker, not `unirec trainer`
                    _publish_feedback(services, example, at)
    if services.drift is not None:
        services.drift.update(joined)
    services.metrics.count_consumed(topic, len(records))
    services.metrics.observe_labels(len(joined), unmatched)
    return len(joined)


# --- feedback (issue #14): one record per joined label, for the fleet monitor -------------

def _publish_feedback(services: WorkerServices, example: JoinedExample, at: float) -> None:
    """Queue the example's ``Feedback`` on ``feedback``, keyed by user id, through the
    worker's bounded producer (sent with the next flush or linger; never waited for here: the
    record is bounded by the admitted ids, so no size refusal can happen)."""
    record = feedback_of(example, at)
    services.publisher.publish(services.topics.feedback, record.user_id.encode(),
                               record.encode())
