"""``unirec demo``: the whole loop on one machine, no Docker (docs/system.md, "Deployment").

1. An embedded Tansu broker on a free loopback port, and a producer that starts at once with
   the training period, sent as interactions only (the users' histories and GRU states, as a
   live system would have them).
2. A model: the checkpoint in the run directory, or one trained now (``train``, on the
   time-ordered first 80% of MovieLens-100K) while that history streams into the broker.
3. ``unirec worker`` as a subprocess (a fresh state store under ``<run dir>/demo``, the HTTP
   API on ``web_port``), which consumes the history from the start; once it has applied all of
   it, the producer replays the held-out period (or its first ``events``) as impression,
   interaction and label per event, at ``rate``.
4. Live progress on stderr every second, from the worker's ``/metrics`` and the fleet monitor's
   ``/fleet/drift`` (``unirec monitor`` as a subprocess beside the worker, a fresh app id: its
   page's URL is printed).
5. Once every message is consumed: the worker's scores are read back from ``scores`` and
   joined with the labels sent, giving the online AUC / GAUC of the streamed scores (each
   computed before its interaction was applied); the worker is stopped and the summary
   returned (``DemoSummary.as_dict``).
6. With learning off (``learning=False``: the worker runs ``--no-train``, so the checkpoint
   scores every event), the same checkpoint is also evaluated offline on the same events, as
   ``unirec eval`` does (``evaluation.quickstart.evaluate_on_log``): the state as served makes
   the two agree (docs/model.md, "The user state"), and the summary shows both.

Ctrl-C (or ``stop``) stops the producer, the worker and the broker, and returns the summary
of what was done, marked ``interrupted``. No process outlives the demo: the worker is
terminated (then killed) and the broker dies with its parent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from kafka import TopicPartition

from eventlog.loaders import DATASETS
from eventlog.log import EventLog, time_split
from eventlog.schema import Interaction
from model.prediction_metrics import auc, gauc, report
from stream.broker import EmbeddedBroker, free_port
from stream.kafka_client import kafka_consumer
from stream.metrics import histogram_quantile, scrape, total
from stream.producer import open_producer, replay_events, send_interactions
from stream.serving import Scores
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    """The demo cannot run or went wrong; the message says why (one line)."""


@dataclass(frozen=True)
class DemoConfig:
    """What one demo run does."""

    run_dir: Path  # checkpoints; the demo's store and logs go under run_dir / "demo"
    checkpoint: Path
    data_dir: Path | None = None
    events: int | None = None  # held-out events to replay scored (None: all of them)
    rate: float | None = None  # interactions/s of the scored replay (None: as fast as possible)
    partitions: int = 4
    negatives: int = 9
    web_port: int = 0  # 0: a free port
    device: str = "cpu"
    batch_size: int = 512
    timeout_s: float = 600.0  # for the worker to consume everything after the producer ends
    progress_every_s: float = 1.0
    learning: bool = True  # False: the worker runs --no-train; the offline figures are added


@dataclass
class DemoSummary:
    """What the demo did and measured."""

    dataset: str
    checkpoint: str
    device: str = "cpu"  # where the model trained (when it did) and the worker scored
    api: str = ""
    history_interactions: int = 0
    scored_events: int = 0
    interactions_applied: int = 0
    impressions_scored: int = 0
    labels_joined: int = 0
    dead_letters: int = 0
    users: int = 0
    monitor: str = ""  # the fleet monitor's page (while it ran)
    fleet: dict[str, Any] = field(default_factory=dict)  # its figures at the end
    replay_s: float = 0.0  # from the replay's start until the worker consumed everything
    feedback_per_s: float | None = None  # the worker's join rate while labels were joined
    model_version: int | None = None
    train_steps: int = 0
    online: dict[str, Any] = field(default_factory=dict)
    learning: bool = True
    offline: dict[str, Any] = field(default_factory=dict)  # unirec eval on the same events
    drift: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        online = self.online
        lines = [
            f"unirec demo on {self.dataset} ({self.device}): {self.seconds:.1f} s"
            + ("  (interrupted)" if self.interrupted else ""),
            f"  interactions applied   {self.interactions_applied:,} "
            f"({self.history_interactions:,} history + {self.scored_events:,} replayed)",
            f"  impressions scored     {self.impressions_scored:,}"
            f"   labels joined {self.labels_joined:,}   dead letters {self.dead_letters:,}",
            f"  users                  {self.users:,}   model version {self.model_version}"
            f"   train steps {self.train_steps:,}"
            + ("" if self.learning else "   (learning off: --no-train)"),
        ]
        if online.get("auc") is not None:
            lines.append(f"  online AUC             {online['auc']:.4f}   GAUC "
                         f"{online['gauc']:.4f}   on {online['n']:,} labelled impressions")
        if self.offline.get("auc") is not None:
            off = self.offline
            lines.append(f"  offline AUC            {off['auc']:.4f}   GAUC {off['gauc']:.4f}"
                         f"   (unirec eval, same checkpoint and events: {off['n']:,})")
            if online.get("auc") is not None:
                lines.append(f"  streamed - offline     AUC {online['auc'] - off['auc']:+.4f}   "
                             f"GAUC {online['gauc'] - off['gauc']:+.4f}   scores differing "
                             f"{off['events_differing']:,} (largest difference "
                             f"{_fmt_small(off['max_score_difference'])})")
        if online.get("static_auc") is not None:
            lines.append(f"  static twin AUC        {online['static_auc']:.4f}   (frozen model, "
                         f"no user state)")
        for window, distance in sorted(self.drift.get("surrogate_distance", {}).items()):
            lines.append(f"  surrogate distance     {distance:.4f}   (last {window} predictions)")
        fleet = self.fleet
        if fleet.get("n"):
            lines.append(f"  fleet monitor          {fleet['n']:,} feedback records in the last "
                         f"window: AUC live {_fmt(fleet.get('auc_dynamic'))} / twin "
                         f"{_fmt(fleet.get('auc_static'))}, surrogate distance "
                         f"{_fmt(fleet.get('distance'))}, versions {fleet.get('versions')}")
        for name, q in self.latency_ms.items():
            lines.append(f"  {name:<22} p50 {q['p50']:.1f} ms   p99 {q['p99']:.1f} ms")
        lines.append(f"  HTTP API (while it ran) {self.api}")
        if self.monitor:
            lines.append(f"  fleet monitor page (while it ran) {self.monitor}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the run


class Demo:
    """One run of the demo (see the module docstring); ``run()`` returns the summary."""

    def __init__(self, config: DemoConfig, event_log: EventLog,
                 out: IO[str] = sys.stderr, stop: threading.Event | None = None,
                 train: Callable[[threading.Event], bool] | None = None) -> None:
        self.config = config
        self.train = train  # writes config.checkpoint; False: stopped before it finished
        self.log = event_log
        self.out = out
        self.stop = stop if stop is not None else threading.Event()
        self.topics = TopicNames()
        # The worker and the monitor run in the repository root: every path they get is
        # absolute, or the caller's working directory would be read as the repository's.
        self.home = (config.run_dir / "demo").resolve()
        split = time_split(event_log, 0.8)
        end = len(event_log) if config.events is None else min(len(event_log),
                                                               split + config.events)
        self.history = event_log.interactions[:split]
        self.replayed = list(zip(event_log.interactions[split:end],
                                 event_log.labels[split:end].tolist(), strict=True))
        self.summary = DemoSummary(event_log.name, str(config.checkpoint), config.device,
                                   history_interactions=len(self.history),
                                   scored_events=len(self.replayed), learning=config.learning)
        self.streamed = np.full(len(self.replayed), np.nan)  # the real item's score, by event
        self.produced = threading.Event()
        self.serving = threading.Event()  # set once the worker serves (or the demo stops)
        self.producer_error: BaseException | None = None

    def run(self) -> DemoSummary:
        started = time.perf_counter()
        if self.home.exists():
            shutil.rmtree(self.home)
        self.home.mkdir(parents=True)
        with EmbeddedBroker(log_dir=self.home) as broker:
            bootstrap = broker.bootstrap_servers
            ensure_topics(bootstrap, self.config.partitions, topics=self.topics)
            producer = threading.Thread(target=self._produce, args=(bootstrap,),
                                        name="demo-producer", daemon=True)
            producer.start()
            self._say(f"streaming the history ({len(self.history):,} interactions) into the "
                      f"broker at {bootstrap}")
            if self.train is None or self.train(self.stop):
                try:
                    self._serve(bootstrap, producer)
                except BaseException:
                    self.stop.set()  # the producer ends its sends while the broker is up
                    producer.join(timeout=30)
                    raise
            else:  # interrupted while training: no model, nothing to serve
                self.stop.set()
                self.serving.set()
                producer.join(timeout=30)
        self.summary.interrupted = self.stop.is_set()
        self.summary.seconds = round(time.perf_counter() - started, 1)
        return self.summary

    def _serve(self, bootstrap: str, producer: threading.Thread) -> None:
        """Run the worker and the fleet monitor beside the broker, replay the held-out events
        once the history is applied, and fill in the summary; both are stopped at the end."""
        port = self.config.web_port or free_port()
        self.summary.api = f"http://127.0.0.1:{port}"
        worker = self._start_worker(bootstrap, port)
        monitor = self._start_monitor(bootstrap)
        try:
            self._wait_ready(worker)
            self._say(f"HTTP API on {self.summary.api} (try /users/1/state, /metrics)")
            self._say(f"fleet monitor on {self.summary.monitor} (the page; JSON at "
                      f"/fleet/drift, /fleet/versions)")
            self._wait_history(worker)
            replay_started = time.perf_counter()
            self.serving.set()
            self._follow(worker)
            self.summary.replay_s = round(time.perf_counter() - replay_started, 2)
            producer.join(timeout=30)
            # Once stopped, a failed send is not reported: the stop is what was asked for.
            if self.producer_error is not None and not self.stop.is_set():
                raise DemoError(f"the producer failed: {self.producer_error}")
            self._finish(self._metrics())
            if not self.stop.is_set():
                self.summary.online = self._online_auc(bootstrap)
                self._wait_fleet()
            if not self.stop.is_set() and not self.config.learning:
                self.summary.offline = self._offline_auc()
        finally:
            self.serving.set()  # the producer must not wait for a worker that is gone
            _stop(worker, self.worker_log, timeout_s=60)
            _stop(monitor, self.monitor_log, timeout_s=30)

    # -------------------------------------------------------------------------- parts

    def _start_worker(self, bootstrap: str, port: int) -> subprocess.Popen:
        c = self.config
        argv = [
            sys.executable, "-m", "app.cli", "worker", "--bootstrap-servers", bootstrap,
            "--checkpoint", str(c.checkpoint.resolve()), "--store", str(self.home / "state"),
            "--partitions", str(c.partitions), "--web-port", str(port),
            "--batch-size", str(c.batch_size), "--device", c.device,
            "--group-id", "unirec-demo",
            # The replay runs months of log time in minutes: wait for labels by count
            # (the window's size bound), not by an hour of event time.
            "--feedback-window", str(365 * 86400.0),
        ]
        if not c.learning:
            argv.append("--no-train")
        if self.log.profiles and self.log.name in DATASETS:
            argv += ["--profiles", self.log.name]
        if c.data_dir is not None:
            argv += ["--data-dir", str(c.data_dir.resolve())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.worker_log = (self.home / "worker.log").open("ab")
        # Its own process group: a Ctrl-C in the terminal reaches the demo only, which stops
        # the worker in order (SIGTERM, then the wait) instead of racing it.
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.worker_log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    # --- the fleet monitor (issue #14) ---------------------------------------------------

    def _start_monitor(self, bootstrap: str) -> subprocess.Popen:
        """``unirec monitor`` with a fresh app id (no changelog recovery on the embedded
        broker) and short group timeouts, on a free port."""
        port = free_port()
        self.summary.monitor = f"http://127.0.0.1:{port}/"
        argv = [sys.executable, "-m", "app.cli", "monitor", "--bootstrap-servers", bootstrap,
                "--web-port", str(port), "--fresh", "--short-timeouts",
                "--partitions", str(self.config.partitions),
                "--data-dir", str(self.home / "monitor")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.monitor_log = (self.home / "monitor.log").open("ab")
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.monitor_log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _fleet(self) -> dict[str, Any]:
        """The monitor's current fleet window (``{}`` while it has none or is unreachable)."""
        try:
            with urllib.request.urlopen(self.summary.monitor + "fleet/drift",
                                        timeout=2.0) as reply:
                report = json.loads(reply.read())
        except (OSError, ValueError):
            return {}
        current = report.get("current", {})
        fleet = dict(current.get("all", {}))
        if fleet:
            fleet["versions"] = sorted(int(s[1:]) for s in current if s != "all")
            fleet["consumed"] = report.get("records_consumed", 0)
        return fleet

    def _wait_fleet(self, timeout_s: float = 30.0) -> None:
        """Keep the monitor's figures once it has consumed every joined label (or timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            fleet = self._fleet()
            if fleet and fleet["consumed"] >= self.summary.labels_joined:
                break
            time.sleep(0.5)
        fleet = self._fleet()
        self.summary.fleet = {k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in fleet.items()}

    def _wait_ready(self, worker: subprocess.Popen, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            self._check_alive(worker)
            if scrape(self.summary.api, timeout_s=1.0):
                return
            time.sleep(0.2)
        if not self.stop.is_set():
            raise DemoError(f"the worker did not serve {self.summary.api} within {timeout_s} s "
                            f"(see {self.home / 'worker.log'})")

    def _produce(self, bootstrap: str) -> None:
        try:
            producer = open_producer(bootstrap)
            try:
                send_interactions(self.history, producer, self.topics, stop=self.stop)
                self.serving.wait()  # the scored replay waits for the worker to serve
                replay_events(self._until_stopped(self.replayed), bootstrap, self.topics,
                              rate=self.config.rate, negatives=self.config.negatives,
                              producer=producer, seen=self.history)
            finally:
                producer.close()
        except BaseException as exc:  # reported by run(); the thread must not die silently
            self.producer_error = exc
        finally:
            self.produced.set()

    def _until_stopped(self, pairs: list[tuple[Interaction, int]]
                       ) -> Iterator[tuple[Interaction, int]]:
        for pair in pairs:
            if self.stop.is_set():
                return
            yield pair

    def _wait_history(self, worker: subprocess.Popen) -> None:
        """Until the worker has applied the whole history (streamed while the model trained):
        the scored replay then starts against the users' states, as the offline evaluation
        has them, instead of racing a backlog through the worker's event-time gate."""
        deadline = time.monotonic() + self.config.timeout_s
        while not self.stop.is_set():
            self._check_alive(worker)
            done = self._interactions_done(self._metrics())
            if done >= len(self.history):
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the worker applied {done:,.0f} of the {len(self.history):,} "
                                f"history interactions in {self.config.timeout_s:.0f} s")
            time.sleep(0.2)

    def _metrics(self) -> dict:
        return scrape(self.summary.api)

    def _follow(self, worker: subprocess.Popen) -> None:
        """Print progress until everything sent is consumed (or stop, or a timeout)."""
        want = len(self.history) + len(self.replayed)
        last_applied, last_time = 0.0, time.monotonic()
        joins: list[tuple[float, float]] = []  # (time, labels joined) whenever it grew
        deadline: float | None = None
        while not self.stop.wait(self.config.progress_every_s):
            self._check_alive(worker)
            samples = self._metrics()
            applied = total(samples, "unirec_events_applied_total")
            now = time.monotonic()
            joined = total(samples, "unirec_labels_joined_total")
            if joined > (joins[-1][1] if joins else 0.0):
                joins.append((now, joined))
                self._note_feedback_rate(joins)
            rate = (applied - last_applied) / max(now - last_time, 1e-9)
            last_applied, last_time = applied, now
            p99 = histogram_quantile(0.99, samples, "unirec_scoring_duration_seconds")
            version = samples.get("unirec_model_version")
            aucs = {lab.get("model"): v for lab, v in samples.get("unirec_online_auc", ())}
            distance = max((v for _, v in samples.get("unirec_surrogate_distance", ())),
                           default=None)
            self._say(
                f"applied {applied:>9,.0f}/{want:,} ({rate:>6,.0f}/s)  "
                f"lag {total(samples, 'unirec_consumer_lag_messages'):>7,.0f}  "
                f"users {total(samples, 'unirec_users'):>5,.0f}  "
                f"scored {total(samples, 'unirec_scoring_duration_seconds_count'):>7,.0f}  "
                f"joined {total(samples, 'unirec_labels_joined_total'):>7,.0f}  "
                f"p99 scoring {'-' if p99 is None else f'{p99 * 1000:.0f} ms'}  "
                f"v{int(version[0][1]) if version else '?'} "
                f"steps {total(samples, 'unirec_train_steps_total'):,.0f}  "
                f"AUC {_fmt(aucs.get('dynamic'))}/{_fmt(aucs.get('static'))}  "
                f"D {_fmt(distance)}  {self._fleet_line()}"
            )
            if not self.produced.is_set():
                continue
            if self.producer_error is not None or self._consumed_all(samples):
                return
            deadline = deadline or now + self.config.timeout_s
            if now > deadline:
                raise DemoError(f"the worker did not consume everything within "
                                f"{self.config.timeout_s} s (see {self.home / 'worker.log'})")

    def _note_feedback_rate(self, joins: list[tuple[float, float]]) -> None:
        """The worker's feedback rate: labels joined (one ``feedback`` record each) per second
        between the first sample that saw joins and the last that saw more."""
        if len(joins) >= 2:
            (t0, n0), (t1, n1) = joins[0], joins[-1]
            self.summary.feedback_per_s = round((n1 - n0) / max(t1 - t0, 1e-9), 1)

    def _fleet_line(self) -> str:
        fleet = self._fleet()
        if not fleet:
            return "fleet -"
        return (f"fleet {fleet['n']:,} AUC {_fmt(fleet.get('auc_dynamic'))}/"
                f"{_fmt(fleet.get('auc_static'))} D {_fmt(fleet.get('distance'))}")

    def _interactions_done(self, samples: dict) -> float:
        """Interactions the worker has applied or rejected (dead-lettered)."""
        t = self.topics
        return (total(samples, "unirec_events_applied_total", topic=t.interactions)
                + total(samples, "unirec_events_rejected_total", topic=t.interactions))

    def _consumed_all(self, samples: dict) -> bool:
        t = self.topics
        n = len(self.replayed)
        return (self._interactions_done(samples) >= len(self.history) + n
                and total(samples, "unirec_events_consumed_total", topic=t.impressions) >= n
                and total(samples, "unirec_events_consumed_total", topic=t.labels) >= n)

    def _finish(self, samples: dict) -> None:
        s, t = self.summary, self.topics
        s.interactions_applied = int(total(samples, "unirec_events_applied_total",
                                           topic=t.interactions))
        s.impressions_scored = int(total(samples, "unirec_scoring_duration_seconds_count"))
        s.labels_joined = int(total(samples, "unirec_labels_joined_total"))
        s.dead_letters = int(total(samples, "unirec_dead_letters_total"))
        s.users = int(total(samples, "unirec_users"))
        version = samples.get("unirec_model_version")
        s.model_version = int(version[0][1]) if version else None
        s.train_steps = int(total(samples, "unirec_train_steps_total"))
        s.drift = {
            "surrogate_distance": {lab["window"]: round(v, 5) for lab, v
                                   in samples.get("unirec_surrogate_distance", ())},
            "worker_online_auc": {lab["model"]: round(v, 4) for lab, v
                                  in samples.get("unirec_online_auc", ())},
        }
        for name, metric in (("scoring", "unirec_scoring_duration_seconds"),
                             ("apply batch", "unirec_apply_batch_duration_seconds")):
            p50 = histogram_quantile(0.5, samples, metric)
            p99 = histogram_quantile(0.99, samples, metric)
            if p50 is not None and p99 is not None:
                s.latency_ms[name] = {"p50": round(p50 * 1000, 2), "p99": round(p99 * 1000, 2)}

    def _online_auc(self, bootstrap: str) -> dict[str, Any]:
        """AUC/GAUC of the real item's streamed score against its label."""
        wanted = {f"req-{e.event_id}": (k, e.user_id, e.item_id, y)
                  for k, (e, y) in enumerate(self.replayed)}
        users, labels, scores, static = [], [], [], []
        for message in _read_all(bootstrap, self.topics.scores, len(wanted)):
            request = wanted.pop(message.request_id, None)
            if request is None:
                continue
            k, user, item, label = request
            scored = next((i for i in message.items if i.item_id == item), None)
            if scored is not None:
                self.streamed[k] = scored.score
                users.append(user)
                labels.append(label)
                scores.append(scored.score)
                static.append(scored.static_score)
        result: dict[str, Any] = {"auc": None, "gauc": None, "n": len(scores),
                                  "missing": len(wanted)}
        if not scores or len(set(labels)) < 2:
            return result
        y, u = np.asarray(labels), np.asarray(users, dtype=object)
        result["auc"] = round(float(auc(y, np.asarray(scores))), 4)
        result["gauc"] = round(float(gauc(u, y, np.asarray(scores))), 4)
        if all(v is not None for v in static):
            result["static_auc"] = round(float(auc(y, np.asarray(static))), 4)
        return result


    def _offline_auc(self) -> dict[str, Any]:
        """``unirec eval``'s metrics of the checkpoint on the replayed events; the largest
        difference between an event's offline probability and its streamed score, and how many
        events differ by more than the scorer's tolerance on the device
        (``model.scorer.score_tolerance``: fp32 on the CPU, bf16 on CUDA). None should: each
        would be an impression scored with another state or history than its user's, e.g. one
        the worker's event-time gate let through too early (``stream.gate``)."""
        import torch

        from evaluation.quickstart import predict_on_log
        from model.baselines import MODEL_KINDS
        from model.checkpoint import load
        from model.scorer import score_tolerance

        device = torch.device(self.config.device)
        model, meta = load(self.config.checkpoint, device, kind=None, kinds=MODEL_KINDS)
        examples, offline = predict_on_log(model, self.log, device,
                                           meta.get("train_fraction", 0.8), len(self.replayed))
        metrics = report(examples.user_ids, examples.labels, offline)
        scored = ~np.isnan(self.streamed)
        difference = np.abs(offline - self.streamed)[scored]
        tolerance = score_tolerance(device)
        return {"auc": round(float(metrics["auc"]), 4), "gauc": round(float(metrics["gauc"]), 4),
                "logloss": round(float(metrics["logloss"]), 4), "n": int(metrics["n"]),
                "max_score_difference": float(difference.max()) if scored.any() else None,
                "tolerance": tolerance, "events_differing": int((difference > tolerance).sum())}

    def _check_alive(self, worker: subprocess.Popen) -> None:
        if worker.poll() is not None:
            tail = (self.home / "worker.log").read_text(errors="replace").strip()
            last = tail.splitlines()[-1] if tail else ""
            raise DemoError(f"the worker exited with status {worker.returncode}: {last} "
                            f"(see {self.home / 'worker.log'})")

    def _say(self, line: str) -> None:
        elapsed = time.strftime("%H:%M:%S")
        print(f"[{elapsed}] {line}", file=self.out, flush=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_small(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 60.0) -> Iterator[Scores]:
    """Up to ``n`` ``Scores`` of ``topic``, from its start."""
    import msgspec

    consumer = kafka_consumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_poll_records=5000)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        seen, deadline = 0, time.monotonic() + timeout_s
        while seen < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    seen += 1
                    yield msgspec.json.decode(r.value, type=Scores)
    finally:
        consumer.close()


def run_demo(config: DemoConfig, event_log: EventLog, as_json: bool,
             train: Callable[[threading.Event], bool] | None = None) -> int:
    """Run the demo with Ctrl-C handled (exit status 130 when interrupted); prints the
    summary on stdout, as text or JSON. ``train(stop)``: trains and saves the checkpoint while
    the history streams (None: it exists); returns False when ``stop`` cut it short."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(signum: int, frame: object) -> None:
        print("\nstopping (Ctrl-C)...", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        summary = Demo(config, event_log, stop=stop, train=train).run()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(json.dumps(summary.as_dict(), indent=2) if as_json else summary.text())
    return 130 if summary.interrupted else 0


def _stop(process: subprocess.Popen, log: IO[bytes], timeout_s: float) -> None:
    """SIGTERM ``process``, SIGKILL it if it has not ended within ``timeout_s``; close its
    log."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()
