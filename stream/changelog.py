"""The ``user-states`` changelog: the state store's compacted copy in Kafka, and restoring from it.

``user-states`` is partitioned like ``interactions`` and keyed by user id: partition p holds
the records of the users of ``interactions`` partition p. Two kinds of record:

- a user record (key: the user id): the user's stored record as the store holds it after a
  batch, state, model version, update count, last event time and history rows, tagged with
  the partition's last applied offset ``o`` and the ``interactions`` log id. Rule: **a user
  record tagged ``o`` is the user's state after every event of the partition up to ``o``**;
- the partition marker (key ``MARKER_KEY``, a NUL byte: no user id contains one), tagged with
  ``o``: every user with an event up to ``o`` has a record tagged at least its last such event.

Publishing (``ChangelogWriter.publish_batch``, called by ``stream.handlers.handle_interactions``
after each partition batch): AFTER the store's WriteBatch (states, history, offset: the
exactly-once write), the owner reads the batch's users back and sends their records, then
the marker, in partition order (one idempotent producer), and flushes. So the changelog runs
at most one batch behind the store, never ahead of it:

- a crash before the sends, or part-way through them, leaves the store at offset S and the
  changelog's marker at the previous batch's M < S, with some of the batch's user records
  (tagged S) possibly sent;
- a crash after the flush leaves both at S.

Restoring (``restore_partition``, on assignment): read the partition of ``user-states`` from
its start to its end and keep, per user, the record with the highest tag (duplicates are
harmless: last record by offset wins among equal tags, so a changelog that was never compacted
restores the same states), and the highest marker M. Write those records into the store with
the partition's offset M, then read ``interactions`` from M+1 and skip each event whose offset
is at or below its user's tag (those users' records, from a batch whose marker was never sent,
already include it): the "minimum offset it reflects" is M+1, and per-user tags make the
replay of the one incomplete batch exact. Every state equals the uninterrupted run's. The
partition's records are then published again from the store under a new marker, which closes
the gap the crash left (``publish_partition``).

A store that holds the partition at an offset S >= M is kept as it is (its own states are the
log's prefix up to S, the changelog has nothing newer); when S > M (this worker crashed between
its write and its sends) the partition is republished from the store. A store at S < M (the
partition was applied elsewhere since) is restored.

Logs: records carry the ``interactions`` log id. Records of another log (a recreated topic)
count as states from before the current log: with ``reset_on_new_log`` the worker restores them
and reads the new log from its start (the new log continues the old one); without it, a
changelog whose newest marker belongs to another log is refused (``ChangelogLogError``), as the
store's offsets are (``StateStore.offset_in_log``).

``interactions`` retention: a restore reads ``interactions`` only from M+1; once every
partition's marker is past the events a retention would delete, those events are no longer
needed. ``restore_partition`` refuses (``ChangelogGapError``) when the partition's first
retained offset is beyond the offset it must resume from: the states would silently miss the
deleted events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import numpy as np
from kafka import TopicPartition

from state_store import StateStore, UserRecord
from state_store.keys import encode_user_ids
from stream.kafka_client import kafka_consumer
from stream.publisher import Publisher
from stream.records import ConsumedRecord
from stream.topics import end_offsets

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_KEY = b"\x00"
NO_OFFSET = -1


class ChangelogError(RuntimeError):
    """A partition that cannot be restored from its changelog; the message says why."""


class ChangelogLogError(ChangelogError):
    """The changelog's newest marker belongs to another ``interactions`` log."""


class ChangelogGapError(ChangelogError):
    """``interactions`` no longer holds the events after the offset the states reflect."""


class ChangelogValue(msgspec.Struct, array_like=True, frozen=True):
    """One ``user-states`` value (msgpack). A marker has no state (``update_count`` 0)."""

    format: int
    log_id: str
    last_offset: int  # the partition's last applied offset this record reflects
    update_count: int = 0
    model_version: int = 0
    last_event_ts: float = 0.0
    state: bytes = b""  # float32, little-endian
    history: list[bytes] = []  # newest rows, oldest first

    def user_record(self, user_id: str) -> UserRecord:
        return UserRecord(user_id=user_id, state=np.frombuffer(self.state, dtype="<f4"),
                          model_version=self.model_version, update_count=self.update_count,
                          last_event_ts=self.last_event_ts, history=list(self.history))


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ChangelogValue)


