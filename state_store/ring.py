"""The history ring: which slot holds which of a user's events.

A user's events are numbered ``seq = 0, 1, ...`` in the order they are applied; event ``seq``
lives in slot ``seq % N``, so the slots always hold the newest ``min(count, N)`` events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from state_store.codec import decode_row
from state_store.errors import CorruptValueError


@dataclass(frozen=True)
class EventNumbers:
    """Where the events of a batch go, for events in offset order.

    seq: (E,) each event's number for its user.
    per_user: (U,) events of each user in the batch (each at least 1).
    last_event: (U,) index of each user's last event in the batch.
    newest: (E,) bool, the event is among its user's newest N of the batch (older ones would
        be overwritten in the same write, so they need not be written).
    """

    seq: np.ndarray
    per_user: np.ndarray
    last_event: np.ndarray
    newest: np.ndarray


def number_events(event_user: np.ndarray, base_counts: np.ndarray, n: int) -> EventNumbers:
    """Number events whose users (``event_user``, indices into ``base_counts``) each have
    ``base_counts`` events already; every user must have at least one event."""
    per_user = np.bincount(event_user, minlength=len(base_counts))
    order = np.argsort(event_user, kind="stable")  # grouped by user, offset order kept
    ends = np.cumsum(per_user)
    rank = np.empty(len(event_user), dtype=np.int64)
    rank[order] = np.arange(len(event_user)) - np.repeat(ends - per_user, per_user)
    return EventNumbers(
        seq=base_counts[event_user] + rank,
        per_user=per_user,
        last_event=order[ends - 1],
        newest=rank >= per_user[event_user] - n,
    )


def read_ring(
    prefix: bytes, suffixes: Sequence[bytes], slots: Sequence[bytes | None], count: int
) -> list[bytes]:
    """The newest rows of a user with ``count`` events, oldest first, from its slot values.

    ``prefix + suffixes[slot]`` is the key of ``slots[slot]`` (``None`` when absent). Raises
    ``CorruptValueError`` if a row that must exist is missing or holds another event.
    """
    n = len(suffixes)
    rows = []
    for seq in range(max(0, count - n), count):
        value = slots[seq % n]
        if value is None:
            raise CorruptValueError(prefix + suffixes[seq % n], f"history row {seq} is missing")
        rows.append(decode_row(prefix + suffixes[seq % n], value, seq))
    return rows
