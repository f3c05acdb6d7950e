"""Applying a consumed batch of the ``interactions`` topic to the user states, exactly once.

One call of ``InteractionApplier.apply`` handles one batch of ONE partition:

1. records at or below the partition's stored offset are skipped (already applied);
2. the others are decoded; a record that does not decode, does not validate or whose key is not
   its user id becomes a ``DeadLetter`` and is not applied;
3. the users of the valid events are read in one multi-get;
4. every user's new GRU state is computed in ONE batched unroll (``model.user_state.advance``)
   over the user's new events in offset order, from the stored state (zeros for a new user);
5. one ``StateStore.apply`` writes the states, the history rows and the batch's last offset in
   one WriteBatch: a crash leaves all of it or none of it, and the offset is stored even when
   every record was rejected, so a poison message is not read again forever.

A stored state produced by another model version than the applier's is stale: it is rebuilt
under the current weights from the user's stored history, then the new events are applied to
it (in the same unroll). The rebuilt state covers only the stored history window (the store's
``history_len`` newest events): events older than the window no longer count (docs/model.md).

History rows are the events' JSON (``eventlog.schema.encode``);
``model.user_state.decode_history`` reads them back as ``Interaction``s, oldest first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from eventlog.schema import Interaction, encode
from model import user_state
from model.backbone import UniRecModel
from model.features import Featurizer
from state_store import PartitionBatch, RecordBatch, StateStore
from stream.admission import RecordLimits
from stream.crash_points import crash_point
from stream.dead_letters import DeadLetter, check_offsets, decode_records
from stream.isolation import isolate
from stream.records import ConsumedRecord

log = logging.getLogger(__name__)


class NonFiniteStateError(ArithmeticError):
    """A GRU state computed from a batch's events came out NaN or infinite."""


def check_state_dim(store: StateStore, model: UniRecModel) -> None:
    """Raise ``ValueError`` unless the store's state vectors fit the model's GRU (d_model)."""
    user_state.check_state_dim(model, store.config.state_dim, f"the state store at {store.path}")


