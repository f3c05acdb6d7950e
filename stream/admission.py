"""Admission at the edge: which consumed records the worker takes in, and which it rejects.

Every record comes from outside the worker's control. A record that decodes as its kind
(``eventlog.schema`` already rejects non-finite numbers, event times outside 1970-2100 and
ids with control characters) is admitted only if it also keeps the ``RecordLimits``:

- its value is at most ``max_record_bytes`` (checked before decoding);
- it has a key, and the key is the message's ``user_id`` (a keyless or mis-keyed record may
  sit in another user's partition, where its user's events would be applied out of order);
- every id (user, item, event, request, action) is at most ``max_id_bytes`` of UTF-8;
- an impression has at most ``max_candidates`` candidates;
- every numeric feature is at most ``max_abs_number`` in magnitude;
- its event time is at most ``max_event_ahead_s`` after the record's broker timestamp, and,
  when ``max_event_age_s`` is set, at most that long before it. Replays of old data (the demo
  replays 1997) keep their event times, so the age bound is off by default; an event from the
  future is never plausible.

Outputs fit the broker's message limit by construction: with these limits a ``scores``
record is at most ``RecordLimits.scores_bytes_bound()`` bytes, and ``RecordLimits`` refuses
values whose bound exceeds ``MAX_OUTPUT_BYTES`` (a dead letter is bounded by
``stream.dead_letters``).

``stream_time(record_timestamp_ms)`` is the worker's clock for a record: its broker timestamp,
bounded by the local clock plus ``clock_skew_s``, so that no record can move a clock (the
feedback window's) further ahead than that. ``bounded_timestamp`` is what the consume loop
keeps of a record's broker timestamp: one more than ``clock_skew_s`` ahead of the local clock
(a producer's clock, or a hostile CreateTime) is replaced by the local clock, so that no
record can hold the event-time merge (``stream.gate``) back until the clock reaches it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from eventlog.schema import FeatureMap, Impression, Interaction, Label

MAX_OUTPUT_BYTES = 1_000_000
"""The largest record the worker produces: under Kafka's default message limit (1 MiB)."""


@dataclass(frozen=True)
class RecordLimits:
    """The bounds a consumed record must keep (module docstring); ``None``: no age bound."""

    max_record_bytes: int = 1 << 20
    max_id_bytes: int = 256
    max_candidates: int = 1000
    max_abs_number: float = 1e12
    max_event_ahead_s: float = 3600.0
    max_event_age_s: float | None = None
    clock_skew_s: float = 60.0

    def __post_init__(self) -> None:
        positive = {"max_record_bytes": self.max_record_bytes,
                    "max_id_bytes": self.max_id_bytes, "max_candidates": self.max_candidates,
                    "max_abs_number": self.max_abs_number}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_event_ahead_s < 0 or self.clock_skew_s < 0 or (
                self.max_event_age_s is not None and self.max_event_age_s < 0):
            raise ValueError("max_event_ahead_s, max_event_age_s and clock_skew_s must be >= 0")
        if self.scores_bytes_bound() > MAX_OUTPUT_BYTES:
            raise ValueError(
                f"max_candidates={self.max_candidates} with max_id_bytes={self.max_id_bytes} "
                f"allows scores records of {self.scores_bytes_bound()} bytes, over the "
                f"{MAX_OUTPUT_BYTES}-byte output limit: lower one of them")

    def scores_bytes_bound(self) -> int:
        """The largest ``scores`` record (JSON) an admitted impression can produce.

        Ids hold no control character, so JSON escapes at most double an id (``"`` and
        ``\\``); a scored item adds its id, two floats of at most 24 characters each and
        its keys (about 50 bytes); the envelope adds two ids, a version and its keys."""
        per_item = 2 * self.max_id_bytes + 2 * 24 + 64
        return self.max_candidates * per_item + 4 * self.max_id_bytes + 128

    def bounded_timestamp(self, timestamp_ms: int, now_ms: int) -> int:
        """``timestamp_ms``, or ``now_ms`` (the local clock) when it is more than
        ``clock_skew_s`` ahead of it; -1 (none) stays -1."""
        if timestamp_ms > now_ms + self.clock_skew_s * 1000:
            return now_ms
        return timestamp_ms

    def stream_time(self, timestamp_ms: int) -> float:
        """Seconds: the record's broker timestamp, at most the local clock + ``clock_skew_s``
        (the local clock when the record has none, ``timestamp_ms < 0``)."""
        now = time.time()
        if timestamp_ms < 0:
            return now
        return min(timestamp_ms / 1000.0, now + self.clock_skew_s)

    def violation(self, message: Interaction | Impression | Label, timestamp_ms: int
                  ) -> str | None:
        """Why a decoded ``message`` (consumed with broker timestamp ``timestamp_ms``, < 0 if
        none) breaks the limits, or None if it keeps them."""
        ids = [("user_id", message.user_id)]
        numbers: list[tuple[str, FeatureMap]] = []
        if isinstance(message, Interaction):
            ids += [("event_id", message.event_id), ("item_id", message.item_id),
                    ("action", message.action)]
            numbers += [("item_features", message.item_features), ("context", message.context)]
        elif isinstance(message, Impression):
            if len(message.candidates) > self.max_candidates:
                return (f"impression has {len(message.candidates)} candidates, over the limit "
                        f"of {self.max_candidates}")
            ids.append(("request_id", message.request_id))
            ids += [("candidates[].item_id", c.item_id) for c in message.candidates]
            numbers.append(("context", message.context))
            numbers += [("candidates[].item_features", c.item_features)
                        for c in message.candidates]
        else:
            ids += [("request_id", message.request_id), ("item_id", message.item_id)]
        for where, value in ids:
            size = len(value.encode())
            if size > self.max_id_bytes:
                return f"{where} is {size} bytes of UTF-8, over the limit of {self.max_id_bytes}"
        for where, features in numbers:
            for name, value in features.items():
                if isinstance(value, float) and abs(value) > self.max_abs_number:
                    return (f"{where}[{name[:64]!r}] = {value!r} is beyond "
                            f"+-{self.max_abs_number:g}")
        return self._time_violation(message.ts, timestamp_ms)

    def _time_violation(self, ts: float, timestamp_ms: int) -> str | None:
        if timestamp_ms < 0:
            return None
        broker_s = timestamp_ms / 1000.0
        if ts > broker_s + self.max_event_ahead_s:
            return (f"event time {ts!r} is {ts - broker_s:.0f} s after the record's broker "
                    f"timestamp {broker_s:.3f}, over the limit of {self.max_event_ahead_s:g} s")
        if self.max_event_age_s is not None and ts < broker_s - self.max_event_age_s:
            return (f"event time {ts!r} is {broker_s - ts:.0f} s before the record's broker "
                    f"timestamp {broker_s:.3f}, over the limit of {self.max_event_age_s:g} s")
        return None
