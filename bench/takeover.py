"""Benchmark of a partition takeover: restoring from ``user-states`` against replaying from 0.

One partition of ``--users`` users with ``--events-per-user`` events each (default 20k x 200 =
4M events), on the embedded Tansu broker (or ``--bootstrap-servers``):

1. the events are produced to ``interactions`` (one partition), users interleaved in time;
2. ``replay``: what a new owner did before issue #13 and still does for a partition with no
   changelog: a consumer reads the partition from offset 0 and ``InteractionApplier`` (the
   worker's applier, batches of ``--batch-size``) applies every event into a fresh store;
   timed from the first poll to the last write;
3. the changelog is published from that store, one record per user plus the marker
   (``ChangelogWriter.publish_partition``): what Kafka's log cleaner leaves of a compacted
   ``user-states`` partition (Tansu does not compact; an uncompacted changelog holds one record
   per user per batch and is read the same way, last record per user winning);
4. ``restore``: ``stream.changelog.restore_partition`` (the worker's path on assignment)
   brings a fresh store to the same offset from the changelog; timed whole (reading, folding,
   writing, the retention check). The restored store is checked against the replayed one
   (every user's update count and state).

The model: ``--d-model``/``--history-len`` (default the ModelConfig defaults, 64 and 50),
random weights, its FeatureSpec fitted on the events. Prints one JSON object on stdout.

    python bench/takeover.py                              # 20k users x 200 events
    python bench/takeover.py --users 2000 --events-per-user 50   # a quick run
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from kafka import TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eventlog.schema import Interaction, encode  # noqa: E402
from model.backbone import UniRecModel  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.features import FeatureSpec  # noqa: E402
from state_store import StateStore, StoreConfig  # noqa: E402
from stream.applier import InteractionApplier  # noqa: E402
from stream.broker import EmbeddedBroker  # noqa: E402
from stream.changelog import ChangelogWriter, restore_partition  # noqa: E402
from stream.kafka_client import kafka_consumer  # noqa: E402
from stream.producer import open_producer  # noqa: E402
from stream.publisher import KafkaPublisher  # noqa: E402
from stream.records import ConsumedRecord  # noqa: E402
from stream.topics import TopicNames, end_offsets, ensure_topics, log_identity  # noqa: E402

log = logging.getLogger("bench.takeover")


def events(users: int, per_user: int, items: int, seed: int) -> Iterator[Interaction]:
    """``users * per_user`` events in time order, each user's spread over the whole stream
    (generated lazily: 4M events would not fit in memory as objects)."""
    rng = np.random.default_rng(seed)
    order = np.repeat(np.arange(users), per_user)
    rng.shuffle(order)
    item = rng.integers(items, size=order.size)
    genre = item % 12
    for i, (u, it, g) in enumerate(zip(order.tolist(), item.tolist(), genre.tolist(),
                                       strict=True)):
        yield Interaction(f"e{i}", f"u{u}", f"i{it}", "click", 1.7e9 + i * 0.01,
                          {"genre": [f"g{g}"], "price": float(it % 50)}, {"device": "web"})


def produce(bootstrap: str, topic: str, stream: Iterator[Interaction]) -> float:
    producer = open_producer(bootstrap, 30.0)
    start = time.perf_counter()
    try:
        for i, event in enumerate(stream):
            producer.send(topic, key=event.user_id.encode(), value=encode(event), partition=0)
            if i % 200_000 == 0 and i:
                log.info("produced %d", i)
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - start


def replay(bootstrap: str, topic: str, log_id: str, store: StateStore, model: UniRecModel,
           batch_size: int, end: int) -> float:
    """Apply ``topic[0]`` from offset 0 to ``end`` as a new owner without a changelog did."""
    applier = InteractionApplier(store, model, 1)
    tp = TopicPartition(topic, 0)
    consumer = kafka_consumer(bootstrap_servers=bootstrap, group_id=None,
                              enable_auto_commit=False, max_poll_records=batch_size,
                              fetch_max_bytes=64 << 20)
    start = time.perf_counter()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        position = 0
        while position < end:
            polled = consumer.poll(timeout_ms=500).get(tp, [])
            if not polled:
                continue
            batch = [ConsumedRecord(0, r.offset, r.key, r.value, r.timestamp) for r in polled]
            applier.apply(topic, 0, log_id, batch, batch[-1].offset)
            position = batch[-1].offset + 1
            if position // 100_000 != (position - len(batch)) // 100_000:
                log.info("replayed %d of %d (%.0f/s)", position, end,
                         position / (time.perf_counter() - start))
    finally:
        consumer.close()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events-per-user", type=int, default=200)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=ModelConfig().d_model)
    parser.add_argument("--history-len", type=int, default=ModelConfig().history_len)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--bootstrap-servers", help="a running broker (default: embedded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    sample = list(itertools.islice(events(args.users, args.events_per_user, args.items,
                                         args.seed), 50_000))
    cfg = ModelConfig(d_model=args.d_model, history_len=args.history_len,
                      n_heads=max(1, args.d_model // 16))
    model = UniRecModel(cfg, FeatureSpec.fit(sample)).eval().to(args.device)
    store_config = StoreConfig(state_dim=cfg.d_model, history_len=cfg.history_len)
    topics = TopicNames.with_prefix("takeover-")
    with tempfile.TemporaryDirectory(prefix="takeover-") as tmp:
        work = Path(tmp)
        broker = None if args.bootstrap_servers else EmbeddedBroker(log_dir=work / "broker")
        try:
            bootstrap = args.bootstrap_servers or broker.start().bootstrap_servers  # type: ignore[union-attr]
            ensure_topics(bootstrap, 1, topics=topics, timeout_s=30.0)
            produce_s = produce(bootstrap, topics.interactions, events(
                args.users, args.events_per_user, args.items, args.seed))
            end = end_offsets(bootstrap, topics.interactions, 30.0)[0]
            log_id = log_identity(bootstrap, topics.interactions, 30.0)
            log.info("produced %d events in %.1f s; replaying from 0", end, produce_s)
            producer = open_producer(bootstrap, 30.0)
            writer = ChangelogWriter(KafkaPublisher(producer, 120.0), topics.user_states)
            with StateStore.open(work / "replayed", store_config) as replayed:
                replay_s = replay(bootstrap, topics.interactions, log_id, replayed, model,
                                  args.batch_size, end)
                log.info("replayed in %.1f s; publishing the compacted changelog", replay_s)
                publish_start = time.perf_counter()
                published = writer.publish_partition(replayed, 0, 1, log_id, end - 1)
                publish_s = time.perf_counter() - publish_start
                with StateStore.open(work / "restored", store_config) as restored:
                    applier = InteractionApplier(restored, model, 1)

                    def apply_batch(records: list[ConsumedRecord], last: int) -> object:
                        return applier.apply(topics.interactions, 0, log_id, records, last)

                    report = restore_partition(restored, writer, apply_batch, bootstrap,
                                               topics.interactions, 0, 1, log_id,
                                               timeout_s=60.0)
                    expected = {r.user_id: (r.update_count, r.state)
                                for r in replayed.iter_users()}
                    got = {r.user_id: (r.update_count, r.state) for r in restored.iter_users()}
                    same = set(expected) == set(got) and all(
                        got[u][0] == c and np.array_equal(got[u][1], s)
                        for u, (c, s) in expected.items())
            producer.close()
        finally:
            if broker is not None:
                broker.stop()
    result = {
        "partition": {"users": args.users, "events_per_user": args.events_per_user,
                      "events": end},
        "model": {"d_model": cfg.d_model, "history_len": cfg.history_len,
                  "device": args.device, "torch_threads": args.torch_threads},
        "batch_size": args.batch_size,
        "replay_from_0_s": round(replay_s, 2),
        "replay_events_per_s": round(end / replay_s),
        "restore_s": round(report.seconds, 2),
        "restore_records_read": report.read,
        "restore_mode": report.mode,
        "restore_next_offset": report.next_offset,
        "restored_equals_replayed": same,
        "speedup": round(replay_s / report.seconds, 1),
        "changelog_publish_s": round(publish_s, 2),
        "changelog_records": published + 1,
        "produce_s": round(produce_s, 1),
    }
    print(json.dumps(result))
    return 0 if same and report.next_offset == end else 1


if __name__ == "__main__":
    sys.exit(main())
