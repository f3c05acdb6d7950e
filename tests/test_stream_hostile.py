"""Hostile records against a running worker: it stays up, applies every good interaction
exactly once, and turns every bad record into a dead letter (issue #16).

Each test runs ``unirec worker`` as a subprocess against an embedded broker, sends raw
records (any key, any bytes) with a plain KafkaProducer, and compares the worker's store with
an in-process ``InteractionApplier`` that applied only the good interactions. Dead letters are
matched to the bad records by (topic, partition, offset).
"""

from __future__ import annotations

import base64
import json
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer
from stream_fixtures import WorkerProcess, wait_for

from eventlog.schema import Interaction, Label, encode
from model.checkpoint import load
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.broker import EmbeddedBroker
from stream.metrics import scrape, total
from stream.producer import synthetic_events
from stream.records import ConsumedRecord
from stream.topics import TopicNames, ensure_topics

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

PARTITIONS = 2
START_TIMEOUT_S = 60.0
Sent = tuple[str, int, int]  # topic, partition, offset


class Stream:
    """One topic prefix on the broker: raw sends, and a tail of its output topics."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap, self.topics = bootstrap, TopicNames.with_prefix(prefix)
        ensure_topics(bootstrap, PARTITIONS, topics=self.topics)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20,
                                      linger_ms=5)
        self.tail = KafkaConsumer(self.topics.dead_letters, self.topics.scores,
                                  bootstrap_servers=bootstrap, group_id=None,
                                  auto_offset_reset="earliest", enable_auto_commit=False,
                                  max_partition_fetch_bytes=16 << 20)
        self.dead: list[dict[str, Any]] = []
        self.scores: list[dict[str, Any]] = []

    def send(self, records: list[tuple[str, bytes | None, bytes | None]]) -> list[Sent]:
        """Send ``(kind, key, value)`` records in order; where each landed."""
        futures = [self.producer.send(self.topics.of(kind), key=key, value=value)
                   for kind, key, value in records]
        self.producer.flush(30)
        return [(m.topic, m.partition, m.offset) for m in (f.get(30) for f in futures)]

    def poll(self) -> None:
        for tp, batch in self.tail.poll(timeout_ms=200).items():
            target = self.dead if tp.topic == self.topics.dead_letters else self.scores
            target.extend(json.loads(r.value) for r in batch)

    def dead_at(self) -> list[Sent]:
        return [(d["topic"], d["partition"], d["offset"]) for d in self.dead]

    def close(self) -> None:
        self.producer.close()
        self.tail.close()


def start(stream: Stream, checkpoint: Path, store: Path, log: Path, group: str,
          env: dict[str, str] | None = None) -> WorkerProcess:
    worker = WorkerProcess(stream.bootstrap, checkpoint, store, log,
                           prefix=stream.topics.interactions.removesuffix("interactions"),
                           partitions=PARTITIONS, group=group, extra=("--no-train",), env=env)
    wait_for(lambda: "resuming partitions at" in worker.output(), START_TIMEOUT_S, worker,
             "partition assignment")
    return worker


def stored(store: Path, users: list[str]) -> dict[str, tuple[int, np.ndarray]]:
    """(update count, state) of each of ``users`` in the worker's store, read-only."""
    if not (store / "CURRENT").exists():
        return {}
    try:
        with StateStore.open(store, read_only=True) as s:
            batch = s.get_many(users)
            return {u: (int(batch.update_counts[i]), batch.states[i].copy())
                    for i, u in enumerate(users)}
    except Exception:  # the worker is writing: read again later
        return {}


