"""Who owns which partition: each worker's API URL, from the group's assignment.

After every assignment (once its partitions are restored and readable) a worker publishes to
the compacted ``workers`` topic (one partition), keyed by its API URL, its assigned
``interactions`` partitions and the group generation of that assignment
(``Announcement``). Every worker follows the topic (``WorkerDirectory``, a thread of its own)
and takes as the owner of partition p the announcement of the newest generation that lists p
(the latest one when generations tie). A worker that died announced nothing more, but its
partitions' new owner announced them under a newer generation, so it wins.

``Ownership`` answers, for the HTTP API (``GET /users/{id}/state``), where a user's state is:
here (and the offset this store reflects), still being restored here, or at another worker's
URL (answered with 421 Misdirected Request and that URL; ``fetch_state`` follows it).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from kafka import TopicPartition

from state_store import StateStore
from stream.changelog import partition_of
from stream.kafka_client import kafka_consumer
from stream.publisher import Publisher

log = logging.getLogger(__name__)


class Announcement(msgspec.Struct, frozen=True):
    """One ``workers`` record: a worker's API URL and what it owns as of ``generation``."""

    url: str
    partitions: list[int]
    generation: int
    ts: float


def advertised_url(bind: str, port: int, advertised: str | None = None) -> str:
    """The URL other workers and clients reach this worker's API at: ``advertised`` when given,
    else ``http://<bind>:<port>``, with the host name for a wildcard bind (``0.0.0.0``)."""
    if advertised:
        return advertised.rstrip("/")
    host = socket.gethostname() if bind in ("0.0.0.0", "::", "") else bind
    return f"http://{host}:{port}"


def announce(publisher: Publisher, topic: str, url: str, partitions: Iterable[int],
             generation: int) -> None:
    """Publish (and flush) that the worker at ``url`` owns ``partitions`` as of
    ``generation``."""
    value = msgspec.json.encode(Announcement(url, sorted(set(partitions)), generation,
                                             time.time()))
    publisher.publish(topic, url.encode(), value, 0)
    publisher.flush()


class WorkerDirectory:
    """Follows the ``workers`` topic on a thread of its own; ``owner(p)`` is the URL of the
    announcement of the newest generation that lists ``p`` (None if none does)."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 10.0) -> None:
        self._latest: dict[str, Announcement] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                                        client_id="unirec-workers", enable_auto_commit=False,
                                        request_timeout_ms=int(timeout_s * 1000))
        tp = TopicPartition(topic, 0)
        self._consumer.assign([tp])
        self._consumer.seek_to_beginning(tp)
        self._thread = threading.Thread(target=self._run, name="worker-directory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                polled = self._consumer.poll(timeout_ms=200)
            except Exception as exc:  # a broker hiccup: read on
                log.warning("reading the workers topic failed: %s", exc)
                time.sleep(0.5)
                continue
            for records in polled.values():
                for r in records:
                    try:
                        value = msgspec.json.decode(r.value, type=Announcement)
                    except msgspec.DecodeError as exc:
                        log.warning("workers@%d skipped: %s", r.offset, exc)
                        continue
                    with self._lock:
                        self._latest[value.url] = value

    def owner(self, partition: int) -> str | None:
        with self._lock:
            claims = [a for a in self._latest.values() if partition in a.partitions]
        if not claims:
            return None
        return max(claims, key=lambda a: (a.generation, a.ts)).url

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._consumer.close()


@dataclass(frozen=True)
class Location:
    """Where a user's state is answered: ``owned`` here (``offset``: the next offset of its
    partition this store reflects), ``restoring`` here, else at ``owner`` (None: unknown)."""

    partition: int
    owned: bool
    restoring: bool = False
    offset: int | None = None
    owner: str | None = None


@dataclass
class Ownership:
    """This worker's view of partition ownership (set by its loop, read by its API)."""

    url: str
    partitions: int  # of interactions (users are placed as the producers place them)
    interactions: str
    store: StateStore
    directory: WorkerDirectory | None = None
    owned: frozenset[int] = frozenset()
    restoring: frozenset[int] = frozenset()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, owned: Iterable[int], restoring: Iterable[int]) -> None:
        with self._lock:
            self.owned, self.restoring = frozenset(owned), frozenset(restoring)

    def locate(self, user_id: str) -> Location:
        partition = partition_of(user_id, self.partitions)
        with self._lock:
            owned, restoring = self.owned, self.restoring
        if partition in restoring:
            return Location(partition, owned=False, restoring=True)
        if partition in owned:
            stored = self.store.offset(self.interactions, partition)
            return Location(partition, owned=True,
                            offset=0 if stored is None else stored.next_offset)
        owner = None if self.directory is None else self.directory.owner(partition)
        if owner == self.url:  # our own announcement, not yet superseded: not ours any more
            owner = None
        return Location(partition, owned=False, owner=owner)
