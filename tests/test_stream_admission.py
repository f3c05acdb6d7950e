"""``stream.admission``: the records a worker admits, and the dead letters of the others."""

from __future__ import annotations

import time

import msgspec
import pytest

from eventlog.schema import Impression, Interaction, Label
from stream.admission import MAX_OUTPUT_BYTES, RecordLimits
from stream.dead_letters import decode_records
from stream.records import ConsumedRecord
from stream.serving import ScoredItem, Scores

LIMITS = RecordLimits()
NOW_MS = 1_700_000_000_000
INTERACTION = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "click",
               "ts": 1_700_000_000.0, "item_features": {"price": 3.0}}
IMPRESSION = {"request_id": "r1", "user_id": "u1", "ts": 1_700_000_000.0,
              "candidates": [{"item_id": "i1"}]}
LABEL = {"request_id": "r1", "user_id": "u1", "item_id": "i1", "label": 1,
         "ts": 1_700_000_000.0}


def reasons(kind: type, message: dict | bytes, key: bytes | None = b"u1",
            timestamp: int = NOW_MS, limits: RecordLimits = LIMITS) -> list[str]:
    value = message if isinstance(message, bytes) else msgspec.json.encode(message)
    valid, dead = decode_records(kind, "t", [ConsumedRecord(0, 7, key, value, timestamp)],
                                 limits)
    assert len(valid) + len(dead) == 1
    return [d.reason for d in dead]


def test_well_formed_records_are_admitted() -> None:
    assert reasons(Interaction, INTERACTION) == []
    assert reasons(Impression, IMPRESSION) == []
    assert reasons(Label, LABEL) == []
    assert reasons(Label, LABEL, timestamp=-1) == []  # no broker timestamp: no time check


@pytest.mark.parametrize(("kind", "message", "key", "expected"), [
    (Interaction, INTERACTION, None, "record has no key"),
    (Label, LABEL, b"u2", "record key 'u2' differs"),
    (Interaction, {**INTERACTION, "user_id": "a\x00b"}, b"a\x00b", "control characters"),
    (Interaction, {**INTERACTION, "user_id": "u" * 300}, b"u" * 300, "user_id is 300 bytes"),
    (Interaction, {**INTERACTION, "ts": -1e300}, b"u1", "ts must be seconds since the epoch"),
    (Label, {**LABEL, "ts": 1e300}, b"u1", "ts must be seconds since the epoch"),
    (Interaction, {**INTERACTION, "ts": 1_700_000_000.0 + 7200}, b"u1", "event time "),
    (Interaction, {**INTERACTION, "item_features": {"price": 1e200}}, b"u1", "is beyond +-"),
    (Impression, {**IMPRESSION, "candidates": [{"item_id": f"i{k}"} for k in range(13_000)]},
     b"u1", "impression has 13000 candidates, over the limit of 1000"),
])
def test_hostile_records_become_dead_letters_naming_why(kind: type, message: dict,
                                                        key: bytes | None,
                                                        expected: str) -> None:
    (reason,) = reasons(kind, message, key)
    assert expected in reason


def test_oversized_values_are_rejected_before_decoding() -> None:
    (reason,) = reasons(Interaction, b"[" * 2_000_000)
    assert reason == "record value is 2000000 bytes, over the limit of 1048576"


def test_the_age_bound_is_off_by_default_and_on_when_set() -> None:
    """Replays of old logs keep their event times; a deployment can bound the age."""
    old = {**INTERACTION, "ts": 880_000_000.0}  # 1997
    assert reasons(Interaction, old) == []
    (reason,) = reasons(Interaction, old, limits=RecordLimits(max_event_age_s=86_400.0))
    assert reason.startswith("event time 880000000.0 is ")


def test_the_largest_scores_record_fits_the_output_limit() -> None:
    """An impression at every bound (most candidates, longest ids, escapes) still gives a
    ``scores`` record under the bound ``RecordLimits`` promises, itself under the limit."""
    worst_id = ('"\\' * LIMITS.max_id_bytes)[: LIMITS.max_id_bytes]
    items = [ScoredItem(worst_id, -1.2345678901234567e-300, -1.2345678901234567e-300)
             for _ in range(LIMITS.max_candidates)]
    encoded = Scores(worst_id, worst_id, 2**63 - 1, items).encode()
    assert len(encoded) <= LIMITS.scores_bytes_bound() <= MAX_OUTPUT_BYTES


def test_limits_that_would_break_the_output_bound_are_refused() -> None:
    with pytest.raises(ValueError, match="output limit"):
        RecordLimits(max_candidates=10_000)


def test_stream_time_is_the_broker_time_bounded_by_the_local_clock() -> None:
    now = time.time()
    assert LIMITS.stream_time(int(now * 1000) - 5000) == pytest.approx(now - 5, abs=0.01)
    assert LIMITS.stream_time(2**62) <= time.time() + LIMITS.clock_skew_s
    assert LIMITS.stream_time(-1) == pytest.approx(time.time(), abs=1.0)


def test_a_broker_timestamp_far_ahead_of_the_local_clock_is_replaced_by_it() -> None:
    """A CreateTime decades ahead cannot hold the event-time merge back: the consume loop
    keeps the local clock instead; timestamps within the skew, and none (-1), are kept."""
    now_ms = 1_700_000_000_000
    assert LIMITS.bounded_timestamp(4_000_000_000_000, now_ms) == now_ms
    assert LIMITS.bounded_timestamp(now_ms + 30_000, now_ms) == now_ms + 30_000
    assert LIMITS.bounded_timestamp(now_ms - 5, now_ms) == now_ms - 5
    assert LIMITS.bounded_timestamp(-1, now_ms) == -1
