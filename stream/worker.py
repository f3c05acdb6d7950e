"""``unirec worker``: consumes ``interactions``, ``impressions`` and ``labels`` in micro-batches.

One kafka-python consumer, a member of the worker's group (``group_id``), is subscribed to
the three topics; the range assignor gives a worker the same partition numbers of all three
(co-partitioning: a user's impressions are scored where the user's state is). Its loop, on
one thread, polls up to ``batch_size`` records at a time and:

- ``impressions``: scored (one multi-get per batch), ``Scores`` published to ``scores``;
- ``interactions``: applied exactly once through ``InteractionApplier`` (``stream.handlers``);
- ``labels``: joined with the scored impressions through the ``LabelBuffer``;

in that order, interactions and labels passing through an ``EventTimeGate`` (``stream.gate``)
so that an impression is scored before the interaction it predicts is applied (the gate holds
at most ``max_held`` records per partition).

Why not faust's agents: measured here (2 cores, embedded broker), a faust-streaming 0.15
agent over ``take_events`` with a handler that does nothing delivers about 7,000 events/s
(each event goes through several asyncio tasks), while a kafka-python consumer reads
about 58,000/s. The 10,000 interactions/s the worker must apply cannot pass through faust.

Exactly once (docs/system.md, "Exactly once"): the group's committed offsets
matter only for impressions and labels; they are committed every ``lag_interval_s``, on
revocation and at the end, up to what was processed (not merely polled: the gate may hold
records), so impressions and labels are processed at least once, and after a clean
rebalance exactly once (the revoked partitions' commit, from kafka-python's IO thread:
``_Rebalance``). Whenever
``interactions`` partitions are assigned, the worker seeks each to one past the offset stored
in the state store, after checking that the stored offsets belong to the current log
(``StateStore.resume_offset`` with the log identity and the partition's end offset). If they
do not, the worker stops with an error naming the partition, unless ``reset_on_new_log`` is
set: then the partition's stored offset is forgotten and the new log is consumed from its
start. Redelivered records are skipped by the applier anyway. The check runs before the group
is joined (for every partition the store holds; a refusal is a ``WorkerError``, exit status 2
from the CLI) and again after every assignment (a refusal then ends the process with status
3: e.g. an embedded broker restarted under a running worker).

Co-partitioning (issue #16): the three input topics must have one partition count, or the
partitions only some of them have are never read with their peers (an ``interactions``
topic auto-created with more partitions by a producer that started first: its extra
partitions stalled, silently). ``ensure_copartitioned`` refuses differing counts with an
error naming each topic, its count and the command that fixes it: at start (a
``TopicError``, exit status 2 from the CLI) and on every assignment, before the log check
(it then ends the process with status 4, ``EXIT_NOT_COPARTITIONED``). A revoked partition is not
applied until it is assigned and checked again, and what the gate held of it is dropped. An
assignment first creates the topics the broker lacks, as the start does (a restarted embedded
broker has none but those the consumer's metadata request made); a broker that does not answer
the checks ends the process with status 7, ``EXIT_ASSIGNMENT_UNCHECKED``.

Partition ownership (issues #7, #13): each worker keeps, in its own store, the state of the
``interactions`` partitions it is assigned, and after each applied batch publishes the changed
users' records and the partition's offset to the compacted ``user-states`` changelog
(``stream.changelog``; from ``handle_interactions``). The changelog rule: it is written after
the store's WriteBatch (states, history and offset together, the exactly-once write), so a
crash between the two leaves the changelog one batch behind the store, possibly with some of
that batch's user records sent but not its marker. Restore is still exact: per user the record
with the highest offset wins (duplicates are harmless), ``interactions`` is read from the
offset of the newest marker, and an event at or below its user's record offset is skipped.
On assignment the listener (kafka-python's IO thread, where nothing may block on the consumer)
checks the partitions (``plan_resume``), pauses them with their impressions and labels and
marks them restoring; the loop's thread then restores each one whose store lacks it or holds it
older than the changelog, seeks it to the offset the changelog reflects, resumes it and
announces the worker's partitions and API URL on ``workers`` (``stream.ownership``). A
partition the worker owned in the previous generation and lost cleanly resumes at once. A
partition with no changelog is replayed from offset 0; one whose needed ``interactions``
events were deleted stops the worker (``EXIT_CHANGELOG``), and a changelog of another log
without ``reset_on_new_log`` does too (``EXIT_LOG_CHANGED``). A worker that loses a partition
stops writing it; its API answers 421 with the owner's URL for those users instead of its
stale states. A restore blocks the loop: it must end within ``rebalance_timeout_s``.

Online learning (``stream.learner``, ``stream.model_updates``, ``stream.drift_tracker``): unless
``train`` is off, an ``OnlineLearner`` thread fine-tunes a copy of the model on the joined
labels and publishes versions to ``versions_dir``, announced on ``model-updates`` (one
trainer per directory and topic, ``stream.trainer_claim``: a ``unirec trainer`` that cannot
lock the directory stops with a ``WorkerError``, a worker serves without training; a trainer
that yields to an older one on the topic ends with ``EXIT_TRAINER_REFUSED``). Every
worker reads ``model-updates`` outside its group and swaps an announced version in between two
batches. At start it serves the newest readable version of ``versions_dir`` (a training worker
with an empty directory publishes its checkpoint there as the first version). The static twin,
the ``--checkpoint`` model (or ``static_checkpoint``) frozen at start, scores every impression
in shadow with a zero user state (docs/model.md, "Static twin": a per-user snapshot at
deploy time would cost a copy of the store, and users first seen later have none); the joined
labels feed the ``DriftTracker`` behind ``GET /drift`` and the drift metrics.

The HTTP API (``stream.http_api``) is served on ``web_bind:web_port`` from a thread of its
own; every ``lag_interval_s`` the loop sets the consumer lag of each assigned
``interactions`` partition (the fetched high water minus the store's next offset).
SIGTERM and SIGINT stop the loop after the batch in hand; the consumer, the producer, the
server and the store are closed in that order.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from kafka import AsyncConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from eventlog.loaders import DatasetUnavailable, load_dataset
from model.checkpoint import CheckpointError, load
from model.scorer import Scorer
from model.versions import VersionStore
from state_store import LogMismatchError, StateStore, StoreConfig
from stream.admission import RecordLimits
from stream.applier import InteractionApplier
from stream.changelog import (
    ChangelogError,
    ChangelogLogError,
    ChangelogWriter,
    restore_partition,
)
from stream.drift_tracker import DriftConfig, DriftTracker
from stream.gate import (
    IDLE_GRACE_S,
    KINDS,
    EventTimeGate,
    preceding_interactions,
)
from stream.handlers import (
    WorkerServices,
    handle_impressions,
    handle_interactions,
    handle_labels,
)
from stream.health import DEFAULT_STALL_AFTER_S, LoopHealth
from stream.http_api import ApiServer, ApiServices, ApiToken
from stream.kafka_client import kafka_consumer
from stream.learner import LearnerConfig, OnlineLearner
from stream.metrics import WorkerMetrics
from stream.model_updates import HotSwap, UpdateListener, announce, starting_model
from stream.ownership import Ownership, WorkerDirectory, advertised_url
from stream.ownership import announce as announce_owner
from stream.partition_ends import PartitionEnds
from stream.producer import open_producer
from stream.publisher import KafkaPublisher
from stream.records import ConsumedRecord
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer
from stream.topics import (
    BrokerUnavailable,
    CopartitionError,
    TopicError,
    TopicNames,
    end_offsets,
    ensure_copartitioned,
    log_identity,
)
from stream.trainer_claim import RivalWatch, TrainerClaimError, TrainerIdentity, VersionsLock

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 100
"""How long the broker may hold the consumer's fetch when there is nothing new to read. Short
for latency: `bench/ingest.py --quick` measured produce-to-visible p50 478 ms with 100 against
532 ms with kafka-python's default 500 (the event-time gate's grace is most of either)."""

EXIT_LOG_CHANGED = 3
EXIT_NOT_COPARTITIONED = 4
EXIT_TRAINER_REFUSED = 5  # a `unirec trainer` that yielded to another trainer on the topic
EXIT_CHANGELOG = 6  # an assigned partition cannot be restored exactly (stream.changelog)
EXIT_ASSIGNMENT_UNCHECKED = 7  # the broker could not be read, or a topic made, on an assignment


class WorkerError(RuntimeError):
    """A worker that cannot start or must stop: the message says why (one line)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker is configured with (printed once at start)."""

    bootstrap_servers: str
    store_dir: Path
    checkpoint: Path
    device: str = "cpu"
    partitions: int = 4
    batch_size: int = 256
    batch_within_s: float = 0.05
    web_port: int = 6066
    web_bind: str = "127.0.0.1"
    reset_on_new_log: bool = False
    torch_threads: int = 1
    quantize: str = "none"  # "w8a16": the scorer's int8-weight copy (model.quantize)
    group_id: str = "unirec-worker"
    topic_prefix: str = ""
    feedback_window_s: float = 3600.0  # event time an impression waits for its labels
    feedback_max: int = 100_000
    label_capacity: int = 100_000
    timeout_s: float = 10.0
    # Group timings: short ones suit the embedded broker and tests; Kafka's defaults (45 s
    # session, 3 s heartbeats) suit production. The rebalance timeout is kafka-python's
    # max_poll_interval: it must also exceed the time one polled batch takes.
    rebalance_timeout_s: float = 60.0
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    lag_interval_s: float = 1.0  # seconds between consumer lag updates
    max_held: int = 32768  # records the gate may hold per topic and partition (stream.gate)
    idle_grace_s: float = IDLE_GRACE_S  # how long an idle topic holds a record back (stream.gate)
    profiles_dataset: str | None = None  # a data set whose user profiles the scorer reads
    data_dir: Path | None = None  # where that data set is cached
    api_token: ApiToken | None = None  # the HTTP API's bearer token (its repr hides it)
    stall_after_s: float = DEFAULT_STALL_AFTER_S  # /healthz: 503 past this without an iteration
    advertised_url: str | None = None  # this API's URL for the others (stream.ownership)

    train: bool = True  # run the online learner in this worker
    publish_scores: bool = True  # False: `unirec trainer`, which scores only to learn
    versions_dir: Path | None = None  # default: versions_dir_of(store_dir)
    static_checkpoint: Path | None = None  # the static twin (default: the checkpoint)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    limits: RecordLimits = field(default_factory=RecordLimits)  # what records are admitted

    @property
    def topics(self) -> TopicNames:
        return TopicNames.with_prefix(self.topic_prefix)

    @property
    def versions(self) -> Path:
        return self.versions_dir or versions_dir_of(self.store_dir)


def versions_dir_of(store_dir: Path) -> Path:
    """The default model versions directory: ``<store>-versions``, next to the store."""
    return store_dir.with_name(f"{store_dir.name}-versions")


def model_version_of(meta: dict[str, Any]) -> int:
    """The model version recorded in a checkpoint's metadata, or 1."""
    for key in ("model_version", "version"):
        value = meta.get(key)
        if isinstance(value, int) and value >= 0:
            return value
    return 1


