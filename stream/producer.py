"""Producers: replay an ``EventLog`` (or a synthetic stream) onto the topics, in time order.

For each interaction of the log, in order, ``replay`` sends:

1. an ``Impression`` on ``impressions`` at the event's ``ts``: ``request_id`` is
   ``f"req-{event_id}"``, ``context`` the event's context, and the candidates are the real item
   (with the event's ``item_features``) plus up to ``negatives`` distinct other items drawn
   uniformly from the items seen EARLIER in the log (each with the features it had when last
   seen), in a shuffled order. Early in a log fewer items have been seen, so an impression has
   ``min(negatives, distinct earlier items other than the real one)`` negatives;
2. the ``Interaction`` itself on ``interactions``;
3. ``label_delay`` seconds of wall-clock later, a ``Label`` on ``labels`` for the real item
   only: ``label`` is the log's label of the event, ``ts`` the event's ``ts`` (log time, like
   the impression it answers). Negatives get no label: they were sampled, not shown, and the
   log's own labels already hold both outcomes. Labels still due at the end are sent at once.

User profiles are not sent (there is no profile topic). Every message is keyed by user id
(UTF-8), so one user's messages of a topic share one partition and keep their order; values are
the schema's JSON (``eventlog.schema.encode``). ``rate`` paces interactions per second of
wall-clock (None: as fast as possible); ``limit`` stops after that many interactions. The same
``seed`` gives the same messages.

Producer settings (``producer_config``): ``acks="all"`` with idempotence on, so a retried batch
never duplicates an interaction (a duplicate would be a second, different GRU update);
``linger_ms=20`` and 512 KiB batches for throughput (with one broker ``acks="all"`` costs the
same as ``acks=1``); no automatic topic creation, so the topics must exist (``ensure_topics``)
and a misspelt name fails instead of creating a stray topic. kafka-python computes record-batch
CRC32C checksums in pure Python unless the ``crc32c`` package is installed, which then roughly
triples producer throughput.

``synthetic`` sends the same three kinds of messages for a generated stream (see
``synthetic_events``), for load tests.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError

from eventlog.log import EventLog
from eventlog.schema import Candidate, FeatureMap, Impression, Interaction, Label, encode
from stream.kafka_client import kafka_producer
from stream.topics import DEFAULT_TIMEOUT_S, BrokerUnavailable, TopicNames

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5


class ProduceError(RuntimeError):
    """Messages the broker did not acknowledge."""


@dataclass
class ReplayStats:
    """What a replay sent, and how long it took (wall-clock, flush included)."""

    interactions: int = 0
    impressions: int = 0
    labels: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def messages(self) -> int:
        return self.interactions + self.impressions + self.labels

    def as_dict(self) -> dict[str, Any]:
        rate = self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {**asdict(self), "messages": self.messages, "messages_per_s": round(rate, 1)}


Progress = Callable[[ReplayStats], None]


def producer_config(bootstrap: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """KafkaProducer settings for replay (see the module docstring)."""
    return {
        "bootstrap_servers": bootstrap,
        "client_id": "unirec-producer",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 20,
        "batch_size": 512 * 1024,
        "allow_auto_create_topics": False,
        "metrics_enabled": False,
        "bootstrap_timeout_ms": int(timeout_s * 1000),
        "max_block_ms": int(timeout_s * 1000),
        "request_timeout_ms": int(timeout_s * 1000),
        "delivery_timeout_ms": int(3 * timeout_s * 1000) + 20,
    }


def open_producer(bootstrap: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> KafkaProducer:
    """A connected producer; ``BrokerUnavailable`` when no broker answers in time."""
    try:
        return kafka_producer(**producer_config(bootstrap, timeout_s))
    except KafkaError as exc:
        raise BrokerUnavailable(f"no Kafka broker answered at {bootstrap} ({exc})") from exc


class CandidateSampler:
    """Builds an impression's candidates: the real item plus negatives drawn uniformly without
    replacement from the items seen before (``observe`` records an item after its event).

    The negatives come in random draw order and the real item goes to a uniformly random
    position among them, so the list is uniformly shuffled. ``Candidate`` objects are cached
    per item (rebuilt when the item's features change): building and validating a million of
    them would cost more than sending them.
    """

    def __init__(self, negatives: int, rng: random.Random) -> None:
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        self.negatives = negatives
        self._rng = rng
        self._items: list[str] = []
        self._cached: dict[str, Candidate] = {}

    def candidates(self, event: Interaction) -> list[Candidate]:
        real = event.item_id
        known = real in self._cached
        k = min(self.negatives, len(self._items) - known)
        chosen = [self._cached[item] for item in self._draw(k, real)]
        real_candidate = self._candidate(real, event.item_features)
        chosen.insert(int(self._rng.random() * (k + 1)), real_candidate)
        return chosen

    def observe(self, event: Interaction) -> None:
        if event.item_id not in self._cached:
            self._items.append(event.item_id)
        self._cached[event.item_id] = self._candidate(event.item_id, event.item_features)

    def _candidate(self, item: str, features: FeatureMap) -> Candidate:
        cached = self._cached.get(item)
        if cached is not None and cached.item_features == features:
            return cached
        return Candidate(item, features)

    def _draw(self, k: int, exclude: str) -> list[str]:
        """``k`` distinct seen items other than ``exclude``, in random order."""
        items, n = self._items, len(self._items)
        if k <= 0:
            return []
        if n < 4 * (k + 1):  # small pool: sample without rejection
            return [item for item in self._rng.sample(items, min(k + 1, n))
                    if item != exclude][:k]
        drawn: list[str] = []
        seen = {exclude}
        random_ = self._rng.random
        while len(drawn) < k:
            item = items[int(random_() * n)]
            if item not in seen:
                seen.add(item)
                drawn.append(item)
        return drawn


class _Sender:
    """A producer that counts bytes and remembers failed sends (callbacks run on the
    producer's I/O thread)."""

    def __init__(self, producer: KafkaProducer) -> None:
        self.producer = producer
        self.bytes = 0
        self.failed = 0
        self.first_error: BaseException | None = None
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes, value: bytes, timestamp_ms: int | None = None
             ) -> None:
        try:
            future = self.producer.send(topic, key=key, value=value, timestamp_ms=timestamp_ms)
        except KafkaError as exc:
            raise ProduceError(f"cannot send to {topic!r}: {exc}") from exc
        future.add_errback(self._failed)
        self.bytes += len(key) + len(value)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
            self.first_error = self.first_error or exc

    def flush(self, timeout_s: float | None = None) -> None:
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise ProduceError(f"flush failed: {exc}") from exc
        if self.failed:
            raise ProduceError(f"{self.failed} messages were not acknowledged; first error: "
                               f"{self.first_error}")


class _Replayer:
    """Sends impression, interaction and (later) label of each event; paces interactions."""

    def __init__(self, sender: _Sender, topics: TopicNames, sampler: CandidateSampler,
                 rate: float | None, label_delay: float, progress: Progress | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 events per second, got {rate}")
        if label_delay < 0:
            raise ValueError(f"label_delay must be >= 0 seconds, got {label_delay}")
        self.sender, self.topics, self.sampler = sender, topics, sampler
        self.rate, self.label_delay, self.progress = rate, label_delay, progress
        self.stats = ReplayStats()
        # (due, seq, key, value, the event's record timestamp)
        self._labels: list[tuple[float, int, bytes, bytes, int]] = []
        self._last_ms = -1  # the last event's record timestamp
        self._started = 0.0
        self._last_progress = 0.0

    def run(self, events: Iterable[tuple[Interaction, int]], limit: int | None) -> ReplayStats:
        self._started = self._last_progress = time.perf_counter()
        for n, (event, label) in enumerate(events):
            if limit is not None and n >= limit:
                break
            self._wait_turn(n)
            self._send_event(event, label)
            self._send_due_labels(time.perf_counter())
            self._report()
        self._send_due_labels(float("inf"))
        self.sender.flush()
        self._report(final=True)
        return self.stats

    def _send_event(self, event: Interaction, label: int) -> None:
        key = event.user_id.encode()
        request_id = f"req-{event.event_id}"
        impression = Impression(request_id, event.user_id, event.ts,
                                self.sampler.candidates(event), dict(event.context))
        # Record timestamps order a user's messages across topics (stream.gate: within one
        # millisecond an impression comes before an interaction): this impression must get a
        # later millisecond than the user's previous interaction, whatever the send rate. And
        # the gate reads each partition's timestamps as being in offset order: so every event
        # gets a later millisecond than the previous one of ANY user (a stamp per user, run
        # ahead of the clock by a burst of that user's events, let another user's earlier
        # interaction stand behind it in the partition, and an impression pass before it).
        stamp = max(int(time.time() * 1000), self._last_ms + 1)
        self._last_ms = stamp
        self.sender.send(self.topics.impressions, key, encode(impression), stamp)
        self.sender.send(self.topics.interactions, key, encode(event), stamp)
        self.sampler.observe(event)
        self.stats.impressions += 1
        self.stats.interactions += 1
        value = encode(Label(request_id, event.user_id, event.item_id, int(label), event.ts))
        due = time.perf_counter() + self.label_delay
        heapq.heappush(self._labels, (due, self.stats.interactions, key, value, stamp))

    def _send_due_labels(self, now: float) -> None:
        while self._labels and self._labels[0][0] <= now:
            _, _, key, value, stamp = heapq.heappop(self._labels)
            self.sender.send(self.topics.labels, key, value,
                             max(int(time.time() * 1000), stamp))
            self.stats.labels += 1

    def _wait_turn(self, n: int) -> None:
        """Sleep until interaction ``n``'s slot (``n / rate`` s after the start), sending
        labels that fall due meanwhile."""
        if self.rate is None:
            return
        slot = self._started + n / self.rate
        while (now := time.perf_counter()) < slot:
            next_label = self._labels[0][0] if self._labels else slot
            time.sleep(max(0.0, min(slot, next_label) - now))
            self._send_due_labels(time.perf_counter())

    def _report(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        self.stats.elapsed_s = now - self._started
        self.stats.bytes = self.sender.bytes
        if self.progress is not None:
            self.progress(self.stats)


def replay_events(
    events: Iterable[tuple[Interaction, int]],
    bootstrap: str,
    topics: TopicNames | None = None,
    rate: float | None = None,
    limit: int | None = None,
    negatives: int = 9,
    label_delay: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    producer: KafkaProducer | None = None,
    seen: Iterable[Interaction] = (),
) -> ReplayStats:
    """Send (interaction, label) pairs given in time order, as described in the module
    docstring; negatives may also come from the items of ``seen`` (events before these, e.g.
    sent by ``send_interactions``). A ``producer`` passed in is flushed but not closed;
    otherwise one is opened (``BrokerUnavailable`` if none answers) and closed. Raises
    ``ProduceError`` if any message is not acknowledged."""
    own = producer is None
    producer = producer or open_producer(bootstrap)
    try:
        sampler = CandidateSampler(negatives, random.Random(seed))
        for event in seen:
            sampler.observe(event)
        replayer = _Replayer(_Sender(producer), topics or TopicNames(), sampler, rate,
                             label_delay, progress)
        stats = replayer.run(events, limit)
    finally:
        if own:
            producer.close(timeout=DEFAULT_TIMEOUT_S)
    log.info("replayed %d interactions, %d impressions, %d labels (%.1f MB) in %.2f s",
             stats.interactions, stats.impressions, stats.labels, stats.bytes / 1e6,
             stats.elapsed_s)
    return stats


def send_interactions(
    events: Iterable[Interaction],
    producer: KafkaProducer,
    topics: TopicNames | None = None,
    rate: float | None = None,
    on_sent: Callable[[Interaction, float], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Send ``events`` to ``interactions`` only (no impressions, no labels: a history to load,
    or an ingestion load), at ``rate`` per second (None: as fast as possible), until ``stop``
    is set. ``on_sent(event, perf_counter time)`` is called after each send. Flushes; returns
    the number sent. Raises ``ProduceError`` if any message is not acknowledged."""
    topic = (topics or TopicNames()).interactions
    sender = _Sender(producer)
    started = time.perf_counter()
    sent = 0
    for event in events:
        if stop is not None and stop.is_set():
            break
        if rate is not None:
            delay = started + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sender.send(topic, event.user_id.encode(), encode(event))
        sent += 1
        if on_sent is not None:
            on_sent(event, time.perf_counter())
    sender.flush()
    return sent


def replay(
    log: EventLog,
    bootstrap: str,
    topics: TopicNames | None = None,
    rate: float | None = None,
    limit: int | None = None,
    negatives: int = 9,
    label_delay: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    producer: KafkaProducer | None = None,
) -> ReplayStats:
    """Replay ``log`` in time order onto ``topics`` (see the module docstring)."""
    events = zip(log.interactions, log.labels.tolist(), strict=True)
    return replay_events(events, bootstrap, topics, rate, limit, negatives, label_delay, seed,
                         progress, producer)


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic population: Zipf item popularity, one preferred genre per user."""

    users: int = 1000
    items: int = 5000
    genres: int = 18
    zipf_s: float = 1.1  # popularity of the item of rank r is proportional to r ** -zipf_s
    prefer: float = 0.6  # probability that an event picks from the user's preferred genre
    p_like_preferred: float = 0.75
    p_like_other: float = 0.25
    start_ts: float = 1_700_000_000.0
    interval_s: float = 1.0  # log time between consecutive events


def synthetic_events(n: int, config: SyntheticConfig | None = None,
                     seed: int = 0) -> Iterator[tuple[Interaction, int]]:
    """``n`` (interaction, label) pairs in time order, deterministic in ``seed``.

    Users ``u<k>`` pick a uniformly random user per event; the item comes from the user's
    preferred genre with probability ``prefer``, else from all items, in both cases by Zipf
    popularity. Items carry ``genre`` (a one-element bag) and ``price``; events carry a
    ``device`` context. The label is 1 with probability ``p_like_preferred`` when the item is
    of the user's preferred genre, else ``p_like_other``.
    """
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    genre = rng.integers(cfg.genres, size=cfg.items)
    price = np.round(rng.lognormal(2.5, 0.8, size=cfg.items), 2)
    popularity = (1.0 + rng.permutation(cfg.items)) ** -cfg.zipf_s
    preferred = rng.integers(cfg.genres, size=cfg.users)
    by_genre = [np.flatnonzero(genre == g) for g in range(cfg.genres)]
    cum_all = np.cumsum(popularity) / popularity.sum()
    cum_genre = [np.cumsum(popularity[ids]) / popularity[ids].sum() if len(ids) else None
                 for ids in by_genre]
    features: list[FeatureMap] = [{"genre": [f"g{genre[i]}"], "price": float(price[i])}
                                  for i in range(cfg.items)]
    devices = ("ios", "android", "web")
    chunk = 10_000
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        user = rng.integers(cfg.users, size=size)
        u = rng.random(size)
        item = np.minimum(np.searchsorted(cum_all, u), cfg.items - 1)
        from_preferred = rng.random(size) < cfg.prefer
        for g, cum in enumerate(cum_genre):
            rows = np.flatnonzero(from_preferred & (preferred[user] == g))
            if cum is not None and len(rows):
                picks = np.minimum(np.searchsorted(cum, u[rows]), len(cum) - 1)
                item[rows] = by_genre[g][picks]
        liked = np.where(genre[item] == preferred[user], cfg.p_like_preferred, cfg.p_like_other)
        labels = (rng.random(size) < liked).astype(np.int64)
        device = rng.integers(len(devices), size=size)
        for j in range(size):
            i = start + j
            yield Interaction(
                event_id=f"syn{seed}-{i}", user_id=f"u{user[j]}", item_id=f"i{item[j]}",
                action="click", ts=cfg.start_ts + i * cfg.interval_s,
                item_features=features[item[j]], context={"device": devices[device[j]]},
            ), int(labels[j])


def synthetic(
    n: int,
    bootstrap: str,
    topics: TopicNames | None = None,
    config: SyntheticConfig | None = None,
    rate: float | None = None,
    negatives: int = 9,
    label_delay: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    producer: KafkaProducer | None = None,
) -> ReplayStats:
    """Send ``n`` synthetic events (``synthetic_events``) like ``replay`` sends a log."""
    return replay_events(synthetic_events(n, config, seed), bootstrap, topics, rate, None,
                         negatives, label_delay, seed, progress, producer)
