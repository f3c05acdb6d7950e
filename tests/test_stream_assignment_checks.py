"""What the worker's consume loop does with an assignment whose topics are not as it left them.

kafka-python re-raises an exception of a rebalance listener from ``poll`` as a bare
``KafkaError`` ("User rebalance callback throws an error"), so anything the assignment checks
cannot handle used to end the worker with a traceback. These pin the two cases a restarted
embedded broker produces:

- the changelog topic is missing (the broker has only what the consumer's metadata request
  made): the assignment creates it as the worker's start does, and the loop goes on;
- the broker does not answer the checks: the loop ends with ``EXIT_ASSIGNMENT_UNCHECKED`` and
  a message naming the broker, never an exception.

and the restore that follows a checked assignment: a broker gone while a partition is restored
from the changelog ends the loop with ``EXIT_CHANGELOG``, not a traceback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic
from stream_fixtures import tiny_checkpoint

from stream.broker import EmbeddedBroker, free_port
from stream.topics import TopicNames, admin_client, ensure_topics
from stream.worker import (
    EXIT_ASSIGNMENT_UNCHECKED,
    EXIT_CHANGELOG,
    ConsumerLoop,
    WorkerConfig,
    WorkerServices,
    build_services,
    plan_resume,
)

pytestmark = pytest.mark.broker  # every test here starts a broker

TIMEOUT_S = 60.0


def loop_config(bootstrap: str, tmp_path: Path, prefix: str) -> WorkerConfig:
    return WorkerConfig(bootstrap_servers=bootstrap, store_dir=tmp_path / "store",
                        checkpoint=tiny_checkpoint(tmp_path / "model.pt"), partitions=2,
                        web_port=free_port(), group_id=f"{prefix}group", topic_prefix=prefix,
                        train=False, timeout_s=3.0)


def close(loop: ConsumerLoop | None, services: WorkerServices) -> None:
    if loop is not None:
        loop.close()
    services.publisher.close()
    services.store.close()


def test_an_assignment_creates_a_missing_changelog_topic_and_the_loop_goes_on(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Property: started on the input topics alone (no ``user-states``: the loop is started
    without ``run_worker``'s ``ensure_topics``), the loop's first assignment creates the
    changelog with the worker's partition count, passes its checks and consumes; stopped, the
    loop returns 0."""
    bootstrap = broker.bootstrap_servers
    topics = TopicNames.with_prefix("nochangelog-")
    with admin_client(bootstrap) as admin:
        admin.create_topics([NewTopic(name, 2, 1) for name in topics.inputs()])
        admin.wait_for_topics(list(topics.inputs()), timeout_ms=10_000)
    config = loop_config(bootstrap, tmp_path, "nochangelog-")
    services = build_services(config)
    stop = threading.Event()
    give_up = threading.Timer(TIMEOUT_S, stop.set)
    loop: ConsumerLoop | None = None
    assigned: list[set[TopicPartition]] = []

    def after_batch() -> None:
        held = loop.consumer.assignment() if loop is not None else set()
        if held and not loop.restoring:
            assigned.append(set(held))
            stop.set()

    try:
        loop = ConsumerLoop(services, config, between_batches=after_batch)
        give_up.start()
        code = loop.run(stop)
    finally:
        give_up.cancel()
        close(loop, services)
    assert code == 0 and loop.rebalance.fatal is None
    assert assigned, f"no assignment within {TIMEOUT_S:g} s"
    assert {tp.topic for tp in assigned[0]} == set(topics.inputs())
    with admin_client(bootstrap) as admin:
        described = admin.describe_topics([topics.user_states])
    assert described[0]["error_code"] == 0 and len(described[0]["partitions"]) == 2


def fatal_once_the_broker_is_gone(
        tmp_path: Path, prefix: str, act: Callable[[ConsumerLoop, WorkerConfig], None],
        prepare: Callable[[ConsumerLoop, WorkerConfig], None] | None = None,
) -> tuple[WorkerConfig, tuple[int, str] | None]:
    """A loop on a broker of its own: ``prepare`` it, stop the broker, ``act`` on it (which must
    raise nothing); returns the config and the loop's ``rebalance.fatal``."""
    broker = EmbeddedBroker().start()
    services: WorkerServices | None = None
    loop: ConsumerLoop | None = None
    try:
        config = loop_config(broker.bootstrap_servers, tmp_path, prefix)
        services = build_services(config)
        loop = ConsumerLoop(services, config)
        if prepare is not None:
            prepare(loop, config)
        broker.stop()
        act(loop, config)
    finally:
        broker.stop()
        if services is not None:
            close(loop, services)
    return config, loop.rebalance.fatal


def test_an_assignment_the_broker_cannot_answer_sets_its_exit_status_and_raises_nothing(
        tmp_path: Path) -> None:
    """Property: when the broker is gone by the time an assignment is checked, the listener
    keeps ``EXIT_ASSIGNMENT_UNCHECKED`` with a message naming the broker and raises nothing
    (a listener's exception would end the worker with a traceback)."""

    def assign(loop: ConsumerLoop, config: WorkerConfig) -> None:
        assigned = {TopicPartition(config.topics.interactions, 0)}
        asyncio.run(loop.rebalance.on_partitions_assigned(assigned))

    config, fatal = fatal_once_the_broker_is_gone(tmp_path, "gone-", assign)
    assert fatal is not None
    code, message = fatal
    assert code == EXIT_ASSIGNMENT_UNCHECKED
    assert f"cannot check the partitions assigned at {config.bootstrap_servers}" in message


def test_a_restore_the_broker_cannot_answer_sets_its_exit_status_and_raises_nothing(
        tmp_path: Path) -> None:
    """Property: when the broker is gone by the time an assigned partition is restored from the
    changelog, ``restore_pending`` keeps ``EXIT_CHANGELOG`` with a message naming the partition
    and raises nothing (the loop then ends with that status, not a traceback)."""

    def checked_assignment(loop: ConsumerLoop, config: WorkerConfig) -> None:
        ensure_topics(config.bootstrap_servers, config.partitions, topics=config.topics)
        plan_resume(loop.services, config, [0])  # the assignment's checks passed
        loop.restoring, loop.pending_log_ids = {0}, {0: loop.services.log_ids[0]}

    config, fatal = fatal_once_the_broker_is_gone(
        tmp_path, "gonerestore-", lambda loop, _: loop.restore_pending(), checked_assignment)
    assert fatal is not None
    code, message = fatal
    assert code == EXIT_CHANGELOG
    assert f"{config.topics.user_states}[0]" in message
