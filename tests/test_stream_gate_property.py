"""``EventTimeGate`` against any schedule of production, fetches, idle signals and clock moves.

Property: for two partitions, each with its three topics' records (timestamps non-decreasing
per topic, offsets in order), produced in event-time order at arbitrary clock readings,
fetched in arbitrary poll batches (topics and partitions interleaved arbitrarily), with
``release`` called at arbitrary moments and the idle signal arbitrary but truthful up to the
consumer's documented staleness (a topic partition may look idle only if every record of it
produced at least ``FETCH_MAX_WAIT_MS`` ago was delivered), what ``release`` returns, each
call's records taken in time order as the worker does:

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

from stream.gate import FETCH_MAX_WAIT_MS, IDLE_GRACE_S, KINDS, EventTimeGate, order_key
from stream.records import ConsumedRecord

PARTITIONS = (0, 1)
SPEC_RANK = {"impressions": 0, "interactions": 1, "labels": 2}  # one millisecond's order
STALE_S = FETCH_MAX_WAIT_MS / 1000  # how old the idle signal's high-water mark can be

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
    """The records of every stream, what was produced (and when) and delivered so far."""

    records: dict[Stream, list[ConsumedRecord]]
    production: list[tuple[str, ConsumedRecord]]  # every record, in event-time order
    produced_at: dict[tuple[str, int, int], float] = field(default_factory=dict)
    delivered: dict[Stream, int] = field(default_factory=dict)  # how many, per stream

    def produced(self) -> int:
        return len(self.produced_at)

    def produce(self, n: int, now: float) -> None:
        for kind, r in self.production[self.produced():self.produced() + n]:
            self.produced_at[(kind, r.partition, r.offset)] = now

    def deliverable(self, stream: Stream) -> list[ConsumedRecord]:
        kind, _ = stream
        done = self.delivered.get(stream, 0)
        return [r for r in self.records[stream][done:]
                if (kind, r.partition, r.offset) in self.produced_at]

    def deliver(self, stream: Stream, n: int) -> list[ConsumedRecord]:
        batch = self.deliverable(stream)[:n]
        self.delivered[stream] = self.delivered.get(stream, 0) + len(batch)
        return batch

    def may_look_idle(self, stream: Stream, now: float) -> bool:
        """Truthful up to staleness: every record produced ``STALE_S`` ago or earlier is
        delivered."""
        kind, _ = stream
        return all(self.produced_at.get((kind, r.partition, r.offset), now) > now - STALE_S
                   for r in self.records[stream][self.delivered.get(stream, 0):])


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


ADVANCES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)


def run(world: World, data: st.DataObject, gate: EventTimeGate, clock: Clock,
        steps: int) -> list[tuple[str, ConsumedRecord]]:
    """Drive ``gate`` through ``steps`` drawn actions, then the end; what it released."""
    out: list[tuple[str, ConsumedRecord]] = []
    streams = list(world.records)

    def release(idle: dict[Stream, bool]) -> None:
        out.extend(in_time_order(gate.release(lambda kind, p: idle[(kind, p)])))

    for _ in range(steps):
        actions = ["advance", "release"]
        if world.produced() < len(world.production):
            actions.append("produce")
        ready = [s for s in streams if world.deliverable(s)]
        if ready:
            actions.append("deliver")
        action = data.draw(st.sampled_from(actions))
        if action == "produce":
            world.produce(data.draw(st.integers(1, 4)), clock.now)
        elif action == "deliver":
            stream = data.draw(st.sampled_from(ready))
            gate.hold(stream[0], world.deliver(stream, data.draw(st.integers(1, 3))))
        elif action == "advance":
            clock.now += data.draw(st.sampled_from(ADVANCES))
        else:  # idle: as truthful as allowed, or some of it withheld
            truthful = {s: world.may_look_idle(s, clock.now) for s in streams}
            if not data.draw(st.booleans()):
                truthful = {s: idle and data.draw(st.booleans())
                            for s, idle in truthful.items()}
            release(truthful)
    # the end: everything produced and delivered, every topic idle, the grace passed
    world.produce(len(world.production), clock.now)
    for stream in streams:
        gate.hold(stream[0], world.deliver(stream, len(world.records[stream])))
    clock.now += IDLE_GRACE_S + STALE_S + 0.01
    release(dict.fromkeys(streams, True))
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


def test_the_documented_staleness_is_below_the_grace() -> None:
    """The property above holds only because an idle signal is at most ``STALE_S`` old while
    a record waits ``IDLE_GRACE_S`` for it."""
    assert STALE_S < IDLE_GRACE_S
