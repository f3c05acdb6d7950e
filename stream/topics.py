"""The topics, their creation, and what a partition's offsets belong to.

``TopicNames`` holds the topic names (docs/system.md, "Topics"), optionally with a prefix.
``ensure_topics`` creates the missing ones; ``ensure_copartitioned`` does too, then refuses
input topics whose partition counts differ. ``log_identity`` names the log that a topic's
offsets belong to, and ``end_offsets`` gives each partition's end offset; together they let the
worker refuse offsets stored for another log (docs/system.md, "Exactly once").

Log identity, as found with the embedded broker (Tansu 0.6.0) and kafka-python 3.0.12:

- the cluster id is whatever the broker was started with (Tansu's default is the fixed
  ``"tansu_cluster"``; ``EmbeddedBroker`` passes a fresh ``unirec-embedded-<hex>`` per start);
- the topic id is a UUID (version 7: time plus random bits) assigned when the topic is created,
  stable for the topic's life, new when the topic is recreated or the in-memory broker
  restarted. Apache Kafka (2.8+) gives topic ids too.

So ``log_identity`` = ``"<cluster id>/<topic>/<topic id>"`` changes on a restarted embedded
broker even if the same cluster id is passed again. A broker that gives no topic id (Kafka
older than 2.8) yields ``"<cluster id>/<topic>/-"`` and a warning: a recreated topic on such a
broker cannot be told apart by its identity, only by ``end_offsets`` falling below a stored
offset.

End offsets: Tansu 0.6.0 answers ListOffsets(LATEST) with the base offset of the partition's
last record batch plus one, not with the offset after its last record (a batch of 5 records
at offsets 0..4 gives 1, not 5), while its Fetch responses carry the right high watermark.
``end_offsets`` therefore takes, per non-empty partition, the larger of the listed offset and
the high watermark of one fetch from (listed - 1). On Apache Kafka both agree.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream.kafka_client import kafka_admin, kafka_consumer

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_NO_TOPIC_ID = (None, "", str(uuid.UUID(int=0)))


class BrokerUnavailable(ConnectionError):
    """No broker answered at the bootstrap address within the timeout."""


class TopicError(RuntimeError):
    """A topic that is missing, or that the broker refused to create."""


class CopartitionError(TopicError):
    """Topics read together whose partition counts differ (``ensure_copartitioned``)."""


@dataclass(frozen=True)
class TopicNames:
    """The topic names, one field per topic; ``with_prefix`` prefixes all of them."""

    interactions: str = "interactions"
    impressions: str = "impressions"
    scores: str = "scores"
    labels: str = "labels"
    model_updates: str = "model-updates"
    dead_letters: str = "dead-letters"
    user_states: str = "user-states"  # compacted changelog of the state store (stream.changelog)
    workers: str = "workers"  # compacted: each worker's API URL and partitions (stream.ownership)
    feedback: str = "feedback"  # joined (impression, label) pairs, the fleet monitor's input

    @classmethod
    def with_prefix(cls, prefix: str) -> TopicNames:
        """Every default name with ``prefix`` in front (e.g. ``"test-"``)."""
        return cls(**{f.name: prefix + f.default for f in fields(cls)})  # type: ignore[operator]

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def of(self, kind: str) -> str:
        """The topic of ``kind``, a field name (``"interactions"``, ``"model_updates"``, ...);
        ``KeyError`` names the kinds."""
        if kind not in {f.name for f in fields(self)}:
            raise KeyError(f"no topic kind {kind!r}; kinds: {[f.name for f in fields(self)]}")
        return getattr(self, kind)

    def kind_of(self, topic: str) -> str:
        """The kind (field name) whose topic is ``topic``; ``KeyError`` if none is."""
        for f in fields(self):
            if getattr(self, f.name) == topic:
                return f.name
        raise KeyError(f"{topic!r} is none of these topics: {self.all()}")

    def inputs(self) -> tuple[str, str, str]:
        """The topics a worker reads together, partition p of each in one worker: they must
        be co-partitioned (``ensure_copartitioned``)."""
        return self.interactions, self.impressions, self.labels

    def copartitioned(self) -> tuple[str, ...]:
        """The inputs and the ``user-states`` changelog: partition p of the changelog holds the
        states of the users of ``interactions`` partition p, so all must have one count."""
        return (*self.inputs(), self.user_states)

    def partitions(self, keyed: int) -> dict[str, int]:
        """The partition count of each topic: ``keyed`` for the topics keyed by user id, one for
        ``model-updates`` (model versions form one total order that every scorer reads) and
        ``workers`` (every worker reads all of it)."""
        single = (self.model_updates, self.workers)
        return {name: 1 if name in single else keyed for name in self.all()}

    def compacted(self) -> tuple[str, str]:
        """The topics created with ``cleanup.policy=compact``: only the last record of each
        key matters (``user-states``: a user's latest state; ``workers``: a worker's latest
        announcement)."""
        return self.user_states, self.workers


@contextlib.contextmanager
def admin_client(bootstrap: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[KafkaAdminClient]:
    """A connected ``KafkaAdminClient``; ``BrokerUnavailable`` if none answers in time."""
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = kafka_admin(
            bootstrap_servers=bootstrap, client_id="unirec-admin",
            bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
        )
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s ({exc})"
        ) from exc
    try:
        yield admin
    finally:
        admin.close()


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition count of each existing topic among ``names`` (missing ones are left out)."""
    return {
        topic["name"]: len(topic["partitions"])
        for topic in admin.describe_topics(names)
        if topic["error_code"] == 0
    }


