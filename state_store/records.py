"""What a read returns: one user's record, or the records of many users as columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_MODEL_VERSION = -1
"""``RecordBatch.model_versions`` of a user no model has updated yet (a new user)."""


@dataclass(frozen=True)
class UserRecord:
    """One user's stored state.

    A user with no stored record reads as new: zero state, ``update_count`` 0,
    ``model_version`` and ``last_event_ts`` None, empty history. Model versions are
    non-negative integers chosen by the writer (the trainer's version counter).
    """

    user_id: str
    state: np.ndarray  # (D,) float32
    model_version: int | None
    update_count: int
    last_event_ts: float | None  # seconds since the epoch, of the last applied event
    history: list[bytes] | None  # newest N rows, oldest first; None when not read

    @property
    def is_new(self) -> bool:
        """Whether no event of this user has been applied yet."""
        return self.update_count == 0


@dataclass(frozen=True)
class RecordBatch:
    """The records of ``user_ids`` (in that order) as columns, for vectorized use.

    New users hold zero states, update count 0, ``NO_MODEL_VERSION`` and NaN event time.
    Pass a batch back to ``StateStore.apply`` with the states computed from it: its update
    counts tell the store which stored records those states were computed from.
    """

    user_ids: list[str]
    states: np.ndarray  # (U, D) float32
    model_versions: np.ndarray  # (U,) int64
    update_counts: np.ndarray  # (U,) int64
    last_event_ts: np.ndarray  # (U,) float64
    histories: list[list[bytes]] | None  # per user, oldest first; None when not read
    read_mark: object = None
    """Opaque: the store's write generation when this batch was read (None if unknown)."""

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def is_new(self) -> np.ndarray:
        """(U,) bool: users with no applied event."""
        return self.update_counts == 0

    def record(self, i: int) -> UserRecord:
        """The ``i``-th user's record as a ``UserRecord``."""
        count = int(self.update_counts[i])
        return UserRecord(
            user_id=self.user_ids[i],
            state=self.states[i],
            model_version=int(self.model_versions[i]) if count else None,
            update_count=count,
            last_event_ts=float(self.last_event_ts[i]) if count else None,
            history=None if self.histories is None else self.histories[i],
        )
