"""Partition ownership across two ``unirec worker`` processes of one consumer group.

Issue #7, item 3, and issue #13. A worker that is assigned an ``interactions`` partition its
own state store has never applied restores it from the ``user-states`` changelog and reads on
from the offset it reflects (with no changelog it would replay the partition from offset 0);
a worker that loses a partition stops writing it (``stream.worker``'s module docstring,
"Partition ownership").

The test, against an embedded broker with 4 partitions:

1. worker A, alone in the group, applies a first slice of events (all 4 partitions);
2. worker B joins the same group with an empty store: the range assignor splits the
   partitions (whichever half B gets); a second slice of events is produced;
3. once every partition's final owner has applied up to the partition's end, it checks:

   (a) each partition's stored offset reaches the partition's end in exactly the store of
       its final owner (from the workers' last ``assigned [...]`` log lines);
   (b) every user's state and update count in its partition owner's store equal those of a
       reference computed in this process, with ``InteractionApplier`` applying the same
       records partition by partition into a fresh store (states ``np.allclose`` with
       ``atol=1e-5``): B's restore from the changelog and A's continuation are both exact;
   (c) A's store stopped at the revocation for the partitions it lost: their stored offsets
       are the first slice's ends and their users' states are bit-identical to what A had
       before B joined, while B's offsets for them reached the end.

Every wait is bounded (``wait_for``); workers are stopped by their PID.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from stream_fixtures import WorkerGroup, WorkerProcess, tiny_checkpoint, wait_for

from model.checkpoint import load
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.broker import EmbeddedBroker, free_port
from stream.producer import replay_events, synthetic_events
from stream.records import ConsumedRecord
from stream.topics import TopicNames, end_offsets, ensure_topics, log_identity
from stream.worker import WorkerConfig, run_worker

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

PARTITIONS = 4
FIRST, SECOND = 400, 400  # interactions produced before and after B joins
BATCH = 64  # the workers' --batch-size (WorkerProcess)
TIMEOUT_S = 60.0
PREFIX = "rebalance-"

UserStates = dict[str, tuple[np.ndarray, int]]


def stored_offsets(store: Path, topic: str) -> dict[int, int]:
    """``{partition: next offset}`` of ``topic`` in ``store`` (read-only; {} while it cannot
    be opened, e.g. before the worker created it)."""
    if not (store / "CURRENT").exists():
        return {}
    try:
        with StateStore.open(store, read_only=True) as opened:
            return {tp.partition: o.next_offset for tp, o in opened.offsets().items()
                    if tp.topic == topic}
    except Exception:
        return {}


def user_states(store: Path) -> UserStates:
    """Every user's (state, update count) in ``store``, read-only."""
    with StateStore.open(store, read_only=True) as opened:
        return {r.user_id: (r.state.copy(), r.update_count) for r in opened.iter_users()}


