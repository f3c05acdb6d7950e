"""``EventLog``: a data set as a time-ordered list of interactions with their outcomes.

Every loader (``eventlog.movielens``, ``eventlog.generic``) returns one. The contract:

- ``interactions`` are sorted by ``ts``; events with equal ``ts`` keep the order they had in
  the source (a stable sort), so replaying the log is deterministic;
- ``labels[i]`` (int8, 0 or 1) is the outcome of ``interactions[i]``;
- ``profiles`` maps a user id to that user's static profile; users without one are absent.

``time_split`` cuts the log into an earlier and a later part without letting any event of the
later part be earlier than an event of the earlier part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eventlog.schema import Interaction, UserProfile


@dataclass
class EventLog:
    """A time-ordered interaction log; the constructor checks the contract above."""

    name: str
    interactions: list[Interaction]
    labels: np.ndarray
    profiles: dict[str, UserProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels.dtype != np.int8 or self.labels.ndim != 1:
            raise ValueError(f"labels must be a 1-d int8 array, got {self.labels.dtype}")
        if len(self.labels) != len(self.interactions):
            raise ValueError(
                f"{len(self.labels)} labels for {len(self.interactions)} interactions"
            )
        if not np.isin(self.labels, (0, 1)).all():
            raise ValueError("labels must be 0 or 1")
        ts = self.timestamps()
        if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():
            first = int(np.argmax(ts[1:] < ts[:-1])) + 1
            raise ValueError(f"interactions are not in time order at index {first}")

    def __len__(self) -> int:
        return len(self.interactions)

    def timestamps(self) -> np.ndarray:
        """The interactions' ``ts`` as a float64 array (non-decreasing)."""
        return np.fromiter((event.ts for event in self.interactions), np.float64,
                           count=len(self.interactions))

    def slice(self, start: int, stop: int) -> EventLog:
        """The events ``start:stop`` as a new log sharing this log's profiles."""
        return EventLog(self.name, self.interactions[start:stop], self.labels[start:stop],
                        self.profiles)


def time_split(log: EventLog, fraction: float) -> int:
    """The index ``k`` that splits ``log`` into ``log[:k]`` (about ``fraction`` of the events)
    and ``log[k:]``, with every event of ``log[k:]`` strictly later than every event of
    ``log[:k]``.

    ``k`` starts at ``round(fraction * len(log))``; if that falls inside a run of equal
    timestamps, it moves to the nearer end of the run (the earlier end on a tie), so equal
    timestamps stay on one side. ``fraction`` must lie in [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    ts = log.timestamps()
    k = round(fraction * len(ts))
    if k == 0 or k == len(ts) or ts[k - 1] != ts[k]:
        return k
    run_start = int(np.searchsorted(ts, ts[k], side="left"))
    run_stop = int(np.searchsorted(ts, ts[k], side="right"))
    return run_start if k - run_start <= run_stop - k else run_stop
