"""A worker against a real Apache Kafka (the image docker-compose.yml uses), through the
``docker`` SDK. Skipped, with the reason, where no Docker engine is reachable (here and in CI).

The test starts ``apache/kafka`` (KRaft, one node, published on 127.0.0.1 only), replays a
small synthetic slice, runs ``unirec worker`` until every interaction is applied, checks the
stored states and one score per impression, and removes the container whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_fixtures import compose_config, compose_env
from kafka import KafkaConsumer
from stream_fixtures import WorkerProcess, tiny_checkpoint, wait_for

from state_store import StateStore
from stream.broker import free_port
from stream.producer import replay_events, synthetic_events
from stream.topics import BrokerUnavailable, TopicNames, ensure_topics

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

N_EVENTS = 200
PARTITIONS = 2
KAFKA_START_S = 120.0


def docker_client():  # -> docker.DockerClient, or pytest.skip
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # no socket, no permission, no engine: all mean "cannot run"
        pytest.skip(f"no Docker engine reachable ({type(exc).__name__}: {exc})")
    return client


@pytest.fixture(scope="module")
def kafka() -> Iterator[str]:
    """A fresh apache/kafka container; yields its bootstrap address on 127.0.0.1."""
    client = docker_client()
    image = compose_config(compose_env())["services"]["kafka"]["image"]
    port = free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENERS": "HOST://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"HOST://127.0.0.1:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "HOST:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "HOST",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": str(PARTITIONS),
    }
    container = client.containers.run(image, detach=True, environment=env,
                                      ports={"9092/tcp": ("127.0.0.1", port)})
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + KAFKA_START_S
        while True:
            try:
                ensure_topics(bootstrap, PARTITIONS, topics=TopicNames.with_prefix("probe-"),
                              timeout_s=5.0)
                break
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise AssertionError("Kafka did not answer:\n"
                                         + container.logs(tail=50).decode()) from None
                time.sleep(1.0)
        yield bootstrap
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


def applied_total(store: Path) -> int:
    if not (store / "CURRENT").exists():
        return 0
    try:
        with StateStore.open(store, read_only=True) as opened:
            return sum(record.update_count for record in opened.iter_users())
    except Exception:  # the worker is writing: try again
        return 0


def test_worker_against_real_kafka_applies_and_scores_a_slice(
        kafka: str, tmp_path: Path) -> None:
    topics = TopicNames.with_prefix("real-")
    ensure_topics(kafka, PARTITIONS, topics=topics)
    replay_events(synthetic_events(N_EVENTS, seed=11), kafka, topics, negatives=3, seed=11)
    store = tmp_path / "store"
    worker = WorkerProcess(kafka, tiny_checkpoint(tmp_path / "model.pt"), store,
                           tmp_path / "worker.log", prefix="real-", partitions=PARTITIONS)
    try:
        wait_for(lambda: applied_total(store) == N_EVENTS, 120.0, worker,
                 f"{N_EVENTS} interactions applied")
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    with StateStore.open(store, read_only=True) as opened:
        users = list(opened.iter_users())
        offsets = {tp.partition for tp in opened.offsets() if tp.topic == topics.interactions}
    assert sum(u.update_count for u in users) == N_EVENTS and offsets == set(range(PARTITIONS))
    consumer = KafkaConsumer(topics.scores, bootstrap_servers=kafka, group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    scores = [json.loads(record.value) for record in consumer]
    consumer.close()
    assert len({s["request_id"] for s in scores}) == len(scores) == N_EVENTS
    assert all(s["model_version"] == 3 and s["items"] for s in scores)
