"""``ConsumedRecord``: one record as the worker consumed it, the one type every stage passes on
(the consume loop, the event-time gate, admission, the handlers, the applier)."""

from __future__ import annotations

from typing import NamedTuple


class ConsumedRecord(NamedTuple):
    """One record of a topic partition: its partition, offset, raw key, raw value and broker
    timestamp in milliseconds (-1: none, as Kafka says). The topic is the caller's context:
    records travel grouped by topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int = -1