def build_services(config: WorkerConfig, metrics: WorkerMetrics | None = None
                   ) -> WorkerServices:
    """Load the model, open the store and the producer; ``WorkerError`` if one cannot be.

    ``metrics`` (default: a new ``WorkerMetrics``) is what the handlers count into: pass the
    one the HTTP API renders."""
    device = torch.device(config.device)
    try:
        model, meta = load(config.checkpoint, device)
    except CheckpointError as exc:
        raise WorkerError(f"{exc} (train a model first, e.g. `unirec train`)") from exc
    version = model_version_of(meta)
    metrics = metrics if metrics is not None else WorkerMetrics()
    try:
        static = load(config.static_checkpoint, device)[0] if config.static_checkpoint \
            else copy.deepcopy(model)
        model, version = starting_model(VersionStore(config.versions, config.learner.keep_versions),
                                        model, version, device, publish=config.train,
                                        metrics=metrics)
    except CheckpointError as exc:
        raise WorkerError(f"cannot load the static twin or the latest model version: {exc}"
                          ) from exc
    store_config = StoreConfig(state_dim=model.cfg.d_model, history_len=model.cfg.stored_events)
    try:
        store = StateStore.open(config.store_dir, store_config)
    except Exception as exc:
        raise WorkerError(f"cannot open the state store at {config.store_dir}: {exc}") from exc
    try:
        producer = open_producer(config.bootstrap_servers, config.timeout_s)
    except Exception:
        store.close()
        raise
    profiles = {}
    if config.profiles_dataset is not None:
        try:
            profiles = load_dataset(config.profiles_dataset, config.data_dir).profiles
        except (KeyError, DatasetUnavailable) as exc:
            store.close()
            producer.close()
            raise WorkerError(f"cannot load the profiles of {config.profiles_dataset}: "
                              f"{exc}") from exc
        log.info("%d user profiles from %s", len(profiles), config.profiles_dataset)
    log.info("model %s: version %d, d_model %d, on %s", config.checkpoint, version,
             model.cfg.d_model, device)
    metrics.set_model_version(version)
    metrics.set_users(sum(1 for _ in store.iter_users()))
    scorer = ImpressionScorer(store, Scorer(model, device, quantize=config.quantize), version,
                              profiles,
                              static=Scorer(static, device))
    return WorkerServices(
        store=store,
        applier=InteractionApplier.following(store, scorer.serving_model, config.limits),
        scorer=scorer,
        labels=LabelBuffer(FeedbackWindow(config.feedback_window_s, config.feedback_max),
                           config.label_capacity),
        publisher=KafkaPublisher(producer, config.timeout_s),
        topics=config.topics,
        metrics=metrics,
        drift=DriftTracker(metrics, config.drift),
        publish_scores=config.publish_scores,
        limits=config.limits,
        # `unirec trainer` (no scores) is a group of its own over the same topics: it neither
        # writes the serving workers' changelog nor restores from it.
        changelog=ChangelogWriter(KafkaPublisher(producer, config.timeout_s),
                                  config.topics.user_states) if config.publish_scores else None,
    )