def encode_user(record: UserRecord, log_id: str, last_offset: int) -> bytes:
    """The changelog value of a stored user record (read with its history)."""
    return _ENCODER.encode(ChangelogValue(
        FORMAT_VERSION, log_id, last_offset, record.update_count, int(record.model_version or 0),
        float(record.last_event_ts or 0.0), np.asarray(record.state, dtype="<f4").tobytes(),
        list(record.history or [])))


def encode_marker(log_id: str, last_offset: int) -> bytes:
    return _ENCODER.encode(ChangelogValue(FORMAT_VERSION, log_id, last_offset))


def decode_value(value: bytes) -> ChangelogValue:
    """Raises ``ValueError`` on a value that is not a changelog record of this format."""
    try:
        decoded = _DECODER.decode(value)
    except (msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"not a changelog record: {exc}") from None
    if decoded.format != FORMAT_VERSION:
        raise ValueError(f"changelog format {decoded.format}, expected {FORMAT_VERSION}")
    return decoded


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of ``interactions`` (and of ``user-states``) that holds ``user_id``: the
    default partitioner of the producers (murmur2 of the utf-8 key, as Kafka's Java client)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def _user_keys(records: Iterable[ConsumedRecord]) -> list[str]:
    """The distinct record keys that can be user ids of the store, in order."""
    users: dict[str, None] = {}
    for r in records:
        if r.key is None:
            continue
        try:
            user = r.key.decode()
            encode_user_ids([user])
        except (UnicodeDecodeError, ValueError):
            continue
        users[user] = None
    return list(users)


@dataclass
class ChangelogWriter:
    """Publishes the store's changed records to ``topic`` (``user-states``) after each batch."""

    publisher: Publisher
    topic: str
    published: int = 0  # user records sent

    def publish_users(self, store: StateStore, partition: int, log_id: str, last_offset: int,
                      users: Sequence[str]) -> int:
        """Send the stored records of ``users`` tagged ``last_offset``, then the partition's
        marker, and wait for the broker's acknowledgement; the number of user records sent.
        Raises what the producer raises (the caller must not go on: module docstring)."""
        sent = 0
        for start in range(0, len(users), 1024):
            batch = store.get_many(users[start:start + 1024], history=True)
            for i in range(len(batch)):
                record = batch.record(i)
                if record.is_new:
                    continue
                self.publisher.publish(self.topic, record.user_id.encode(),
                                       encode_user(record, log_id, last_offset), partition)
                sent += 1
        self.publisher.publish(self.topic, MARKER_KEY, encode_marker(log_id, last_offset),
                               partition)
        self.publisher.flush()
        self.published += sent
        return sent

    def publish_batch(self, store: StateStore, partition: int, log_id: str,
                      records: Sequence[ConsumedRecord], last_offset: int, changed: bool) -> int:
        """After ``StateStore.apply`` of ``records`` (partition ``partition``) wrote the
        partition up to ``last_offset``: send the records of the batch's users and the marker.
        ``changed``: whether the apply wrote anything (a fully redelivered batch did not:
        nothing is sent)."""
        if not changed:
            return 0
        return self.publish_users(store, partition, log_id, last_offset, _user_keys(records))

    def publish_partition(self, store: StateStore, partition: int, partitions: int,
                          log_id: str, last_offset: int) -> int:
        """Send every stored user of ``partition`` (of ``partitions``) tagged ``last_offset``,
        then the marker: the store is the partition's newest state, the changelog gets it
        whole (after a crash between a write and its sends, and after a restore's replay)."""
        users = [r.user_id for r in store.iter_users()
                 if partition_of(r.user_id, partitions) == partition]
        sent = self.publish_users(store, partition, log_id, last_offset, users)
        log.info("republished %d users of partition %d to %s at offset %d", sent, partition,
                 self.topic, last_offset)
        return sent


@dataclass
class ChangelogSnapshot:
    """What one partition of ``user-states`` holds, folded by the rule of the module docstring.

    marker: the highest marker of the current log (None: none).
    foreign_marker: a marker of another log was read and none of the current log.
    users: per user, its tag in the current log (``NO_OFFSET`` for a record of another log) and
        the record.
    read: records read; seconds: time spent reading and folding.
    """

    marker: int | None = None
    foreign_marker: bool = False
    users: dict[str, tuple[int, ChangelogValue]] = field(default_factory=dict)
    read: int = 0
    seconds: float = 0.0

    def fold(self, key: bytes | None, value: ChangelogValue, log_id: str) -> None:
        """Take one record, in changelog order."""
        current = value.log_id == log_id
        if key == MARKER_KEY:
            if current and (self.marker is None or value.last_offset >= self.marker):
                self.marker = value.last_offset
            self.foreign_marker = self.foreign_marker or not current
            return
        if key is None or value.update_count < 1:
            return
        user = key.decode(errors="replace")
        tag = value.last_offset if current else NO_OFFSET
        held = self.users.get(user)
        if held is None or tag >= held[0]:
            self.users[user] = (tag, value)


def read_changelog(bootstrap: str, topic: str, partition: int, log_id: str,
                   timeout_s: float = 10.0) -> ChangelogSnapshot:
    """Read partition ``partition`` of ``topic`` from its start to its current end and fold it
    (``ChangelogSnapshot``). A record that does not decode is logged and skipped. Raises
    ``TimeoutError`` when no record arrives for ``timeout_s`` before the end is reached."""
    start = time.perf_counter()
    snapshot = ChangelogSnapshot()
    end = end_offsets(bootstrap, topic, timeout_s).get(partition, 0)
    if end == 0:
        snapshot.seconds = time.perf_counter() - start
        return snapshot
    tp = TopicPartition(topic, partition)
    consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                              client_id="unirec-restore", enable_auto_commit=False,
                              fetch_max_bytes=64 << 20, max_partition_fetch_bytes=32 << 20,
                              max_poll_records=10_000, request_timeout_ms=int(timeout_s * 1000))
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        position, progress = 0, time.monotonic()
        while position < end:
            polled = consumer.poll(timeout_ms=200).get(tp, [])
            if not polled:
                if time.monotonic() - progress > timeout_s:
                    raise TimeoutError(f"{topic}[{partition}]: no record for {timeout_s:g} s at "
                                       f"offset {position} of {end}")
                continue
            progress = time.monotonic()
            for r in polled:
                try:
                    value = decode_value(r.value)
                except ValueError as exc:
                    log.warning("%s[%d]@%d skipped: %s", topic, partition, r.offset, exc)
                    continue
                snapshot.fold(r.key, value, log_id)
            snapshot.read += len(polled)
            position = polled[-1].offset + 1
    finally:
        consumer.close()
    snapshot.seconds = time.perf_counter() - start
    return snapshot