def ensure_topics(
    bootstrap: str,
    partitions: int,
    replication: int = 1,
    topics: TopicNames | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, int]:
    """Create the missing topics of ``topics`` (default names) and return every topic's
    partition count, ``{name: partitions}``.

    New keyed topics get ``partitions`` partitions (``model-updates`` one, see
    ``TopicNames.partitions``); ``interactions`` is created with ``retention.ms=-1`` (a
    finite retention is safe once every partition's changelog is ahead of it: docs/operations.md),
    ``user-states`` and ``workers`` with ``cleanup.policy=compact``.
    Existing topics are left as they are, even with another partition count (a warning says
    so). Idempotent, and safe against a concurrent creator.
    Raises ``BrokerUnavailable`` or ``TopicError``.
    """
    if partitions < 1 or replication < 1:
        raise ValueError(f"partitions and replication must be >= 1, got {partitions}, "
                         f"{replication}")
    topics = topics or TopicNames()
    wanted = topics.partitions(partitions)
    with admin_client(bootstrap, timeout_s) as admin:
        existing = _partition_counts(admin, list(wanted))
        missing = {name: n for name, n in wanted.items() if name not in existing}
        if missing:
            # A new owner restores from `user-states` and reads `interactions` only from the
            # offsets the changelog reflects (stream.changelog); kept forever by default all
            # the same, for a partition whose changelog is empty (replayed from offset 0).
            compact = {"cleanup.policy": "compact"}
            _create(admin, missing, replication, timeout_s,
                    {topics.interactions: {"retention.ms": "-1"},
                     **{name: compact for name in topics.compacted()}})
        counts = _partition_counts(admin, list(wanted))
    for name, n in wanted.items():
        if name not in counts:
            raise TopicError(f"topic {name!r} does not exist after creation")
        if name in existing and counts[name] != n:
            log.warning("topic %r exists with %d partitions (asked for %d); left as it is",
                        name, counts[name], n)
    return counts


def copartitioning_error(counts: Mapping[str, int], bootstrap: str,
                         interactions: str = "interactions") -> str | None:
    """``None`` if every topic of ``counts`` (``{name: partitions}``) has the same partition
    count; otherwise a one-line error naming each topic and its count, with the commands that
    add the missing partitions on Kafka and what to do on the embedded broker (which cannot
    add partitions). ``interactions``: the topic whose growth moves users away from their
    states (the message says so when it is among those to grow)."""
    if len(set(counts.values())) <= 1:
        return None
    target = max(counts.values())
    smaller = [name for name, n in counts.items() if n < target]
    found = ", ".join(f"{name!r} has {n}" for name, n in counts.items())
    commands = "; ".join(f"kafka-topics.sh --bootstrap-server {bootstrap} --alter "
                         f"--topic {name} --partitions {target}" for name in smaller)
    moved = (f" (grown, {interactions!r} sends users' later events to other partitions than "
             "their stored states: if it holds events, recreate it and the stores instead)"
             if interactions in smaller else "")
    return (f"topics not co-partitioned: {found} partitions; a worker reads partition p of "
            f"each of them together, so they need one partition count. Fix on Kafka: "
            f"{commands}{moved}. The embedded broker cannot add partitions and keeps topics in "
            f"memory only: stop it and every producer and worker using it, start it again and "
            f"start them all with --partitions {target}")


