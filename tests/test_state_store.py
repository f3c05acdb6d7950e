"""Properties of the state store (single process): exactly-once apply, bounded history,
checkpoints, corruption detection, read-only access, deletion, float16 states, log identity."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_store_fixtures import apply_events, step

from state_store import (
    NO_MODEL_VERSION,
    ConfigMismatchError,
    CorruptValueError,
    LogChangedError,
    OffsetBeyondEndError,
    PartitionBatch,
    ReadOnlyStoreError,
    RecordBatch,
    StaleUpdateError,
    StateStore,
    StateStoreError,
    StoreConfig,
    TopicPartition,
)
from state_store.keys import history_prefix, offset_key, slot_suffixes, state_key
from state_store.rocks import open_rocksdb

TOPIC = "interactions"
LOG = "cluster-a/topic-1"
CONFIG = StoreConfig(state_dim=4, history_len=5)


def make_batch(
    offsets: Sequence[int],
    users: Sequence[str],
    *,
    partition: int = 0,
    topic: str = TOPIC,
    log_id: str = LOG,
    last_offset: int | None = None,
) -> PartitionBatch:
    """Events whose row and time derive from their offset."""
    return PartitionBatch(
        topic=topic,
        partition=partition,
        log_id=log_id,
        last_offset=max(offsets) if last_offset is None else last_offset,
        offsets=np.asarray(offsets),
        user_ids=list(users),
        ts=1000.0 + np.asarray(offsets, dtype=np.float64),
        rows=[f"row-{partition}-{o}".encode() for o in offsets],
    )


def contents(store: StateStore) -> tuple[list, dict]:
    """Everything a store holds, comparable with ==."""
    users = [
        (r.user_id, r.state.tolist(), r.model_version, r.update_count, r.last_event_ts, r.history)
        for r in store.iter_users(history=True)
    ]
    return users, store.offsets()


def contents_of(store: StateStore, users: list[str]) -> list:
    """The records of ``users``, comparable with ==."""
    batch = store.get_many(users, history=True)
    return [
        (u, batch.states[i].tolist(), int(batch.update_counts[i]), batch.histories[i])
        for i, u in enumerate(users)
    ]


@pytest.fixture(autouse=True)
def scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Read-only opens keep files in a temporary directory: put it under tmp_path."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


@pytest.fixture
def store(tmp_path: Path):
    with StateStore.open(tmp_path / "store", CONFIG) as s:
        yield s


def test_applying_a_batch_twice_changes_nothing_the_second_time(store: StateStore) -> None:
    batch = make_batch(range(10), ["a", "b", "a", "c", "a", "b", "d", "a", "c", "e"])
    first = apply_events(store, batch)
    assert (first.applied, first.skipped, first.users, first.last_offset) == (10, 0, 5, 9)
    after_first = contents(store)

    # Redelivered: the worker's own filter finds nothing new...
    assert len(store.new_events(batch)) == 0
    # ...and a replay that slips past it is skipped by apply itself, whatever states it carries.
    users, _ = batch.users()
    before = store.get_many(users)
    second = store.apply(batch, before, before.states + 7.0, model_version=2)
    assert (second.applied, second.skipped, second.users, second.last_offset) == (0, 10, 0, 9)
    assert contents(store) == after_first


def test_apply_counts_updates_and_keeps_state_time_and_version(store: StateStore) -> None:
    apply_events(store, make_batch([0, 1, 2], ["a", "b", "a"]), model_version=3)
    a = store.get("a")
    assert a.update_count == 2
    assert a.model_version == 3
    assert a.last_event_ts == 1002.0
    np.testing.assert_array_equal(a.state, step(step(np.zeros(4, np.float32), 0), 2))
    assert a.history == [b"row-0-0", b"row-0-2"]


def test_a_redelivery_from_an_older_offset_applies_only_the_new_events(store: StateStore) -> None:
    apply_events(store, make_batch(range(6), ["a", "b"] * 3))
    result = apply_events(store, make_batch(range(3, 10), ["b", "a", "b", "a", "b", "a", "b"]))
    assert (result.applied, result.skipped, result.last_offset) == (4, 0, 9)
    assert store.get("a").update_count == 5  # offsets 0 2 4 6 8
    assert store.get("b").history == [b"row-0-1", b"row-0-3", b"row-0-5", b"row-0-7", b"row-0-9"]


def test_apply_rejects_a_state_that_includes_already_applied_events(store: StateStore) -> None:
    """A batch straddling the stored offset, applied without filtering: a user whose new
    state mixes applied and new events would be double-applied, so nothing is written."""
    apply_events(store, make_batch(range(4), ["a", "b", "a", "b"]))
    saved = contents(store)
    batch = make_batch(range(2, 6), ["a", "b", "a", "b"])
    before = store.get_many(["a", "b"])
    with pytest.raises(StaleUpdateError, match="'a'"):
        store.apply(batch, before, before.states, model_version=1)
    assert contents(store) == saved


def test_apply_rejects_states_computed_from_a_record_that_has_since_changed(
    store: StateStore,
) -> None:
    apply_events(store, make_batch([0], ["a"]))
    stale = store.get_many(["a"])
    apply_events(store, make_batch([1], ["a"]))
    saved = contents(store)
    with pytest.raises(StaleUpdateError, match="update count 2 in the store but 1"):
        store.apply(make_batch([2], ["a"]), stale, stale.states, model_version=1)
    # The same holds for a hand-made batch, which carries no read mark.
    unmarked = dataclasses.replace(stale, read_mark=None)
    with pytest.raises(StaleUpdateError):
        store.apply(make_batch([2], ["a"]), unmarked, stale.states, model_version=1)
    assert contents(store) == saved


def test_a_batch_of_only_rejected_events_still_advances_the_offset(store: StateStore) -> None:
    empty = make_batch([], [], last_offset=41)
    result = store.apply(empty, store.get_many([]), np.zeros((0, 4)), model_version=1)
    assert (result.applied, result.last_offset) == (0, 41)
    assert store.offset(TOPIC, 0).next_offset == 42


def test_offsets_are_kept_per_topic_and_partition(store: StateStore) -> None:
    apply_events(store, make_batch([5], ["a"], partition=0))
    apply_events(store, make_batch([2], ["b"], partition=1))
    apply_events(store, make_batch([9], ["c"], topic="other"))
    offsets = {tp: o.last_offset for tp, o in store.offsets().items()}
    assert offsets == {
        TopicPartition(TOPIC, 0): 5,
        TopicPartition(TOPIC, 1): 2,
        TopicPartition("other", 0): 9,
    }
    # An offset of partition 0 says nothing about partition 1.
    assert len(store.new_events(make_batch([3], ["b"], partition=1))) == 1


# Each example gets its own fresh directory under tmp_path.
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    history_len=st.integers(1, 7),
    batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    data=st.data(),
)
def test_history_stays_bounded_and_keeps_the_newest_events_in_order(
    tmp_path: Path, history_len: int, batch_sizes: list[int], data: st.DataObject
) -> None:
    config = StoreConfig(state_dim=2, history_len=history_len)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp, StateStore.open(tmp, config) as store:
        offset, seen = 0, {"a": [], "b": []}
        for size in batch_sizes:
            users = data.draw(st.lists(st.sampled_from("ab"), min_size=size, max_size=size))
            batch = make_batch(range(offset, offset + size), users)
            apply_events(store, batch)
            for u, row in zip(users, batch.rows, strict=True):
                seen[u].append(row)
            offset += size
            for u, rows in seen.items():
                record = store.get(u)
                assert record.update_count == len(rows)
                assert record.history == rows[-history_len:]
        by_iteration = {r.user_id: r.history for r in store.iter_users(history=True)}
        assert by_iteration == {u: rows[-history_len:] for u, rows in seen.items() if rows}


def test_checkpoint_reopens_with_the_same_contents(store: StateStore, tmp_path: Path) -> None:
    for start in range(0, 40, 8):
        apply_events(store, make_batch(range(start, start + 8), list("abcdefgh")))
    at_checkpoint = contents(store)
    store.checkpoint(tmp_path / "ckpt")
    apply_events(store, make_batch([40], ["a"]))  # later writes do not reach the checkpoint

    with StateStore.open(tmp_path / "ckpt", read_only=True) as snapshot:
        assert contents(snapshot) == at_checkpoint
        assert snapshot.config == CONFIG
    with StateStore.restore(tmp_path / "ckpt", tmp_path / "restored") as restored:
        assert contents(restored) == at_checkpoint
        apply_events(restored, make_batch([40, 41], ["a", "z"]))
        assert restored.get("z").update_count == 1
    with StateStore.open(tmp_path / "ckpt", read_only=True) as snapshot:
        assert contents(snapshot) == at_checkpoint  # restoring left the checkpoint untouched


def _write_raw(path: Path, key: bytes, value: bytes, family: str = "users") -> None:
    """Put ``value`` at ``key`` of ``family``, bypassing the store's encoding."""
    db = open_rocksdb(path, create=False, reader_dir=None, cache_bytes=1 << 20)
    db.get_column_family(family)[key] = value
    db.close()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    ids=["truncated", "unknown-version", "wrong-dtype", "zero-count"],
    argvalues=[
        (b"\x07garbage", "shorter than"),
        (b"\x09" + bytes(27 + 16), "unknown format version 9"),
        (b"\x01\x02\x04\x00" + bytes(24 + 8), "dtype code 2"),
        (b"\x01\x01\x04\x00" + bytes(24 + 16), "update count 0"),
    ],
)
def test_a_corrupt_record_raises_an_error_naming_its_key_and_apply_writes_nothing(
    tmp_path: Path, garbage: bytes, reason: str
) -> None:
    path = tmp_path / "store"
    with StateStore.open(path, CONFIG) as store:
        apply_events(store, make_batch([0, 1], ["alice", "bob"]))
    _write_raw(path, state_key(b"alice"), garbage)

    with StateStore.open(path) as store:
        saved = contents_of(store, ["bob"])
        with pytest.raises(CorruptValueError, match=reason) as err:
            store.get("alice")
        assert err.value.key == b"salice"
        assert "salice" in str(err.value)
        with pytest.raises(CorruptValueError):
            store.get_many(["bob", "alice"])
        with pytest.raises(CorruptValueError):
            list(store.iter_users())

        # The worker holds records of both users (say, read before the corruption).
        before = RecordBatch(
            user_ids=["alice", "bob"],
            states=np.zeros((2, 4), np.float32),
            model_versions=np.array([1, 1]),
            update_counts=np.array([1, 1]),
            last_event_ts=np.array([1000.0, 1001.0]),
            histories=None,
        )
        with pytest.raises(CorruptValueError) as err:
            store.apply(
                make_batch([2, 3], ["alice", "bob"]), before, before.states + 1, model_version=2
            )
        assert err.value.key == b"salice"
        assert contents_of(store, ["bob"]) == saved
        assert store.offset(TOPIC, 0).last_offset == 1
    db = open_rocksdb(path, create=False, reader_dir=tmp_path / "reader", cache_bytes=1 << 20)
    assert db.get_column_family("users")[state_key(b"alice")] == garbage  # never overwritten


