"""``StateStore``: user states, histories and partition offsets in one RocksDB (rocksdict).

The exactly-once effect: ``apply`` writes a partition batch's new states, its appended history
rows and the partition's new offset in ONE WriteBatch, so a crash leaves either all of it or
none of it. Events at or below the stored offset are skipped, so a redelivered batch changes
nothing. The worker's loop::

    fresh = store.new_events(batch)                    # (a) events above the stored offset
    users, event_user = fresh.users()
    before = store.get_many(users)                     # (b) one multi-get
    states = gru(before.states, fresh, event_user)     # (c) the caller's computation
    result = store.apply(fresh, before, states, model_version=v)   # (d) one WriteBatch

One process may open a store for writing (RocksDB's lock); any number of others may open it
read-only at the same time, each seeing the store as of its opening or last ``refresh``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
from rocksdict import Checkpoint, Rdict, RdictIter, WriteBatch, WriteOptions

from state_store.batch import ApplyResult, PartitionBatch, PartitionOffset, TopicPartition
from state_store.codec import RecordCodec, decode_offset, encode_offset, encode_row
from state_store.config import StoreConfig
from state_store.errors import (
    ConfigMismatchError,
    CorruptValueError,
    LogChangedError,
    OffsetBeyondEndError,
    ReadOnlyStoreError,
    StaleUpdateError,
    StateStoreError,
)
from state_store.keys import (
    COLUMN_FAMILIES,
    CONFIG_KEY,
    META_CF,
    OFFSETS_CF,
    STATES_BEGIN,
    STATES_END,
    USERS_CF,
    after_state_key,
    encode_user_ids,
    history_prefix,
    history_range,
    offset_key,
    parse_offset_key,
    slot_suffixes,
    state_key,
    uid_of,
)
from state_store.records import NO_MODEL_VERSION, RecordBatch, UserRecord
from state_store.ring import number_events, read_ring
from state_store.rocks import open_rocksdb

log = logging.getLogger(__name__)

_INT64_MAX = int(np.iinfo(np.int64).max)


def _config_value(db: Rdict) -> tuple[bytes | None, bool]:
    """The recorded config value, and whether the store holds any user data.

    A function of its own so that its column family handles are dropped on return: a handle
    kept alive (say, by a traceback) would keep the database and its lock open after close.
    """
    it = db.get_column_family(USERS_CF).iter()
    it.seek_to_first()
    return db.get_column_family(META_CF).get(CONFIG_KEY), it.valid()


class StateStore:
    """Per-user GRU states, bounded histories and per-partition offsets. Use ``open``."""

    def __init__(
        self, db: Rdict, config: StoreConfig, path: Path, sync: bool, reader_dir: Path | None
    ) -> None:
        self.config = config
        self.path = path
        self.read_only = reader_dir is not None
        self._reader_dir = reader_dir
        self._db = db
        self._users = db.get_column_family(USERS_CF)
        self._offsets = db.get_column_family(OFFSETS_CF)
        self._users_cf = db.get_column_family_handle(USERS_CF)
        self._offsets_cf = db.get_column_family_handle(OFFSETS_CF)
        self._codec = RecordCodec(config)
        self._suffixes = slot_suffixes(config.history_len)
        self._write_options = WriteOptions()
        self._write_options.sync = sync
        self._write_lock = threading.Lock()
        # Replaced after every write: a RecordBatch read under the current mark is up to date.
        self._write_mark = object()

    # ----------------------------------------------------------------- opening and closing

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: StoreConfig | None = None,
        *,
        read_only: bool = False,
        sync: bool = False,
        cache_bytes: int = 128 << 20,
    ) -> StateStore:
        """Open the store at ``path``, creating it (with ``config`` or the defaults) if absent.

        An existing store keeps the config it was created with; passing a different one raises
        ``ConfigMismatchError``. ``read_only`` opens a view of the store as of the opening
        (``refresh`` moves it forward) that is safe while another process writes the store;
        it keeps a few files of its own in a temporary directory, removed by ``close``, and
        its writes raise ``ReadOnlyStoreError``. ``sync`` fsyncs the write-ahead log on every
        write (to survive power loss, not only process crashes; either way a batch is applied
        wholly or not at all). ``cache_bytes`` sizes the block cache of user records.
        """
        path = Path(path)
        exists = (path / "CURRENT").exists()
        if exists and not set(COLUMN_FAMILIES) <= set(Rdict.list_cf(str(path))):
            raise StateStoreError(f"{path} is a RocksDB database but not a state store")
        if not exists and read_only:
            raise StateStoreError(f"no state store at {path}")
        path.mkdir(parents=True, exist_ok=True)
        reader_dir = Path(tempfile.mkdtemp(prefix="state-store-reader-")) if read_only else None
        db = None
        try:
            db = open_rocksdb(
                path, create=not exists, reader_dir=reader_dir, cache_bytes=cache_bytes
            )
            stored_config = cls._stored_config(db, config, path, read_only)
        except Exception:
            if db is not None:
                db.close()
            if reader_dir is not None:
                shutil.rmtree(reader_dir, ignore_errors=True)
            raise
        mode = "read-only" if read_only else "read-write"
        log.info("opened state store %s (%s, %s)", path, mode, stored_config)
        return cls(db, stored_config, path, sync, reader_dir)

    @staticmethod
    def _stored_config(
        db: Rdict, config: StoreConfig | None, path: Path, read_only: bool
    ) -> StoreConfig:
        """The store's recorded config; records ``config`` (or the default) in a new store."""
        value, has_users = _config_value(db)
        if value is None:
            # A store whose creation was cut short holds nothing yet: record the config now.
            if read_only or has_users:
                raise StateStoreError(f"state store at {path} has no recorded config")
            stored = config or StoreConfig()
            db.get_column_family(META_CF)[CONFIG_KEY] = stored.encode()
            return stored
        try:
            stored = StoreConfig.decode(value)
        except ValueError as exc:
            raise CorruptValueError(CONFIG_KEY, str(exc), META_CF) from None
        if config is not None and config != stored:
            raise ConfigMismatchError(
                f"state store at {path} was created with {stored}, opened with {config}"
            )
        return stored

    @classmethod
    def restore(
        cls, checkpoint_dir: str | Path, path: str | Path, *, sync: bool = False
    ) -> StateStore:
        """Copy the checkpoint at ``checkpoint_dir`` to the new directory ``path`` and open it.

        The checkpoint itself stays untouched, so it can be restored again.
        """
        shutil.copytree(checkpoint_dir, path)
        log.info("restored state store %s from checkpoint %s", path, checkpoint_dir)
        return cls.open(path, sync=sync)

    def close(self) -> None:
        """Flush and close. Iterators from ``iter_users`` must be finished or closed first."""
        self._db.close()
        # rocksdict releases the database (and its lock) only when every handle is dropped.
        del self._users, self._offsets, self._users_cf, self._offsets_cf, self._db
        if self._reader_dir is not None:
            shutil.rmtree(self._reader_dir, ignore_errors=True)

    def refresh(self) -> None:
        """Move a read-only view forward to the writer's latest writes (a writer always sees
        its own writes: nothing to do). The view stays consistent: whole batches only."""
        if self.read_only:
            self._db.try_catch_up_with_primary()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- reads

    def get_many(self, user_ids: Sequence[str], *, history: bool = False) -> RecordBatch:
        """The records of ``user_ids`` in that order, read in ONE multi-get.

        Absent users read as new. With ``history`` the newest N history rows of each user are
        read in the same multi-get, so states and histories are from one point in time.
        Raises ``CorruptValueError`` naming the key of a value that does not decode.
        """
        mark = self._write_mark  # taken before reading: a write after it changes the mark
        uids = encode_user_ids(user_ids)
        keys = [state_key(u) for u in uids]
        histories = None
        if not history:
            decoded = self._codec.decode(keys, self._users[keys])
        else:
            suffixes = self._suffixes
            width = len(suffixes) + 1
            prefixes = [history_prefix(u) for u in uids]
            wanted = []
            for key, prefix in zip(keys, prefixes, strict=True):
                wanted.append(key)
                wanted.extend([prefix + s for s in suffixes])
            values = self._users[wanted]
            decoded = self._codec.decode(keys, values[::width])
            counts = decoded.update_counts.tolist()
            histories = [
                read_ring(prefix, suffixes, values[i * width + 1 : (i + 1) * width], counts[i])
                for i, prefix in enumerate(prefixes)
            ]
        return RecordBatch(
            user_ids=list(user_ids),
            states=decoded.states,
            model_versions=np.where(decoded.present, decoded.model_versions, NO_MODEL_VERSION),
            update_counts=decoded.update_counts,
            last_event_ts=np.where(decoded.present, decoded.last_event_ts, np.nan),
            histories=histories,
            read_mark=mark,
        )

    def get(self, user_id: str, *, history: bool = True) -> UserRecord:
        """One user's record (new if absent), with its history unless ``history`` is false."""
        return self.get_many([user_id], history=history).record(0)

    def iter_users(
        self, *, after: str | None = None, history: bool = False
    ) -> Iterator[UserRecord]:
        """Every stored user's record in user-id order (byte order of the utf-8 ids).

        ``after`` starts after that user id (for paging). The iteration sees the store as of
        its start. Raises ``CorruptValueError`` on a value that does not decode.
        """
        it = self._users.iter()
        if after is None:
            it.seek(STATES_BEGIN)
        else:
            it.seek(after_state_key(state_key(encode_user_ids([after])[0])))
        while it.valid() and (key := it.key()) < STATES_END:
            decoded = self._codec.decode([key], [it.value()])
            count = int(decoded.update_counts[0])
            rows = None
            if history:
                rows = self._history_at(it, uid_of(key), count)
                it.seek(after_state_key(key))
            else:
                it.next()
            yield UserRecord(
                user_id=uid_of(key).decode(),
                state=decoded.states[0],
                model_version=int(decoded.model_versions[0]),
                update_count=count,
                last_event_ts=float(decoded.last_event_ts[0]),
                history=rows,
            )

    def _history_at(self, it: RdictIter, uid: bytes, count: int) -> list[bytes]:
        """The history of ``uid`` read through ``it`` (the iteration's point in time)."""
        prefix = history_prefix(uid)
        slots: list[bytes | None] = [None] * len(self._suffixes)
        it.seek(prefix)
        while it.valid() and (key := it.key()).startswith(prefix):
            slot = int.from_bytes(key[len(prefix) :], "big")
            if len(key) != len(prefix) + 2 or slot >= len(slots):
                raise CorruptValueError(key, "history key outside the ring")
            slots[slot] = it.value()
            it.next()
        return read_ring(prefix, self._suffixes, slots, count)

    # --------------------------------------------------------------------------- offsets

    def offset(self, topic: str, partition: int) -> PartitionOffset | None:
        """The partition's stored position, or None if nothing of it was applied."""
        key = offset_key(topic, partition)
        value = self._offsets.get(key)
        return None if value is None else PartitionOffset(*decode_offset(key, value))

    def offset_in_log(self, topic: str, partition: int, log_id: str) -> PartitionOffset | None:
        """The partition's stored position, which must belong to the log ``log_id``: None if
        nothing of it was applied; ``LogChangedError`` if it was stored for another log.
        The one check of a stored offset's log (resume, new events, the applier)."""
        stored = self.offset(topic, partition)
        if stored is not None:
            _check_log(topic, partition, stored.log_id, log_id)
        return stored

    def offsets(self) -> dict[TopicPartition, PartitionOffset]:
        """Every stored partition position."""
        return {
            TopicPartition(*parse_offset_key(key)): PartitionOffset(*decode_offset(key, value))
            for key, value in self._offsets.items()
        }

    def resume_offset(self, topic: str, partition: int, log_id: str, end_offset: int) -> int | None:
        """Where to seek a newly assigned partition: one past its last applied offset.

        None when nothing of the partition was applied (start from the log's beginning).
        Raises ``LogChangedError`` if the offsets were stored for another log, and
        ``OffsetBeyondEndError`` if the last applied offset is not below ``end_offset`` (the
        partition's end, the offset the next produced message will get).
        """
        stored = self.offset_in_log(topic, partition, log_id)
        if stored is None:
            return None
        if stored.last_offset >= end_offset:
            raise OffsetBeyondEndError(topic, partition, stored.last_offset, end_offset)
        return stored.next_offset

    def reset_partition(self, topic: str, partition: int) -> None:
        """Forget the partition's position, so its log is consumed as new from the start.

        User records are kept. For a worker told explicitly to accept a changed log.
        """
        self._require_writable()
        wb = WriteBatch(raw_mode=True)
        wb.delete(offset_key(topic, partition), self._offsets_cf)
        with self._write_lock:
            self._write(wb)
        log.warning("forgot the stored offset of %s[%d]", topic, partition)

    def new_events(self, batch: PartitionBatch) -> PartitionBatch:
        """The events of ``batch`` above its partition's stored offset (not yet applied).

        Raises ``LogChangedError`` if the partition's offsets were stored for another log.
        """
        stored = self.offset_in_log(batch.topic, batch.partition, batch.log_id)
        if stored is None:
            return batch
        return batch.select(batch.offsets > stored.last_offset)

    # ----------------------------------------------------------------------------- writes

    def apply(
        self,
        batch: PartitionBatch,
        before: RecordBatch,
        new_states: np.ndarray,
        *,
        model_version: int,
    ) -> ApplyResult:
        """Apply one partition batch atomically: states, history rows and offset together.

        ``before`` holds the records the new states were computed from (from ``get_many``):
        every user with an event in ``batch``, each once; ``new_states`` (U, D) is each
        user's state after its events of the batch in offset order. Each applied event adds
        one to its user's update count and appends its row to the user's history; the user's
        last event time becomes the time of its last event in offset order.

        Events at or below the partition's stored offset are skipped and counted, so applying
        a batch twice changes nothing the second time. Raises, writing nothing:
        ``StaleUpdateError`` if a user's stored record is no longer the one in ``before`` (or
        only some of its events were applied already), ``CorruptValueError`` if a user's stored
        record does not decode, ``LogChangedError`` if the partition's offsets belong to
        another log, ``ValueError`` on malformed arguments.
        """
        self._require_writable()
        if not 0 <= model_version <= _INT64_MAX:
            raise ValueError(f"model_version must be a non-negative int64, got {model_version}")
        states = np.asarray(new_states, dtype=np.float32)
        if states.shape != (len(before), self.config.state_dim):
            raise ValueError(
                f"new_states has shape {states.shape}, "
                f"expected ({len(before)}, {self.config.state_dim})"
            )
        if not np.isfinite(states).all():
            raise ValueError("new_states holds NaN or infinity")
        event_user, n_events = batch.index_users(before.user_ids)
        okey = offset_key(batch.topic, batch.partition)
        with self._write_lock:
            return self._apply_locked(
                batch, before, states, model_version, event_user, n_events, okey
            )

    def _apply_locked(
        self,
        batch: PartitionBatch,
        before: RecordBatch,
        states: np.ndarray,
        model_version: int,
        event_user: np.ndarray,
        n_events: np.ndarray,
        okey: bytes,
    ) -> ApplyResult:
        stored_value = self._offsets.get(okey)
        stored_last = -1
        if stored_value is not None:
            stored_last, stored_log = decode_offset(okey, stored_value)
            _check_log(batch.topic, batch.partition, stored_log, batch.log_id)
        fresh = batch.offsets > stored_last
        n_fresh = np.bincount(event_user[fresh], minlength=len(before))
        skipped = len(batch) - int(n_fresh.sum())
        mixed = np.flatnonzero((n_fresh > 0) & (n_fresh < n_events))
        if mixed.size:
            raise StaleUpdateError(
                f"user {before.user_ids[mixed[0]]!r} has events both at or below and above "
                f"the stored offset {stored_last} of {batch.topic}[{batch.partition}]: its new "
                "state includes events already applied; read again and recompute"
            )
        writing = np.flatnonzero(n_fresh)  # users whose events are all fresh
        last_offset = max(stored_last, batch.last_offset)
        if not writing.size and last_offset == stored_last:
            return ApplyResult(applied=0, skipped=skipped, users=0, last_offset=stored_last)

        uids = encode_user_ids([before.user_ids[i] for i in writing.tolist()])
        # In key order: RocksDB inserts ascending keys into its memtable markedly faster.
        by_key = sorted(range(len(uids)), key=uids.__getitem__)
        writing, uids = writing[by_key], [uids[i] for i in by_key]
        keys = [state_key(u) for u in uids]
        base = before.update_counts[writing]
        self._check_current(before, writing, keys, base)

        events = np.flatnonzero(fresh)
        position = np.empty(len(before), dtype=np.int64)
        position[writing] = np.arange(writing.size)
        user = position[event_user[events]]  # (F,) each fresh event's index into `writing`
        numbers = number_events(user, base, self.config.history_len)
        last_ts = batch.ts[events[numbers.last_event]]
        values = self._codec.encode(
            base + numbers.per_user, model_version, last_ts, states[writing]
        )

        wb = WriteBatch(raw_mode=True)
        wb.set_default_column_family(self._users_cf)
        prefixes = [history_prefix(u) for u in uids]
        suffixes, rows, n = self._suffixes, batch.rows, self.config.history_len
        newest = np.flatnonzero(numbers.newest)
        newest = newest[np.argsort(user[newest], kind="stable")]  # key order, seq order within
        for e, u, s in zip(
            events[newest].tolist(),
            user[newest].tolist(),
            numbers.seq[newest].tolist(),
            strict=True,
        ):
            wb.put(prefixes[u] + suffixes[s % n], encode_row(s, rows[e]))
        for key, value in zip(keys, values, strict=True):  # state keys sort after history keys
            wb.put(key, value)
        wb.put(okey, encode_offset(last_offset, batch.log_id), self._offsets_cf)
        self._write(wb)
        log.debug(
            "applied %d events of %d users to %s[%d] through offset %d (%d skipped)",
            events.size,
            writing.size,
            batch.topic,
            batch.partition,
            last_offset,
            skipped,
        )
        return ApplyResult(
            applied=int(events.size),
            skipped=skipped,
            users=int(writing.size),
            last_offset=last_offset,
        )

    def _check_current(
        self, before: RecordBatch, writing: np.ndarray, keys: list[bytes], base: np.ndarray
    ) -> None:
        """Raise unless the stored records of ``keys`` are those ``before`` was read as.

        Skips the re-read when nothing was written since ``before`` was read by this store.
        Raises ``StaleUpdateError`` or ``CorruptValueError``.
        """
        if before.read_mark is self._write_mark:
            return
        current = self._codec.decode(keys, self._users[keys])
        moved = np.flatnonzero(current.update_counts != base)
        if moved.size:
            i = moved[0]
            raise StaleUpdateError(
                f"user {before.user_ids[writing[i]]!r} has update count "
                f"{current.update_counts[i]} in the store but {base[i]} in the record its new "
                "state was computed from; read again and recompute"
            )

    def _write(self, wb: WriteBatch) -> None:
        """Write ``wb`` atomically; the caller holds the write lock."""
        self._db.write(wb, self._write_options)
        self._write_mark = object()

    def restore_partition(
        self,
        topic: str,
        partition: int,
        log_id: str,
        last_offset: int | None,
        records: Sequence[UserRecord],
        *,
        chunk: int = 2048,
    ) -> None:
        """Write ``records`` (each with its ``history``, oldest first, and its own model
        version) as they are, replacing those users' records and histories, then set the
        partition's stored offset to ``last_offset`` in log ``log_id`` (None: forget it).

        For restoring a partition from a changelog (``stream.changelog``). The users are
        written in WriteBatches of ``chunk`` users and the offset in the last one: a crash
        part-way leaves some users restored under the partition's old offset, and restoring
        again from the same records gives the same store (idempotent). A record's history may
        hold at most ``history_len`` rows (the newest are kept) and at most its update count.
        Raises ``ValueError`` on a state of the wrong shape or not finite, a record with no
        update, or more history rows than updates.
        """
        self._require_writable()
        okey = offset_key(topic, partition)
        n = self.config.history_len
        for start in range(0, max(len(records), 1), chunk):
            part = records[start : start + chunk]
            wb = WriteBatch(raw_mode=True)
            if part:
                uids = encode_user_ids([r.user_id for r in part])
                states = np.stack([np.asarray(r.state, dtype=np.float32) for r in part])
                if states.shape != (len(part), self.config.state_dim):
                    raise ValueError(f"restored states have shape {states.shape}, the store "
                                     f"holds dimension {self.config.state_dim}")
                if not np.isfinite(states).all():
                    raise ValueError("a restored state holds NaN or infinity")
                counts = np.array([r.update_count for r in part], dtype=np.int64)
                if (counts < 1).any():
                    raise ValueError("a restored record has no applied event")
                versions = np.array([r.model_version for r in part], dtype=np.int64)
                ts = np.array([r.last_event_ts for r in part], dtype=np.float64)
                values = self._codec.encode(counts, versions, ts, states)  # type: ignore[arg-type]
                for uid, record, count, value in zip(uids, part, counts.tolist(), values,
                                                     strict=True):
                    rows = list(record.history or [])[-n:]
                    if len(rows) > count:
                        raise ValueError(f"user {record.user_id!r}: {len(rows)} history rows "
                                         f"but {count} updates")
                    wb.delete_range(*history_range(uid), self._users_cf)
                    first = count - len(rows)
                    for seq, row in enumerate(rows, start=first):
                        wb.put(history_prefix(uid) + self._suffixes[seq % n],
                               encode_row(seq, row), self._users_cf)
                    wb.put(state_key(uid), value, self._users_cf)
            if start + chunk >= len(records):
                if last_offset is None:
                    wb.delete(okey, self._offsets_cf)
                else:
                    wb.put(okey, encode_offset(last_offset, log_id), self._offsets_cf)
            with self._write_lock:
                self._write(wb)
        log.info("restored %d users of %s[%d] at offset %s", len(records), topic, partition,
                 last_offset)

    def delete_user(self, user_id: str) -> bool:
        """Remove a user's state and history (a data-removal request); False if absent."""
        self._require_writable()
        uid = encode_user_ids([user_id])[0]
        key = state_key(uid)
        with self._write_lock:
            existed = self._users.get(key) is not None
            wb = WriteBatch(raw_mode=True)
            wb.delete(key, self._users_cf)
            # rocksdict's delete_range ignores set_default_column_family: name the family.
            wb.delete_range(*history_range(uid), self._users_cf)
            self._write(wb)
        log.info("deleted user %r (%s)", user_id, "state and history" if existed else "absent")
        return existed

    # ----------------------------------------------------------------------- maintenance

    def checkpoint(self, directory: str | Path) -> None:
        """Write a consistent RocksDB checkpoint of the whole store to the new ``directory``.

        The checkpoint is itself a store: ``open`` it (read-only to inspect) or ``restore`` it.
        Only the writer can take one (a read-only view's checkpoint would miss data).
        """
        self._require_writable()
        Checkpoint(self._db).create_checkpoint(str(directory))
        log.info("checkpoint of %s written to %s", self.path, directory)

    def compact(self) -> None:
        """Compact every column family fully (drops overwritten and deleted data)."""
        self._require_writable()
        for name in COLUMN_FAMILIES:
            self._db.get_column_family(name).compact_range(None, None)

    def _require_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"state store {self.path} is open read-only")


def _check_log(topic: str, partition: int, stored_log_id: str, log_id: str) -> None:
    """``LogChangedError`` unless the stored offsets of the partition belong to ``log_id``."""
    if stored_log_id != log_id:
        raise LogChangedError(topic, partition, stored_log_id, log_id)
