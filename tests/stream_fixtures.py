"""Running ``unirec worker`` as a subprocess in tests, against any Kafka-compatible broker.

- ``tiny_checkpoint(path)``: a small model (random weights) whose FeatureSpec is fitted on
  ``synthetic_events``; the worker's contract does not depend on the weights' quality.
- ``WorkerProcess``: ``python -m app.cli worker`` with a store, a checkpoint and a free
  web port, its output in a log file; ``stop`` ends it by its PID (SIGTERM, then SIGKILL).
- ``wait_for(condition, timeout_s, worker, what)``: polls, failing early (with the worker's
  output) if the worker exits, and on time-out.
- ``http_get(url)``: ``(status, body)``, error statuses returned rather than raised.
- ``read_all(bootstrap, topic)``: every record of a topic up to its end offsets (read from a
  fetch's high watermark, ``stream.topics.end_offsets``), without waiting out a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kafka import KafkaConsumer, TopicPartition

from model.backbone import UniRecModel
from model.checkpoint import save
from model.config import ModelConfig
from model.features import FeatureSpec
from stream.broker import free_port
from stream.producer import synthetic_events
from stream.topics import end_offsets

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, dropout=0.0)


def tiny_checkpoint(path: Path, model_version: int = 3, seed: int = 99) -> Path:
    """Save a tiny random model at ``path`` (fitted on ``synthetic_events(500, seed)``)."""
    torch.manual_seed(0)
    events = [e for e, _ in synthetic_events(500, seed=seed)]
    save(UniRecModel(TINY, FeatureSpec.fit(events)).eval(), path,
         {"model_version": model_version})
    return path


class ServiceProcess:
    """``python -m app.cli COMMAND ...`` as a subprocess serving HTTP on 127.0.0.1:``web_port``
    (a free port, passed as ``--web-port``), its output in ``log_path``; ``env`` adds to its
    environment. ``stop`` ends it by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, command: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.web_port = free_port()
        argv = [sys.executable, "-m", "app.cli", *command, "--web-port", str(self.web_port)]
        self.log_path = log_path
        self._log = log_path.open("ab")
        environ = {**os.environ, "PYTHONPATH": str(REPO), "UNIREC_DEVICE": "cpu", **(env or {})}
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=environ)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end by itself; its exit status."""
        try:
            return self.process.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


class WorkerProcess(ServiceProcess):
    """A worker subprocess (``command="trainer"``: a trainer); ``env`` adds to its
    environment."""

    def __init__(self, bootstrap: str, checkpoint: Path, store: Path, log_path: Path, *,
                 prefix: str = "", partitions: int = 2, group: str | None = None,
                 extra: tuple[str, ...] = (), command: str = "worker",
                 env: dict[str, str] | None = None) -> None:
        super().__init__([
            command,
            "--bootstrap-servers", bootstrap, "--checkpoint", str(checkpoint),
            "--store", str(store), "--partitions", str(partitions),
            "--topic-prefix", prefix, "--group-id", group or f"g-{uuid.uuid4().hex[:8]}",
            "--batch-size", "64", "--batch-within", "0.05", *extra,
        ], log_path, env)


class WorkerGroup:
    """Workers of one consumer group (``group``, default: a new one) on one topic prefix,
    started by ``start``; leaving the ``with`` block kills (SIGKILL) every one still running.
    Their logs are ``<directory>/<name>.log``."""

    def __init__(self, bootstrap: str, checkpoint: Path, directory: Path, prefix: str,
                 partitions: int, group: str | None = None,
                 extra: tuple[str, ...] = ("--no-train",)) -> None:
        self.bootstrap, self.checkpoint, self.directory = bootstrap, checkpoint, directory
        self.prefix, self.partitions, self.extra = prefix, partitions, extra
        self.group = group or f"g-{uuid.uuid4().hex[:8]}"
        self.started: list[WorkerProcess] = []

    def start(self, store: Path, name: str, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(self.bootstrap, self.checkpoint, store,
                               self.directory / f"{name}.log", prefix=self.prefix,
                               partitions=self.partitions, group=self.group,
                               extra=(*self.extra, *extra))
        self.started.append(worker)
        return worker

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.started:
            worker.stop(signal.SIGKILL)


def wait_for(condition: Callable[[], bool], timeout_s: float,
             worker: WorkerProcess | None = None, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if worker is not None and worker.exited() is not None:
            raise AssertionError(f"worker exited ({worker.exited()}) before {what}:\n"
                                 f"{worker.output()[-3000:]}")
        time.sleep(0.3)
    tail = worker.output()[-3000:] if worker is not None else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` up to its end offsets now."""
    ends = end_offsets(bootstrap, topic)
    want = sum(ends.values())
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=3000,
                             enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, p) for p in ends])
    consumer.seek_to_beginning()
    records = []
    for record in consumer:
        records.append(record)
        if len(records) == want:
            break
    consumer.close()
    return records
