"""``EventTimeGate`` against any schedule of production, fetches, idle signals and clock moves.

Property: for two partitions, each with its three topics' records (timestamps non-decreasing
per topic, offsets in order), produced in event-time order at arbitrary clock readings, each
reaching the broker up to less than ``IDLE_GRACE_S`` later (the producer batches each topic
partition separately, so a record can reach it after a later record of another topic),
fetched in arbitrary poll batches (topics and partitions interleaved arbitrarily), with
``release`` called at arbitrary moments and the read-to-end answers taken from checks of the
broker made at arbitrary moments, however old (a slow loop pass), truthful as of their
moment or withheld, what ``release`` returns, each call's records taken in time order as the
worker does:

(a) is in event-time order per partition: timestamp, then impression < interaction < label,
    then offset (the spec is written out here, not taken from the gate);
(b) is complete once everything is delivered, every topic is idle and the idle grace has
    passed (one ``release`` call);
(c) never gives an impression after an interaction of its user at or after its timestamp
    (the interaction it predicts: that would leak the answer into the score);
(d) gives each record exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.gate import IDLE_GRACE_S, KINDS, EventTimeGate, order_key
from stream.records import ConsumedRecord

PARTITIONS = (0, 1)
SPEC_RANK = {"impressions": 0, "interactions": 1, "labels": 2}  # one millisecond's order
DELAYS = (0.0, 0.1, 0.2, 0.29)  # how much later than produced a record reaches the broker

Stream = tuple[str, int]  # (kind, partition)


def spec_key(kind: str, r: ConsumedRecord) -> tuple[int, int, int]:
    return r.timestamp, SPEC_RANK[kind], r.offset


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """The records of every stream, when each reached the broker, what was delivered, and
    the broker checks made so far."""

    records: dict[Stream, list[ConsumedRecord]]
    production: list[tuple[str, ConsumedRecord]]  # every record, in event-time order
    on_broker_at: dict[tuple[str, int, int], float] = field(default_factory=dict)
    delivered: dict[Stream, int] = field(default_factory=dict)  # how many, per stream
    checked: dict[Stream, tuple[float, bool]] = field(default_factory=dict)  # (when, read)

    def produced(self) -> int:
        return len(self.on_broker_at)

    def produce(self, delays: list[float], now: float) -> None:
        """The next ``len(delays)`` records, produced at ``now``, each on the broker after its
        delay, but not before the record before it in its stream (a log)."""
        for (kind, r), delay in zip(self.production[self.produced():], delays, strict=False):
            before = [self.on_broker_at[(kind, r.partition, o)] for o in range(r.offset)]
            self.on_broker_at[(kind, r.partition, r.offset)] = max([now + delay, *before])

    def deliverable(self, stream: Stream, now: float) -> list[ConsumedRecord]:
        kind, _ = stream
        done = self.delivered.get(stream, 0)
        out = []
        for r in self.records[stream][done:]:
            if self.on_broker_at.get((kind, r.partition, r.offset), now + 1) > now:
                break
            out.append(r)
        return out

    def deliver(self, stream: Stream, n: int, now: float) -> list[ConsumedRecord]:
        batch = self.deliverable(stream, now)[:n]
        self.delivered[stream] = self.delivered.get(stream, 0) + len(batch)
        return batch

    def check(self, stream: Stream, now: float) -> None:
        """A broker check at ``now``: is every record then on the broker delivered?"""
        kind, _ = stream
        self.checked[stream] = now, all(
            self.on_broker_at.get((kind, r.partition, r.offset), now + 1) > now
            for r in self.records[stream][self.delivered.get(stream, 0):])

    def read_to_end(self, stream: Stream, as_of: float) -> bool:
        """The last check's answer, if it was made at ``as_of`` or later."""
        when, read = self.checked.get(stream, (-1.0, False))
        return when >= as_of and read