def read_interactions(bootstrap: str, topic: str, partition: int, first: int, last: int,
                      timeout_s: float = 10.0) -> list[ConsumedRecord]:
    """The records of ``topic[partition]`` at offsets ``first .. last`` (inclusive)."""
    if last < first:
        return []
    tp = TopicPartition(topic, partition)
    consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                              client_id="unirec-restore", enable_auto_commit=False,
                              fetch_max_bytes=64 << 20, max_poll_records=10_000,
                              request_timeout_ms=int(timeout_s * 1000))
    out: list[ConsumedRecord] = []
    try:
        consumer.assign([tp])
        consumer.seek(tp, first)
        progress = time.monotonic()
        while not out or out[-1].offset < last:
            polled = consumer.poll(timeout_ms=200).get(tp, [])
            if not polled:
                if time.monotonic() - progress > timeout_s:
                    raise TimeoutError(f"{topic}[{partition}]: offsets {first}..{last} not read")
                continue
            progress = time.monotonic()
            out.extend(ConsumedRecord(partition, r.offset, r.key, r.value, r.timestamp)
                       for r in polled if r.offset <= last)
    finally:
        consumer.close()
    return out


def first_offset(bootstrap: str, topic: str, partition: int, timeout_s: float = 10.0) -> int:
    """The partition's first retained offset (its log start)."""
    tp = TopicPartition(topic, partition)
    consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                              client_id="unirec-restore", enable_auto_commit=False,
                              request_timeout_ms=int(timeout_s * 1000))
    try:
        return int(consumer.beginning_offsets([tp], timeout_ms=int(timeout_s * 1000))[tp])
    finally:
        consumer.close()