def ensure_copartitioned(bootstrap: str, partitions: int, topics: TopicNames,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, int]:
    """``ensure_topics`` (the missing topics made with ``partitions``), then the partition
    count of each of ``topics.copartitioned()`` as the broker described them, in that order:
    one admin connection.

    Raises ``CopartitionError`` (``copartitioning_error``'s message) when the counts differ,
    ``TopicError``, ``BrokerUnavailable``. A Kafka Streams topology refuses such topics at
    start the same way: a worker assigned partition p of each reads nothing of the partitions
    only one topic has, silently.
    """
    counts = ensure_topics(bootstrap, partitions, topics=topics, timeout_s=timeout_s)
    ordered = {name: counts[name] for name in topics.copartitioned()}
    message = copartitioning_error(ordered, bootstrap, topics.interactions)
    if message is not None:
        raise CopartitionError(message)
    return ordered


def _create(admin: KafkaAdminClient, missing: dict[str, int], replication: int,
            timeout_s: float, configs: dict[str, dict[str, str]]) -> None:
    request = {name: {"num_partitions": n, "replication_factor": replication,
                      "configs": configs.get(name, {})}
               for name, n in missing.items()}
    try:
        result = admin.create_topics(request, timeout_ms=int(timeout_s * 1000),
                                     raise_errors=False)
    except KafkaError as exc:
        raise TopicError(f"cannot create topics {sorted(missing)}: {exc}") from exc
    for topic in result["topics"]:
        code = topic["error_code"]
        if code == TopicAlreadyExistsError.errno:
            continue  # created by someone else meanwhile: fine
        if code != 0:
            raise TopicError(f"cannot create topic {topic['name']!r}: "
                             f"{topic.get('error_message') or f'error code {code}'}")
        log.info("created topic %s (%d partitions, replication %d)",
                 topic["name"], missing[topic["name"]], replication)
    admin.wait_for_topics(list(missing), timeout_ms=int(timeout_s * 1000))


def log_identity(bootstrap: str, topic: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """``"<cluster id>/<topic>/<topic id>"``: the identity of the log ``topic``'s offsets
    belong to (see the module docstring). Stable for a topic's life; different for a recreated
    topic or a restarted embedded broker. Raises ``TopicError`` if the topic does not exist.
    """
    with admin_client(bootstrap, timeout_s) as admin:
        cluster_id = admin.describe_cluster().get("cluster_id") or "-"
        described = admin.describe_topics([topic])
    if not described or described[0]["error_code"] != 0:
        raise TopicError(f"topic {topic!r} does not exist at {bootstrap}")
    topic_id = described[0].get("topic_id")
    if topic_id in _NO_TOPIC_ID or str(topic_id) in _NO_TOPIC_ID:
        log.warning("the broker at %s gives no topic id for %r: a recreated topic keeps the "
                    "same log identity", bootstrap, topic)
        topic_id = "-"
    return f"{cluster_id}/{topic}/{topic_id}"


def end_offsets(bootstrap: str, topic: str,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[int, int]:
    """``{partition: end offset}`` (the offset the next record will get) of every partition of
    ``topic``, correct on Tansu too (see the module docstring). Raises ``TopicError`` if the
    topic does not exist, ``TimeoutError`` if the check fetch gets no answer in time.
    """
    with admin_client(bootstrap, timeout_s) as admin:
        described = admin.describe_topics([topic])
        if not described or described[0]["error_code"] != 0:
            raise TopicError(f"topic {topic!r} does not exist at {bootstrap}")
        tps = [TopicPartition(topic, p["partition_index"]) for p in described[0]["partitions"]]
        listed = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps})
    ends = {tp.partition: int(listed[tp].offset) for tp in tps}
    nonempty = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
    if nonempty:
        for partition, high in _fetch_high_watermarks(bootstrap, nonempty, ends,
                                                      timeout_s).items():
            ends[partition] = max(ends[partition], high)
    return ends


def _fetch_high_watermarks(bootstrap: str, tps: list[TopicPartition], listed: dict[int, int],
                           timeout_s: float) -> dict[int, int]:
    """The high watermark each partition's Fetch response reports, fetching from listed - 1."""
    consumer = kafka_consumer(
        bootstrap_servers=bootstrap, client_id="unirec-end-offsets", group_id=None,
        enable_auto_commit=False, max_partition_fetch_bytes=1024, fetch_max_wait_ms=10,
        request_timeout_ms=int(timeout_s * 1000) + 1000,
    )
    try:
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, listed[tp.partition] - 1)
        deadline = time.monotonic() + timeout_s
        highs: dict[int, int] = {}
        while len(highs) < len(tps):
            if time.monotonic() > deadline:
                pending = sorted(tp.partition for tp in tps if tp.partition not in highs)
                raise TimeoutError(f"no fetch answer for {tps[0].topic} partitions {pending}")
            consumer.poll(timeout_ms=100, max_records=1)
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None:
                    highs[tp.partition] = int(high)
        return highs
    finally:
        consumer.close()