def plan_resume(services: WorkerServices, config: WorkerConfig,
                partitions: Iterable[int]) -> dict[int, int]:
    """``{partition: offset to seek to}`` for the given ``interactions`` partitions.

    Sets ``services.log_ids``. Raises ``WorkerError`` naming the partition when the stored
    offsets belong to another log, unless ``config.reset_on_new_log`` (then the partition is
    reset in the store and read from offset 0).
    """
    topic = services.topics.interactions
    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    log_id = log_identity(config.bootstrap_servers, topic, config.timeout_s)
    ends = end_offsets(config.bootstrap_servers, topic, config.timeout_s)
    plan: dict[int, int] = {}
    for partition in wanted:
        end = ends.get(partition, 0)
        try:
            offset = services.store.resume_offset(topic, partition, log_id, end)
        except LogMismatchError as exc:
            if not config.reset_on_new_log:
                raise WorkerError(
                    f"{exc}; refusing to skip the new log's events. Pass --reset-on-new-log "
                    f"to consume partition {topic}[{partition}] from its start"
                ) from exc
            log.warning("%s; --reset-on-new-log: consuming %s[%d] from its start",
                        exc, topic, partition)
            services.store.reset_partition(topic, partition)
            offset = None
        services.log_ids[partition] = log_id
        plan[partition] = 0 if offset is None else offset
    log.info("%s: resuming partitions at %s (log %s, end offsets %s)", topic, plan, log_id,
             {p: ends.get(p) for p in wanted})
    return plan


