"""Online learning speed: training examples/s and the delay from a label's arrival to a model
version that learned from it serving.

In one process, no broker (the broker's share is measured by ``bench/ingest.py``): synthetic
impressions (the played item and ``--negatives`` sampled ones) are scored by the worker's
``ImpressionScorer`` (live model and static twin) and their labels joined through the
``FeedbackWindow`` into the ``LabelBuffer``, at ``--rate`` labels/s. The ``OnlineLearner``
runs on its own thread as in the worker (student included unless ``--no-student``) and
publishes a version every ``--checkpoint-every`` steps; the feeding loop plays the consumer
loop and swaps announced versions in (``HotSwap``) between its batches.

- ``examples_per_s``: joined examples the live model trained on per second of the learner's
  wall time, with a backlog (all labels offered before it starts). The student takes one step
  per round after the live model's (``stream.learner``); ``student`` says how far it got.
- ``label_to_live_s``: for each label of the rate-limited run, the seconds from its ``offer``
  to the swap of the first version published after the learner had trained on it (p50, p95,
  max). A label is trained on once the learner has taken it and it left the fresh queue.

    python bench/train.py [--labels N] [--rate R] [--checkpoint-every K] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventlog.schema import Impression, Label
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import FeatureSpec
from model.online import OnlineConfig
from model.scorer import Scorer
from model.versions import VersionStore
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.drift_tracker import DriftTracker
from stream.handlers import WorkerServices
from stream.learner import LearnerConfig, OnlineLearner
from stream.metrics import WorkerMetrics
from stream.model_updates import HotSwap, ModelUpdate
from stream.producer import CandidateSampler, synthetic_events
from stream.publisher import DiscardingPublisher
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer
from stream.topics import TopicNames

CPU = torch.device("cpu")


def labelled_impressions(n_events: int, negatives: int, seed: int
                         ) -> tuple[FeatureSpec, list[tuple[Impression, list[int]]]]:
    """Impressions of the played item among ``negatives`` others, with their labels."""
    events = [e for e, _ in synthetic_events(n_events, seed=seed)]
    sampler = CandidateSampler(negatives, random.Random(seed))
    out = []
    for k, event in enumerate(events):
        candidates = sampler.candidates(event)
        sampler.observe(event)
        impression = Impression(f"r{k}", event.user_id, event.ts, candidates, {})
        out.append((impression, [int(c.item_id == event.item_id) for c in candidates]))
    return FeatureSpec.fit(events), out


class Pipeline:
    """Scoring, joining, the learner thread and hot swap, as in the worker."""

    def __init__(self, tmp: Path, spec: FeatureSpec, cfg: ModelConfig,
                 learner_cfg: LearnerConfig) -> None:
        torch.manual_seed(0)
        model = UniRecModel(cfg, spec).eval()
        store = StateStore.open(tmp / "store", StoreConfig(state_dim=cfg.d_model,
                                                           history_len=cfg.history_len))
        metrics = WorkerMetrics()
        window = FeedbackWindow(1e12, 1_000_000)
        self.labels = LabelBuffer(window, 1_000_000)
        drift = DriftTracker(metrics)
        scorer = ImpressionScorer(store, Scorer(model, CPU), 0,
                                  static=Scorer(UniRecModel(cfg, spec).eval(), CPU))
        self.services = WorkerServices(
            store=store, applier=InteractionApplier.following(store, scorer.serving_model),
            scorer=scorer,
            labels=self.labels, publisher=DiscardingPublisher(), topics=TopicNames(),
            metrics=metrics, drift=drift)
        versions = VersionStore(tmp / "versions", keep=3)
        self.announced: list[tuple[ModelUpdate, int]] = []  # (update, labels trained so far)
        self._offered = 0  # announcements already offered to the hot swap
        self._lock = threading.Lock()
        self.learner = OnlineLearner(model, self.labels, versions, self._announce, metrics,
                                     learner_cfg, drift)
        self.hot_swap = HotSwap(self.services, versions, CPU)
        self.live: dict[int, float] = {}  # version -> when it started serving

    def _announce(self, update: ModelUpdate) -> None:
        trained = self.learner.examples - self.learner.trainer.pending
        with self._lock:
            self.announced.append((update, trained))

    def offer(self, batch: list[tuple[Impression, list[int]]]) -> list[float]:
        """Score ``batch``, offer its labels; returns each label's offer time."""
        scored = self.services.scorer.score_many([i for i, _ in batch])
        times = []
        for item, (impression, labels) in zip(scored, batch, strict=True):
            self.services.labels.window.add(item, impression.ts)
            for candidate, y in zip(impression.candidates, labels, strict=True):
                joined = self.labels.offer(Label(impression.request_id, impression.user_id,
                                                 candidate.item_id, y, impression.ts),
                                           impression.ts)
                if joined is not None:
                    times.append(time.perf_counter())
        return times

    def swap(self) -> None:
        with self._lock:  # each announcement offered once, as the worker's listener does
            updates = [u for u, _ in self.announced[self._offered:]]
            self._offered = len(self.announced)
        version = self.hot_swap.offer(updates)
        if version is not None:
            self.live.setdefault(version, time.perf_counter())