def assigned_partitions(worker: WorkerProcess, topic: str) -> set[int] | None:
    """The ``topic`` partitions of the worker's last ``assigned [...]`` log line (None
    before the first)."""
    lines = re.findall(r"assigned \[(.*)\]", worker.output())
    if not lines:
        return None
    return {int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", lines[-1])}


def read_interactions(bootstrap: str, topic: str, expected: int
                      ) -> dict[int, list[ConsumedRecord]]:
    """Every record of ``topic``, by partition in offset order (reads until ``expected``)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False)
    by_partition: dict[int, list[ConsumedRecord]] = {p: [] for p in range(PARTITIONS)}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline, count = time.monotonic() + 30.0, 0
        while count < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=300).items():
                by_partition[tp.partition].extend(
                    ConsumedRecord(tp.partition, r.offset, r.key, r.value) for r in records)
                count += len(records)
    finally:
        consumer.close()
    assert count == expected, f"read {count} of {expected} records of {topic}"
    return by_partition


def reference_states(checkpoint: Path, store: Path, log_id: str, topic: str,
                     records: dict[int, list[ConsumedRecord]]) -> UserStates:
    """One uninterrupted application of ``records``, partition by partition, in batches of
    the workers' size, into a fresh store."""
    model, _ = load(checkpoint, torch.device("cpu"))
    config = StoreConfig(state_dim=model.cfg.d_model, history_len=model.cfg.history_len)
    with StateStore.open(store, config) as opened:
        applier = InteractionApplier(opened, model, 3)
        for partition, consumed in records.items():
            for i in range(0, len(consumed), BATCH):
                chunk = consumed[i:i + BATCH]
                applier.apply(topic, partition, log_id, chunk, chunk[-1].offset)
    return user_states(store)


@pytest.fixture
def broker(tmp_path: Path):
    with EmbeddedBroker(log_dir=tmp_path / "broker") as running:
        yield running


def test_rebalance_moves_partitions_and_their_state_to_the_new_owner(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix(PREFIX)
    topic = topics.interactions
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    events = list(synthetic_events(FIRST + SECOND, seed=21))
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    with WorkerGroup(bootstrap, checkpoint, tmp_path, PREFIX, PARTITIONS) as workers:
        # 1. A alone applies the first slice, on every partition.
        replay_events(events[:FIRST], bootstrap, topics, negatives=2, seed=21)
        first_ends = end_offsets(bootstrap, topic)
        assert sum(first_ends.values()) == FIRST
        a = workers.start(store_a, "a")
        wait_for(lambda: stored_offsets(store_a, topic) == first_ends, TIMEOUT_S, a,
                 "A to apply the first slice")
        assert assigned_partitions(a, topic) == set(range(PARTITIONS))
        before_b = user_states(store_a)

        # 2. B joins: the group splits the partitions between A and B.
        b = workers.start(store_b, "b")

        def split() -> bool:
            owned_a, owned_b = assigned_partitions(a, topic), assigned_partitions(b, topic)
            return bool(owned_a and owned_b) and not owned_a & owned_b \
                and owned_a | owned_b == set(range(PARTITIONS))

        wait_for(split, TIMEOUT_S, b, "the rebalance to split the partitions")
        owned_a, owned_b = assigned_partitions(a, topic), assigned_partitions(b, topic)
        assert owned_a is not None and owned_b is not None
        replay_events(events[FIRST:], bootstrap, topics, negatives=2, seed=22)
        ends = end_offsets(bootstrap, topic)
        assert sum(ends.values()) == FIRST + SECOND
        assert all(ends[p] > first_ends[p] for p in owned_b), "B's partitions got new events"

        # 3. Each owner applies its partitions up to their ends.
        def owners_done() -> bool:
            done_a, done_b = stored_offsets(store_a, topic), stored_offsets(store_b, topic)
            return all(done_a.get(p) == ends[p] for p in owned_a) and \
                all(done_b.get(p) == ends[p] for p in owned_b)

        wait_for(owners_done, TIMEOUT_S, b, "every partition applied by its owner")
        time.sleep(1.0)  # room for a wrong write by the loser of a partition
        assert assigned_partitions(a, topic) == owned_a, "no later rebalance"
        assert assigned_partitions(b, topic) == owned_b, "no later rebalance"
        assert a.stop() == 0, a.output()[-3000:]
        assert b.stop() == 0, b.output()[-3000:]

    # B's store had nothing of its partitions (offset 0 for the log check), and it restored
    # them from the `user-states` changelog A had written (issue #13), not by a replay.
    assert re.search(r"resuming partitions at \{" + ", ".join(
        f"{p}: 0" for p in sorted(owned_b)) + r"\}", b.output()), b.output()[-3000:]
    for p in owned_b:
        assert re.search(rf"restored {re.escape(topic)}\[{p}\] \(restored\)", b.output()), \
            b.output()[-3000:]

    # (a) offsets complete in exactly the owner's store.
    offsets_a, offsets_b = stored_offsets(store_a, topic), stored_offsets(store_b, topic)
    for p in range(PARTITIONS):
        owner, other = (offsets_a, offsets_b) if p in owned_a else (offsets_b, offsets_a)
        assert owner.get(p) == ends[p], f"partition {p}: owner's offset {owner.get(p)}"
        assert other.get(p) is None or other[p] < ends[p], f"partition {p}: not the owner"
    assert set(offsets_b) == owned_b, "B never wrote a partition it did not own"

    # (b) every user's state in its owner's store equals the uninterrupted reference.
    records = read_interactions(bootstrap, topic, FIRST + SECOND)
    assert {p: len(r) for p, r in records.items()} == ends, "offsets are contiguous"
    reference = reference_states(checkpoint, tmp_path / "reference", log_identity(
        bootstrap, topic), topic, records)
    partition_of = {r.key.decode(): p for p, rs in records.items() for r in rs}
    states_a, states_b = user_states(store_a), user_states(store_b)
    assert set(states_b) == {u for u, p in partition_of.items() if p in owned_b}
    assert set(reference) == set(partition_of)
    for user, (state, count) in reference.items():
        owner = states_a if partition_of[user] in owned_a else states_b
        got_state, got_count = owner[user]
        assert got_count == count, user
        assert np.allclose(got_state, state, atol=1e-5, rtol=0), user

    # (c) A stopped writing what it lost: offsets and states as they were at the revocation.
    lost = set(range(PARTITIONS)) - owned_a
    assert lost == owned_b
    for p in lost:
        assert offsets_a[p] == first_ends[p] < ends[p] == offsets_b[p], p
    for user, (state, count) in before_b.items():
        if partition_of[user] in lost:
            assert states_a[user][1] == count and np.array_equal(states_a[user][0], state), user


# ------------------------------------------------- issue #16: commit on revocation

REVOKE_PREFIX = "revoke-"


class InProcessWorker:
    """``run_worker`` on a thread of this process, so that the test can set
    ``lag_interval_s`` (not a CLI flag); ``stop`` sets its stop event and joins it."""

    def __init__(self, config: WorkerConfig) -> None:
        self.stop_event = threading.Event()
        self.result: list[int | BaseException] = []

        def run() -> None:
            try:
                self.result.append(run_worker(config, stop=self.stop_event))
            except BaseException as exc:  # reported by stop() and by the waits
                self.result.append(exc)

        self.thread = threading.Thread(target=run, name=f"worker-{config.store_dir.name}",
                                       daemon=True)
        self.thread.start()

    def check_running(self) -> None:
        """Fail if the worker ended by itself."""
        assert not self.result, f"worker ended early: {self.result!r}"

    def stop(self, timeout_s: float = 30.0) -> int | BaseException | None:
        self.stop_event.set()
        self.thread.join(timeout_s)
        return self.result[0] if self.result else None


def read_values(bootstrap: str, topic: str, expected: int, timeout_s: float = TIMEOUT_S
                ) -> list[bytes]:
    """The value of every record of ``topic``, reading until ``expected`` came (or the time
    is up), then a grace poll: more than expected shows up."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                values.extend(r.value for r in records)
        for records in consumer.poll(timeout_ms=1000).values():
            values.extend(r.value for r in records)
    finally:
        consumer.close()
    return values


def request_ids(values: list[bytes]) -> list[str]:
    return [json.loads(v)["request_id"] for v in values]


def test_revoked_partitions_commit_what_was_processed_so_no_impression_is_scored_twice(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Issue #16, part 4. Property: across a clean rebalance (a second worker joins and
    takes half of the partitions), every impression is scored exactly once: each
    ``request_id`` of ``impressions`` appears once in ``scores``, none is missing.

    The workers commit only on revocation and at close (``lag_interval_s`` of an hour, so
    the periodic commit hides nothing): when the revocation's commit fails (kafka-python 3
    refusing a blocking commit from its IO thread), both the new owner and A, for the
    partitions it keeps, read again from the last commit and score A's impressions again.
    Held back by the gate but unprocessed records of the revoked partitions are not
    committed (``ConsumerLoop.processed_offsets``): they would show up here as missing.
    """
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix(REVOKE_PREFIX)
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    events = list(synthetic_events(FIRST + SECOND, seed=31))
    group = f"revoke-{uuid.uuid4().hex[:8]}"
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"

    def config(store: Path) -> WorkerConfig:
        return WorkerConfig(bootstrap_servers=bootstrap, store_dir=store,
                            checkpoint=checkpoint, partitions=PARTITIONS, batch_size=BATCH,
                            web_port=free_port(), group_id=group, topic_prefix=REVOKE_PREFIX,
                            train=False, lag_interval_s=3600.0)

    started: list[InProcessWorker] = []
    try:
        first = replay_events(events[:FIRST], bootstrap, topics, negatives=2, seed=31)
        a = InProcessWorker(config(store_a))
        started.append(a)
        scored_by_a = read_values(bootstrap, topics.scores, first.impressions)
        a.check_running()
        assert len(scored_by_a) == first.impressions, "A alone scores the first slice"

        b = InProcessWorker(config(store_b))
        started.append(b)

        def b_owns_partitions() -> bool:
            a.check_running()
            b.check_running()
            return bool(stored_offsets(store_b, topics.interactions))

        wait_for(b_owns_partitions, TIMEOUT_S, what="B to be assigned partitions")
        second = replay_events(events[FIRST:], bootstrap, topics, negatives=2, seed=32)
        total = first.impressions + second.impressions
        assert len(read_values(bootstrap, topics.scores, total)) >= total, "all scored"
        a.check_running()
        b.check_running()
        owned_b = set(stored_offsets(store_b, topics.interactions))
        assert owned_b and owned_b != set(range(PARTITIONS)), "the partitions were split"
    finally:
        codes = [worker.stop() for worker in started]
    assert codes == [0, 0], codes

    produced = request_ids(read_values(bootstrap, topics.impressions, total))
    assert len(set(produced)) == total
    scored = Counter(request_ids(read_values(bootstrap, topics.scores, total)))
    twice = {rid: n for rid, n in scored.items() if n > 1}
    assert not twice, f"{len(twice)} of {total} impressions scored more than once"
    assert set(scored) == set(produced), f"{len(set(produced) - set(scored))} never scored"
