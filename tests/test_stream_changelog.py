"""Issue #13: the ``user-states`` changelog, restore on takeover, and ownership redirects.

Against an embedded broker (4 partitions), workers as subprocesses of one group:

- ``test_takeover_after_kill_restores_from_the_changelog``: workers A and B split the
  partitions and apply two slices of events; ``GET /users/{id}/state`` on the worker that does
  not own a user answers 421 naming the owner, ``fetch_state`` follows it and the owner states
  the offset it reflects; B is killed with SIGKILL; A takes B's partitions over, restoring them
  from ``user-states`` (its log says so; it never replays them from offset 0), applies a third
  slice, and every user's state and update count equal an uninterrupted reference.
- ``test_restore_is_exact_when_interactions_lost_its_head``: after the first slice, B is
  killed, A stopped, and ``interactions`` recreated holding only the second slice (the head is
  gone, as after a retention); A restarted with ``--reset-on-new-log`` restores the states
  from the changelog and applies the tail: every state equals the reference of both slices,
  which differs from the replay of the tail alone.
- ``test_fold_keeps_the_highest_tag_and_skips_duplicates`` and
  ``test_restore_replays_only_what_an_incomplete_batch_lacks``: the restore rule itself, with
  duplicated records (Tansu does not compact) and a batch whose marker was never sent.

Tansu does not compact: the changelog the restores read holds every record ever sent, so
these tests also show that duplicates do not change the result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from stream_fixtures import REPO, WorkerGroup, WorkerProcess, http_get, tiny_checkpoint, wait_for
from test_stream_rebalance import (
    BATCH,
    PARTITIONS,
    read_interactions,
    stored_offsets,
    user_states,
)

from model.checkpoint import load
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.broker import EmbeddedBroker
from stream.changelog import (
    ChangelogSnapshot,
    ChangelogWriter,
    decode_value,
    encode_marker,
    encode_user,
    partition_of,
    restore_partition,
)
from stream.http_api import fetch_state
from stream.producer import open_producer, replay_events, synthetic_events
from stream.publisher import KafkaPublisher
from stream.records import ConsumedRecord
from stream.topics import TopicNames, admin_client, end_offsets, ensure_topics, log_identity

TIMEOUT_S = 90.0
PREFIX = "changelog-"

UserStates = dict[str, tuple[np.ndarray, int]]


@pytest.fixture
def broker(tmp_path: Path):
    with EmbeddedBroker(log_dir=tmp_path / "broker") as running:
        yield running


def apply_reference(checkpoint: Path, store: Path, runs: list[tuple[str, str, dict[int, list[
        ConsumedRecord]]]]) -> UserStates:
    """Apply each ``(topic, log id, records by partition)`` in turn, uninterrupted, in batches
    of the workers' size, into a fresh store; a new log's partitions start from its offset 0
    with the states kept (what ``--reset-on-new-log`` does)."""
    model, _ = load(checkpoint, torch.device("cpu"))
    config = StoreConfig(state_dim=model.cfg.d_model, history_len=model.cfg.history_len)
    with StateStore.open(store, config) as opened:
        applier = InteractionApplier(opened, model, 3)
        for topic, log_id, records in runs:
            for partition, consumed in records.items():
                if opened.offset(topic, partition) is not None:
                    opened.reset_partition(topic, partition)
                for i in range(0, len(consumed), BATCH):
                    chunk = consumed[i:i + BATCH]
                    applier.apply(topic, partition, log_id, chunk, chunk[-1].offset)
    return user_states(store)


def assert_states_equal(got: UserStates, reference: UserStates) -> None:
    assert set(got) >= set(reference), sorted(set(reference) - set(got))[:5]
    for user, (state, count) in reference.items():
        got_state, got_count = got[user]
        assert got_count == count, (user, got_count, count)
        assert np.allclose(got_state, state, atol=1e-5, rtol=0), user


def owned(worker: WorkerProcess, topic: str) -> set[int] | None:
    """The partitions of the worker's last ``owning [...]`` log line (None before one)."""
    lines = re.findall(r"owning \[(.*)\]", worker.output())
    if not lines:
        return None
    return {int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", lines[-1])}


def test_takeover_after_kill_restores_from_the_changelog(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix(PREFIX)
    topic = topics.interactions
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    events = list(synthetic_events(900, seed=31))
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    workers = WorkerGroup(bootstrap, checkpoint, tmp_path, PREFIX, PARTITIONS)

    def applied(owners: dict[Path, set[int]], ends: dict[int, int]) -> bool:
        return all(stored_offsets(store, topic).get(p) == ends[p]
                   for store, ps in owners.items() for p in ps)

    with workers:
        a, b = workers.start(store_a, "a"), workers.start(store_b, "b")

        def split() -> bool:
            oa, ob = owned(a, topic), owned(b, topic)
            return bool(oa and ob) and not oa & ob and oa | ob == set(range(PARTITIONS))

        wait_for(split, TIMEOUT_S, b, "A and B to split the partitions")
        owned_a, owned_b = owned(a, topic), owned(b, topic)
        assert owned_a is not None and owned_b is not None
        replay_events(events[:300], bootstrap, topics, negatives=1, seed=31)
        replay_events(events[300:600], bootstrap, topics, negatives=1, seed=32)
        ends = end_offsets(bootstrap, topic)
        wait_for(lambda: applied({store_a: owned_a, store_b: owned_b}, ends), TIMEOUT_S, b,
                 "both slices applied by their owners")

        # Ownership-aware API: the other worker redirects to the owner; the owner answers.
        records = read_interactions(bootstrap, topic, 600)
        user_b = next(r.key.decode() for p in sorted(owned_b) for r in records[p])
        assert partition_of(user_b, PARTITIONS) in owned_b
        status, body = http_get(f"{a.url}/users/{user_b}/state")
        assert status == 421, body
        assert b'"owner":"' + b.url.encode() + b'"' in body.replace(b" ", b""), body
        followed = fetch_state(a.url, user_b)
        assert followed["user_id"] == user_b
        p_b = partition_of(user_b, PARTITIONS)
        assert followed["partition"] == p_b and followed["offset"] == ends[p_b]
        cli = subprocess.run([sys.executable, "-m", "app.cli", "state", user_b, "--api", a.url],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["offset"] == ends[p_b], cli.stdout

        # kill -9 B; A takes its partitions over through the changelog.
        b.stop(signal.SIGKILL)
        wait_for(lambda: owned(a, topic) == set(range(PARTITIONS)), TIMEOUT_S, a,
                 "A to own every partition")
        replay_events(events[600:], bootstrap, topics, negatives=1, seed=33)
        final = end_offsets(bootstrap, topic)
        wait_for(lambda: applied({store_a: set(range(PARTITIONS))}, final), TIMEOUT_S, a,
                 "A to apply every partition to its end")
        status, body = http_get(f"{a.url}/users/{user_b}/state")
        assert status == 200, body
        assert a.stop() == 0, a.output()[-3000:]

    log_a = a.output()
    for p in owned_b:
        assert re.search(rf"restored {re.escape(topic)}\[{p}\] \(restored\)", log_a), \
            log_a[-3000:]
        # resumed where the changelog was, not replayed from 0
        resumed = re.findall(rf"restored {re.escape(topic)}\[{p}\] \(restored\): resuming at "
                             r"(\d+)", log_a)
        assert int(resumed[-1]) >= ends[p] > 0, resumed

    all_records = read_interactions(bootstrap, topic, len(events))
    reference = apply_reference(checkpoint, tmp_path / "reference", [
        (topic, log_identity(bootstrap, topic), all_records)])
    assert len(reference) > 50
    assert_states_equal(user_states(store_a), reference)


def test_restore_is_exact_when_interactions_lost_its_head(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix(PREFIX)
    topic = topics.interactions
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    events = list(synthetic_events(600, seed=41))
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    workers = WorkerGroup(bootstrap, checkpoint, tmp_path, PREFIX, PARTITIONS)

    with workers:
        a, b = workers.start(store_a, "a"), workers.start(store_b, "b")
        wait_for(lambda: bool(owned(a, topic)) and bool(owned(b, topic))
                 and owned(a, topic) | owned(b, topic) == set(range(PARTITIONS)),  # type: ignore[operator]
                 TIMEOUT_S, b, "A and B to split the partitions")
        owned_a, owned_b = owned(a, topic), owned(b, topic)
        assert owned_a is not None and owned_b is not None
        replay_events(events[:300], bootstrap, topics, negatives=1, seed=41)
        head_log = log_identity(bootstrap, topic)
        ends = end_offsets(bootstrap, topic)
        wait_for(lambda: all(stored_offsets(s, topic).get(p) == ends[p]
                             for s, ps in ((store_a, owned_a), (store_b, owned_b))
                             for p in ps), TIMEOUT_S, b, "the first slice applied")
        head = read_interactions(bootstrap, topic, 300)
        b.stop(signal.SIGKILL)
        assert a.stop() == 0, a.output()[-3000:]

        # interactions recreated with only the tail: its head is gone.
        with admin_client(bootstrap) as admin:
            admin.delete_topics([topic])
        time.sleep(1.0)
        ensure_topics(bootstrap, PARTITIONS, topics=topics)
        replay_events(events[300:], bootstrap, topics, negatives=1, seed=42)
        tail_log = log_identity(bootstrap, topic)
        assert tail_log != head_log
        tail_ends = end_offsets(bootstrap, topic)
        survivor = workers.start(store_a, "a2", "--reset-on-new-log")
        wait_for(lambda: all(stored_offsets(store_a, topic).get(p) == tail_ends[p]
                             for p in range(PARTITIONS) if tail_ends[p]), TIMEOUT_S, survivor,
                 "the survivor to apply the tail")
        assert survivor.stop() == 0, survivor.output()[-3000:]

    log_s = survivor.output()
    for p in owned_b:
        assert re.search(rf"restored {re.escape(topic)}\[{p}\] \(restored\)", log_s), \
            log_s[-3000:]
    tail = read_interactions(bootstrap, topic, 300)
    reference = apply_reference(checkpoint, tmp_path / "reference", [
        (topic, head_log, head), (topic, tail_log, tail)])
    replay_only = apply_reference(checkpoint, tmp_path / "replay-only",
                                  [(topic, tail_log, tail)])
    assert any(replay_only[u][1] != reference[u][1] for u in replay_only), \
        "the tail alone would give other states: the test must tell them apart"
    assert_states_equal(user_states(store_a), reference)


# ------------------------------------------------------------------- the restore rule


def _value(log_id: str, tag: int, count: int, state: float) -> bytes:
    from state_store import UserRecord

    return encode_user(UserRecord("u", np.full(4, state, np.float32), 3, count, 1.0, [b"r"]),
                       log_id, tag)


def test_fold_keeps_the_highest_tag_and_skips_duplicates() -> None:
    snapshot = ChangelogSnapshot()
    sequence = [
        (b"u", _value("L", 5, 1, 1.0)), (b"\x00", encode_marker("L", 5)),
        (b"u", _value("L", 9, 2, 2.0)), (b"\x00", encode_marker("L", 9)),
        (b"u", _value("L", 5, 1, 1.0)),  # a duplicate of an older record, sent again later
        (b"\x00", encode_marker("L", 5)),
        (b"v", _value("OLD", 99, 7, 3.0)),  # another log's record: before the current log
        (b"\x00", encode_marker("OLD", 99)),
    ]
    for key, value in sequence:
        snapshot.fold(key, decode_value(value), "L")
    assert snapshot.marker == 9
    tag, record = snapshot.users["u"]
    assert tag == 9 and record.update_count == 2
    assert snapshot.users["v"][0] == -1
    with pytest.raises(ValueError):
        decode_value(b"\x93garbage")


def test_restore_replays_only_what_an_incomplete_batch_lacks(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A crash after the store write of a batch, part-way through its changelog sends: some
    users' records of the batch are in the changelog, its marker is not. A store restored from
    that changelog must equal the crashed store (one uninterrupted run), neither missing the
    batch for the others nor applying it twice to the users whose records were sent."""
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix("partial-")
    ensure_topics(bootstrap, 1, topics=topics)
    topic = topics.interactions
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    replay_events(list(synthetic_events(200, seed=51)), bootstrap, topics, negatives=1,
                  seed=51)
    records = read_interactions_one(bootstrap, topic, 200)
    log_id = log_identity(bootstrap, topic)
    model, _ = load(checkpoint, torch.device("cpu"))
    config = StoreConfig(state_dim=model.cfg.d_model, history_len=model.cfg.history_len)
    producer = open_producer(bootstrap)
    publisher = KafkaPublisher(producer)
    writer = ChangelogWriter(publisher, topics.user_states)
    try:
        with StateStore.open(tmp_path / "crashed", config) as crashed:
            applier = InteractionApplier(crashed, model, 3)
            first, second = records[:120], records[120:]
            applier.apply(topic, 0, log_id, first, first[-1].offset)
            writer.publish_batch(crashed, 0, log_id, first, first[-1].offset, changed=True)
            applier.apply(topic, 0, log_id, second, second[-1].offset)
            # the crash: half of the second batch's users sent, no marker
            users = list(dict.fromkeys(r.key.decode() for r in second))
            sent = users[: len(users) // 2]
            batch = crashed.get_many(sent, history=True)
            for i in range(len(batch)):
                publisher.publish(topics.user_states, sent[i].encode(),
                                  encode_user(batch.record(i), log_id, second[-1].offset), 0)
            publisher.flush()
            expected = {r.user_id: (r.state.copy(), r.update_count)
                        for r in crashed.iter_users()}
        with StateStore.open(tmp_path / "restored", config) as restored:
            applier = InteractionApplier(restored, model, 3)
            report = restore_partition(
                restored, writer,
                lambda rs, last: applier.apply(topic, 0, log_id, rs, last),
                bootstrap, topic, 0, 1, log_id)
            got = {r.user_id: (r.state.copy(), r.update_count) for r in restored.iter_users()}
            assert report.mode == "restored" and report.next_offset == records[-1].offset + 1
            assert 0 < report.replayed < len(second)  # the sent users' events were skipped
        assert set(got) == set(expected)
        assert_states_equal(got, expected)
        # the gap is closed: a second restore finds a complete changelog at the end
        with StateStore.open(tmp_path / "again", config) as again:
            report = restore_partition(again, writer, lambda rs, last: None, bootstrap, topic,
                                       0, 1, log_id)
            assert report.replayed == 0 and report.next_offset == records[-1].offset + 1
            assert_states_equal({r.user_id: (r.state.copy(), r.update_count)
                                 for r in again.iter_users()}, expected)
    finally:
        publisher.close()


def read_interactions_one(bootstrap: str, topic: str, expected: int) -> list[ConsumedRecord]:
    from stream.changelog import read_interactions as read_range

    return read_range(bootstrap, topic, 0, 0, expected - 1)
