"""``EventTimeGate``: a partition's impressions, interactions and labels are released in time
order (timestamp, then impression < interaction < label), only once no other topic of the
partition can still bring an earlier record; ``preceding_interactions`` gives each impression
the interactions of its user ordered before it."""

from __future__ import annotations

from stream.gate import EventTimeGate, preceding_interactions
from stream.records import ConsumedRecord


def rec(partition: int, offset: int, ts: int, user: bytes = b"u") -> ConsumedRecord:
    return ConsumedRecord(partition, offset, user, b"{}", ts)


def never_idle(kind: str, partition: int, as_of: float) -> bool:
    return False


def offsets(records: list[ConsumedRecord]) -> list[int]:
    return [r.offset for r in records]


def test_an_interaction_waits_until_the_impressions_and_labels_have_passed_it() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 100), rec(0, 1, 101)])
    gate.hold("labels", [rec(0, 0, 150)])
    assert gate.release(never_idle)["interactions"] == []
    gate.hold("impressions", [rec(0, 0, 100)])  # same millisecond: the impression comes first
    released = gate.release(never_idle)
    assert offsets(released["impressions"]) == [0]  # interactions and labels are past it
    assert released["interactions"] == []
    gate.hold("impressions", [rec(0, 1, 101)])
    released = gate.release(never_idle)
    assert offsets(released["interactions"]) == [0]
    assert offsets(released["impressions"]) == [1]
    assert gate.held("interactions", 0) == 1


def test_an_impression_waits_for_the_interactions_before_it() -> None:
    gate = EventTimeGate()
    gate.hold("impressions", [rec(1, 0, 200)])
    gate.hold("labels", [rec(1, 0, 300)])
    assert gate.release(never_idle)["impressions"] == []
    gate.hold("interactions", [rec(1, 0, 150)])
    assert gate.release(never_idle)["impressions"] == []  # an interaction at 180 may follow
    gate.hold("interactions", [rec(1, 1, 200)])
    assert offsets(gate.release(never_idle)["impressions"]) == [0]


def test_records_of_another_partition_release_nothing() -> None:
    gate = EventTimeGate()
    gate.hold("labels", [rec(1, 0, 100)])
    gate.hold("impressions", [rec(0, 0, 500)])
    gate.hold("interactions", [rec(0, 0, 500)])
    assert gate.release(never_idle)["labels"] == []


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_idle_topics_hold_nothing_back_once_the_grace_has_passed() -> None:
    clock = Clock()
    gate = EventTimeGate(idle_grace_s=0.3, clock=clock)
    gate.hold("interactions", [rec(2, 0, 300), rec(2, 1, 100), rec(3, 0, 50)])

    asked: list[float] = []

    def idle(kind: str, partition: int, as_of: float) -> bool:
        asked.append(as_of)
        return partition == 2 and kind in ("impressions", "labels")

    clock.now = 0.2
    assert gate.release(idle)["interactions"] == []  # an earlier record may still arrive
    assert asked == []  # nothing to ask before the grace has passed
    clock.now = 0.3
    released = gate.release(idle)["interactions"]
    assert [(r.partition, r.offset) for r in released] == [(2, 0), (2, 1)]
    assert gate.held("interactions", 3) == 1


def test_a_label_is_not_released_ahead_of_its_impression_by_a_stale_idle_mark() -> None:
    """The impressions partition looks idle (its last fetch saw it empty), a label arrives,
    and its impression arrives in the next poll, within the grace: the impression goes first."""
    clock = Clock()
    gate = EventTimeGate(idle_grace_s=0.3, clock=clock)
    impressions_fetched = False

    def idle(kind: str, partition: int, as_of: float) -> bool:
        return kind != "impressions" or not impressions_fetched

    gate.hold("labels", [rec(0, 0, 101)])
    assert gate.release(idle)["labels"] == []
    clock.now, impressions_fetched = 0.1, True
    gate.hold("impressions", [rec(0, 0, 100)])
    gate.hold("interactions", [rec(0, 0, 100)])
    released = gate.release(idle)
    assert offsets(released["impressions"]) == [0]
    assert released["labels"] == []  # not idle any more, and nothing newer seen
    clock.now = 0.5
    assert offsets(gate.release(lambda kind, partition, as_of: True)["labels"]) == [0]


def test_an_idle_answer_from_before_the_grace_ends_releases_nothing() -> None:
    """A slow loop pass: the impressions partition was last seen read to its end at 0.1 s,
    the interaction was held at 0.2 s, and the clock reads 5 s when the gate next releases.
    The old answer says nothing of an impression that reached the broker after 0.1 s."""
    clock = Clock()
    gate = EventTimeGate(idle_grace_s=0.3, clock=clock)
    seen_read_to_end_at = 0.1

    def read_to_end(kind: str, partition: int, as_of: float) -> bool:
        return kind == "labels" or as_of <= seen_read_to_end_at

    clock.now = 0.2
    gate.hold("interactions", [rec(0, 0, 100)])
    clock.now = 5.0
    assert gate.release(read_to_end)["interactions"] == []
    seen_read_to_end_at = 5.0
    assert offsets(gate.release(read_to_end)["interactions"]) == [0]


def test_release_stops_at_the_first_record_not_yet_due_keeping_offset_order() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 10), rec(0, 1, 30), rec(0, 2, 20)])
    gate.hold("impressions", [rec(0, 0, 25)])
    gate.hold("labels", [rec(0, 0, 99)])
    assert offsets(gate.release(never_idle)["interactions"]) == [0]


def test_forget_drops_held_records_and_what_was_seen() -> None:
    gate = EventTimeGate()
    gate.hold("interactions", [rec(0, 0, 10)])
    gate.hold("impressions", [rec(0, 0, 50)])
    gate.hold("labels", [rec(0, 0, 50)])
    gate.forget("interactions", 0)
    gate.forget("impressions", 0)
    assert gate.held("interactions", 0) == 0
    gate.hold("interactions", [rec(0, 1, 10)])
    assert gate.release(never_idle)["interactions"] == []


def test_a_full_gate_releases_its_oldest_records_and_counts_them() -> None:
    gate = EventTimeGate(max_held=2)
    gate.hold("interactions", [rec(0, o, 100 + o) for o in range(5)])
    assert offsets(gate.release(never_idle)["interactions"]) == [0, 1, 2]
    assert gate.released_early == {"impressions": 0, "interactions": 3, "labels": 0}
    assert gate.held("interactions", 0) == 2


def test_each_impression_gets_its_users_earlier_interactions_of_the_release() -> None:
    interactions = [rec(0, 0, 10, b"a"), rec(0, 1, 20, b"b"), rec(0, 2, 30, b"a"),
                    rec(1, 0, 5, b"a")]
    impressions = [rec(0, 7, 30, b"a"), rec(0, 8, 31, b"a"), rec(0, 9, 31, b"c"),
                   rec(1, 3, 1, b"a")]
    before = preceding_interactions(impressions, interactions)
    assert offsets(before[(0, 7)]) == [0]  # the interaction of its own millisecond is later
    assert offsets(before[(0, 8)]) == [0, 2]
    assert before[(0, 9)] == []
    assert before[(1, 3)] == []  # another partition's, and later
