"""The state store across processes: a writer killed with SIGKILL at random moments never
leaves a half-applied batch, and a read-only open beside a live writer sees a consistent store.

The workload is deterministic: the event at offset ``o`` of partition ``p`` always belongs to
the same user and carries the same row, and a user's state is a fold of its events. So from a
partition's stored offset alone the test computes every user's exact update count, state, last
event time and history, and checks them all after each kill.

Run as a script (``python tests/test_state_store_crash.py STORE SEED``) this file is the
writer: it applies batches of random sizes in a loop, with redeliveries from older offsets and
verbatim replays, until it is killed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from state_store_fixtures import apply_events

from state_store import PartitionBatch, ReadOnlyStoreError, StateStore, StoreConfig

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

TOPIC = "interactions"
LOG = "test-cluster/interactions"
PARTITIONS = 2
USERS_PER_PARTITION = 24
CONFIG = StoreConfig(state_dim=3, history_len=6)
MODEL_VERSION = 7
REPO = Path(__file__).resolve().parent.parent


def user_of(partition: int, offset: int) -> str:
    return f"u{partition}-{(offset * 7 + offset // 11) % USERS_PER_PARTITION:02d}"


def row_of(partition: int, offset: int) -> bytes:
    return f"{partition}:{offset}:".encode().ljust(100, b".")


def step(state: np.ndarray, offset: int) -> np.ndarray:
    """Not idempotent, and exact in float32: (events seen, last offset, an order-sensitive hash)."""
    return np.array([state[0] + 1, offset, (state[1] * 31 + offset) % 1009], dtype=np.float32)


def make_batch(partition: int, start: int, size: int) -> PartitionBatch:
    offsets = list(range(start, start + size))
    return PartitionBatch(
        topic=TOPIC,
        partition=partition,
        log_id=LOG,
        last_offset=offsets[-1],
        offsets=np.array(offsets),
        user_ids=[user_of(partition, o) for o in offsets],
        ts=np.array([1000.0 + o for o in offsets]),
        rows=[row_of(partition, o) for o in offsets],
    )


class Expected:
    """Every user's record once all events up to an offset are applied, folded forward."""

    def __init__(self) -> None:
        self.next = [0] * PARTITIONS
        self.records: dict[str, tuple[np.ndarray, int, float, list[bytes]]] = {}

    def through(self, partition: int, last_offset: int) -> None:
        assert last_offset + 1 >= self.next[partition], "a stored offset went backwards"
        for o in range(self.next[partition], last_offset + 1):
            user = user_of(partition, o)
            state, count, _, rows = self.records.get(user, (np.zeros(3, np.float32), 0, 0.0, []))
            rows = [*rows, row_of(partition, o)][-CONFIG.history_len :]
            self.records[user] = (step(state, o), count + 1, 1000.0 + o, rows)
        self.next[partition] = last_offset + 1


def check_consistent(store: StateStore, expected: Expected) -> list[int]:
    """Assert every user's record is exactly what the stored offsets imply; return them."""
    offsets = []
    for p in range(PARTITIONS):
        stored = store.offset(TOPIC, p)
        last = -1 if stored is None else stored.last_offset
        expected.through(p, last)
        offsets.append(last)
    users = [f"u{p}-{i:02d}" for p in range(PARTITIONS) for i in range(USERS_PER_PARTITION)]
    got = store.get_many(users, history=True)
    for i, user in enumerate(users):
        state, count, ts, rows = expected.records.get(user, (np.zeros(3), 0, None, []))
        record = got.record(i)
        assert record.update_count == count, f"{user}: offsets {offsets}"
        assert record.history == rows, f"{user}: offsets {offsets}"
        np.testing.assert_array_equal(record.state, state, err_msg=f"{user}: offsets {offsets}")
        assert record.last_event_ts == ts
        assert record.model_version == (MODEL_VERSION if count else None)
    listed = {r.user_id: r.update_count for r in store.iter_users()}
    assert listed == {u: r[1] for u, r in expected.records.items()}
    return offsets


def writer(path: str, seed: int) -> None:
    """Apply batches until killed: fresh ones, redeliveries from an older offset, replays."""
    rng = random.Random(seed)
    store = StateStore.open(path, CONFIG)
    print("ready", flush=True)
    while True:
        p = rng.randrange(PARTITIONS)
        stored = store.offset(TOPIC, p)
        start = max(0, (stored.next_offset if stored else 0) - rng.choice([0, 0, 0, 7]))
        batch = make_batch(p, start, rng.randint(1, 300))
        apply_events(store, batch, MODEL_VERSION, step)
        if rng.random() < 0.2:
            # A replay that slips past the filter: apply must skip it whole, whatever it carries.
            before = store.get_many(batch.users()[0])
            result = store.apply(batch, before, before.states + 1, model_version=MODEL_VERSION)
            assert result.applied == 0 and result.skipped == len(batch), result


def start_writer(path: Path, seed: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(seed)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"writer did not start: {line!r} {proc.communicate()[1]}")
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the writer; fail if it had already died on its own (an assertion in it)."""
    if proc.poll() is not None:
        pytest.fail(f"writer exited with {proc.returncode}: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_a_writer_killed_at_random_moments_never_leaves_a_half_applied_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    rng = random.Random(1234)
    expected = Expected()
    progress = []
    for life in range(24):
        proc = start_writer(path, seed=life)
        time.sleep(rng.uniform(0.02, 0.3))
        kill(proc)
        with StateStore.open(path) as store:
            progress.append(sum(check_consistent(store, expected)))
    advanced = sum(b > a for a, b in zip([0, *progress], progress, strict=False))
    assert advanced >= len(progress) // 3, f"the writer made little progress: {progress}"


def test_a_read_only_open_beside_a_live_writer_sees_a_consistent_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the reader's own files
    path = tmp_path / "store"
    expected = Expected()
    proc = start_writer(path, seed=99)
    try:
        seen = []
        for _ in range(6):
            time.sleep(0.05)
            with StateStore.open(path, read_only=True) as reader:
                seen.append(check_consistent(reader, expected))
                for _ in range(3):
                    time.sleep(0.05)
                    reader.refresh()
                    seen.append(check_consistent(reader, expected))
                with pytest.raises(ReadOnlyStoreError):
                    reader.delete_user("u0-00")
        assert proc.poll() is None, "the writer stopped while being read"
    finally:
        kill(proc)
    assert sum(seen[-1]) > sum(seen[0]), f"the reader saw no progress: {seen}"


if __name__ == "__main__":
    writer(sys.argv[1], int(sys.argv[2]))
