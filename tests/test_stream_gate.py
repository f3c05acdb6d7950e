"""``EventTimeGate``: an interaction or label is released only after an impression of its
partition with a later timestamp was seen, or once that partition's impressions are idle."""

from __future__ import annotations

from stream.agents import Record
from stream.gate import EventTimeGate


def rec(partition: int, offset: int, ts: int) -> Record:
    return Record(partition, offset, b"u", b"{}", ts)


def never_idle(partition: int) -> bool:
    return False


def test_an_interaction_waits_for_a_strictly_later_impression_of_its_partition() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 100), rec(0, 1, 101)])
    assert gate.release(never_idle)["interactions"] == []
    gate.saw_impressions([rec(0, 5, 100)])  # same millisecond: not ordered, still held
    assert gate.release(never_idle)["interactions"] == []
    gate.saw_impressions([rec(0, 6, 101)])
    assert [r.offset for r in gate.release(never_idle)["interactions"]] == [0]
    assert gate.held("interactions", 0) == 1


def test_impressions_of_another_partition_release_nothing() -> None:
    gate = EventTimeGate()
    gate.hold("labels", [rec(1, 0, 100)])
    gate.saw_impressions([rec(0, 0, 500)])
    assert gate.release(never_idle)["labels"] == []


def test_idle_impressions_release_everything_in_offset_order() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(2, 0, 300), rec(2, 1, 100), rec(3, 0, 50)])
    released = gate.release(lambda p: p == 2)["interactions"]
    assert [(r.partition, r.offset) for r in released] == [(2, 0), (2, 1)]
    assert gate.held("interactions", 3) == 1


def test_release_stops_at_the_first_record_not_yet_due_keeping_offset_order() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 10), rec(0, 1, 30), rec(0, 2, 20)])
    gate.saw_impressions([rec(0, 0, 25)])
    assert [r.offset for r in gate.release(never_idle)["interactions"]] == [0]


def test_forget_drops_held_records_and_impression_time() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 10)])
    gate.saw_impressions([rec(0, 0, 50)])
    gate.forget("interactions", 0)
    gate.forget_impressions(0)
    assert gate.held("interactions", 0) == 0
    gate.hold("interactions", [rec(0, 1, 10)])
    assert gate.release(never_idle)["interactions"] == []


def test_a_full_gate_releases_its_oldest_records_and_counts_them() -> None:
    gate = EventTimeGate(max_held=2)
    gate.hold("interactions", [rec(0, o, 100 + o) for o in range(5)])
    assert [r.offset for r in gate.release(never_idle)["interactions"]] == [0, 1, 2]
    assert gate.released_early == {"interactions": 3, "labels": 0}
    assert gate.held("interactions", 0) == 2
