"""Model versions announced on ``model-updates`` and swapped into a running worker.

The trainer (the worker's ``OnlineLearner``) publishes each version with
``VersionStore.publish`` and then announces a ``ModelUpdate`` (JSON ``{version, path, steps,
ts}``) on ``model-updates`` (one partition: one total order of versions).

A worker reads the topic with an ``UpdateListener``: a consumer outside any group (every
worker reads every announcement), assigned the topic's partitions from their end (versions
older than the worker's start are found in the versions directory instead), polled without
blocking by the consumer loop between two batches. ``HotSwap.offer`` loads the announced
version from the worker's own versions directory (``VersionStore.load``; the announced path is
the trainer's, which may be mounted elsewhere) and swaps it in: a new ``Scorer`` and model
replace the old references in the ``ImpressionScorer`` and the ``InteractionApplier``, so an
HTTP request scoring meanwhile finishes on the old model and the next one uses the new one;
weights are never changed in place. A version that does not load is skipped with one error
line and counted (``unirec_model_versions_skipped_total``); the old weights keep serving.

The worker follows the newest announcement: a version is swapped in when it differs from the
one serving (states of any other version are stale and rebuilt, ``stream.serving``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import torch
from kafka import KafkaProducer, TopicPartition

from model.backbone import UniRecModel
from model.checkpoint import CheckpointError
from model.scorer import Scorer
from model.versions import VersionStore
from stream.agents import WorkerServices
from stream.kafka_client import kafka_consumer

log = logging.getLogger(__name__)


class ModelUpdate(msgspec.Struct, frozen=True):
    """One published model version: its number, the checkpoint's path (as the trainer wrote
    it), the trainer's accepted steps so far and the wall-clock time of publication."""

    version: int
    path: str
    steps: int
    ts: float

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, value: bytes) -> ModelUpdate:
        """Raises ``msgspec.ValidationError`` / ``DecodeError`` on anything else."""
        return msgspec.json.decode(value, type=cls)


def announce(producer: KafkaProducer, topic: str, update: ModelUpdate,
             timeout_s: float = 30.0) -> None:
    """Send ``update`` to ``topic`` and wait until the broker has it."""
    producer.send(topic, key=b"model", value=update.encode())
    producer.flush(timeout=timeout_s)


class UpdateListener:
    """Reads ``topic`` from its end, outside any consumer group; ``poll()`` never blocks."""

    def __init__(self, bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> None:
        self.consumer = kafka_consumer(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
            request_timeout_ms=int(max(timeout_s, 6.0) * 1000),
        )
        partitions = self.consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end now: an announcement after this line is read
            self.consumer.position(tp)

    def poll(self) -> list[ModelUpdate]:
        """Announcements received since the last call, in topic order; malformed ones are
        logged and skipped."""
        updates = []
        for records in self.consumer.poll(timeout_ms=0).values():
            for record in records:
                try:
                    updates.append(ModelUpdate.decode(record.value))
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    log.error("model-updates offset %d: not a model update (%s): skipped",
                              record.offset, exc)
        return updates

    def close(self) -> None:
        self.consumer.close()


class HotSwap:
    """Swaps announced versions into ``services`` (the scorer and the applier); call from the
    consumer loop's thread, between batches."""

    def __init__(self, services: WorkerServices, versions: VersionStore,
                 device: torch.device) -> None:
        self.services = services
        self.versions = versions
        self.device = device

    def offer(self, updates: Sequence[ModelUpdate]) -> int | None:
        """Swap in the newest of ``updates`` that loads, if it is not the version serving.
        Returns the version swapped in, or None."""
        services = self.services
        for update in reversed(updates):
            if update.version == services.scorer.model_version:
                return None
            try:
                model, _ = self.versions.load(update.version, self.device)
            except CheckpointError as exc:
                log.error("skipping model version %d (announced at %s): %s",
                          update.version, update.path, exc)
                services.metrics.versions_skipped.inc()
                continue
            self.swap_in(model, update.version)
            log.info("serving model version %d (trainer steps %d)", update.version,
                     update.steps)
            return update.version
        return None

    def swap_in(self, model: UniRecModel, version: int) -> None:
        """Serve ``model`` as ``version``: new references, never in-place weight changes."""
        services = self.services
        old = services.scorer.scorer
        services.scorer.swap(Scorer(model, self.device, old.task, old.max_batch), version)
        services.applier.swap(model, version)
        services.model_version = version
        services.metrics.set_model_version(version)


def starting_model(versions: VersionStore, model: UniRecModel, version: int,
                   device: torch.device, publish: bool) -> tuple[UniRecModel, int]:
    """The model and version a worker serves at start: the newest readable version in
    ``versions``; else, when this process trains (``publish``), ``model`` published as the
    directory's first version (so that every version a trainer publishes is numbered by the
    directory, never colliding with the checkpoint's own number); else ``model`` as
    ``version``."""
    latest = versions.latest()
    if latest is not None:
        loaded, _ = versions.load(latest[0], device)
        log.info("serving model version %d from %s", latest[0], latest[1])
        return loaded, latest[0]
    if publish:
        first = versions.publish(model, {"online_steps": 0, "base_version": version})
        log.info("published the starting model as version %d in %s", first,
                 versions.directory)
        return model, first
    return model, version
