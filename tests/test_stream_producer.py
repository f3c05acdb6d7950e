"""Replay of event logs onto the topics, the synthetic generator, and ``unirec produce``."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from stream_fixtures import read_all

from app.cli import main
from eventlog.log import EventLog
from eventlog.schema import Impression, Interaction, Label, decode
from stream.broker import EmbeddedBroker, free_port
from stream.producer import (
    CandidateSampler,
    SyntheticConfig,
    replay,
    replay_events,
    synthetic_events,
)
from stream.topics import TopicNames, end_offsets, ensure_topics

logging.getLogger("kafka").setLevel(logging.ERROR)

USERS = ("alice", "bob", "carol", "dave")


@pytest.fixture
def topics(broker: EmbeddedBroker) -> TopicNames:
    names = TopicNames.with_prefix(f"p{uuid.uuid4().hex[:8]}-")
    ensure_topics(broker.bootstrap_servers, partitions=3, topics=names)
    return names


def small_log(n: int = 40, seed: int = 1) -> EventLog:
    """Four users, ten items with features, increasing timestamps, mixed labels."""
    rng = random.Random(seed)
    events = [
        Interaction(
            event_id=f"e{i}", user_id=rng.choice(USERS), item_id=f"m{(item := rng.randrange(10))}",
            action="watch", ts=1000.0 + 7 * (i // 2), context={"device": rng.choice(["a", "b"])},
            item_features={"genre": [f"g{item % 3}"], "year": 1990.0 + item},
        )
        for i in range(n)
    ]
    labels = np.array([rng.randrange(2) for _ in range(n)], dtype=np.int8)
    return EventLog("small", events, labels)


def test_replay_sends_impression_interaction_and_label_per_event(
    broker: EmbeddedBroker, topics: TopicNames
) -> None:
    """Every message decodes with the schema and is keyed by its user id; each user's
    interactions sit in one partition in log order; each impression holds the real item with
    its features plus min(K, earlier distinct other items) distinct negatives seen earlier;
    one label per interaction, for the real item, equal to the log's label."""
    log, negatives = small_log(), 4
    bootstrap = broker.bootstrap_servers
    stats = replay(log, bootstrap, topics, negatives=negatives, seed=3)
    assert (stats.interactions, stats.impressions, stats.labels) == (len(log),) * 3
    assert stats.bytes > 0

    interactions = read_all(bootstrap, topics.interactions)
    partitions: dict[str, set[int]] = defaultdict(set)
    per_user: dict[str, list[str]] = defaultdict(list)
    for record in sorted(interactions, key=lambda r: (r.partition, r.offset)):
        event = decode(Interaction, record.value)
        assert record.key == event.user_id.encode()
        partitions[event.user_id].add(record.partition)
        per_user[event.user_id].append(event.event_id)
    assert all(len(p) == 1 for p in partitions.values())
    for user, ids in per_user.items():
        assert ids == [e.event_id for e in log.interactions if e.user_id == user]

    by_request = {f"req-{e.event_id}": (i, e) for i, e in enumerate(log.interactions)}
    impressions = [decode(Impression, r.value) for r in read_all(bootstrap, topics.impressions)]
    assert sorted(imp.request_id for imp in impressions) == sorted(by_request)
    for impression in impressions:
        i, event = by_request[impression.request_id]
        assert (impression.user_id, impression.ts) == (event.user_id, event.ts)
        items = [c.item_id for c in impression.candidates]
        assert len(set(items)) == len(items)
        real = [c for c in impression.candidates if c.item_id == event.item_id]
        assert len(real) == 1 and real[0].item_features == event.item_features
        earlier = {e.item_id for e in log.interactions[:i]} - {event.item_id}
        assert len(items) - 1 == min(negatives, len(earlier))
        assert set(items) - {event.item_id} <= earlier

    labels = [decode(Label, r.value) for r in read_all(bootstrap, topics.labels)]
    assert len(labels) == len(log)
    for label in labels:
        i, event = by_request[label.request_id]
        assert (label.user_id, label.item_id, label.ts) == (event.user_id, event.item_id, event.ts)
        assert label.label == int(log.labels[i])


