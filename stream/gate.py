"""``EventTimeGate``: score an impression before the interaction it predicts is applied.

Impressions, interactions and labels of one user live in the same partition number of three
topics, fetched independently: under a backlog one fetch can bring a thousand interactions of
partition p and none of p's impressions. Applied first, an interaction would put the very
item the impression asks about into the user's state and history before it is scored (a
leak that inflates online AUC). The gate orders the three by the records' Kafka timestamps,
as a stream processor joining co-partitioned topics does:

- impressions are never held;
- an interaction or label of partition p is released once an impression of p with a later
  timestamp has been seen (strictly later: records of one millisecond are not ordered by
  their timestamps), or once p's impressions are idle (everything up to the partition's end
  was read: e.g. a deployment that produces no impressions);
- within a topic and partition, release keeps offset order.

The gate holds at most ``max_held`` records per topic and partition: past that, the oldest
are released anyway (impressions far behind, or none at all for a while) and counted in
``released_early``, so memory stays bounded and the stream never stalls. (Pausing the
partition instead was tried: kafka-python 3.0 did not fetch a resumed partition again from
the embedded broker.)

The gate only buffers; the caller scores the impressions it polled before it applies what
``release`` returns, and calls ``forget`` when a partition is revoked or sought.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from stream.agents import Record

HELD_KINDS = ("interactions", "labels")


class EventTimeGate:
    """Buffers of held interactions and labels per partition, released by impression time."""

    def __init__(self, max_held: int = 8192) -> None:
        if max_held < 1:
            raise ValueError(f"max_held must be positive, got {max_held}")
        self.max_held = max_held
        self.released_early: dict[str, int] = dict.fromkeys(HELD_KINDS, 0)
        self._held: dict[str, dict[int, deque[Record]]] = {kind: {} for kind in HELD_KINDS}
        self._newest_impression: dict[int, int] = {}

    def saw_impressions(self, records: Iterable[Record]) -> None:
        """Note the newest impression timestamp of each partition in ``records``."""
        for r in records:
            if r.timestamp > self._newest_impression.get(r.partition, -1):
                self._newest_impression[r.partition] = r.timestamp

    def hold(self, kind: str, records: Iterable[Record]) -> None:
        """Buffer ``records`` of ``kind`` (``"interactions"`` or ``"labels"``), in order."""
        held = self._held[kind]
        for r in records:
            held.setdefault(r.partition, deque()).append(r)

    def release(self, idle: Callable[[int], bool]) -> dict[str, list[Record]]:
        """``{kind: records}`` that may be processed now, per partition in offset order.

        ``idle(p)``: whether partition p's impressions have nothing more to read.
        """
        out: dict[str, list[Record]] = {kind: [] for kind in HELD_KINDS}
        for kind, held in self._held.items():
            for partition, queue in held.items():
                if not queue:
                    continue
                if idle(partition):
                    out[kind].extend(queue)
                    queue.clear()
                    continue
                newest = self._newest_impression.get(partition, -1)
                while queue and queue[0].timestamp < newest:
                    out[kind].append(queue.popleft())
                while len(queue) > self.max_held:
                    out[kind].append(queue.popleft())
                    self.released_early[kind] += 1
        return out

    def held(self, kind: str, partition: int) -> int:
        """How many records of ``kind`` partition ``partition`` holds."""
        return len(self._held[kind].get(partition, ()))

    def forget(self, kind: str, partition: int) -> None:
        """Drop what is held of ``kind``'s ``partition`` (revoked, or sought elsewhere)."""
        self._held[kind].pop(partition, None)

    def forget_impressions(self, partition: int) -> None:
        """Forget the impression time of ``partition`` (its impressions were revoked)."""
        self._newest_impression.pop(partition, None)
