"""Benchmark of the state store: batched reads, apply, and bytes on disk per user.

Fills a store with ``--users`` users holding a 64-dim state and a full 50-event history of
~100-byte rows, then measures users/s for batches of 1, 64 and 1024 users:

- ``read``: ``get_many`` of states (the worker's read);
- ``read_with_history``: ``get_many(history=True)`` (the serving read);
- ``apply``: ``apply`` of one event per user, records read beforehand;
- ``worker_cycle``: ``new_events`` + ``get_many`` + ``apply``, the worker's whole store work;

then runs the worker cycle at batch 1024 for ``--sustain`` seconds (flushes and compactions
included), and compacts the store to report bytes on disk per user.

Prints one JSON object on stdout; progress goes to stderr.

    python bench/state_store.py            # 100k users
    python bench/state_store.py --quick    # 5k users, shorter timings
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from state_store import PartitionBatch, StateStore, StoreConfig

log = logging.getLogger("bench.state_store")

BATCH_SIZES = (1, 64, 1024)
TOPIC, PARTITION, LOG_ID = "interactions", 0, "bench-cluster/interactions"


class EventSource:
    """Makes partition batches with increasing offsets and ~``row_bytes``-byte rows."""

    def __init__(self, row_bytes: int, seed: int = 0) -> None:
        self.next_offset = 0
        self.row_bytes = row_bytes
        self.rng = np.random.default_rng(seed)

    def batch(self, user_ids: list[str]) -> PartitionBatch:
        n = len(user_ids)
        offsets = np.arange(self.next_offset, self.next_offset + n)
        self.next_offset += n
        pad = b"x" * max(0, self.row_bytes - 40)
        rows = [b'{"item_id":"i%08d","ts":%d,"p":"' % (o % 99991, o) + pad + b'"}' for o in offsets]
        return PartitionBatch(
            topic=TOPIC,
            partition=PARTITION,
            log_id=LOG_ID,
            last_offset=int(offsets[-1]),
            offsets=offsets,
            user_ids=user_ids,
            ts=offsets.astype(np.float64),
            rows=rows,
        )


def user_id(i: int) -> str:
    return f"user-{i:08d}"


def populate(st: StateStore, n_users: int, source: EventSource) -> float:
    """Give every user a full history: ``history_len`` events each. Returns seconds taken."""
    config = st.config
    t0 = time.perf_counter()
    chunk = 1024
    for start in range(0, n_users, chunk):
        users = [user_id(i) for i in range(start, min(n_users, start + chunk))]
        batch = source.batch([u for _ in range(config.history_len) for u in users])
        before = st.get_many(users)
        states = source.rng.standard_normal((len(users), config.state_dim), dtype=np.float32)
        st.apply(batch, before, states, model_version=1)
        if (start // chunk) % 20 == 0:
            log.info("populated %d/%d users", start + len(users), n_users)
    return time.perf_counter() - t0


def rate(step: Callable[[], tuple[int, float]], seconds: float) -> float:
    """Users/s of ``step``, which returns (users handled, seconds of the timed part)."""
    step()  # warm up
    users, spent = 0, 0.0
    while spent < seconds:
        n, dt = step()
        users, spent = users + n, spent + dt
    return users / spent


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Workload:
    """The measured operations, each on ``size`` users drawn at random from the store."""

    def __init__(self, st: StateStore, n_users: int, source: EventSource, size: int) -> None:
        self.st, self.n_users, self.source, self.size = st, n_users, source, size

    def users(self) -> list[str]:
        ids = self.source.rng.choice(self.n_users, size=self.size, replace=False)
        return [user_id(i) for i in ids.tolist()]

    def read(self, history: bool = False) -> tuple[int, float]:
        users = self.users()
        return self.size, timed(lambda: self.st.get_many(users, history=history))

    def apply(self) -> tuple[int, float]:
        users = self.users()
        batch = self.source.batch(users)
        before = self.st.get_many(users)
        states = before.states + np.float32(0.01)
        return self.size, timed(lambda: self.st.apply(batch, before, states, model_version=2))

    def worker_cycle(self) -> tuple[int, float]:
        batch = self.source.batch(self.users())

        def cycle() -> None:
            fresh = self.st.new_events(batch)
            users, _ = fresh.users()
            before = self.st.get_many(users)
            self.st.apply(fresh, before, before.states + np.float32(0.01), model_version=2)

        return self.size, timed(cycle)


def measure(
    st: StateStore, n_users: int, source: EventSource, seconds: float
) -> dict[str, dict[str, float]]:
    """Users/s of each operation, by batch size."""
    out: dict[str, dict[str, float]] = {}
    for size in BATCH_SIZES:
        work = Workload(st, n_users, source, size)
        steps = {
            "read": work.read,
            "read_with_history": lambda work=work: work.read(history=True),
            "apply": work.apply,
            "worker_cycle": work.worker_cycle,
        }
        for name, step in steps.items():
            out.setdefault(name, {})[str(size)] = rate(step, seconds)
        log.info("batch %d: %s", size, {k: round(v[str(size)]) for k, v in out.items()})
    return out


def disk_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all files, bytes of SST files) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(
        p.stat().st_size for p in files if p.suffix == ".sst"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000, help="users in the store")
    parser.add_argument("--quick", action="store_true", help="at most 5k users, short timings")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--sustain", type=float, default=10.0, help="sustained-run seconds")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--row-bytes", type=int, default=100)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the store")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.seconds, args.sustain = min(args.users, 5_000), 0.3, 1.0
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    config = StoreConfig(state_dim=args.dim, state_dtype=args.dtype, history_len=args.history)
    source = EventSource(args.row_bytes)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "store"
        with StateStore.open(path, config) as st:
            populate_s = populate(st, args.users, source)
            log.info("compacting the populated store")
            st.compact()  # measure a settled store, not the backlog of the bulk load
            rates = measure(st, args.users, source, args.seconds)
            log.info("sustained worker cycle, batch %d, %.0f s", BATCH_SIZES[-1], args.sustain)
            work = Workload(st, args.users, source, BATCH_SIZES[-1])
            sustained = rate(work.worker_cycle, args.sustain)
            st.compact()
        total, sst = disk_bytes(path)
    result = {
        "users": args.users,
        "state_dim": args.dim,
        "state_dtype": args.dtype,
        "history_len": args.history,
        "row_bytes": args.row_bytes,
        "cpus": os.cpu_count(),
        "populate_events_per_s": round(args.users * args.history / populate_s),
        **{f"{k}_users_per_s": {b: round(v) for b, v in r.items()} for k, r in rates.items()},
        f"sustained_worker_cycle_{BATCH_SIZES[-1]}_users_per_s": round(sustained),
        "disk_bytes_per_user": round(total / args.users, 1),
        "sst_bytes_per_user": round(sst / args.users, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
