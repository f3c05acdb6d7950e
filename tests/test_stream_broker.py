"""The embedded broker, topic creation, log identity and end offsets, against a real Tansu."""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from stream.broker import BrokerStartError, EmbeddedBroker, PortTaken, free_port
from stream.topics import (
    BrokerUnavailable,
    TopicError,
    TopicNames,
    end_offsets,
    ensure_topics,
    log_identity,
)

logging.getLogger("kafka").setLevel(logging.ERROR)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def topics() -> TopicNames:
    return TopicNames.with_prefix(f"t{uuid.uuid4().hex[:8]}-")


@pytest.mark.broker
def test_broker_starts_answers_and_stops_leaving_no_process(tmp_path: Path) -> None:
    """A started broker answers metadata requests on loopback with its own cluster id, logs to
    the file asked for, and leaves no process behind when the block exits."""
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        pid = broker.pid
        assert broker.bootstrap_servers.startswith("127.0.0.1:")
        assert not _gone(pid)
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        try:
            assert admin.describe_cluster()["cluster_id"] == broker.cluster_id
        finally:
            admin.close()
    assert _gone(pid)
    assert broker.log_path is not None
    assert "tansu broker" in broker.log_path.read_text()
    broker.stop()  # idempotent


@pytest.mark.broker
def test_a_broker_with_a_client_connected_stops_by_itself_not_killed(
        caplog: pytest.LogCaptureFixture) -> None:
    """``stop()`` with a client's connection still open: the broker exits by itself with
    status 0 within ``stop_timeout_s`` (on SIGTERM Tansu waits for its clients' connections
    to close, and was killed at the timeout)."""
    broker = EmbeddedBroker(stop_timeout_s=3.0).start()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        admin.list_topics()
        with caplog.at_level(logging.INFO, logger="stream.broker"):
            broker.stop()
    finally:
        admin.close()
        broker.stop()
    stopped = [r.getMessage() for r in caplog.records if "stopped (exit" in r.getMessage()]
    assert len(stopped) == 1 and stopped[0].endswith("stopped (exit 0)"), caplog.text


@pytest.mark.broker
def test_start_failure_raises_with_the_broker_output(tmp_path: Path) -> None:
    """A broker binary that exits at start gives BrokerStartError quoting its output."""
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'fake tansu: cannot start' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(BrokerStartError, match="cannot start"):
        EmbeddedBroker(binary=str(fake), start_timeout_s=5).start()


def test_a_port_held_by_another_broker_is_refused(broker: EmbeddedBroker) -> None:
    """Asking for a port another broker holds fails with PortTaken rather than passing the
    other broker off as this one; the refused process is stopped."""
    second = EmbeddedBroker(port=broker.port, start_timeout_s=5)
    with pytest.raises(PortTaken):
        second.start()
    assert not second.is_running()


def test_ensure_topics_is_idempotent_and_makes_the_partitions_asked_for(
    broker: EmbeddedBroker, topics: TopicNames
) -> None:
    """New keyed topics get the partition count asked for (model-updates and workers one,
    read whole by everyone); a second call changes nothing and returns the same counts, even
    when asked for another count."""
    first = ensure_topics(broker.bootstrap_servers, partitions=3, topics=topics)
    single = {topics.model_updates, topics.workers}
    assert first == {name: 1 if name in single else 3 for name in topics.all()}
    assert ensure_topics(broker.bootstrap_servers, partitions=3, topics=topics) == first
    assert ensure_topics(broker.bootstrap_servers, partitions=5, topics=topics) == first


@pytest.mark.broker
def test_log_identity_is_stable_and_changes_with_a_restarted_broker() -> None:
    """The identity is the same across calls on one broker and differs after a restart with
    the same topic names, even when the restarted broker reuses the cluster id."""
    identities = []
    for _ in range(2):
        with EmbeddedBroker(cluster_id="tansu_cluster") as broker:
            ensure_topics(broker.bootstrap_servers, partitions=2)
            first = log_identity(broker.bootstrap_servers, "interactions")
            assert log_identity(broker.bootstrap_servers, "interactions") == first
            assert first.startswith("tansu_cluster/interactions/")
            identities.append(first)
    assert identities[0] != identities[1]


def test_log_identity_changes_with_a_recreated_topic(
    broker: EmbeddedBroker, topics: TopicNames
) -> None:
    """Deleting and recreating a topic of the same name gives it a new identity."""
    bootstrap = broker.bootstrap_servers
    ensure_topics(bootstrap, partitions=1, topics=topics)
    before = log_identity(bootstrap, topics.interactions)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topics.interactions])
    finally:
        admin.close()
    ensure_topics(bootstrap, partitions=1, topics=topics)
    assert log_identity(bootstrap, topics.interactions) != before


def test_missing_topic_is_an_error(broker: EmbeddedBroker) -> None:
    """log_identity and end_offsets of a topic that does not exist raise TopicError."""
    with pytest.raises(TopicError):
        log_identity(broker.bootstrap_servers, "no-such-topic")
    with pytest.raises(TopicError):
        end_offsets(broker.bootstrap_servers, "no-such-topic")


def test_end_offsets_count_records_not_batches(broker: EmbeddedBroker,
                                               topics: TopicNames) -> None:
    """end_offsets gives, per partition, the offset after the last record, also when records
    arrive in multi-record batches (Tansu's ListOffsets alone undercounts those)."""
    bootstrap = broker.bootstrap_servers
    ensure_topics(bootstrap, partitions=3, topics=topics)
    assert end_offsets(bootstrap, topics.interactions) == {0: 0, 1: 0, 2: 0}
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=200)
    for round_size in (7, 1, 5):
        for i in range(round_size):
            producer.send(topics.interactions, key=f"user{i}".encode(), value=b"x")
        producer.flush()
    producer.close()
    tps = [TopicPartition(topics.interactions, p) for p in range(3)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=1000)
    consumer.assign(tps)
    consumer.seek_to_beginning()
    counts = {p: 0 for p in range(3)}
    for record in consumer:
        counts[record.partition] += 1
    consumer.close()
    assert sum(counts.values()) == 13
    assert end_offsets(bootstrap, topics.interactions) == counts


def test_unreachable_bootstrap_is_reported_quickly() -> None:
    """With no broker at the address, ensure_topics raises BrokerUnavailable within about its
    timeout."""
    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable, match="no Kafka broker answered"):
        ensure_topics(f"127.0.0.1:{free_port()}", partitions=1, timeout_s=1.0)
    assert time.perf_counter() - started < 5.0