class _Rebalance(AsyncConsumerRebalanceListener):
    """Checks and seeks assigned ``interactions`` partitions, commits and forgets revoked ones.

    kafka-python 3 runs a listener on its IO thread, inside the ``poll`` (or ``close``) that
    the loop's thread is blocked in, so the loop's state is not touched concurrently. A
    blocking call into the consumer from there (``commit``, anything that waits on the
    network) raises "Cannot block on net.run() from the IO thread" (kafka-python PR #2968);
    the methods are therefore coroutines, which the coordinator awaits on that thread, and
    the revocation awaits ``commit_async`` (the coordinator sends JoinGroup after it).

    An assignment first creates the topics missing on the broker, as the worker's start does
    (``ensure_copartitioned``: a restarted embedded broker has none, and it makes the
    subscribed ones itself, with its own partition count, when the consumer's metadata
    request reaches it).
    A refusal on assignment is kept in ``fatal``, never raised (kafka-python re-raises a
    listener's exception from ``poll`` as a bare ``KafkaError``); the loop ends the process
    with it: ``EXIT_NOT_COPARTITIONED`` when the input topics' partition counts differ
    (``ensure_copartitioned``, before anything else), ``EXIT_LOG_CHANGED`` when
    ``plan_resume`` refuses, ``EXIT_ASSIGNMENT_UNCHECKED`` when the broker does not answer
    the checks or a topic cannot be created."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.fatal: tuple[int, str] | None = None  # (exit status, message)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.loop.commit_revoked(revoked)
        self.loop.forget(revoked)
        self.loop.revoked(revoked)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        """Membership was lost (evicted): the group refuses commits, and others own them."""
        self.loop.forget(lost)
        self.loop.revoked(lost, lost=True)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        loop = self.loop
        topic = loop.topics.interactions
        interactions = [tp for tp in assigned if tp.topic == topic]
        loop.forget(assigned)  # anything held of them predates this assignment
        config = loop.config
        try:
            ensure_copartitioned(config.bootstrap_servers, config.partitions, loop.topics,
                                 config.timeout_s)
            plan = plan_resume(loop.services, config, [tp.partition for tp in interactions])
        except CopartitionError as exc:
            self.fatal = EXIT_NOT_COPARTITIONED, str(exc)
            return
        except WorkerError as exc:
            self.fatal = EXIT_LOG_CHANGED, str(exc)
            return
        except (TopicError, BrokerUnavailable, TimeoutError, KafkaError) as exc:
            self.fatal = EXIT_ASSIGNMENT_UNCHECKED, (
                f"cannot check the partitions assigned at {config.bootstrap_servers}: {exc}")
            return
        for tp in interactions:
            loop.consumer.seek(tp, plan[tp.partition])
        loop.mark_restoring({tp.partition for tp in interactions})
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class ConsumerLoop:
    """The worker's consume-process loop (see the module docstring); ``run`` until ``stop``."""

    def __init__(self, services: WorkerServices, config: WorkerConfig,
                 between_batches: Callable[[], None] | None = None,
                 health: LoopHealth | None = None, ownership: Ownership | None = None,
                 partitions: int | None = None) -> None:
        self.services = services
        self.ownership = ownership
        self.partitions = partitions if partitions is not None else config.partitions
        self.restoring: set[int] = set()  # assigned interactions partitions not yet restored
        self.owned: set[int] = set()  # restored and being consumed
        self.kept: set[int] = set()  # revoked cleanly in generation `kept_generation`
        self.kept_generation = -1
        self.pending_log_ids: dict[int, str] = {}  # checked by plan_resume, set once restored
        self.announce_due = False  # an assignment not yet announced (stream.ownership)
        self.health = health if health is not None else LoopHealth(config.stall_after_s)
        self.config = config
        self.between_batches = between_batches
        self.topics = config.topics
        self.gate = EventTimeGate(config.max_held, config.idle_grace_s)
        self.next_offsets: dict[TopicPartition, int] = {}  # after the last record polled
        self.processed: dict[TopicPartition, int] = {}  # after the last record processed
        self.consumer = kafka_consumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            client_id=f"{config.group_id}-worker",
            enable_auto_commit=False,  # commit_processed: what was processed, not polled
            auto_offset_reset="earliest",
            max_poll_records=config.batch_size,
            max_poll_interval_ms=int(config.rebalance_timeout_s * 1000),
            session_timeout_ms=int(config.session_timeout_s * 1000),
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            request_timeout_ms=int(max(config.timeout_s, config.session_timeout_s + 5) * 1000),
            fetch_max_bytes=64 << 20,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.end_lister = kafka_consumer(  # the gate's end-offset checks (stream.partition_ends)
            bootstrap_servers=config.bootstrap_servers, group_id=None,
            client_id=f"{config.group_id}-ends", enable_auto_commit=False)
        self.ends = PartitionEnds(self.consumer, self.end_lister, self.topics.of,
                                  self._input_partitions, self.position_of,
                                  clock=self.gate.clock)
        self.rebalance = _Rebalance(self)
        topics = self.topics
        self.consumer.subscribe([topics.interactions, topics.impressions, topics.labels],
                                listener=self.rebalance)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop the log check, the lag gauge and what the gate held of ``tps``."""
        topics, services = self.topics, self.services
        for tp in tps:
            if tp.topic == topics.interactions:
                services.log_ids.pop(tp.partition, None)
                services.metrics.forget_partition(tp.topic, tp.partition)
            self.gate.forget(self.topics.kind_of(tp.topic), tp.partition)
            self.ends.forget(tp)
            self.next_offsets.pop(tp, None)
            self.processed.pop(tp, None)

    def run(self, stop: threading.Event) -> int:
        """Poll and process until ``stop`` is set; returns the exit status (0, or the one of
        an assignment's refusal: ``EXIT_LOG_CHANGED``, ``EXIT_NOT_COPARTITIONED``,
        ``EXIT_ASSIGNMENT_UNCHECKED``, ``EXIT_CHANGELOG``)."""
        next_lag = time.monotonic()
        timeout_ms = max(1, int(self.config.batch_within_s * 1000))
        while not stop.is_set():
            polled = self.consumer.poll(timeout_ms=timeout_ms)
            if self.rebalance.fatal is None and (self.restoring or self.announce_due):
                self.restore_pending()
            if self.rebalance.fatal is not None:
                code, message = self.rebalance.fatal
                log.critical("%s", message)
                return code
            self.process(polled)
            if self.between_batches is not None:
                self.between_batches()
            if time.monotonic() >= next_lag:
                self.report_lag()
                self.commit_processed()
                if self.services.drift is not None:
                    self.services.drift.export_due()
                next_lag = time.monotonic() + self.config.lag_interval_s
            self.health.beat(self.consumer.assignment())
        return 0

    def _partition_tps(self, partitions: Iterable[int]) -> list[TopicPartition]:
        """The assigned partitions of the three input topics with these numbers."""
        wanted = set(partitions)
        return [tp for tp in self.consumer.assignment()
                if tp.partition in wanted and tp.topic in self.topics.inputs()]

    def mark_restoring(self, partitions: set[int]) -> None:
        """From the listener: ``partitions`` of ``interactions`` were assigned and checked;
        pause them (and their impressions and labels: co-partitioned) until ``restore_pending``
        has brought the store up to the changelog. Their records are not applied meanwhile
        (no log id)."""
        generation = self._generation()
        log_ids = self.services.log_ids
        self.pending_log_ids = {p: log_ids[p] for p in partitions}
        if self.kept and generation == self.kept_generation + 1:
            # Ours in the previous generation and revoked cleanly: nobody owned them since, so
            # the store is the partition's newest state. Resume at once.
            fast = partitions & self.kept
        else:
            fast = set()
        self.kept = set()
        self.restoring = set(partitions) - fast
        self.owned = set(fast)
        for p in self.restoring:
            log_ids.pop(p, None)
        self.announce_due = True
        self.consumer.pause(*self._partition_tps(self.restoring))
        if self.ownership is not None:
            self.ownership.set(self.owned, self.restoring)

    def revoked(self, tps: Iterable[TopicPartition], lost: bool = False) -> None:
        """From the listener: ``tps`` are no longer ours."""
        gone = {tp.partition for tp in tps if tp.topic == self.topics.interactions}
        self.kept = set() if lost else (self.owned & gone)
        self.kept_generation = self._generation()
        self.owned -= gone
        self.restoring -= gone
        if self.ownership is not None:
            self.ownership.set(self.owned, self.restoring)

    def _generation(self) -> int:
        try:
            return int(self.consumer.group_metadata().generation_id)
        except Exception:
            return -1

    def restore_pending(self) -> None:
        """From the loop's thread, between polls: restore each partition marked restoring
        (``stream.changelog.restore_partition``), seek ``interactions`` to the offset it
        reflects, resume it, and announce this worker's partitions (``stream.ownership``). A
        partition that cannot be restored exactly, or whose broker stops answering, sets
        ``rebalance.fatal`` (``EXIT_LOG_CHANGED`` or ``EXIT_CHANGELOG``) and raises nothing. A
        restore blocks the loop: it must end within ``rebalance_timeout_s`` (kafka-python's
        max_poll_interval)."""
        services, config, topic = self.services, self.config, self.topics.interactions
        self.announce_due = False
        for p in sorted(self.restoring):
            log_id = self.pending_log_ids[p]

            def apply_batch(records: list[Any], last: int, p: int = p, log_id: str = log_id
                            ) -> object:
                return services.applier.apply(topic, p, log_id, records, last,
                                              on_dead_letters=services.publish_dead_letters)

            if services.changelog is None:  # no changelog: the listener's seek stands
                services.log_ids[p] = log_id
                self.consumer.resume(*self._partition_tps({p}))
                self.restoring.discard(p)
                self.owned.add(p)
                continue
            try:
                report = restore_partition(
                    services.store, services.changelog, apply_batch, config.bootstrap_servers,
                    topic, p, self.partitions, log_id, reset_on_new_log=config.reset_on_new_log,
                    batch_size=config.batch_size, timeout_s=config.timeout_s)
            except ChangelogLogError as exc:
                self.rebalance.fatal = EXIT_LOG_CHANGED, str(exc)
                return
            except (ChangelogError, TimeoutError) as exc:
                self.rebalance.fatal = EXIT_CHANGELOG, str(exc)
                return
            except (TopicError, BrokerUnavailable, KafkaError) as exc:
                self.rebalance.fatal = EXIT_CHANGELOG, (
                    f"cannot restore {services.changelog.topic}[{p}] from "
                    f"{config.bootstrap_servers}: {exc}")
                return
            self.consumer.seek(TopicPartition(topic, p), report.next_offset)
            services.log_ids[p] = log_id
            self.consumer.resume(*self._partition_tps({p}))
            self.restoring.discard(p)
            self.owned.add(p)
            log.info("restored %s[%d] (%s): resuming at %d", topic, p, report.mode,
                     report.next_offset)
        if self.ownership is not None:
            self.ownership.set(self.owned, self.restoring)
            try:
                announce_owner(services.publisher, self.topics.workers, self.ownership.url,
                               self.owned, self._generation())
            except Exception as exc:  # others keep redirecting to the old owner meanwhile
                log.warning("announcing the owned partitions failed: %s", exc)
        log.info("owning %s", sorted(f"{topic}[{p}]" for p in self.owned))

    def process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Score the polled impressions, then apply and join what the gate releases."""
        services, gate, topics = self.services, self.gate, self.topics
        now_ms, limits = int(time.time() * 1000), self.config.limits
        for tp, records in polled.items():
            gate.hold(topics.kind_of(tp.topic), [
                ConsumedRecord(tp.partition, r.offset, r.key, r.value,
                               limits.bounded_timestamp(r.timestamp, now_ms))
                for r in records])
            if records:
                self.next_offsets[tp] = records[-1].offset + 1
        early = dict(gate.released_early)
        released = gate.release(self.ends)
        for kind in KINDS:
            if gate.released_early[kind] > early[kind]:
                services.metrics.released_early.labels(topics.of(kind)).inc(
                    gate.released_early[kind] - early[kind])
        impressions, interactions = released["impressions"], released["interactions"]
        if impressions:
            handle_impressions(services, impressions,
                               preceding_interactions(impressions, interactions))
        if interactions:
            handle_interactions(services, interactions)
        if released["labels"]:
            handle_labels(services, released["labels"])
        for kind in KINDS:
            for r in released[kind]:
                tp = TopicPartition(topics.of(kind), r.partition)
                self.processed[tp] = max(self.processed.get(tp, 0), r.offset + 1)

    def processed_offsets(self, tps: Iterable[TopicPartition] | None = None
                          ) -> dict[TopicPartition, OffsetAndMetadata]:
        """The offsets to commit for ``tps`` (default: all): one past the last record
        processed, not polled, so that what the gate holds is read again (by this worker
        after a restart, or by a partition's next owner)."""
        wanted = self.processed if tps is None else {
            tp: self.processed[tp] for tp in tps if tp in self.processed}
        return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in wanted.items()}

    def commit_processed(self) -> None:
        """Commit ``processed_offsets()`` of every partition, from the loop's thread
        (blocking). Impressions and labels are processed at least once; ``interactions``
        resume from the store anyway."""
        offsets = self.processed_offsets()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=int(self.config.timeout_s * 1000))
        except Exception as exc:  # a failed commit means a redelivery, never a loss
            log.warning("committing consumed offsets failed: %s", exc)

    async def commit_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Commit ``processed_offsets(revoked)`` from the rebalance listener, on kafka-python's
        IO thread, before the group rebalances: the partitions' next owner (or this worker,
        when it gets them back) reads on from there, and nothing processed is read again.
        A failure is logged (those records are then processed again, never lost)."""
        offsets = self.processed_offsets(revoked)
        if not offsets:
            return
        try:
            await self.consumer.commit_async(offsets)
        except Exception as exc:  # a failed commit means a redelivery, never a loss
            log.warning("committing the offsets of revoked partitions failed: %s", exc)
            return
        log.info("committed on revocation: %s",
                 sorted(f"{tp.topic}[{tp.partition}]@{o.offset}" for tp, o in offsets.items()))

    def _input_partitions(self) -> list[TopicPartition]:
        inputs = self.topics.inputs()
        return [tp for tp in self.consumer.assignment() if tp.topic in inputs]

    def position_of(self, tp: TopicPartition) -> int | None:
        """One past the last record polled from ``tp`` (its consumer position before the first
        poll since its assignment); None if not assigned or not known yet."""
        position = self.next_offsets.get(tp)
        if position is None:
            try:
                position = self.consumer.position(tp, timeout_ms=200)
            except Exception:  # not assigned (rebalancing), or not known yet
                return None
            if position is not None:
                self.next_offsets[tp] = position
        return position

    def report_lag(self) -> None:
        """Set the lag gauge of each assigned ``interactions`` partition already fetched."""
        topic, store, metrics = self.topics.interactions, self.services.store, \
            self.services.metrics
        for tp in self.consumer.assignment():
            if tp.topic != topic:
                continue
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            stored = store.offset(topic, tp.partition)
            metrics.set_lag(topic, tp.partition,
                            end - (0 if stored is None else stored.next_offset))

    def close(self) -> None:
        """Close the consumer (it revokes every partition first: ``commit_revoked``), then the
        gate's end-offset client."""
        try:
            self.consumer.close(autocommit=False, timeout_ms=int(self.config.timeout_s * 1000))
        finally:
            self.end_lister.close()


