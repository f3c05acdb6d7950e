"""``unirec worker`` end to end, as a subprocess against an embedded Tansu broker.

Each test produces a small synthetic log, runs the worker (``python -m app.cli worker``)
with a temporary store and a tiny checkpoint (``stream_fixtures``: random weights and a FeatureSpec
fitted on the synthetic events: the worker's contract does not depend on the weights'
quality), and waits for conditions by polling the store read-only or the output topics, with
bounded timeouts. Every worker and broker a test starts is stopped by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from stream_fixtures import WorkerProcess, wait_for

from app.cli import main as unirec
from eventlog.schema import encode
from state_store import StateStore
from stream.broker import EmbeddedBroker, free_port
from stream.handlers import by_partition
from stream.producer import replay_events, synthetic_events
from stream.records import ConsumedRecord
from stream.topics import TopicNames, ensure_topics

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 2
START_TIMEOUT_S = 60.0
TANSU_AUTO_PARTITIONS = 4  # what Tansu gives a topic it creates on a metadata request


# ----------------------------------------------------------------------------- fixtures


def topics_for(prefix: str) -> TopicNames:
    return TopicNames.with_prefix(prefix)


def produce(bootstrap: str, topics: TopicNames, n: int, seed: int, negatives: int = 3,
            partitions: int = PARTITIONS) -> None:
    ensure_topics(bootstrap, partitions, topics=topics)
    events = synthetic_events(n, seed=seed)
    replay_events(events, bootstrap, topics, negatives=negatives, seed=seed)


def start_worker(bootstrap: str, checkpoint: Path, store: Path, prefix: str, log_path: Path,
                 *extra: str, group: str | None = None,
                 partitions: int = PARTITIONS) -> WorkerProcess:
    """A worker with ``--no-train`` (these tests are about applying events)."""
    return WorkerProcess(bootstrap, checkpoint, store, log_path, prefix=prefix,
                         partitions=partitions, group=group, extra=("--no-train", *extra))


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    """Starts workers (``start_worker``); every one still running at the end is killed (by
    its PID)."""
    started: list[WorkerProcess] = []

    def start(*args: Any, **kwargs: Any) -> WorkerProcess:
        worker = start_worker(*args, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------ helpers


def store_snapshot(path: Path) -> dict[str, tuple[np.ndarray, int, int, list[bytes]]]:
    """Every user's (state, update count, model version, history), read-only."""
    with StateStore.open(path, read_only=True) as store:
        users = [record.user_id for record in store.iter_users()]
        batch = store.get_many(users, history=True)
        return {
            u: (batch.states[i].copy(), int(batch.update_counts[i]),
                int(batch.model_versions[i]), list(batch.histories[i]))
            for i, u in enumerate(users)
        }