def test_candidates_are_deterministic_in_the_seed_and_shuffled() -> None:
    """The same seed gives the same candidate lists; the real item's position varies."""
    log = small_log(200)

    def lists(seed: int) -> list[list[str]]:
        sampler = CandidateSampler(5, random.Random(seed))
        out = []
        for event in log.interactions:
            out.append([c.item_id for c in sampler.candidates(event)])
            sampler.observe(event)
        return out

    assert lists(7) == lists(7)
    assert lists(7) != lists(8)
    positions = {row.index(e.item_id) for row, e in zip(lists(7), log.interactions, strict=True)}
    assert len(positions) > 3


class RecordingProducer:
    """Stands in for KafkaProducer: records (wall time, topic, value) of each send, and each
    send's record timestamp in ``stamps``."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str, bytes]] = []
        self.stamps: list[int | None] = []

    def send(self, topic: str, key: bytes, value: bytes, timestamp_ms: int | None = None):
        self.sent.append((time.perf_counter(), topic, value))
        self.stamps.append(timestamp_ms)
        return self

    def add_errback(self, _callback) -> None:
        pass

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_rate_is_roughly_respected(broker: EmbeddedBroker, topics: TopicNames) -> None:
    """200 events at 1000 events/s take at least 0.15 s; the limit caps the interactions."""
    log = small_log(300)
    stats = replay(log, broker.bootstrap_servers, topics, rate=1000.0, limit=200)
    assert stats.interactions == 200
    assert stats.elapsed_s >= 0.15


def test_labels_wait_for_the_label_delay() -> None:
    """A label is sent no earlier than label_delay after its interaction, except the labels
    still pending at the end, which are all sent before replay returns."""
    log, delay = small_log(30), 0.05
    producer = RecordingProducer()
    stats = replay(log, "unused:0", TopicNames(), rate=200.0, label_delay=delay,
                   producer=producer)  # type: ignore[arg-type]
    assert stats.labels == len(log)
    sent_at = {}
    for at, topic, value in producer.sent:
        if topic == "interactions":
            sent_at[decode(Interaction, value).event_id] = at
    labels = [(at, decode(Label, value)) for at, topic, value in producer.sent
              if topic == "labels"]
    assert len(labels) == len(log)
    last_interaction = max(sent_at.values())
    for at, label in labels:
        interaction_at = sent_at[label.request_id.removeprefix("req-")]
        pending_at_end = interaction_at > last_interaction - delay
        assert at - interaction_at >= delay * 0.99 or pending_at_end
    assert sum(at - sent_at[lab.request_id[4:]] >= delay * 0.99 for at, lab in labels) > 10


def test_record_timestamps_order_each_users_messages_across_topics() -> None:
    """Sent as fast as possible (many messages per millisecond): a user's impression gets a
    later record timestamp than that user's previous interaction, the interaction the same
    one as its impression, and the label no earlier one (``stream.gate`` orders by them)."""
    log = small_log(60)
    producer = RecordingProducer()
    replay(log, "unused:0", TopicNames(), producer=producer)  # type: ignore[arg-type]
    last_interaction: dict[str, int] = {}
    impression_stamp: dict[str, int] = {}
    for (_, topic, value), stamp in zip(producer.sent, producer.stamps, strict=True):
        assert stamp is not None
        if topic == "impressions":
            message = decode(Impression, value)
            assert stamp > last_interaction.get(message.user_id, -1)
            impression_stamp[message.request_id] = stamp
        elif topic == "interactions":
            message = decode(Interaction, value)
            assert stamp == impression_stamp[f"req-{message.event_id}"]
            last_interaction[message.user_id] = stamp
        else:
            assert stamp >= impression_stamp[decode(Label, value).request_id]


def test_record_timestamps_of_each_topic_follow_the_send_order() -> None:
    """Sent as fast as possible, each topic's record timestamps never go back in send order,
    whatever the user: so within any partition they are in offset order, which the gate
    assumes when a later record of one topic lets an earlier record of another pass (a stamp
    per user ran ahead of the clock for a busy user and broke this)."""
    log = small_log(60)
    producer = RecordingProducer()
    replay(log, "unused:0", TopicNames(), producer=producer)  # type: ignore[arg-type]
    for topic in ("impressions", "interactions", "labels"):
        stamps = [stamp for (_, t, _), stamp in zip(producer.sent, producer.stamps, strict=True)
                  if t == topic]
        assert stamps and all(b >= a for a, b in pairwise(stamps)), topic


def test_synthetic_events_are_deterministic_ordered_and_skewed() -> None:
    """The same seed gives the same events; timestamps increase; popularity is skewed (the top
    item far above the median one); preferred-genre events are liked more often."""
    cfg = SyntheticConfig(users=50, items=200, genres=5)
    a = list(synthetic_events(3000, cfg, seed=4))
    assert a == list(synthetic_events(3000, cfg, seed=4))
    assert a != list(synthetic_events(3000, cfg, seed=5))
    ts = [event.ts for event, _ in a]
    assert ts == sorted(ts)
    counts = sorted(Counter(event.item_id for event, _ in a).values(), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2]
    assert 0.2 < sum(label for _, label in a) / len(a) < 0.8


def test_synthetic_replay_reaches_the_topics(broker: EmbeddedBroker, topics: TopicNames) -> None:
    """A synthetic stream lands on the three topics, one message of each kind per event."""
    events = synthetic_events(500, SyntheticConfig(users=20, items=100), seed=1)
    stats = replay_events(events, broker.bootstrap_servers, topics, negatives=3)
    for topic in (topics.interactions, topics.impressions, topics.labels):
        assert sum(end_offsets(broker.bootstrap_servers, topic).values()) == 500
    assert stats.messages == 1500


def _write_events(path: Path) -> None:
    rows = [
        {"user_id": f"u{i % 5}", "item_id": f"i{i % 7}", "ts": 1_000 + i, "label": i % 2,
         "item_genre": ["Drama"], "ctx_device": "web"}
        for i in range(60)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_cli_produce_end_to_end(broker: EmbeddedBroker, tmp_path: Path, capsys,
                                monkeypatch) -> None:
    """`unirec produce --events FILE` creates the topics with the partitions asked for,
    replays the file and prints a JSON summary with the counts."""
    events = tmp_path / "events.jsonl"
    _write_events(events)
    prefix = f"cli{uuid.uuid4().hex[:6]}-"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    code = main(["produce", "--events", str(events), "--partitions", "2", "--negatives", "3",
                 "--topic-prefix", prefix])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["interactions"], summary["impressions"], summary["labels"]) == (60, 60, 60)
    names = TopicNames.with_prefix(prefix)
    assert summary["topics"][names.interactions] == 2
    assert sum(end_offsets(broker.bootstrap_servers, names.labels).values()) == 60


def test_cli_produce_unreachable_broker_exits_2(tmp_path: Path, capsys) -> None:
    """With no broker at the address, `unirec produce` prints one error line and exits 2."""
    events = tmp_path / "events.jsonl"
    _write_events(events)
    code = main(["produce", "--events", str(events), "--bootstrap-servers",
                 f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("unirec produce: error: no Kafka broker answered")


@pytest.mark.parametrize("flags", [["--rate", "0"], ["--negatives", "-1"], ["--partitions", "0"],
                                   ["--label-delay", "-2"]])
def test_cli_produce_bad_arguments_exit_2(tmp_path: Path, capsys, flags: list[str]) -> None:
    """Bad numbers are refused before any connection, with exit status 2."""
    events = tmp_path / "events.jsonl"
    _write_events(events)
    code = main(["produce", "--events", str(events), "--bootstrap-servers", "127.0.0.1:1",
                 *flags])
    assert code == 2
    assert "unirec produce: error:" in capsys.readouterr().err


def test_cli_produce_needs_a_bootstrap_address(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without --bootstrap-servers and KAFKA_BOOTSTRAP_SERVERS the command exits 2."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    code = main(["produce", "--synthetic", "10"])
    assert code == 2
    assert "KAFKA_BOOTSTRAP_SERVERS" in capsys.readouterr().err
