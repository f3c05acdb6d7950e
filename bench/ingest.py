"""Benchmark of end-to-end ingestion: broker -> worker -> state store, against a raw consumer.

In one run, against one broker (the embedded Tansu broker unless ``--bootstrap-servers``):

1. ``--events`` synthetic interactions are produced to a fresh ``interactions`` topic;
2. ``raw_consumer``: a kafka-python consumer reads them all (no decoding, no work): the
   ceiling any consumer of this broker on this machine can reach;
3. ``worker``: ``unirec worker`` (a subprocess, with a model of ``--d-model`` whose
   FeatureSpec is fitted on the synthetic events) applies them all; interactions/s is counted
   from its first applied batch to its last (group join and model load are left out), read
   from its ``/metrics``;
4. ``latency``: with the worker caught up, interactions are produced at ``--rate`` per second
   for ``--latency-seconds``; for every ``--sample-every``-th one, ``GET /users/{id}/state``
   is polled until the event is visible (its user's ``last_event_ts`` reaches the event's
   ``ts``); latency = visible - handed to the producer.

Prints one JSON object on stdout; progress goes to stderr.

    python bench/ingest.py            # 100k events
    python bench/ingest.py --quick    # 10k events, 3 s of latency sampling
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from kafka import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.backbone import UniRecModel
from model.checkpoint import save
from model.config import ModelConfig
from model.features import FeatureSpec
from stream.broker import EmbeddedBroker, free_port
from stream.kafka_client import kafka_consumer
from stream.metrics import scrape, total
from stream.producer import SyntheticConfig, open_producer, send_interactions, synthetic_events
from stream.topics import TopicNames, ensure_topics

log = logging.getLogger("bench.ingest")

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path, d_model: int, history_len: int, events: list) -> None:
    """A model with random weights (ingestion cost does not depend on their values)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, history_len=history_len)
    save(UniRecModel(cfg, FeatureSpec.fit(events)).eval(), path, {"model_version": 1})


def produce(bootstrap: str, topics: TopicNames, events: list, rate: float | None = None,
            on_sent=None) -> float:
    """Send interactions (at ``rate`` per second if given); returns the seconds it took."""
    producer = open_producer(bootstrap)
    start = time.perf_counter()
    try:
        send_interactions(events, producer, topics, rate, on_sent)
    finally:
        producer.close()
    return time.perf_counter() - start


def raw_consume(bootstrap: str, topic: str, n: int, timeout_s: float = 120.0) -> float:
    """Seconds for a kafka-python consumer to read ``n`` records of ``topic`` from offset 0."""
    consumer = kafka_consumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=64 << 20)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        seen = 0
        start = time.perf_counter()
        while seen < n:
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(f"raw consumer read {seen} of {n} records in {timeout_s} s")
            for records in consumer.poll(timeout_ms=500).values():
                seen += len(records)
        return time.perf_counter() - start
    finally:
        consumer.close()