def applied_total(path: Path) -> int:
    if not (path / "CURRENT").exists():
        return 0
    try:
        with StateStore.open(path, read_only=True) as store:
            return sum(r.update_count for r in store.iter_users())
    except Exception:
        return 0


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
               ) -> list[tuple[bytes | None, bytes]]:
    """The (key, value) of every record of ``topic``, reading until ``expected`` came (or the
    time is up)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    records: list[tuple[bytes | None, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend((r.key, r.value) for r in batch)
        # a short grace poll: more than expected would be a bug
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend((r.key, r.value) for r in batch)
    finally:
        consumer.close()
    return records


def http(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET (or, with ``body``, a JSON POST); error statuses returned."""
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``unirec *argv`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = unirec(list(argv))
    return code, out.getvalue(), err.getvalue()


def probe_api(worker: WorkerProcess, bootstrap: str, topics: TopicNames, user: str
              ) -> dict[str, Any]:
    """What the running worker's HTTP API (and ``unirec state --api``) answer, once a
    consumer lag sample is out."""
    url, found = worker.url, dict[str, Any]()
    metrics: list[str] = []

    def lag_reported() -> bool:
        status, body = http(url + "/metrics")
        metrics[:] = [body.decode()]
        return status == 200 and "unirec_consumer_lag_messages{" in body.decode()

    wait_for(lag_reported, 20.0, worker, "a consumer lag sample")
    found["metrics"] = metrics[0]
    found["healthz"] = http(url + "/healthz")
    found["state"] = http(f"{url}/users/{user}/state")
    _, impression = read_topic(bootstrap, topics.impressions, 1)[0]
    found["impression"] = json.loads(impression)
    found["score"] = http(url + "/score", impression)
    found["cli_state"] = run_cli("state", user, "--api", url)
    return found


# -------------------------------------------------------------------------------- tests


class E2ERun(NamedTuple):
    store: Path
    output: str
    code: int
    api: dict[str, Any]  # ``probe_api`` while it ran, and the user it asked about ("user")


@pytest.fixture(scope="module")
def e2e_run(broker: EmbeddedBroker, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> E2ERun:
    """One worker run over a 300-event log, stopped by SIGTERM once every interaction is
    applied. Checks the scores and asks the HTTP API (``probe_api``) while it runs."""
    bootstrap, topics, n = broker.bootstrap_servers, topics_for("e2e-"), 300
    produce(bootstrap, topics, n, seed=1)
    tmp = tmp_path_factory.mktemp("e2e")
    store = tmp / "store"
    worker = start_worker(bootstrap, checkpoint, store, "e2e-", tmp / "worker.log")
    try:
        wait_for(lambda: applied_total(store) == n, START_TIMEOUT_S, worker, f"{n} applied")
        scores = read_topic(bootstrap, topics.scores, n)
        user = json.loads(scores[0][1])["user_id"]
        api = {**probe_api(worker, bootstrap, topics, user), "user": user}
    finally:
        code = worker.stop()
    request_ids = [json.loads(v)["request_id"] for _, v in scores]
    assert len(request_ids) == n and len(set(request_ids)) == n, "one score per impression"
    first = json.loads(scores[0][1])
    assert scores[0][0] == first["user_id"].encode() and first["model_version"] == 3
    assert len(first["items"]) >= 1
    return E2ERun(store, worker.output(), code, api)


def test_end_to_end_applies_every_interaction_and_scores_every_impression(
        e2e_run: E2ERun) -> None:
    store, output, code, _ = e2e_run
    assert code == 0, output[-3000:]
    snapshot = store_snapshot(store)
    assert sum(count for _, count, _, _ in snapshot.values()) == 300
    assert {version for _, _, version, _ in snapshot.values()} == {3}
    assert "unirec worker config" in output
    with StateStore.open(store, read_only=True) as opened:
        offsets = {tp.partition: o for tp, o in opened.offsets().items()
                   if tp.topic == "e2e-interactions"}
    assert set(offsets) == set(range(PARTITIONS))


def test_http_api_of_the_running_worker(e2e_run: E2ERun) -> None:
    """While the worker ran: health, a user's state (as the store has it), the metrics (the
    applied count, a consumer lag sample) and a scored impression, over its --web-port."""
    store, output, _, api = e2e_run
    status, body = api["healthz"]
    health = json.loads(body)
    assert status == 200 and (health["status"], health["model_version"]) == ("ok", 3)
    assert health["loop"]["assigned_partitions"]  # the consume loop holds partitions
    status, body = api["state"]
    assert status == 200, body
    state = json.loads(body)
    _, count, version, history = store_snapshot(store)[api["user"]]
    assert state["user_id"] == api["user"] and state["update_count"] == count >= 1
    assert state["model_version"] == version == 3 and len(state["history"]) == len(history)
    metrics = api["metrics"]
    assert 'unirec_events_applied_total{topic="e2e-interactions"} 300.0' in metrics
    assert 'unirec_consumer_lag_messages{partition="' in metrics
    assert 'topic="e2e-interactions"} 0.0' in metrics  # everything was applied
    assert "unirec_model_version 3.0" in metrics
    assert 'unirec_events_consumed_total{topic="e2e-impressions"} 300.0' in metrics
    assert "unirec_scoring_duration_seconds_count" in metrics
    status, body = api["score"]
    assert status == 200, body
    scores, impression = json.loads(body), api["impression"]
    assert scores["request_id"] == impression["request_id"] and scores["model_version"] == 3
    assert sorted(i["item_id"] for i in scores["items"]) == sorted(
        c["item_id"] for c in impression["candidates"])
    ranked = [i["score"] for i in scores["items"]]
    assert ranked == sorted(ranked, reverse=True)
    assert "'interactions_applied': 300" in output


def test_state_command_reads_the_api_and_the_store(e2e_run: E2ERun) -> None:
    """``unirec state USER --api URL`` printed the API's snapshot; ``--store DIR`` prints the
    same from the store, without what only the owning worker knows (the user's partition and
    the offset its store reflects, issue #13); an unknown user is one line and exit status 2."""
    store, _, _, api = e2e_run
    code, out, err = api["cli_state"]
    assert code == 0, err
    from_api = json.loads(api["state"][1])
    assert json.loads(out) == from_api
    assert from_api["offset"] > 0 and from_api["partition"] >= 0
    code, out, err = run_cli("state", api["user"], "--store", str(store))
    assert code == 0, err
    assert json.loads(out) == {k: v for k, v in from_api.items()
                               if k not in ("partition", "offset")}
    code, out, err = run_cli("state", "unknown-user", "--store", str(store))
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("unirec state: error: unknown user")


def test_redelivery_from_offset_zero_changes_nothing(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path,
        e2e_run: E2ERun) -> None:
    """A new consumer group starts at offset 0 (auto_offset_reset earliest): the worker seeks
    to the store's offsets and, whatever is redelivered, no state changes."""
    store = e2e_run[0]
    before = store_snapshot(store)
    worker = start_worker(broker.bootstrap_servers, checkpoint, store, "e2e-", tmp_path / "w.log")
    try:
        wait_for(lambda: "resuming partitions at" in worker.output()
                 and "e2e-interactions" in worker.output(), START_TIMEOUT_S, worker,
                 "partition assignment")
        time.sleep(3.0)  # time to (wrongly) re-apply anything redelivered
    finally:
        assert worker.stop() == 0
    after = store_snapshot(store)
    assert before.keys() == after.keys()
    for user, (state, count, version, history) in before.items():
        state2, count2, version2, history2 = after[user]
        assert np.array_equal(state, state2) and (count, version, history) == (
            count2, version2, history2)
    assert "'interactions_applied': 0" in worker.output()


def test_sigkill_mid_replay_then_restart_matches_an_uninterrupted_run(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path,
        workers: Callable[..., WorkerProcess]) -> None:
    bootstrap, topics, n = broker.bootstrap_servers, topics_for("kill-"), 1500
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"
    worker = workers(bootstrap, checkpoint, killed_store, "kill-", tmp_path / "k1.log")
    wait_for(lambda: "resuming partitions at" in worker.output(), START_TIMEOUT_S, worker,
             "partition assignment")
    producer = threading.Thread(target=replay_events, daemon=True, args=(
        synthetic_events(n, seed=2), bootstrap, topics), kwargs={"rate": 500.0, "negatives": 2})
    producer.start()
    wait_for(lambda: applied_total(killed_store) >= 300, START_TIMEOUT_S, worker,
             "some events applied")
    assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert applied_total(killed_store) < n, "killed too late to test anything"
    producer.join(30.0)
    restarted = workers(bootstrap, checkpoint, killed_store, "kill-", tmp_path / "k2.log")
    clean = workers(bootstrap, checkpoint, clean_store, "kill-", tmp_path / "c.log")
    wait_for(lambda: applied_total(killed_store) == n, START_TIMEOUT_S, restarted, "restart")
    wait_for(lambda: applied_total(clean_store) == n, START_TIMEOUT_S, clean, "clean run")
    assert restarted.stop() == 0 and clean.stop() == 0
    a, b = store_snapshot(killed_store), store_snapshot(clean_store)
    assert a.keys() == b.keys()
    for user in a:
        assert a[user][1:] == b[user][1:], user
        np.testing.assert_allclose(a[user][0], b[user][0], atol=1e-6, rtol=0)


def test_poison_and_invalid_messages_go_to_dead_letters(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path,
        workers: Callable[..., WorkerProcess]) -> None:
    bootstrap, topics = broker.bootstrap_servers, topics_for("poison-")
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    events = [e for e, _ in synthetic_events(40, seed=3)]
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for event in events[:20]:
            producer.send(topics.interactions, key=event.user_id.encode(), value=encode(event))
        producer.send(topics.interactions, key=b"u1", value=b"\x00 not json {")
        producer.send(topics.interactions, key=b"u1", value=b'{"user_id": "u1"}')
        for event in events[20:]:
            producer.send(topics.interactions, key=event.user_id.encode(), value=encode(event))
        producer.flush(10)
    finally:
        producer.close()
    store = tmp_path / "store"
    worker = workers(bootstrap, checkpoint, store, "poison-", tmp_path / "w.log")
    wait_for(lambda: applied_total(store) == len(events), START_TIMEOUT_S, worker,
             "the valid events applied")
    letters = [json.loads(v) for _, v in read_topic(bootstrap, topics.dead_letters, 2)]
    assert len(letters) == 2
    assert all(d["topic"] == topics.interactions and d["reason"] for d in letters)
    assert {base64.b64decode(d["value"]) for d in letters} == {
        b"\x00 not json {", b'{"user_id": "u1"}'}
    assert len({(d["partition"], d["offset"]) for d in letters}) == 2
    assert worker.stop() == 0


@pytest.mark.broker
def test_restarted_broker_stops_the_worker_unless_reset_on_new_log(
        checkpoint: Path, tmp_path: Path, workers: Callable[..., WorkerProcess]) -> None:
    store, topics = tmp_path / "store", topics_for("")
    with EmbeddedBroker(log_dir=tmp_path / "b1") as first:
        produce(first.bootstrap_servers, topics, 100, seed=4, negatives=1)
        worker = workers(first.bootstrap_servers, checkpoint, store, "", tmp_path / "w1.log")
        wait_for(lambda: applied_total(store) == 100, START_TIMEOUT_S, worker, "first log")
        assert worker.stop() == 0
    with EmbeddedBroker(log_dir=tmp_path / "b2") as second:
        produce(second.bootstrap_servers, topics, 60, seed=5, negatives=1)
        refused = workers(second.bootstrap_servers, checkpoint, store, "", tmp_path / "w2.log")
        code = refused.wait(START_TIMEOUT_S)
        assert code != 0
        output = refused.output()
        assert "interactions[" in output and "--reset-on-new-log" in output, output[-2000:]
        assert applied_total(store) == 100
        reset = workers(second.bootstrap_servers, checkpoint, store, "", tmp_path / "w3.log",
                        "--reset-on-new-log")
        wait_for(lambda: applied_total(store) == 160, START_TIMEOUT_S, reset, "the new log")
        assert reset.stop() == 0


@pytest.mark.broker
def test_without_a_checkpoint_the_worker_exits_with_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.pt"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--bootstrap-servers",
         f"127.0.0.1:{free_port()}", "--checkpoint", str(missing), "--store",
         str(tmp_path / "store")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert f"no checkpoint at {missing}" in result.stderr


def test_by_partition_keeps_offset_order_and_drops_repeats() -> None:
    records = [ConsumedRecord(1, 5, b"a", b"x"), ConsumedRecord(0, 3, None, b"y"),
               ConsumedRecord(1, 2, b"b", b"z"), ConsumedRecord(1, 5, b"a", b"again")]
    grouped = by_partition(records)
    assert list(grouped) == [0, 1]
    assert [r.offset for r in grouped[1]] == [2, 5] and grouped[1][1].value == b"x"
    assert grouped[0] == [ConsumedRecord(0, 3, None, b"y")]


@pytest.mark.broker
def test_broker_restarted_under_a_running_worker_stops_it(
        checkpoint: Path, tmp_path: Path, workers: Callable[..., WorkerProcess]) -> None:
    """The rejoin after the restart re-checks the log: the worker exits with status 3 and an
    error naming the partition, having applied nothing of the new log.

    The worker's metadata requests reach the new broker as soon as it listens, and Tansu
    creates the subscribed topics then, with its own partition count, whatever the request's
    ``allow_auto_topic_creation`` says; the test uses that count, so the topics are
    co-partitioned whoever creates them first (with 2, a race decided between status 3 and
    the co-partitioning refusal, status 4)."""
    store, topics = tmp_path / "store", topics_for("")
    partitions = TANSU_AUTO_PARTITIONS
    first = EmbeddedBroker(log_dir=tmp_path / "b1").start()
    port, second = first.port, None
    try:
        produce(first.bootstrap_servers, topics, 100, seed=6, negatives=1, partitions=partitions)
        worker = workers(first.bootstrap_servers, checkpoint, store, "", tmp_path / "w.log",
                         partitions=partitions)
        wait_for(lambda: applied_total(store) == 100, START_TIMEOUT_S, worker, "first log")
        first.stop()
        second = EmbeddedBroker(port=port, log_dir=tmp_path / "b2").start()
        produce(second.bootstrap_servers, topics, 30, seed=7, negatives=1, partitions=partitions)
        assert worker.wait(START_TIMEOUT_S) == 3
        assert "stored offsets belong to log" in worker.output()
        assert "partition interactions[" in worker.output()
        assert applied_total(store) == 100
    finally:
        first.stop()
        if second is not None:
            second.stop()
