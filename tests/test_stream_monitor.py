"""The fleet monitor (``unirec monitor``) end to end on the embedded broker.

Each monitor runs as a subprocess with a fresh app id (no changelog recovery: its windows are
rebuilt from ``feedback``, the embedded broker's way) and is stopped by its PID; workers are
``unirec worker`` subprocesses with a tiny random checkpoint (``stream_fixtures``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from kafka import KafkaProducer
from monitor_fixtures import MonitorProcess, feedback_records
from stream_fixtures import REPO, WorkerProcess, read_all, tiny_checkpoint, wait_for

from model.feedback_stats import auc_grid
from model.prediction_metrics import auc
from stream.broker import EmbeddedBroker
from stream.feedback import Feedback
from stream.metrics import scrape, total
from stream.producer import replay_events, synthetic_events
from stream.topics import TopicNames, ensure_topics

PARTITIONS = 2
TUMBLING_S = 60.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


def _offline(records: list[Feedback]) -> dict[str, float | int | None]:
    """Count and grid AUCs (live, twin) of ``records``, computed with
    ``model.prediction_metrics.auc`` on the probabilities rounded to the monitor's grid."""
    y = np.array([r.label for r in records])
    out: dict[str, float | int | None] = {"n": len(records)}
    for name, p in (("auc_dynamic", [r.p_dynamic for r in records]),
                    ("auc_static", [r.p_static for r in records])):
        value = auc(y, auc_grid(p))
        out[name] = None if math.isnan(value) else value
    return out


def _by_tumbling_window(records: list[Feedback]) -> dict[float, list[Feedback]]:
    windows: dict[float, list[Feedback]] = defaultdict(list)
    for r in records:
        windows[math.floor(r.ts / TUMBLING_S) * TUMBLING_S].append(r)
    return windows