def partition_batch(
    topic: str,
    partition: int,
    log_id: str,
    last_offset: int,
    events: Sequence[tuple[int, Interaction]],
) -> PartitionBatch:
    """The store's batch of ``(offset, event)`` pairs; each history row is the event's JSON."""
    return PartitionBatch(
        topic=topic,
        partition=partition,
        log_id=log_id,
        last_offset=last_offset,
        offsets=np.fromiter((o for o, _ in events), dtype=np.int64, count=len(events)),
        user_ids=[e.user_id for _, e in events],
        ts=np.fromiter((e.ts for _, e in events), dtype=np.float64, count=len(events)),
        rows=[encode(e) for _, e in events],
    )


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent in each stage of one apply."""

    decode_s: float  # offset check, JSON decoding and validation, batch building
    read_s: float  # the multi-get(s) of the users' records
    compute_s: float  # featurization and the batched GRU unroll
    write_s: float  # the store's WriteBatch


@dataclass(frozen=True)
class ApplyReport:
    """What one ``InteractionApplier.apply`` did.

    applied: events applied (states updated, history rows appended).
    skipped: records at or below the partition's stored offset (applied or rejected before).
    dead_letters: rejected records, to publish to ``dead-letters``.
    users: users whose record was written.
    new_users: of those, users stored for the first time.
    state_norms: [users] L2 norms of the states written.
    rebuilt: users whose stale state was rebuilt from their stored history.
    last_offset: the partition's stored offset after the call.
    latency_s: the whole call, in seconds; ``stages`` splits it.
    """

    applied: int
    skipped: int
    dead_letters: list[DeadLetter]
    users: int
    new_users: int
    state_norms: np.ndarray
    rebuilt: int
    last_offset: int
    latency_s: float
    stages: StageTimes


ServingModel = Callable[[], tuple[UniRecModel, int]]
"""The model and version to apply a batch with, read once per batch."""


class _Serving(NamedTuple):
    """The model, version and featurizer one batch is applied with."""

    model: UniRecModel
    version: int
    featurizer: Featurizer


def _check_serving(store: StateStore, model: UniRecModel, version: int) -> None:
    check_state_dim(store, model)
    if version < 0:
        raise ValueError(f"model_version must be a non-negative integer, got {version}")


class InteractionApplier:
    """Applies consumed ``interactions`` batches to ``store`` with ``model``'s GRU, exactly once.

    ``model_version`` is the version written with every state (a non-negative integer, the
    registry's version counter); stored states of any other version are stale and rebuilt.
    The model is used as it is (its device and dtype; no gradients); it must not be trained
    while a batch is applied.

    ``InteractionApplier(store, model, version)`` applies with that model; ``following(store,
    serving)`` applies each batch with whatever ``serving()`` gives at its start: the worker
    passes its scorer's ``ImpressionScorer.serving_model``, so the scorer is the one owner of
    the serving model and its version, and a hot swap moves scoring and applying together.
    """

    def __init__(self, store: StateStore, model: UniRecModel, model_version: int,
                 limits: RecordLimits | None = None) -> None:
        _check_serving(store, model, model_version)
        self.store = store
        self.serving: ServingModel = lambda: (model, model_version)
        self.limits = limits if limits is not None else RecordLimits()
        self._featurizer = (model, Featurizer(model.spec))

    @classmethod
    def following(cls, store: StateStore, serving: ServingModel,
                  limits: RecordLimits | None = None) -> InteractionApplier:
        """An applier whose model and version are ``serving()``'s at each batch."""
        applier = cls(store, *serving(), limits)
        applier.serving = serving
        return applier

    @property
    def model_version(self) -> int:
        """The version the next batch is applied with."""
        return self.serving()[1]

    def _featurizer_of(self, model: UniRecModel) -> Featurizer:
        if self._featurizer[0] is not model:
            self._featurizer = (model, Featurizer(model.spec))
        return self._featurizer[1]

    def apply(
        self,
        topic: str,
        partition: int,
        log_id: str,
        records: Sequence[ConsumedRecord],
        last_offset: int,
        on_dead_letters: Callable[[list[DeadLetter]], None] | None = None,
    ) -> ApplyReport:
        """Apply one consumed batch of partition ``partition`` of ``topic`` in log ``log_id``.

        ``records`` are in increasing offset order; ``last_offset`` is the last offset consumed
        in the batch (at least every record's offset) and is stored with the states.
        ``on_dead_letters``, when given, is called with the batch's new dead letters before the
        write: if it publishes and flushes them, a crash between the two publishes them again
        after restart (at least once) instead of losing them. Dead letters of records at or
        below the stored offset are not reported again.

        Raises ``LogChangedError`` if the partition's offsets were stored for another log,
        ``ValueError`` on offsets out of order; store errors propagate (nothing is written).
        """
        start = time.perf_counter()
        model, version = self.serving()
        _check_serving(self.store, model, version)
        serving = _Serving(model, version, self._featurizer_of(model))
        check_offsets(records, partition, last_offset)
        fresh = self._unapplied(topic, partition, log_id, records)
        events, dead = decode_records(Interaction, topic, fresh, self.limits)
        decoded = time.perf_counter()

        before, stale = self._read(events, version)
        read = time.perf_counter()

        isolated = isolate(events, lambda some: self._new_states(serving, before, stale, some))
        states = isolated.result
        if isolated.failed:
            raw = {r.offset: r for r in fresh}
            dead = sorted(dead + [
                DeadLetter.of(topic, partition, offset, raw[offset].key, raw[offset].value,
                              f"cannot apply the event: {reason}")
                for (offset, _), reason in isolated.failed
            ], key=lambda letter: letter.offset)
            events = isolated.kept
            before, stale = self._read(events, version)
            states = self._new_states(serving, before, stale, events)
        batch = partition_batch(topic, partition, log_id, last_offset, events)
        computed = time.perf_counter()

        if dead and on_dead_letters is not None:
            on_dead_letters(dead)
            crash_point("after-dead-letters")
        result = self.store.apply(batch, before, states, model_version=version)
        end = time.perf_counter()

        if dead:
            log.warning(
                "%s[%d]: %d records rejected (dead letters), first at offset %d: %s",
                topic, partition, len(dead), dead[0].offset, dead[0].reason,
            )
        if stale.any():
            log.info(
                "%s[%d]: rebuilt %d stale states from their histories under model version %d",
                topic, partition, int(stale.sum()), version,
            )
        return ApplyReport(
            applied=result.applied,
            skipped=len(records) - len(fresh) + result.skipped,
            dead_letters=dead,
            users=result.users,
            new_users=int(before.is_new.sum()) if result.users else 0,
            state_norms=np.linalg.norm(states, axis=1) if result.users else np.zeros(0),
            rebuilt=int(stale.sum()),
            last_offset=result.last_offset,
            latency_s=end - start,
            stages=StageTimes(decoded - start, read - decoded, computed - read, end - computed),
        )

    def _unapplied(
        self, topic: str, partition: int, log_id: str, records: Sequence[ConsumedRecord]
    ) -> list[ConsumedRecord]:
        """The records above the partition's stored offset; raises ``LogChangedError``."""
        stored = self.store.offset_in_log(topic, partition, log_id)
        if stored is None:
            return list(records)
        return [r for r in records if r.offset > stored.last_offset]

    def _read(self, events: Sequence[tuple[int, Interaction]], version: int
              ) -> tuple[RecordBatch, np.ndarray]:
        """The stored records of the events' users (in order of first event) and which of them
        are stale (written by another version than ``version``; [U] bool); histories are read
        when any is stale."""
        users = list(dict.fromkeys(e.user_id for _, e in events))
        before = self.store.get_many(users)
        stale = (~before.is_new) & (before.model_versions != version)
        if stale.any():
            before = self.store.get_many(users, history=True)
        return before, stale

    @staticmethod
    def _new_states(
        serving: _Serving,
        before: RecordBatch,
        stale: np.ndarray,
        events: Sequence[tuple[int, Interaction]],
    ) -> np.ndarray:
        """[U, d]: each user of ``before`` after its ``events`` (offset order; any subset of
        the batch's users), from its stored state, or from zeros through its stored history if
        ``stale``. Raises ``NonFiniteStateError`` if a state comes out NaN or infinite."""
        position = {user: u for u, user in enumerate(before.user_ids)}
        new: list[list[Interaction]] = [[] for _ in before.user_ids]
        for _, event in events:
            new[position[event.user_id]].append(event)
        histories = [user_state.decode_history(before.histories[u]) if stale[u] else []
                     for u in range(len(new))]
        states = user_state.advance(serving.model, serving.featurizer, before.states, stale,
                                    histories, new)
        bad = ~np.isfinite(states).all(axis=1)
        if bad.any():
            raise NonFiniteStateError(
                f"the GRU state of user {before.user_ids[int(np.flatnonzero(bad)[0])][:256]!r}"
                " comes out NaN or infinite")
        return states