def throughput(pipeline: Pipeline, data: list, batch: int) -> dict:
    for begin in range(0, len(data), batch):
        pipeline.offer(data[begin : begin + batch])
    offered = len(pipeline.labels)
    start = time.perf_counter()
    while pipeline.learner.round():
        pass
    seconds = time.perf_counter() - start
    trainer = pipeline.learner.trainer
    return {"examples": offered, "seconds": round(seconds, 3), "steps": trainer.steps,
            "examples_per_s": round(offered / seconds, 1), "student": student(pipeline)}


def student(pipeline: Pipeline) -> dict | None:
    """The student's steps, and its examples waiting and dropped."""
    if pipeline.learner.student is None:
        return None
    trainer = pipeline.learner.student.trainer
    return {"steps": trainer.steps, "pending": trainer.pending, "dropped": trainer.dropped}


def delay(pipeline: Pipeline, data: list, batch: int, rate: float) -> dict:
    stop = threading.Event()
    thread = pipeline.learner.start(stop)
    offered: list[float] = []
    start = time.perf_counter()
    for begin in range(0, len(data), batch):
        offered += pipeline.offer(data[begin : begin + batch])
        pipeline.swap()
        wait = start + len(offered) / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and (
        not pipeline.announced or pipeline.announced[-1][1] < len(offered) * 0.9
    ):
        pipeline.swap()
        time.sleep(0.01)
    pipeline.swap()
    stop.set()
    thread.join()
    delays = []
    for i, t in enumerate(offered, start=1):
        live = [pipeline.live[u.version] for u, trained in pipeline.announced
                if trained >= i and u.version in pipeline.live]
        if live:
            delays.append(min(live) - t)
    d = np.asarray(delays)
    return {"labels": len(offered), "rate": rate, "versions": len(pipeline.live),
            "labels_measured": len(delays), "student": student(pipeline),
            "label_to_live_s": {"p50": round(float(np.percentile(d, 50)), 3),
                                "p95": round(float(np.percentile(d, 95)), 3),
                                "max": round(float(d.max()), 3)} if len(d) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=4000, help="about this many labels")
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="labels/s of the delay run")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=OnlineConfig().batch_size)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--no-student", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    spec, data = labelled_impressions(args.labels // (args.negatives + 1), args.negatives, 0)
    cfg = ModelConfig(d_model=args.d_model, n_heads=2, history_len=8, core_k=4, dropout=0.0)
    learner_cfg = LearnerConfig(
        online=OnlineConfig(batch_size=args.batch_size, checkpoint_every=args.checkpoint_every),
        student=not args.no_student)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "config": {**vars(args), "device": "cpu"},
            "throughput": throughput(Pipeline(Path(tmp) / "a", spec, cfg, learner_cfg), data,
                                     64),
            "delay": delay(Pipeline(Path(tmp) / "b", spec, cfg, learner_cfg), data, 16,
                           args.rate),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