def run_worker(config: WorkerConfig, metrics: WorkerMetrics | None = None,
               stop: threading.Event | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT (or ``stop`` is set); returns the exit status.

    ``metrics``: what the handlers count into and ``GET /metrics`` renders (default: new).

    Raises ``WorkerError`` when it cannot start (no checkpoint, a store of another model, a
    partition whose stored offsets belong to another log without ``reset_on_new_log``, a web
    port in use), ``CopartitionError`` (a ``TopicError``) when the input topics' partition
    counts differ.
    """
    torch.set_num_threads(config.torch_threads)
    if not config.checkpoint.is_file():
        raise WorkerError(f"no checkpoint at {config.checkpoint} (train a model first, e.g. "
                          "`unirec train`, or pass --checkpoint)")
    log.info("unirec worker config: %s", {k: str(v) for k, v in asdict(config).items()})
    topics = config.topics
    counts = ensure_copartitioned(config.bootstrap_servers, config.partitions, topics,
                                  config.timeout_s)
    identity = TrainerIdentity.new()
    lock, claimed = _claim_versions(config, identity)
    try:
        services = build_services(claimed, metrics)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if claimed.train != config.train:
        services.metrics.count_trainer_refused("versions_dir_locked")
    config = claimed
    stop = stop if stop is not None else threading.Event()
    loop: ConsumerLoop | None = None
    server: ApiServer | None = None
    listener: UpdateListener | None = None
    directory: WorkerDirectory | None = None
    watch: RivalWatch | None = None
    learner_thread: threading.Thread | None = None
    refused: list[str] = []
    try:
        # Fail fast, before joining the group, on every partition this store has applied.
        stored = [p for (t, p) in services.store.offsets() if t == topics.interactions]
        plan_resume(services, config, stored)
        drift = services.drift
        health = LoopHealth(config.stall_after_s)
        ownership = None
        if config.publish_scores:  # a serving worker (not `unirec trainer`: its own group)
            directory = WorkerDirectory(config.bootstrap_servers, topics.workers,
                                        config.timeout_s)
            ownership = Ownership(advertised_url(config.web_bind, config.web_port,
                                                 config.advertised_url),
                                  counts[topics.interactions], topics.interactions,
                                  services.store, directory)
        api = ApiServices(store=services.store, scorer=services.scorer, ownership=ownership,
                          metrics=services.metrics, drift=None if drift is None else drift.report,
                          model_version=lambda: services.scorer.model_version,
                          health=health, token=config.api_token,
                          max_candidates=config.limits.max_candidates)
        try:
            server = ApiServer(api, config.web_bind, config.web_port).start()
        except OSError as exc:
            raise WorkerError(f"cannot serve HTTP on {config.web_bind}:{config.web_port}: "
                              f"{exc.strerror or exc}") from exc
        versions = VersionStore(config.versions, config.learner.keep_versions)
        listener = UpdateListener(config.bootstrap_servers, topics.model_updates,
                                  config.timeout_s)
        hot_swap = HotSwap(services, versions, torch.device(config.device))
        if config.train:
            watch = RivalWatch(UpdateListener(config.bootstrap_servers, topics.model_updates,
                                              config.timeout_s), identity)
            learner = OnlineLearner(
                services.scorer.scorer.model, services.labels, versions,
                lambda update: announce(services.publisher, topics.model_updates, update),
                services.metrics, config.learner, services.drift, watch,
            )

            def on_refused(reason: str) -> None:  # a trainer has nothing left to do
                if not config.publish_scores:
                    refused.append(reason)
                    stop.set()

            learner_thread = learner.start(stop, on_refused)
        poll_updates = listener.poll
        loop = ConsumerLoop(services, config, lambda: hot_swap.offer(poll_updates()), health,
                            ownership, counts[topics.interactions])
        _stop_on_signals(stop)
        code = loop.run(stop)
        if refused:
            log.critical("trainer stopped: %s", refused[0])
            return EXIT_TRAINER_REFUSED
        return code
    finally:
        stop.set()
        if learner_thread is not None:
            learner_thread.join(timeout=config.timeout_s)
        if watch is not None:
            watch.close()
        if lock is not None:
            lock.close()
        if loop is not None:
            loop.close()
        if listener is not None:
            listener.close()
        if directory is not None:
            directory.close()
        log.info("worker stopping: %s", services.summary())
        services.publisher.close()
        if server is not None:
            server.stop()
        services.store.close()


def _claim_versions(config: WorkerConfig, identity: TrainerIdentity
                    ) -> tuple[VersionsLock | None, WorkerConfig]:
    """Lock the versions directory when ``config`` trains (``stream.trainer_claim``): the lock
    and ``config``; a worker that cannot get it serves without training (``train`` off), a
    ``unirec trainer`` (no scores of its own) raises ``WorkerError``."""
    if not config.train:
        return None, config
    try:
        return VersionsLock(config.versions, identity), config
    except TrainerClaimError as exc:
        if not config.publish_scores:
            raise WorkerError(str(exc)) from exc
        log.error("%s; serving without online learning", exc)
        return None, replace(config, train=False)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (main thread only; elsewhere the caller stops it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        log.info("%s: stopping after the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