def reference_states(checkpoint: Path, events: list[Interaction]) -> dict[str, np.ndarray]:
    """Each user's state after ``events`` (good interactions only), applied in process."""
    model, meta = load(checkpoint, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as directory, StateStore.open(
            Path(directory) / "s", StoreConfig(state_dim=model.cfg.d_model,
                                               history_len=model.cfg.history_len)) as store:
        applier = InteractionApplier(store, model, int(meta["model_version"]))
        records = [ConsumedRecord(0, k, e.user_id.encode(), encode(e)) for k, e in
                   enumerate(events)]
        applier.apply("interactions", 0, "ref", records, len(records) - 1)
        return {e.user_id: store.get(e.user_id).state.copy() for e in events}


def settle(stream: Stream, worker: WorkerProcess, store: Path, good: list[Interaction],
           bad: list[Sent], scored: set[str], timeout_s: float = 60.0) -> None:
    """Wait until every good interaction is applied, every bad record dead-lettered and every
    request in ``scored`` scored; then assert it stays so (nothing applied twice)."""
    users = sorted({e.user_id for e in good})
    expected = {u: sum(e.user_id == u for e in good) for u in users}

    def done() -> bool:
        stream.poll()
        counts = {u: c for u, (c, _) in stored(store, users).items()}
        return (counts == expected and set(bad) <= set(stream.dead_at())
                and scored <= {s["request_id"] for s in stream.scores})

    wait_for(done, timeout_s, worker, "good records applied and bad ones dead-lettered")
    time.sleep(1.0)
    assert done(), "something was applied twice or undone"
    reference = reference_states(worker_checkpoint(worker), good)
    for user, (_, state) in stored(store, users).items():
        np.testing.assert_allclose(state, reference[user], atol=1e-5, rtol=0)
    assert worker.exited() is None


def worker_checkpoint(worker: WorkerProcess) -> Path:
    argv = worker.process.args
    return Path(argv[argv.index("--checkpoint") + 1])


def good_events(n: int, seed: int, users: list[str]) -> list[Interaction]:
    """``n`` synthetic interactions of ``users`` (round robin), event ids unique by ``seed``."""
    events = [e for e, _ in synthetic_events(n, seed=seed)]
    return [msgspec.structs.replace(e, user_id=users[k % len(users)],
                                    event_id=f"s{seed}-e{k}") for k, e in enumerate(events)]


def interaction(e: Interaction) -> tuple[str, bytes, bytes]:
    return "interactions", e.user_id.encode(), encode(e)


def impression_of(e: Interaction, request_id: str, n_candidates: int = 3
                  ) -> tuple[str, bytes, bytes]:
    message = {"request_id": request_id, "user_id": e.user_id, "ts": e.ts,
               "candidates": [{"item_id": f"i{k}"} for k in range(n_candidates)]}
    return "impressions", e.user_id.encode(), msgspec.json.encode(message)


def label_of(e: Interaction, request_id: str, ts: float) -> tuple[str, bytes, bytes]:
    message = Label(request_id, e.user_id, "i0", 1, e.ts) if ts == e.ts else {
        "request_id": request_id, "user_id": e.user_id, "item_id": "i0", "label": 1, "ts": ts}
    return "labels", e.user_id.encode(), msgspec.json.encode(message)


def test_every_reported_crash_is_a_dead_letter_and_the_worker_goes_on(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path) -> None:
    """The records that crash-looped the worker: a NUL user id, a 5 MB invalid interaction,
    an impression of 13,000 candidates, ts = -1e300; a label with ts = 1e300 that stopped
    every later join; a record without a key; and on ``model-updates`` a tombstone and
    garbage. Labels sent after them still join."""
    stream = Stream(broker.bootstrap_servers, "crash-")
    store = tmp_path / "store"
    worker = start(stream, checkpoint, store, tmp_path / "w.log", "g-crash")
    try:
        users = ["u0", "u1", "u2"]
        good = good_events(30, seed=1, users=users)
        nul = msgspec.structs.asdict(good[0]) | {"user_id": "a\x00b"}
        huge = b'{"event_id": "' + b"x" * 5_000_000 + b'", "ts": "no"}'
        minus = encode(good[1]).replace(str(good[1].ts).encode(), b"-1e300")
        hostile = [
            ("interactions", b"a\x00b", msgspec.json.encode(nul)),
            ("interactions", b"u0", huge),
            impression_of(good[2], "r-huge", n_candidates=13_000),
            ("interactions", b"u1", minus),
            label_of(good[3], "r-future", ts=1e300),
            ("interactions", None, encode(good[4])),
        ]
        sent = stream.send([interaction(e) for e in good[:15]] + hostile)
        bad = sent[15:]
        stream.producer.send(stream.topics.model_updates, key=b"model", value=None)
        stream.send([("model_updates", b"model", b"\xff not an update")])
        after = good[15:]
        follow = [impression_of(after[k], f"r-after-{k}") for k in range(3)]
        stream.send(follow + [interaction(e) for e in after])
        stream.send([label_of(after[k], f"r-after-{k}", after[k].ts) for k in range(3)])
        settle(stream, worker, store, good, bad, {f"r-after-{k}" for k in range(3)})
        letters = {(d["topic"], d["partition"], d["offset"]): d for d in stream.dead}
        assert "user_id must not contain control characters" in letters[bad[0]]["reason"]
        assert letters[bad[1]]["value_bytes"] == len(huge)
        assert len(base64.b64decode(letters[bad[1]]["value"])) == 4096
        assert "13000 candidates" in letters[bad[2]]["reason"]
        assert "ts must be seconds since the epoch" in letters[bad[3]]["reason"]
        assert "ts must be seconds since the epoch" in letters[bad[4]]["reason"]
        assert "record has no key" in letters[bad[5]]["reason"]
        wait_for(lambda: total(scrape(worker.url), "unirec_labels_joined_total") >= 3, 30.0,
                 worker, "the labels sent after the hostile ones joined")
        assert worker.stop() == 0
    finally:
        worker.stop(signal.SIGKILL)
        stream.close()


# -------------------------------------------------- generated hostile records (hypothesis)

TEMPLATE = msgspec.structs.asdict(good_events(1, seed=0, users=["t"])[0])

# Each value is invalid for its field by construction (type, range, control character, size).
INVALID_FIELD_VALUES = {
    "event_id": st.sampled_from(["", None, 7, "e\x00", "x" * 300]),
    "user_id": st.sampled_from(["", None, ["u"], "u\x00", "\x1b[2J", "u" * 300]),
    "item_id": st.sampled_from(["", None, "i\n", "i" * 257]),
    "action": st.sampled_from(["", 1.5, "a\x7f"]),
    "ts": st.one_of(st.sampled_from([-1e300, 1e300, -1.0, "now", None, 5e9, 1e12]),
                    st.floats(min_value=4_102_444_801.0, allow_infinity=False)),
    "item_features": st.sampled_from([{"price": 1e200}, {"price": -1e13}, {"": 1.0},
                                      {"genre": [1, 2]}, {"genre": {"a": 1}}, "x"]),
    "context": st.sampled_from([{"lat": 1e300}, {"device": None}, []]),
}


@st.composite
def hostile_interaction(draw: st.DrawFn, user: str) -> tuple[str, bytes | None, bytes]:
    """A record on ``interactions`` that the worker must dead-letter."""
    message = dict(TEMPLATE, user_id=user)
    how = draw(st.sampled_from(["field", "drop", "extra", "key", "garbage", "oversized"]))
    key: bytes | None = user.encode()
    if how == "field":
        field = draw(st.sampled_from(sorted(INVALID_FIELD_VALUES)))
        message[field] = draw(INVALID_FIELD_VALUES[field])
        if field == "user_id":
            key = draw(st.sampled_from([b"someone", None]))
    elif how == "drop":
        del message[draw(st.sampled_from(["event_id", "user_id", "item_id", "action", "ts"]))]
    elif how == "extra":
        message["admin"] = True
    elif how == "key":
        key = draw(st.sampled_from([None, b"", b"\xff\xfe", b"another-user", b"k" * 5000]))
    elif how == "garbage":
        return "interactions", key, draw(st.binary(max_size=64).filter(_not_json_object))
    else:
        message["context"] = {"pad": "p" * 1_100_000}
    return "interactions", key, msgspec.json.encode(message)


def _not_json_object(value: bytes) -> bool:
    try:
        return not isinstance(json.loads(value), dict)
    except ValueError:
        return True


@pytest.fixture(scope="module")
def generated(broker: EmbeddedBroker, checkpoint: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stream, WorkerProcess,
                                                                          Path]]:
    """One stream and one worker for every generated example (fresh users per example)."""
    directory = tmp_path_factory.mktemp("generated")
    stream = Stream(broker.bootstrap_servers, "gen-")
    worker = start(stream, checkpoint, directory / "store", directory / "w.log", "g-gen")
    yield stream, worker, directory / "store"
    code = worker.stop()
    stream.close()
    assert code == 0, worker.output()[-3000:]


