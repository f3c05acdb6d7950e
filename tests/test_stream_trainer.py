"""``unirec trainer``: training separated from serving. A trainer process consumes the stream
in a group of its own, fine-tunes and publishes versions to a versions directory it shares
with a worker that runs ``--no-train``; the worker hot-swaps them from ``model-updates``
(its version rises and its scores carry the new versions), and the trainer publishes no
scores of its own."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from stream_fixtures import WorkerProcess, http_get, read_all, tiny_checkpoint, wait_for

from stream.broker import EmbeddedBroker
from stream.producer import replay_events, synthetic_events
from stream.serving import Scores
from stream.topics import TopicNames, ensure_topics

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

N_EVENTS = 400
LATER = 40
PARTITIONS = 2


def scored(process: WorkerProcess) -> int:
    """Impressions the process scored, from its ``/metrics``."""
    _, body = http_get(process.url + "/metrics")
    return int(sum(float(line.split()[-1]) for line in body.decode().splitlines()
                   if line.startswith("unirec_scoring_duration_seconds_count")))


def version(process: WorkerProcess) -> int:
    status, body = http_get(process.url + "/healthz")
    return json.loads(body)["model_version"] if status == 200 else -1


def test_a_separate_trainer_publishes_versions_that_the_worker_serves(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    versions = tmp_path / "versions"
    topics = TopicNames.with_prefix("trainer-")
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, PARTITIONS, topics=topics)
        trainer = WorkerProcess(bootstrap, checkpoint, tmp_path / "trainer-store",
                                tmp_path / "trainer.log", prefix="trainer-",
                                partitions=PARTITIONS, command="trainer",
                                extra=("--versions-dir", str(versions), "--checkpoint-every",
                                       "3", "--train-batch-size", "16"))
        worker = None
        try:
            wait_for(lambda: version(trainer) >= 1, 60, trainer, "the trainer up")
            worker = WorkerProcess(bootstrap, checkpoint, tmp_path / "store",
                                   tmp_path / "worker.log", prefix="trainer-",
                                   partitions=PARTITIONS,
                                   extra=("--no-train", "--versions-dir", str(versions)))
            wait_for(lambda: version(worker) >= 1, 60, worker, "the worker up")
            start = version(worker)
            replay_events(synthetic_events(N_EVENTS, seed=3), bootstrap, topics, negatives=3,
                          seed=3)
            wait_for(lambda: version(worker) >= start + 2, 120, trainer,
                     "two versions from the trainer served by the worker")
            served = version(worker)
            replay_events(synthetic_events(LATER, seed=4), bootstrap, topics, negatives=3,
                          seed=4)
            wait_for(lambda: scored(worker) >= N_EVENTS + LATER, 60, worker, "later scores")
        finally:
            codes = [p.stop() for p in (trainer, worker) if p is not None]
        assert codes == [0, 0]

        scores = [msgspec.json.decode(r.value, type=Scores)
                  for r in read_all(bootstrap, topics.scores)]
    # The worker's, once per impression; none from the trainer.
    assert len(scores) == N_EVENTS + LATER
    later = {f"req-syn4-{i}" for i in range(LATER)}
    assert min(s.model_version for s in scores if s.request_id in later) >= served > start
    assert "published model version" in trainer.output()
    assert "published model version" not in worker.output()
