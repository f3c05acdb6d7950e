"""Model versions announced on ``model-updates`` and swapped into a running worker.

The trainer (the ``OnlineLearner`` of ``unirec trainer``, or of a worker that trains)
publishes each version with ``VersionStore.publish`` and then announces a ``ModelUpdate``
(JSON ``{version, path, steps, ts, trainer, trainer_started}``) on ``model-updates`` (one
partition: one total order of versions). ``trainer`` and ``trainer_started`` identify the
publishing process (``stream.trainer_claim``); announcements written before they existed
decode with ``""`` and ``0.0``.

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

Every model version comes from outside the worker's control (docs/system.md), so before weights
are built a version must (1) move forward: its number is greater than the one serving, and
(2) be compatible: the same ``ModelSignature`` (``model.signature``: model kind, the config
fields that change shapes or semantics, feature-spec fingerprint, and a state width equal to
the state store's ``state_dim``) as the model serving. Anything else is refused with one log
line and counted by reason (``unirec_model_versions_refused_total{reason}``: ``not_newer``,
``model_kind``, ``state_width``, ``feature_spec``, ``model_config``), never loaded, and the
worker keeps serving. So a second trainer racing on the topic can never roll a worker back
(v19 -> v18: states of any other version are stale and rebuilt, ``stream.serving``, so a flip
costs every state), and a version of another model cannot crash the swap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import torch
from kafka import TopicPartition

from model.backbone import UniRecModel
from model.checkpoint import CheckpointError
from model.scorer import Scorer
from model.signature import IncompatibleVersion, ModelSignature, signature_of
from model.versions import VersionStore
from stream.handlers import WorkerServices
from stream.kafka_client import kafka_consumer
from stream.metrics import WorkerMetrics
from stream.publisher import Publisher

log = logging.getLogger(__name__)


class ModelUpdate(msgspec.Struct, frozen=True):
    """One published model version: its number, the checkpoint's path (as the trainer wrote
    it), the trainer's accepted steps so far, the wall-clock time of publication, and the
    publishing trainer's id and start time (``stream.trainer_claim.TrainerIdentity``)."""

    version: int
    path: str
    steps: int
    ts: float
    trainer: str = ""
    trainer_started: float = 0.0

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, value: bytes) -> ModelUpdate:
        """Raises ``msgspec.ValidationError`` / ``DecodeError`` on anything else."""
        return msgspec.json.decode(value, type=cls)


def announce(publisher: Publisher, topic: str, update: ModelUpdate) -> None:
    """Send ``update`` to ``topic`` and wait until the broker has it."""
    publisher.publish(topic, b"model", update.encode())
    publisher.flush()


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
        """Announcements received since the last call, in topic order; malformed ones
        (a tombstone included) are logged and skipped."""
        updates = []
        for records in self.consumer.poll(timeout_ms=0).values():
            for record in records:
                try:
                    updates.append(ModelUpdate.decode(record.value))
                except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as exc:
                    log.error("model-updates offset %d: not a model update (%s): skipped",
                              record.offset, exc)
        return updates

    def close(self) -> None:
        self.consumer.close()


class HotSwap:
    """Swaps announced versions into ``services`` (the scorer, which owns the serving model;
    the applier follows it: ``InteractionApplier.following``); call from the
    consumer loop's thread, between batches.

    ``expected``: the signature every version must have, that of the model serving at
    construction with the state store's ``state_dim`` as its state width."""

    def __init__(self, services: WorkerServices, versions: VersionStore,
                 device: torch.device) -> None:
        self.services = services
        self.versions = versions
        self.device = device
        self.expected = signature_of(services.scorer.scorer.model).with_state_width(
            services.store.config.state_dim)

    def offer(self, updates: Sequence[ModelUpdate]) -> int | None:
        """Swap in the newest of ``updates`` that is newer than the version serving, loads
        and is compatible; every other one is refused (not newer, incompatible) or skipped
        (unreadable), logged and counted. Returns the version swapped in, or None."""
        swapped = None
        for update in sorted(updates, key=lambda u: u.version, reverse=True):
            serving = self.services.scorer.model_version
            if update.version <= serving:
                self._refuse(update.version, "not_newer", f"serving version {serving}",
                             logging.WARNING)
                continue
            try:
                model, _ = self.versions.load(update.version, self.device, self.expected)
            except IncompatibleVersion as exc:
                self._refuse(update.version, exc.reason, str(exc))
                continue
            except CheckpointError as exc:
                log.error("skipping model version %d (announced at %s): %s",
                          update.version, update.path, exc)
                self.services.metrics.versions_skipped.inc()
                continue
            if self.swap_in(model, update.version):
                log.info("serving model version %d (trainer %s, steps %d)", update.version,
                         update.trainer or "unknown", update.steps)
                swapped = update.version
        return swapped

    def swap_in(self, model: UniRecModel, version: int) -> bool:
        """Serve ``model`` as ``version`` (new references, never in-place weight changes) if
        ``version`` is newer than the one serving and ``model`` has the expected signature;
        else refuse it (logged, counted). Returns whether it was swapped in."""
        services = self.services
        serving = services.scorer.model_version
        if version <= serving:
            self._refuse(version, "not_newer", f"serving version {serving}", logging.WARNING)
            return False
        try:
            self.expected.check(signature_of(model))
        except IncompatibleVersion as exc:
            self._refuse(version, exc.reason, str(exc))
            return False
        old = services.scorer.scorer
        services.scorer.swap(Scorer(model, self.device, old.task, old.max_batch, old.quantize),
                             version)
        services.metrics.set_model_version(version)
        return True

    def _refuse(self, version: int, reason: str, detail: str, level: int = logging.ERROR
                ) -> None:
        log.log(level, "refusing model version %d (%s): %s; serving version %d", version,
                reason, detail, self.services.scorer.model_version)
        self.services.metrics.count_version_refused(reason)


def starting_model(versions: VersionStore, model: UniRecModel, version: int,
                   device: torch.device, publish: bool, metrics: WorkerMetrics | None = None
                   ) -> tuple[UniRecModel, int]:
    """The model and version a worker serves at start: the newest version in ``versions``
    that loads and has ``model``'s signature (``model`` is the deployed checkpoint; the state
    store is opened with its state width); versions that do not load are skipped, those of
    another signature refused, each logged and counted in ``metrics``. With none, when this
    process trains (``publish``), ``model`` is published as the directory's next version, at
    least ``version`` (so that every version a trainer publishes is numbered by the directory,
    and a worker serving the checkpoint as ``version`` sees each later one as newer); else
    ``model`` serves as ``version``."""
    expected: ModelSignature = signature_of(model)
    for candidate in reversed(versions.versions()):
        try:
            loaded, _ = versions.load(candidate, device, expected)
        except IncompatibleVersion as exc:
            log.error("refusing model version %d at start (%s): %s", candidate, exc.reason,
                      exc)
            if metrics is not None:
                metrics.count_version_refused(exc.reason)
            continue
        except CheckpointError as exc:
            log.error("skipping model version %d at start: %s", candidate, exc)
            if metrics is not None:
                metrics.versions_skipped.inc()
            continue
        log.info("serving model version %d from %s", candidate, versions.path(candidate))
        return loaded, candidate
    if publish:
        first = versions.publish(model, {"online_steps": 0, "base_version": version},
                                 at_least=version)
        log.info("published the starting model as version %d in %s", first,
                 versions.directory)
        return model, first
    return model, version
