"""RocksDB store of per-user GRU states, bounded event histories and partition offsets.

Imports nothing else of the project: it stores arrays and bytes. See ``store`` for the
exactly-once contract, ``keys`` for the key layout and ``codec`` for the value formats.
"""

from state_store.batch import ApplyResult, PartitionBatch, PartitionOffset, TopicPartition
from state_store.config import StoreConfig
from state_store.errors import (
    ConfigMismatchError,
    CorruptValueError,
    LogChangedError,
    LogMismatchError,
    OffsetBeyondEndError,
    ReadOnlyStoreError,
    StaleUpdateError,
    StateStoreError,
)
from state_store.records import NO_MODEL_VERSION, RecordBatch, UserRecord
from state_store.store import StateStore

__all__ = [
    "NO_MODEL_VERSION",
    "ApplyResult",
    "ConfigMismatchError",
    "CorruptValueError",
    "LogChangedError",
    "LogMismatchError",
    "OffsetBeyondEndError",
    "PartitionBatch",
    "PartitionOffset",
    "ReadOnlyStoreError",
    "RecordBatch",
    "StaleUpdateError",
    "StateStore",
    "StateStoreError",
    "StoreConfig",
    "TopicPartition",
    "UserRecord",
]