EXAMPLES = iter(range(10**6))


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_generated_hostile_records_never_take_the_worker_down(
        generated: tuple[Stream, WorkerProcess, Path], data: st.DataObject) -> None:
    """Any interleaving of good interactions, impressions and labels with generated malformed,
    oversized and hostile interactions: the worker stays up, applies every good interaction
    exactly once (states equal an in-process run over the good ones alone), scores every good
    impression, and dead-letters every bad record."""
    stream, worker, store = generated
    n = next(EXAMPLES)
    users = [f"x{n}-u{k}" for k in range(3)]
    good = good_events(data.draw(st.integers(3, 12), label="good"), seed=100 + n, users=users)
    bad = data.draw(st.lists(hostile_interaction(users[0]), min_size=1, max_size=6),
                    label="bad")
    slots = data.draw(st.lists(st.integers(0, len(good)), min_size=len(bad),
                               max_size=len(bad)), label="where")
    records: list[tuple[str, bytes | None, bytes]] = []
    bad_at: list[int] = []
    for k, e in enumerate(good):
        for record, slot in zip(bad, slots, strict=True):
            if slot == k:
                bad_at.append(len(records))
                records.append(record)
        records += [impression_of(e, f"x{n}-r{k}"), interaction(e)]
    for record, slot in zip(bad, slots, strict=True):
        if slot == len(good):
            bad_at.append(len(records))
            records.append(record)
    sent = stream.send(records)
    stream.send([label_of(e, f"x{n}-r{k}", e.ts) for k, e in enumerate(good)])
    settle(stream, worker, store, good, [sent[i] for i in bad_at],
           {f"x{n}-r{k}" for k in range(len(good))})
    assert len(stream.dead_at()) == len(set(stream.dead_at())), "a dead letter published twice"


