"""Model versions across processes (embedded broker, worker and trainer subprocesses): a
second trainer on a versions directory is refused at start with a clear error while the first
keeps publishing, a worker that would train there serves without training (counted), and a
worker restarted with an incompatible newest version starts from the newest compatible one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from stream_fixtures import TINY, WorkerProcess, http_get, tiny_checkpoint, wait_for

from model.backbone import UniRecModel
from model.checkpoint import load
from model.versions import VersionStore
from stream.broker import EmbeddedBroker
from stream.producer import replay_events, synthetic_events
from stream.topics import TopicNames, ensure_topics

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

PARTITIONS = 2


def version(process: WorkerProcess) -> int:
    status, body = http_get(process.url + "/healthz")
    return json.loads(body)["model_version"] if status == 200 else -1


def metric(process: WorkerProcess, name: str, **labels: str) -> float | None:
    """The value of one sample of ``name`` with exactly ``labels`` in ``/metrics``."""
    _, body = http_get(process.url + "/metrics")
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                   if labels else "")
    for line in body.decode().splitlines():
        if line.rsplit(" ", 1)[0] == want:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_second_trainer_on_the_versions_dir_is_refused_and_the_first_keeps_publishing(
        tmp_path: Path) -> None:
    """A second ``unirec trainer`` on the first one's versions directory exits with status 2
    naming the lock, having written nothing there; a worker that would train there serves
    without training (counted); the first trainer keeps publishing and the worker serves its
    versions."""
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    versions = tmp_path / "versions"
    topics = TopicNames.with_prefix("claim-")
    learning = ("--versions-dir", str(versions), "--checkpoint-every", "3",
                "--train-batch-size", "16")
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, PARTITIONS, topics=topics)
        first = WorkerProcess(bootstrap, checkpoint, tmp_path / "first-store",
                              tmp_path / "first.log", prefix="claim-", partitions=PARTITIONS,
                              command="trainer", extra=learning)
        others: list[WorkerProcess] = []
        try:
            wait_for(lambda: version(first) >= 1, 60, first, "the first trainer up")
            published = VersionStore(versions).versions()
            second = WorkerProcess(bootstrap, checkpoint, tmp_path / "second-store",
                                   tmp_path / "second.log", prefix="claim-",
                                   partitions=PARTITIONS, command="trainer", extra=learning)
            others.append(second)
            assert second.wait(60) == 2
            assert "another trainer" in second.output() and "trainer.lock" in second.output()
            assert VersionStore(versions).versions() == published  # it wrote nothing there
            serving = WorkerProcess(bootstrap, checkpoint, tmp_path / "worker-store",
                                    tmp_path / "worker.log", prefix="claim-",
                                    partitions=PARTITIONS, extra=learning)
            others.append(serving)
            wait_for(lambda: version(serving) >= 1, 60, serving, "the training worker up")
            assert metric(serving, "unirec_trainer_refused_total",
                          reason="versions_dir_locked") == 1
            start = version(first)
            replay_events(synthetic_events(300, seed=5), bootstrap, topics, negatives=3, seed=5)
            wait_for(lambda: version(first) >= start + 2, 120, first,
                     "two more versions from the first trainer")
            wait_for(lambda: version(serving) >= start + 2, 60, serving,
                     "the first trainer's versions served by the worker")
        finally:
            codes = [p.stop() for p in (first, *others)]
        assert codes[0] == 0 and codes[2:] == [0]
    assert "published model version" in first.output()
    assert "published model version" not in serving.output()
    assert "serving without online learning" in serving.output()


def test_a_worker_restarted_with_an_incompatible_newest_version_starts_from_a_compatible_one(
        tmp_path: Path) -> None:
    """The versions directory's newest file is a readable model of another d_model: the
    worker starts from the newest compatible version, counts the refusal and serves."""
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    store = VersionStore(tmp_path / "versions")
    deployed, _ = load(checkpoint)
    assert store.publish(deployed) == 1 and store.publish(deployed) == 2
    torch.manual_seed(1)
    wide = UniRecModel(replace(TINY, d_model=32), deployed.spec)
    assert store.publish(wide.eval()) == 3
    topics = TopicNames.with_prefix("restart-")
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, PARTITIONS, topics=topics)
        worker = WorkerProcess(bootstrap, checkpoint, tmp_path / "store", tmp_path / "w.log",
                               prefix="restart-", partitions=PARTITIONS,
                               extra=("--no-train", "--versions-dir", str(store.directory)))
        try:
            wait_for(lambda: version(worker) >= 0, 60, worker, "the worker up")
            assert version(worker) == 2
            assert metric(worker, "unirec_model_versions_refused_total",
                          reason="state_width") == 1
            replay_events(synthetic_events(20, seed=6), bootstrap, topics, negatives=3, seed=6)
            wait_for(lambda: (metric(worker, "unirec_events_applied_total",
                                     topic=topics.interactions) or 0) >= 1, 60, worker,
                     "events applied")
        finally:
            code = worker.stop()
        assert code == 0
    assert "refusing model version 3 at start (state_width)" in worker.output()