def get(url: str, timeout_s: float = 5.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def applied(api: str, topic: str) -> int:
    """Interactions the worker applied, from its ``/metrics`` (0 while unreachable)."""
    return int(total(scrape(api), "unirec_events_applied_total", topic=topic))


def wait_applied(api: str, topic: str, n: int, timeout_s: float, worker: subprocess.Popen
                 ) -> tuple[float, float, int]:
    """Poll until ``n`` interactions are applied: (time of the first poll that saw some applied,
    time all were, how many were applied at that first sighting)."""
    deadline = time.perf_counter() + timeout_s
    first: tuple[float, int] | None = None
    while time.perf_counter() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with status {worker.returncode}")
        count = applied(api, topic)
        now = time.perf_counter()
        if count > 0 and first is None:
            first = (now, count)
        if count >= n:
            assert first is not None
            return first[0], now, first[1]
        time.sleep(0.02)
    raise TimeoutError(f"worker applied {applied(api, topic)} of {n} in {timeout_s} s")


def measure_latency(api: str, bootstrap: str, topics: TopicNames, events: list, rate: float,
                    sample_every: int) -> list[float]:
    """Produce ``events`` at ``rate``; seconds from send to visibility of every sampled one."""
    latencies: list[float] = []
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=8)

    def watch(event, sent: float) -> None:
        deadline = sent + 30.0
        url = f"{api}/users/{event.user_id}/state"
        while time.perf_counter() < deadline:
            body = get(url)
            if body is not None and json.loads(body).get("last_event_ts", 0) >= event.ts:
                with lock:
                    latencies.append(time.perf_counter() - sent)
                return
            time.sleep(0.002)
        log.warning("event %s not visible after 30 s", event.event_id)

    counter = iter(range(len(events)))

    def on_sent(event, sent: float) -> None:
        if next(counter) % sample_every == 0:
            pool.submit(watch, event, sent)

    produce(bootstrap, topics, events, rate, on_sent)
    pool.shutdown(wait=True)
    return latencies


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    parser.add_argument("--history-len", type=int, default=ModelConfig.history_len)
    parser.add_argument("--batch-size", type=int, default=2048, help="worker micro-batch")
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--sample-every", type=int, default=20)
    parser.add_argument("--bootstrap-servers", help="default: start an embedded broker")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    n = args.events or (10_000 if args.quick else 100_000)
    latency_s = args.latency_seconds or (3.0 if args.quick else 10.0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    synthetic = SyntheticConfig(users=args.users)
    events = [e for e, _ in synthetic_events(n, synthetic, seed=1)]
    later = SyntheticConfig(users=args.users, start_ts=events[-1].ts + 1.0)
    live = [e for e, _ in synthetic_events(int(args.rate * latency_s), later, seed=2)]

    with tempfile.TemporaryDirectory(prefix="unirec-ingest-") as tmp, (
        contextlib.nullcontext() if args.bootstrap_servers else EmbeddedBroker(log_dir=Path(tmp))
    ) as embedded:
        bootstrap = args.bootstrap_servers or embedded.bootstrap_servers
        prefix = f"bench-{uuid.uuid4().hex[:8]}-"
        topics = TopicNames.with_prefix(prefix)
        ensure_topics(bootstrap, args.partitions, topics=topics)
        checkpoint = Path(tmp) / "model.pt"
        make_checkpoint(checkpoint, args.d_model, args.history_len, events[:5000])

        log.info("producing %d interactions", n)
        produce_s = produce(bootstrap, topics, events)
        log.info("raw consumer")
        raw_s = raw_consume(bootstrap, topics.interactions, n)

        port = free_port()
        api = f"http://127.0.0.1:{port}"
        argv_worker = [
            sys.executable, "-m", "app.cli", "worker", "--bootstrap-servers", bootstrap,
            "--checkpoint", str(checkpoint), "--store", str(Path(tmp) / "state"),
            "--partitions", str(args.partitions), "--topic-prefix", prefix,
            "--group-id", f"bench-{uuid.uuid4().hex[:8]}", "--web-port", str(port),
            "--batch-size", str(args.batch_size),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "UNIREC_DEVICE": "cpu"}
        with (Path(tmp) / "worker.log").open("wb") as worker_log:
            worker = subprocess.Popen(argv_worker, cwd=REPO, env=env, stdout=worker_log,
                                      stderr=subprocess.STDOUT)
            try:
                log.info("worker applying %d interactions", n)
                first_s, done_s, first_count = wait_applied(
                    api, topics.interactions, n, args.timeout, worker)
                log.info("latency at %.0f events/s for %.0f s", args.rate, latency_s)
                latencies = measure_latency(api, bootstrap, topics, live,
                                            args.rate, args.sample_every)
            finally:
                worker.terminate()
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            if worker.returncode not in (0, -15):
                tail = (Path(tmp) / "worker.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker exited with {worker.returncode}:\n{tail}")

    worker_rate = (n - first_count) / max(done_s - first_s, 1e-9)
    ms = np.asarray(latencies) * 1000.0
    result = {
        "benchmark": "ingest",
        "events": n,
        "users": args.users,
        "partitions": args.partitions,
        "d_model": args.d_model,
        "history_len": args.history_len,
        "worker_batch_size": args.batch_size,
        "torch_threads": 1,
        "cpus": os.cpu_count(),
        "produce_events_per_s": round(n / produce_s),
        "raw_consumer_events_per_s": round(n / raw_s),
        "worker_interactions_per_s": round(worker_rate),
        "worker_to_raw_ratio": round(worker_rate / (n / raw_s), 3),
        "latency": {
            "rate_events_per_s": args.rate,
            "seconds": latency_s,
            "samples": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
