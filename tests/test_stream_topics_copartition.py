"""Co-partitioning of the worker's input topics (issue #16, part 5), on an embedded broker.

``interactions``, ``impressions`` and ``labels`` are read together, partition p of each in
one worker; if their partition counts differ, the partitions only some of them have are never
read with their peers. The worker refuses such topics with an error that names each topic, its
partition count and the fix:

- at start: ``unirec worker`` exits with status 2 and prints the error;
- on every assignment: ``ConsumerLoop.run`` ends with ``EXIT_NOT_COPARTITIONED``;
- ``ensure_copartitioned`` (what both call) makes the missing topics and judges the counts the
  broker's metadata gives.

The topics are made as a producer that started first would leave them: ``interactions``
created with 4 partitions, the others with 2.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from kafka.admin import NewTopic
from stream_fixtures import WorkerProcess, tiny_checkpoint

from stream.broker import EmbeddedBroker, free_port
from stream.topics import (
    CopartitionError,
    TopicNames,
    admin_client,
    ensure_copartitioned,
    ensure_topics,
)
from stream.worker import EXIT_NOT_COPARTITIONED, ConsumerLoop, WorkerConfig, build_services

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

TIMEOUT_S = 60.0


def uneven_topics(bootstrap: str, prefix: str) -> TopicNames:
    """``<prefix>interactions`` with 4 partitions, every other topic with 2."""
    topics = TopicNames.with_prefix(prefix)
    with admin_client(bootstrap) as admin:
        admin.create_topics([NewTopic(topics.interactions, 4, 1)])
        admin.wait_for_topics([topics.interactions], timeout_ms=10_000)
    ensure_topics(bootstrap, 2, topics=topics)
    return topics


def assert_names_topics_counts_and_fix(message: str, topics: TopicNames, bootstrap: str
                                       ) -> None:
    """The error names each input topic with its count, and the commands that fix it."""
    assert f"'{topics.interactions}' has 4" in message, message
    assert f"'{topics.impressions}' has 2" in message, message
    assert f"'{topics.labels}' has 2" in message, message
    for grown in (topics.impressions, topics.labels):
        assert (f"kafka-topics.sh --bootstrap-server {bootstrap} --alter --topic {grown} "
                f"--partitions 4") in message, message
    assert f"--topic {topics.interactions} " not in message, "interactions has the most"
    assert "embedded broker" in message and "--partitions 4" in message, message


def test_ensure_copartitioned_makes_missing_topics_and_refuses_differing_counts(
        broker: EmbeddedBroker) -> None:
    """Property: differing partition counts of the input topics raise ``CopartitionError``
    with the topics, counts and fix; equal counts return them, in ``copartitioned()`` order;
    topics that do not exist yet are made with the count asked for, and then pass."""
    bootstrap = broker.bootstrap_servers
    uneven = uneven_topics(bootstrap, "uneven-")
    with pytest.raises(CopartitionError) as refused:
        ensure_copartitioned(bootstrap, 2, uneven)
    assert "\n" not in str(refused.value), "one line: the CLI prints the first line only"
    assert_names_topics_counts_and_fix(str(refused.value), uneven, bootstrap)

    even = TopicNames.with_prefix("even-")
    ensure_topics(bootstrap, 3, topics=even)
    counts = ensure_copartitioned(bootstrap, 3, even)
    assert list(counts.items()) == [(name, 3) for name in even.copartitioned()]

    fresh = TopicNames.with_prefix("fresh-")
    with admin_client(bootstrap) as admin:
        admin.create_topics([NewTopic(fresh.interactions, 3, 1)])
        admin.wait_for_topics([fresh.interactions], timeout_ms=10_000)
    assert ensure_copartitioned(bootstrap, 3, fresh) == dict.fromkeys(fresh.copartitioned(), 3)
    other_states = replace(fresh, user_states="fresh-other-states")
    with admin_client(bootstrap) as admin:
        admin.create_topics([NewTopic(other_states.user_states, 5, 1)])
        admin.wait_for_topics([other_states.user_states], timeout_ms=10_000)
    with pytest.raises(CopartitionError, match="'fresh-other-states' has 5"):
        ensure_copartitioned(bootstrap, 3, other_states)


def test_worker_exits_with_status_2_naming_the_topics_counts_and_fix(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Property: ``unirec worker`` started on input topics whose partition counts differ
    exits by itself with status 2 and prints the error (before joining the group)."""
    bootstrap = broker.bootstrap_servers
    topics = uneven_topics(bootstrap, "start-")
    worker = WorkerProcess(bootstrap, tiny_checkpoint(tmp_path / "model.pt"),
                           tmp_path / "store", tmp_path / "worker.log", prefix="start-",
                           partitions=2, extra=("--no-train",))
    try:
        code = worker.wait(TIMEOUT_S)
    finally:
        worker.stop()
    output = worker.output()
    assert code == 2, output[-3000:]
    assert "unirec worker: error: topics not co-partitioned" in output, output[-3000:]
    assert_names_topics_counts_and_fix(output, topics, bootstrap)


def test_assignment_on_uneven_topics_ends_the_loop_with_its_exit_status(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Property: when an assignment finds the input topics' partition counts differing (here
    the loop is started without ``run_worker``'s start check, as if the topics changed after
    it), ``ConsumerLoop.run`` returns ``EXIT_NOT_COPARTITIONED`` by itself."""
    bootstrap = broker.bootstrap_servers
    uneven_topics(bootstrap, "assign-")
    config = WorkerConfig(bootstrap_servers=bootstrap, store_dir=tmp_path / "store",
                          checkpoint=tiny_checkpoint(tmp_path / "model.pt"), partitions=2,
                          web_port=free_port(), group_id="assign-group",
                          topic_prefix="assign-", train=False)
    services = build_services(config)
    stop = threading.Event()
    give_up = threading.Timer(TIMEOUT_S, stop.set)  # a hang ends with status 0: fails below
    loop: ConsumerLoop | None = None
    try:
        loop = ConsumerLoop(services, config)
        give_up.start()
        code = loop.run(stop)
    finally:
        give_up.cancel()
        if loop is not None:
            loop.close()
        services.publisher.close()
        services.store.close()
    assert code == EXIT_NOT_COPARTITIONED
    assert loop.rebalance.fatal is not None
    assert "topics not co-partitioned" in loop.rebalance.fatal[1]
