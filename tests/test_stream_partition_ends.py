"""``PartitionEnds`` against the embedded broker: a partition is read to its end only once
every record on the broker was polled (also when its last batch holds several records: Tansu
lists that batch's base offset plus one as the end), an answer is true only as of the broker
check it came from, and checks are rate-limited."""

from __future__ import annotations

import time
import uuid

from kafka import TopicPartition

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


def test_checks_are_rate_limited_and_a_later_moment_waits_for_the_next() -> None:
    class Consumer:
        calls = 0

        def end_offsets(self, tps: list[TopicPartition], timeout_ms: int) -> dict:
            Consumer.calls += 1
            return dict.fromkeys(tps, 4)

        def highwater(self, tp: TopicPartition) -> int:
            return 4

    clock = Clock()
    tp = TopicPartition("t", 0)
    consumer = Consumer()
    ends = PartitionEnds(consumer, consumer, lambda kind: "t", lambda: [tp],  # type: ignore[arg-type]
                         lambda tp: 4, min_interval_s=0.1, clock=clock)
    assert ends("interactions", 0, clock.now)
    clock.now += 0.05
    assert not ends("interactions", 0, clock.now)  # the last answer is older: no check yet
    assert Consumer.calls == 1
    clock.now += 0.06
    assert ends("interactions", 0, clock.now)
    assert Consumer.calls == 2


def test_a_failed_check_answers_not_read_and_the_next_one_recovers() -> None:
    class Flaky:
        fail = True

        def end_offsets(self, tps: list[TopicPartition], timeout_ms: int) -> dict:
            if Flaky.fail:
                raise TimeoutError("no broker")
            return dict.fromkeys(tps, 2)

        def highwater(self, tp: TopicPartition) -> int:
            return 2

    clock = Clock()
    tp = TopicPartition("t", 0)
    flaky = Flaky()
    ends = PartitionEnds(flaky, flaky, lambda kind: "t", lambda: [tp],  # type: ignore[arg-type]
                         lambda tp: 2, min_interval_s=0.1, clock=clock)
    assert not ends("labels", 0, clock.now)
    clock.now += 0.2
    assert not ends("labels", 0, clock.now)
    assert ends.failures == 2 and ends.checks == 0
    Flaky.fail = False
    clock.now += 0.2
    assert ends("labels", 0, clock.now)
    assert ends.failures == 0 and ends.checks == 1