def test_a_corrupt_history_row_raises_an_error_naming_its_key(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with StateStore.open(path, CONFIG) as store:
        apply_events(store, make_batch([0, 1, 2], ["a", "a", "a"]))
    slot_key = history_prefix(b"a") + slot_suffixes(CONFIG.history_len)[1]
    _write_raw(path, slot_key, b"\x01junk")
    with StateStore.open(path) as store:
        assert store.get("a", history=False).update_count == 3
        with pytest.raises(CorruptValueError) as err:
            store.get("a")
        assert err.value.key == slot_key


def test_a_corrupt_offset_raises_an_error_naming_its_key_and_apply_writes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    with StateStore.open(path, CONFIG) as store:
        apply_events(store, make_batch([0], ["a"]))
    key = offset_key(TOPIC, 0)
    _write_raw(path, key, b"\x05??", family="offsets")
    with StateStore.open(path) as store:
        with pytest.raises(CorruptValueError) as err:
            store.offset(TOPIC, 0)
        assert (err.value.key, err.value.column_family) == (key, "offsets")
        before = store.get_many(["a"])
        with pytest.raises(CorruptValueError):
            store.apply(make_batch([1], ["a"]), before, before.states + 1, model_version=1)
        assert store.get("a").update_count == 1


def test_missing_users_read_as_new(store: StateStore) -> None:
    apply_events(store, make_batch([0], ["known"]))
    batch = store.get_many(["nobody", "known", "nobody-else"], history=True)
    assert batch.update_counts.tolist() == [0, 1, 0]
    assert batch.is_new.tolist() == [True, False, True]
    assert batch.model_versions.tolist() == [NO_MODEL_VERSION, 1, NO_MODEL_VERSION]
    assert np.isnan(batch.last_event_ts[[0, 2]]).all()
    assert not batch.states[[0, 2]].any()
    assert batch.histories == [[], [b"row-0-0"], []]
    new = store.get("nobody")
    assert new.is_new and new.model_version is None and new.last_event_ts is None
    assert new.history == []


def test_delete_removes_a_users_state_and_history(store: StateStore) -> None:
    apply_events(store, make_batch(range(7), ["gone", "kept"] * 3 + ["gone"]))
    assert store.delete_user("gone") is True
    assert store.delete_user("gone") is False
    assert store.get("gone").is_new and store.get("gone").history == []
    assert [r.user_id for r in store.iter_users()] == ["kept"]
    # Events after the deletion start a fresh history: no old row comes back.
    apply_events(store, make_batch([7], ["gone"]))
    assert store.get("gone").history == [b"row-0-7"]
    assert store.get("kept").update_count == 3


def test_read_only_open_sees_the_data_and_refuses_writes(tmp_path: Path, scratch_dir: Path) -> None:
    path = tmp_path / "store"
    with StateStore.open(path, CONFIG) as writer:
        apply_events(writer, make_batch(range(4), ["a", "b", "a", "c"]))
        expected = contents(writer)
        # Opened while the writer still has the store open.
        with StateStore.open(path, read_only=True) as reader:
            assert contents(reader) == expected
            batch = make_batch([9], ["a"])
            before = reader.get_many(["a"])
            with pytest.raises(ReadOnlyStoreError):
                reader.apply(batch, before, before.states, model_version=1)
            with pytest.raises(ReadOnlyStoreError):
                reader.delete_user("a")
            with pytest.raises(ReadOnlyStoreError):
                reader.reset_partition(TOPIC, 0)
            with pytest.raises(ReadOnlyStoreError):
                reader.checkpoint(tmp_path / "ckpt")
            assert contents(reader) == expected
            apply_events(writer, make_batch([4], ["d"]))
            assert contents(reader) == expected  # a view as of its opening...
            reader.refresh()
            assert contents(reader) == contents(writer)  # ...until refreshed
        assert list(scratch_dir.iterdir()) == []  # the reader's own files are gone
    with pytest.raises(StateStoreError, match="no state store"):
        StateStore.open(tmp_path / "absent", read_only=True)


def test_float16_states_round_trip_within_float16_precision(tmp_path: Path) -> None:
    config = StoreConfig(state_dim=16, state_dtype="float16", history_len=3)
    rng = np.random.default_rng(0)
    states = rng.standard_normal((3, 16)).astype(np.float32)
    with StateStore.open(tmp_path / "store", config) as store:
        batch = make_batch([0, 1, 2], ["a", "b", "c"])
        store.apply(batch, store.get_many(["a", "b", "c"]), states, model_version=1)
        read = store.get_many(["a", "b", "c"]).states
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, states.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(read, states, rtol=1e-3, atol=1e-4)
    with StateStore.open(tmp_path / "store") as store:
        assert store.config.state_dtype == "float16"  # recorded at creation
    with pytest.raises(ConfigMismatchError) as err:
        StateStore.open(tmp_path / "store", StoreConfig(state_dim=16, history_len=3))
    # The refused open released the store even while its error is still held.
    with StateStore.open(tmp_path / "store") as store:
        assert err.value is not None and store.config == config


def test_offsets_carry_the_log_identity_and_resume_checks_it(store: StateStore) -> None:
    assert store.resume_offset(TOPIC, 0, LOG, end_offset=100) is None
    apply_events(store, make_batch([10, 11], ["a", "b"]))
    assert store.offset(TOPIC, 0).log_id == LOG
    assert store.resume_offset(TOPIC, 0, LOG, end_offset=100) == 12
    with pytest.raises(LogChangedError, match=r"interactions\[0\].*cluster-b"):
        store.resume_offset(TOPIC, 0, "cluster-b/topic-1", end_offset=100)
    with pytest.raises(OffsetBeyondEndError, match="end offset 11"):
        store.resume_offset(TOPIC, 0, LOG, end_offset=11)
    # A batch from another log is neither filtered nor applied against these offsets.
    other = make_batch([0], ["a"], log_id="cluster-b/topic-1")
    with pytest.raises(LogChangedError):
        store.new_events(other)
    with pytest.raises(LogChangedError):
        store.apply(other, store.get_many(["a"]), np.zeros((1, 4)), model_version=1)
    # Told to treat the log as new: forget the offset, then its events apply from the start.
    store.reset_partition(TOPIC, 0)
    assert apply_events(store, other).applied == 1
    assert store.offset(TOPIC, 0).log_id == "cluster-b/topic-1"
    assert store.get("a").update_count == 2


def test_iteration_pages_through_users_in_order(store: StateStore) -> None:
    users = ["u3", "u1", "u10", "u2", "é"]
    apply_events(store, make_batch(range(5), users))
    assert [r.user_id for r in store.iter_users()] == sorted(users, key=str.encode)
    assert [r.user_id for r in store.iter_users(after="u10")] == ["u2", "u3", "é"]
    assert [r.user_id for r in store.iter_users(after="u0")] == ["u1", "u10", "u2", "u3", "é"]


def test_malformed_arguments_are_rejected_before_anything_is_written(store: StateStore) -> None:
    batch = make_batch([0, 1], ["a", "b"])
    before = store.get_many(["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        store.apply(batch, before, np.zeros((2, 3)), model_version=1)
    with pytest.raises(ValueError, match="NaN"):
        store.apply(batch, before, np.full((2, 4), np.nan), model_version=1)
    with pytest.raises(ValueError, match="'b'"):
        store.apply(batch, store.get_many(["a"]), np.zeros((1, 4)), model_version=1)
    with pytest.raises(ValueError, match="'b' has no events"):
        store.apply(make_batch([0], ["a"]), before, np.zeros((2, 4)), model_version=1)
    with pytest.raises(ValueError, match="model_version"):
        store.apply(batch, before, np.zeros((2, 4)), model_version=-1)
    with pytest.raises(ValueError, match="NUL"):
        store.get_many(["a\x00b"])
    with pytest.raises(ValueError, match="increasing"):
        make_batch([3, 2], ["a", "b"])
    assert store.offsets() == {}
    assert list(store.iter_users()) == []