@st.composite
def worlds(draw: st.DrawFn) -> World:
    records: dict[Stream, list[ConsumedRecord]] = {}
    for p in PARTITIONS:
        for kind in KINDS:
            stamps = sorted(draw(st.lists(st.integers(0, 12), max_size=6)))
            users = draw(st.lists(st.sampled_from([b"a", b"b"]), min_size=len(stamps),
                                  max_size=len(stamps)))
            records[(kind, p)] = [ConsumedRecord(p, offset, b"p%d-" % p + user, b"{}", ts)
                                  for offset, (ts, user) in enumerate(zip(stamps, users,
                                                                          strict=True))]
    production = sorted(((kind, r) for (kind, _), rs in records.items() for r in rs),
                        key=lambda kr: (kr[1].partition, spec_key(*kr)))
    # partitions' productions interleave arbitrarily; within one, event-time order
    order: list[tuple[str, ConsumedRecord]] = []
    queues = {p: [kr for kr in production if kr[1].partition == p] for p in PARTITIONS}
    while any(queues.values()):
        p = draw(st.sampled_from([p for p in PARTITIONS if queues[p]]))
        order.append(queues[p].pop(0))
    return World(records, order)


def in_time_order(released: dict[str, list[ConsumedRecord]]) -> list[tuple[str, ConsumedRecord]]:
    """One release's records as the worker takes them: by the gate's ``order_key``."""
    return sorted(((kind, r) for kind in KINDS for r in released[kind]),
                  key=lambda kr: (kr[1].partition, order_key(*kr)))


ADVANCES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 2.0)


def run(world: World, data: st.DataObject, gate: EventTimeGate, clock: Clock,
        steps: int) -> list[tuple[str, ConsumedRecord]]:
    """Drive ``gate`` through ``steps`` drawn actions, then the end; what it released."""
    out: list[tuple[str, ConsumedRecord]] = []
    streams = list(world.records)

    def release() -> None:
        out.extend(in_time_order(gate.release(
            lambda kind, p, as_of: world.read_to_end((kind, p), as_of))))

    for _ in range(steps):
        actions = ["advance", "release", "check"]
        if world.produced() < len(world.production):
            actions.append("produce")
        ready = [s for s in streams if world.deliverable(s, clock.now)]
        if ready:
            actions.append("deliver")
        action = data.draw(st.sampled_from(actions))
        if action == "produce":
            world.produce(data.draw(st.lists(st.sampled_from(DELAYS), min_size=1, max_size=4)),
                          clock.now)
        elif action == "deliver":
            stream = data.draw(st.sampled_from(ready))
            gate.hold(stream[0], world.deliver(stream, data.draw(st.integers(1, 3)), clock.now))
        elif action == "advance":
            clock.now += data.draw(st.sampled_from(ADVANCES))
        elif action == "check":
            for stream in data.draw(st.lists(st.sampled_from(streams), min_size=1)):
                world.check(stream, clock.now)
        else:
            release()
    # the end: everything produced and delivered, the grace passed, every topic checked
    world.produce([0.0] * len(world.production), clock.now)
    clock.now += max(DELAYS)
    for stream in streams:
        gate.hold(stream[0], world.deliver(stream, len(world.records[stream]), clock.now))
    clock.now += IDLE_GRACE_S
    for stream in streams:
        world.check(stream, clock.now)
    release()
    return out


def check(world: World, out: list[tuple[str, ConsumedRecord]]) -> None:
    everything = sorted((kind, r.partition, r.offset) for kind, r in world.production)
    given_out = [(kind, r.partition, r.offset) for kind, r in out]
    assert sorted(given_out) == everything, "(b, d) not each record exactly once"
    for p in PARTITIONS:
        keys = [spec_key(kind, r) for kind, r in out if r.partition == p]
        assert keys == sorted(keys), f"(a) partition {p} out of event-time order: {keys}"
    position = {(kind, r.partition, r.offset): i for i, (kind, r) in enumerate(out)}
    for kind, imp in out:
        if kind != "impressions":
            continue
        for r in world.records[("interactions", imp.partition)]:
            if r.key == imp.key and r.timestamp >= imp.timestamp:
                assert position[("impressions", imp.partition, imp.offset)] < position[
                    ("interactions", r.partition, r.offset)], (
                    f"(c) impression {imp} after the interaction {r} it predicts")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), steps=st.integers(0, 40), data=st.data())
def test_release_is_ordered_complete_leak_free_and_exactly_once(
        world: World, steps: int, data: st.DataObject) -> None:
    clock = Clock()
    check(world, run(world, data, EventTimeGate(clock=clock), clock, steps))


def test_the_producers_delays_are_below_the_grace() -> None:
    """The property above holds only because a record reaches the broker less than
    ``IDLE_GRACE_S`` after a later record of another topic."""
    assert max(DELAYS) < IDLE_GRACE_S
