"""The errors the state store raises; every one names what it is about."""

from __future__ import annotations


class StateStoreError(Exception):
    """Base class of every error raised by ``state_store``."""


class CorruptValueError(StateStoreError):
    """A stored value does not decode. Nothing is written over it.

    ``key`` is the raw RocksDB key and ``column_family`` the column family holding it.
    """

    def __init__(self, key: bytes, reason: str, column_family: str = "users") -> None:
        self.key = key
        self.reason = reason
        self.column_family = column_family
        super().__init__(
            f"corrupt value at key {key!r} (column family {column_family!r}): {reason}"
        )


class StaleUpdateError(StateStoreError):
    """A new state was computed from a record that is no longer the stored one.

    Raised by ``apply`` when another writer changed a user between the caller's read and the
    apply, so the state handed in would double-apply or lose events. Nothing was written; read
    again and recompute.
    """


class ReadOnlyStoreError(StateStoreError):
    """A write was attempted on a store opened read-only."""


class ConfigMismatchError(StateStoreError):
    """The store was created with a different ``StoreConfig`` than the one given on opening."""


class LogMismatchError(StateStoreError):
    """Stored offsets do not belong to the log being consumed; resuming would skip its events.

    The worker raises (or lets propagate) one of the two subclasses when a partition is
    assigned, unless it was told to treat the log as new (``StateStore.reset_partition``).
    """


class LogChangedError(LogMismatchError):
    """The partition's stored log identity differs from the current log's identity."""

    def __init__(self, topic: str, partition: int, stored_log_id: str, log_id: str) -> None:
        self.topic = topic
        self.partition = partition
        self.stored_log_id = stored_log_id
        self.log_id = log_id
        super().__init__(
            f"partition {topic}[{partition}]: stored offsets belong to log {stored_log_id!r}, "
            f"but the current log is {log_id!r} (a new cluster or a recreated topic?)"
        )


class OffsetBeyondEndError(LogMismatchError):
    """The partition's stored offset lies at or beyond the partition's end offset."""

    def __init__(self, topic: str, partition: int, stored_offset: int, end_offset: int) -> None:
        self.topic = topic
        self.partition = partition
        self.stored_offset = stored_offset
        self.end_offset = end_offset
        super().__init__(
            f"partition {topic}[{partition}]: last applied offset {stored_offset} is beyond "
            f"the partition's end offset {end_offset} (the log was truncated or replaced?)"
        )
