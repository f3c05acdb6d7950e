"""A consumed batch of one partition, the stored position of a partition, and apply's result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class TopicPartition(NamedTuple):
    """A Kafka topic partition."""

    topic: str
    partition: int


@dataclass(frozen=True)
class PartitionOffset:
    """A partition's stored position: the last applied offset, in the log ``log_id``."""

    last_offset: int
    log_id: str

    @property
    def next_offset(self) -> int:
        """The offset to resume consuming from."""
        return self.last_offset + 1


@dataclass(frozen=True)
class ApplyResult:
    """What ``StateStore.apply`` did.

    applied: events applied (each added one to its user's update count and one history row).
    skipped: events at or below the partition's stored offset, left out as already applied.
    users: users whose record was written.
    last_offset: the partition's stored offset after the call.
    """

    applied: int
    skipped: int
    users: int
    last_offset: int


@dataclass(frozen=True, eq=False)
class PartitionBatch:
    """Events consumed from one partition, in increasing offset order, as columns.

    ``log_id`` names the log the offsets belong to (for example ``"cluster_id/topic_id"``).
    ``last_offset`` is the last offset consumed in this batch, events rejected by the caller
    included; it is at least the offset of every event, and ``apply`` stores it.
    ``rows`` are the history rows to append, one per event, opaque to the store.
    """

    topic: str
    partition: int
    log_id: str
    last_offset: int
    offsets: np.ndarray  # (E,) int64, strictly increasing, >= 0
    user_ids: Sequence[str]  # (E,)
    ts: np.ndarray  # (E,) float64, event times in seconds
    rows: Sequence[bytes]  # (E,)

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        ts = np.asarray(self.ts, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "ts", ts)
        n = len(offsets)
        if not len(self.user_ids) == len(ts) == len(self.rows) == n:
            raise ValueError(
                f"batch columns differ in length: {n} offsets, {len(self.user_ids)} user ids, "
                f"{len(ts)} times, {len(self.rows)} rows"
            )
        if n and (offsets[0] < 0 or (np.diff(offsets) <= 0).any()):
            raise ValueError("batch offsets must be non-negative and strictly increasing")
        if n and self.last_offset < offsets[-1]:
            raise ValueError(f"last_offset {self.last_offset} is below offset {offsets[-1]}")
        if not np.isfinite(ts).all():
            raise ValueError("batch event times must be finite")

    def __len__(self) -> int:
        return len(self.offsets)

    def select(self, mask: np.ndarray) -> PartitionBatch:
        """The events where ``mask`` is true; same partition, log and ``last_offset``."""
        idx = np.flatnonzero(mask).tolist()
        return PartitionBatch(
            topic=self.topic,
            partition=self.partition,
            log_id=self.log_id,
            last_offset=self.last_offset,
            offsets=self.offsets[idx],
            user_ids=[self.user_ids[i] for i in idx],
            ts=self.ts[idx],
            rows=[self.rows[i] for i in idx],
        )

    def index_users(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each event's index into ``user_ids`` and each user's event count in the batch.

        Raises ``ValueError`` unless ``user_ids`` lists every user of the batch exactly once
        and no other user.
        """
        position = {u: i for i, u in enumerate(user_ids)}
        if len(position) != len(user_ids):
            raise ValueError("a user is listed more than once")
        try:
            event_user = np.fromiter(
                (position[u] for u in self.user_ids), dtype=np.int64, count=len(self)
            )
        except KeyError as exc:
            raise ValueError(f"no record for the event user {exc.args[0]!r}") from None
        n_events = np.bincount(event_user, minlength=len(user_ids))
        if (n_events == 0).any():
            missing = user_ids[int(np.flatnonzero(n_events == 0)[0])]
            raise ValueError(f"user {missing!r} has no events in the batch")
        return event_user, n_events

    def users(self) -> tuple[list[str], np.ndarray]:
        """Distinct user ids in order of first appearance, and each event's index into them."""
        index: dict[str, int] = {}
        event_user = np.fromiter(
            (index.setdefault(u, len(index)) for u in self.user_ids),
            dtype=np.int64,
            count=len(self),
        )
        return list(index), event_user