class ApplyBatch(Protocol):
    """Applies records of one partition exactly once, storing ``last_offset`` with them."""

    def __call__(self, records: Sequence[ConsumedRecord], last_offset: int) -> object: ...


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore_partition`` did for one partition.

    mode: ``"store"`` (the store was current), ``"restored"`` (from the changelog) or
    ``"empty"`` (no state anywhere: the partition is read from its start).
    next_offset: where to resume ``interactions``.
    users: user records written from the changelog; replayed: events of the incomplete batch
    applied; republished: user records sent to close a gap; read: changelog records read.
    """

    partition: int
    mode: str
    next_offset: int
    users: int = 0
    replayed: int = 0
    republished: int = 0
    read: int = 0
    seconds: float = 0.0


def restore_partition(store: StateStore, writer: ChangelogWriter, apply_batch: ApplyBatch,
                      bootstrap: str, interactions: str, partition: int, partitions: int,
                      log_id: str, *, reset_on_new_log: bool = False, batch_size: int = 256,
                      timeout_s: float = 10.0) -> RestoreReport:
    """Bring the store's partition ``partition`` up to the changelog (module docstring) and say
    where to resume ``interactions``. ``apply_batch(records, last_offset)`` applies records of
    the partition exactly once (the worker's applier). The store's offset of the partition must
    already belong to ``log_id`` (``StateStore.offset_in_log``: the worker checks or resets it
    first). Raises ``ChangelogLogError``, ``ChangelogGapError``, ``TimeoutError``.
    """
    start = time.perf_counter()
    snapshot = read_changelog(bootstrap, writer.topic, partition, log_id, timeout_s)
    if snapshot.foreign_marker and snapshot.marker is None and not reset_on_new_log:
        raise ChangelogLogError(
            f"{writer.topic}[{partition}] was written for another {interactions} log than "
            f"{log_id}; refusing to apply the new log to its states. Pass --reset-on-new-log to "
            "restore them and read the new log from its start")
    stored = store.offset_in_log(interactions, partition, log_id)
    marker = NO_OFFSET if snapshot.marker is None else snapshot.marker
    done: dict[str, int] = {}
    if stored is not None and stored.last_offset >= marker:
        mode, last = "store", stored.last_offset
        republished = 0
        if stored.last_offset > marker:  # a crash between this store's write and its sends
            republished = writer.publish_partition(store, partition, partitions, log_id, last)
    elif not snapshot.users and snapshot.marker is None:
        mode, last, republished = "empty", NO_OFFSET, 0
    else:
        mode = "restored"
        records = [value.user_record(user) for user, (_, value) in snapshot.users.items()]
        store.restore_partition(interactions, partition, log_id,
                                None if marker == NO_OFFSET else marker, records)
        ahead = {user: tag for user, (tag, _) in snapshot.users.items() if tag > marker}
        last, republished = marker, 0
        if ahead:  # the batch whose marker was never sent: replay it, skipping what it holds
            through = max(ahead.values())
            _check_retained(bootstrap, interactions, partition, marker + 1, timeout_s)
            pending = [r for r in read_interactions(bootstrap, interactions, partition,
                                                    marker + 1, through, timeout_s)
                       if r.offset > ahead.get(_key(r), NO_OFFSET)]
            done["replayed"] = len(pending)
            for i in range(0, max(len(pending), 1), batch_size):
                chunk = pending[i:i + batch_size]
                apply_batch(chunk, through if i + batch_size >= len(pending)
                            else chunk[-1].offset)
            last = through
            republished = writer.publish_partition(store, partition, partitions, log_id, last)
    _check_retained(bootstrap, interactions, partition, last + 1, timeout_s)
    report = RestoreReport(partition, mode, last + 1,
                           users=len(snapshot.users) if mode == "restored" else 0,
                           replayed=done.get("replayed", 0), republished=republished,
                           read=snapshot.read, seconds=time.perf_counter() - start)
    log.info("%s[%d]: %s", interactions, partition, report)
    return report


def _key(record: ConsumedRecord) -> str:
    return record.key.decode(errors="replace") if record.key is not None else ""


def _check_retained(bootstrap: str, topic: str, partition: int, needed: int,
                    timeout_s: float) -> None:
    """``ChangelogGapError`` unless ``topic[partition]`` still holds offset ``needed``."""
    first = first_offset(bootstrap, topic, partition, timeout_s)
    if first > needed:
        raise ChangelogGapError(
            f"{topic}[{partition}] starts at offset {first}, but its states reflect the offsets "
            f"before {needed}: events {needed}..{first - 1} were deleted (retention) before the "
            "changelog reflected them; the partition's states cannot be rebuilt exactly")