# ------------------------------------------------- kill -9, restarting into the same group


def test_a_kill_between_dead_letters_and_the_store_write_loses_and_repeats_nothing(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL right after a batch's dead letters are published, before its states and offset
    are written (crash point ``after-dead-letters``); the worker restarts in the SAME group:
    every good interaction is applied exactly once and every bad one is dead-lettered (at
    least once: the restart publishes the batch's dead letters again)."""
    stream = Stream(broker.bootstrap_servers, "kill-dl-")
    store, group = tmp_path / "store", "g-kill-dl"
    good = good_events(40, seed=7, users=["k0", "k1", "k2", "k3"])
    records = [interaction(e) for e in good]
    records.insert(20, ("interactions", b"k0", b"{poison"))
    sent = stream.send(records)
    crashed = WorkerProcess(stream.bootstrap, checkpoint, store, tmp_path / "w1.log",
                            prefix="kill-dl-", partitions=PARTITIONS, group=group,
                            extra=("--no-train",), env={"UNIREC_CRASH_AT": "after-dead-letters"})
    try:
        assert crashed.wait(START_TIMEOUT_S) == -signal.SIGKILL, crashed.output()[-3000:]
        stream.poll()
        assert sent[20] in stream.dead_at()  # published before the kill
        worker = start(stream, checkpoint, store, tmp_path / "w2.log", group)
        settle(stream, worker, store, good, [sent[20]], set())
        assert worker.stop() == 0
    finally:
        crashed.stop(signal.SIGKILL)
        stream.close()


def send_paced(stream: Stream, records: list[tuple[str, bytes | None, bytes]],
               chunk: int = 40, pause_s: float = 0.05) -> None:
    """Send ``records`` in chunks, pausing between them (a stream, not one burst)."""
    producer = KafkaProducer(bootstrap_servers=stream.bootstrap, linger_ms=5)
    try:
        for begin in range(0, len(records), chunk):
            for kind, key, value in records[begin:begin + chunk]:
                producer.send(stream.topics.of(kind), key=key, value=value)
            producer.flush(30)
            time.sleep(pause_s)
    finally:
        producer.close()


def test_a_kill_mid_stream_restarting_in_the_same_group_applies_each_event_once(
        broker: EmbeddedBroker, checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL while a stream of interactions and impressions is being processed, then a
    restart in the same consumer group (its committed offsets are behind the store's):
    every interaction is applied exactly once, and every impression is scored."""
    stream = Stream(broker.bootstrap_servers, "kill-mid-")
    store, group = tmp_path / "store", "g-kill-mid"
    good = good_events(1200, seed=11, users=[f"m{k}" for k in range(20)])
    worker = start(stream, checkpoint, store, tmp_path / "w1.log", group)
    records: list[tuple[str, bytes | None, bytes]] = []
    for k, e in enumerate(good):
        records += [impression_of(e, f"m-r{k}"), interaction(e)]
    paced = threading.Thread(target=send_paced, args=(stream, records), daemon=True)
    try:
        paced.start()
        users = sorted({e.user_id for e in good})
        wait_for(lambda: sum(c for c, _ in stored(store, users).values()) >= 100,
                 START_TIMEOUT_S, worker, "some events applied")
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
        assert sum(c for c, _ in stored(store, users).values()) < len(good), "killed too late"
        paced.join(60.0)
        worker = start(stream, checkpoint, store, tmp_path / "w2.log", group)
        settle(stream, worker, store, good, [], {f"m-r{k}" for k in range(len(good))})
        assert worker.stop() == 0
    finally:
        worker.stop(signal.SIGKILL)
        stream.close()