def test_two_workers_feed_one_monitor_whose_windows_equal_the_offline_union(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Two workers (one consumer group, one partition each) publish a Feedback per joined
    label; the monitor's fleet-wide tumbling windows hold exactly the union of both workers'
    records: per window the same count and the same live and twin AUC as computed offline
    from the records read back from ``feedback``; both workers contributed."""
    bootstrap, prefix = broker.bootstrap_servers, "two-"
    topics = TopicNames.with_prefix(prefix)
    ensure_topics(bootstrap, PARTITIONS, topics=topics)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    monitor = MonitorProcess(bootstrap, tmp_path / "monitor", tmp_path / "monitor.log",
                             prefix=prefix, partitions=PARTITIONS)
    workers = [WorkerProcess(bootstrap, checkpoint, tmp_path / f"store{i}",
                             tmp_path / f"worker{i}.log", prefix=prefix,
                             partitions=PARTITIONS, group="monitor-two",
                             extra=("--no-train",)) for i in range(2)]
    try:
        for w in workers:
            wait_for(lambda w=w: bool(scrape(w.url, timeout_s=1.0)), 90, w, "the worker's API")
        time.sleep(8)  # both in the group, one partition each, before the replay
        replay_events(synthetic_events(300, seed=5), bootstrap, topics, negatives=3, seed=1)

        def joined() -> list[float]:
            return [total(scrape(w.url, timeout_s=2.0), "unirec_labels_joined_total")
                    for w in workers]

        wait_for(lambda: sum(joined()) >= 250, 120, workers[0], "labels joined")
        time.sleep(2)
        per_worker = joined()
        assert all(n > 0 for n in per_worker), f"a worker joined nothing: {per_worker}"
        records = [msgspec.json.decode(r.value, type=Feedback)
                   for r in read_all(bootstrap, topics.feedback)]
        assert len(records) == sum(per_worker)  # one feedback record per joined label
        wait_for(lambda: (monitor.get("/fleet/drift") or {}).get("records_consumed", 0)
                 >= len(records), 90, None, "the monitor to consume every record")
        report = monitor.get("/fleet/drift")
        assert report["records_rejected"] == 0
        seen = {row["start"]: row for row in report["tumbling"]["all"]}
        expected = _by_tumbling_window(records)
        assert set(seen) == set(expected)
        for start, rows in expected.items():
            offline = _offline(rows)
            assert seen[start]["n"] == offline["n"]
            for key in ("auc_dynamic", "auc_static"):
                if offline[key] is None:
                    assert seen[start][key] is None
                else:
                    assert seen[start][key] == pytest.approx(offline[key], abs=1e-12)
        versions = {r.model_version for r in records}
        assert [v["version"] for v in monitor.get("/fleet/versions")] == sorted(versions)
    finally:
        for w in workers:
            w.stop()
        monitor.stop()


@pytest.fixture(scope="module")
def monitor(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[MonitorProcess]:
    """One monitor on the ``direct-`` topics, which the tests below write to directly."""
    topics = TopicNames.with_prefix("direct-")
    ensure_topics(broker.bootstrap_servers, PARTITIONS, topics=topics)
    home = tmp_path_factory.mktemp("monitor")
    # a data directory relative to the monitor's working directory, as `make demo` passes one
    # (runs/demo/monitor): faust changes into its workdir, the monitor must resolve it first
    relative = Path(os.path.relpath(home / "data", REPO))
    running = MonitorProcess(broker.bootstrap_servers, relative, home / "monitor.log",
                             prefix="direct-", partitions=PARTITIONS)
    wait_for(lambda: running.get("/fleet/drift") is not None, 60, None, "the monitor's views")
    yield running
    assert running.stop() == 0, running.output()[-3000:]


def _send(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def test_a_version_switch_shows_up_per_version(broker: EmbeddedBroker,
                                               monitor: MonitorProcess) -> None:
    """v11's records then v12's (announced on model-updates in between): /fleet/versions lists
    both, v12 with its announcement time; each version's windows count exactly its own
    records, and the fleet's windows count both."""
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix("direct-")
    now = time.time()
    old = feedback_records(200, 11, now - 1200, 3.0, seed=1)
    new = feedback_records(150, 12, now - 600, 3.0, seed=2)
    _send(bootstrap, topics.feedback, [(r.user_id.encode(), r.encode()) for r in old])
    announced = now - 601
    _send(bootstrap, topics.model_updates, [(b"12", json.dumps(
        {"version": 12, "path": "/x/v12.pt", "steps": 10, "ts": announced}).encode())])
    _send(bootstrap, topics.feedback, [(r.user_id.encode(), r.encode()) for r in new])

    def versions() -> dict[int, dict]:
        return {v["version"]: v for v in monitor.get("/fleet/versions") or []}

    wait_for(lambda: versions().get(12, {}).get("feedback") == 150
             and versions().get(11, {}).get("feedback") == 200
             and "announced_at" in versions().get(12, {}), 60, None, "both versions")
    v = versions()
    assert v[12]["announced_at"] == pytest.approx(announced)
    assert v[11]["last_ts"] < v[12]["first_ts"]
    report = monitor.get("/fleet/drift")
    for scope, records in (("v11", old), ("v12", new)):
        counts = {row["start"]: row["n"] for row in report["tumbling"][scope]}
        assert counts == {s: len(rs) for s, rs in _by_tumbling_window(records).items()}
    fleet = {row["start"]: row["n"] for row in report["tumbling"]["all"]}
    union = _by_tumbling_window(old + new)
    assert all(fleet.get(s, 0) >= len(rs) for s, rs in union.items())


def test_malformed_feedback_becomes_dead_letters_and_the_monitor_goes_on(
    broker: EmbeddedBroker, monitor: MonitorProcess
) -> None:
    """Undecodable bytes, a record missing fields, a probability of 1.5 and a label of 2 each
    become a dead letter on ``dead-letters`` naming ``feedback`` and the reason; the valid
    records around them are all counted (v21), and the monitor keeps running."""
    bootstrap, topics = broker.bootstrap_servers, TopicNames.with_prefix("direct-")
    good = feedback_records(40, 21, time.time() - 120, 1.0, seed=3)
    bad = [b"\xff\x00not json", b'{"request_id": "x"}',
           msgspec.json.encode({**msgspec.structs.asdict(good[0]), "p_dynamic": 1.5}),
           msgspec.json.encode({**msgspec.structs.asdict(good[0]), "label": 2})]
    values = [(r.user_id.encode(), r.encode()) for r in good[:20]]
    values += [(b"u-bad", value) for value in bad]
    values += [(r.user_id.encode(), r.encode()) for r in good[20:]]
    _send(bootstrap, topics.feedback, values)

    def v21() -> int:
        return {v["version"]: v for v in monitor.get("/fleet/versions") or []
                }.get(21, {}).get("feedback", 0)

    wait_for(lambda: v21() == 40, 60, None, "the valid records")
    letters = [json.loads(r.value) for r in read_all(bootstrap, topics.dead_letters)]
    mine = [d for d in letters if d["topic"] == topics.feedback]
    assert len(mine) == len(bad)
    reasons = " | ".join(d["reason"] for d in mine)
    assert "not a feedback record" in reasons and "p_dynamic 1.5" in reasons
    assert "label 2" in reasons
    assert monitor.exited() is None
    assert monitor.get("/fleet/drift")["records_rejected"] >= len(bad)
