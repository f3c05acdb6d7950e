"""``PartitionEnds`` against the embedded broker: a partition is read to its end only once
every record on the broker was polled (also when its last batch holds several records: Tansu
lists that batch's base offset plus one as the end), an answer is true only as of the broker
check it came from, and checks are rate-limited."""

from __future__ import annotations

import time
import uuid

from kafka import TopicPartition
from kafka.errors import IllegalStateError

from stream.kafka_client import kafka_consumer
from stream.partition_ends import PartitionEnds
from stream.producer import open_producer
from stream.topics import TopicNames, ensure_topics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_read_to_end_as_of_each_broker_check(bootstrap: str) -> None:
    topics = TopicNames().with_prefix(f"ends-{uuid.uuid4().hex[:8]}-")
    ensure_topics(bootstrap, 1, topics=topics)
    tp = TopicPartition(topics.interactions, 0)
    producer = open_producer(bootstrap)
    consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                              enable_auto_commit=False, max_poll_records=2,
                              fetch_max_wait_ms=50)
    clock = Clock()
    positions: dict[TopicPartition, int] = {}
    ends = PartitionEnds(consumer, consumer, topics.of, lambda: [tp], positions.get,
                         clock=clock)

    def produce(n: int) -> None:
        for k in range(n):
            producer.send(tp.topic, key=b"u", value=b"%d" % k, partition=0)
        producer.flush()  # one batch: the last batch holds several records

    def poll_once() -> None:
        for part, records in consumer.poll(timeout_ms=500).items():
            positions[part] = records[-1].offset + 1

    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        positions[tp] = 0
        assert ends("interactions", 0, clock.now)  # an empty partition is read to its end
        produce(5)
        clock.now += 1
        assert not ends("interactions", 0, clock.now)
        deadline = time.monotonic() + 20
        while positions[tp] < 5:
            assert time.monotonic() < deadline, positions
            poll_once()
            clock.now += 1
            assert ends("interactions", 0, clock.now) == (positions[tp] == 5), positions
        checked_at, checks = clock.now, ends.checks
        produce(1)  # after the last check
        clock.now += 1
        assert ends("interactions", 0, checked_at)  # true as of that check, and kept
        assert ends.checks == checks
        assert not ends("interactions", 0, clock.now)  # a new check sees the new record
        assert ends.checks == checks + 1
    finally:
        consumer.close()
        producer.close()


class FakeBroker:
    """A consumer whose every partition ends at offset 4, and whose checks can fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.assigned = True

    def end_offsets(self, tps: list[TopicPartition], timeout_ms: int) -> dict:
        self.calls += 1
        if self.fail:
            raise TimeoutError("no broker")
        return dict.fromkeys(tps, 4)

    def highwater(self, tp: TopicPartition) -> int:
        if not self.assigned:
            raise IllegalStateError("Partition is not assigned")
        return 4


def read_to_end_at_4(broker: FakeBroker, clock: Clock) -> PartitionEnds:
    """``PartitionEnds`` over ``broker`` for one partition whose position is 4."""
    tp = TopicPartition("t", 0)
    return PartitionEnds(broker, broker, lambda kind: "t", lambda: [tp],  # type: ignore[arg-type]
                         lambda tp: 4, min_interval_s=0.1, clock=clock)


def test_checks_are_rate_limited_and_a_later_moment_waits_for_the_next() -> None:
    clock, broker = Clock(), FakeBroker()
    ends = read_to_end_at_4(broker, clock)
    assert ends("interactions", 0, clock.now)
    clock.now += 0.05
    assert not ends("interactions", 0, clock.now)  # the last answer is older: no check yet
    assert broker.calls == 1
    clock.now += 0.06
    assert ends("interactions", 0, clock.now)
    assert broker.calls == 2


def test_a_failed_check_answers_not_read_and_the_next_one_recovers() -> None:
    clock, broker = Clock(), FakeBroker()
    broker.fail = True
    ends = read_to_end_at_4(broker, clock)
    assert not ends("labels", 0, clock.now)
    clock.now += 0.2
    assert not ends("labels", 0, clock.now)
    assert ends.failures == 2 and ends.checks == 0
    broker.fail = False
    clock.now += 0.2
    assert ends("labels", 0, clock.now)
    assert ends.failures == 0 and ends.checks == 1


def test_a_partition_no_longer_assigned_is_not_read_to_its_end_and_raises_nothing() -> None:
    """Mid-rebalance the consumer refuses to speak of a revoked partition (IllegalStateError):
    the answer is "not read", never an exception out of the worker's loop."""
    clock, broker = Clock(), FakeBroker()
    ends = read_to_end_at_4(broker, clock)
    assert ends("impressions", 0, clock.now)
    broker.assigned = False
    assert not ends("impressions", 0, clock.now)
