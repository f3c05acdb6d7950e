"""Properties of the interactions applier: batched GRU updates equal per-event updates, replays
change nothing, bad records become dead letters, stale states are rebuilt, histories read back.

States are checked against ``reference_state``: the GRU stepped one event at a time with the
model's own interaction embedding, with no padding and no batching.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import SPEC, T0, event

from eventlog.log import EventLog
from eventlog.schema import Interaction, encode
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.dataset import build_examples, gather_batch
from model.features import Featurizer
from model.training import example_states
from model.user_state import advance, decode_history, served_state, unroll_events
from state_store import LogChangedError, StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.dead_letters import DeadLetter
from stream.records import ConsumedRecord

TOPIC = "interactions"
LOG = "cluster/topic"
CFG = ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, dropout=0.0)
STORE = StoreConfig(state_dim=16, history_len=6)
FEATURIZER = Featurizer(SPEC)
USERS = ("a", "b", "c")

# RocksDB syncs files as it creates a store; on tmpfs that costs nothing.
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int) -> UniRecModel:
    torch.manual_seed(seed)
    return UniRecModel(CFG, SPEC).eval()


MODEL = make_model(0)
OTHER_MODEL = make_model(1)


@contextmanager
def open_store() -> Iterator[StateStore]:
    """A new store in a temporary directory (hypothesis examples cannot share tmp_path)."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as directory, StateStore.open(
        Path(directory) / "store", STORE
    ) as store:
        yield store


def make_events(users: Sequence[str], seed: int = 0, start: int = 0) -> list[Interaction]:
    """One event per entry of ``users``, in time order (event ids unique from ``start``)."""
    rng = np.random.default_rng(seed)
    return [
        event(rng, user, T0 + 60.0 * (start + k), start + k) for k, user in enumerate(users)
    ]


def records(events: Sequence[Interaction], first_offset: int = 0, partition: int = 0
            ) -> list[ConsumedRecord]:
    return [
        ConsumedRecord(partition, first_offset + k, e.user_id.encode(), encode(e))
        for k, e in enumerate(events)
    ]


def apply(
    applier: InteractionApplier, batch: Sequence[ConsumedRecord], last_offset: int | None = None
):
    last = batch[-1].offset if last_offset is None else last_offset
    return applier.apply(TOPIC, 0, LOG, batch, last)


@torch.no_grad()
def reference_state(model: UniRecModel, events: Sequence[Interaction]) -> np.ndarray:
    """The GRU stepped once per event from zeros: [d]."""
    u = torch.zeros(1, model.cfg.d_model)
    for e in events:
        user = FEATURIZER.assemble_user(
            FEATURIZER.events([e]),
            np.zeros((1, 1), dtype=np.int64),
            np.asarray([e.ts]),
            FEATURIZER.users([e.user_id], [None]),
            FEATURIZER.contexts([{}]),
            u.numpy(),
        )
        u = model.gru(model.tokenizer.interaction(user)[:, 0], u)
    return u[0].numpy()


def of_user(events: Sequence[Interaction], user: str) -> list[Interaction]:
    return [e for e in events if e.user_id == user]


def contents(store: StateStore) -> tuple[list, dict]:
    """Everything the store holds, comparable with ==."""
    users = [
        (r.user_id, r.state.tobytes(), r.model_version, r.update_count, r.last_event_ts, r.history)
        for r in store.iter_users(history=True)
    ]
    return users, store.offsets()


def assert_same_records(store: StateStore, other: StateStore) -> None:
    """The same users, histories, counts and offsets, and states equal to float tolerance."""
    ours, theirs = list(store.iter_users(history=True)), list(other.iter_users(history=True))
    assert [(r.user_id, r.model_version, r.update_count, r.last_event_ts, r.history)
            for r in ours] == [
        (r.user_id, r.model_version, r.update_count, r.last_event_ts, r.history) for r in theirs
    ]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.state, b.state, atol=1e-5)
    assert store.offsets() == other.offsets()


user_lists = st.lists(st.sampled_from(USERS), min_size=1, max_size=12)
examples = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@examples
@given(users=user_lists)
def test_one_batch_equals_one_event_per_batch(users: list[str]) -> None:
    events = make_events(users)
    with open_store() as whole, open_store() as single:
        report = apply(InteractionApplier(whole, MODEL, 1), records(events))
        assert (report.applied, report.skipped, report.dead_letters) == (len(events), 0, [])
        one_by_one = InteractionApplier(single, MODEL, 1)
        for record in records(events):
            apply(one_by_one, [record])
        for user in set(users):
            a, b = whole.get(user), single.get(user)
            np.testing.assert_allclose(a.state, b.state, atol=1e-5)
            np.testing.assert_allclose(a.state, reference_state(MODEL, of_user(events, user)),
                                       atol=1e-5)
            assert (a.update_count, a.history) == (b.update_count, b.history)
            assert a.update_count == users.count(user)


@examples
@given(users=user_lists)
def test_interleaved_users_each_get_their_own_state(users: list[str]) -> None:
    events = make_events(users)
    with open_store() as mixed, open_store() as alone:
        apply(InteractionApplier(mixed, MODEL, 1), records(events))
        one_user = InteractionApplier(alone, MODEL, 1)
        for partition, user in enumerate(set(users)):  # a batch of the user's events only
            mine = records(of_user(events, user), partition=partition)
            one_user.apply(TOPIC, partition, LOG, mine, mine[-1].offset)
        for user in set(users):
            np.testing.assert_allclose(mixed.get(user).state, alone.get(user).state, atol=1e-5)
            np.testing.assert_allclose(
                mixed.get(user).state, reference_state(MODEL, of_user(events, user)), atol=1e-5
            )


@examples
@given(users=st.lists(st.sampled_from(USERS), min_size=2, max_size=12), data=st.data())
def test_replays_change_nothing(users: list[str], data: st.DataObject) -> None:
    events = make_events(users)
    batch = records(events)
    cut = data.draw(st.integers(1, len(batch) - 1), label="cut")
    overlap = data.draw(st.integers(0, cut), label="overlap")
    with open_store() as store, open_store() as once:
        applier = InteractionApplier(store, MODEL, 1)
        apply(applier, batch[:cut])
        before = contents(store)
        replay = apply(applier, batch[:cut])
        assert (replay.applied, replay.skipped, replay.users) == (0, cut, 0)
        assert contents(store) == before
        # A redelivery that overlaps the applied part applies only the new events.
        rest = apply(applier, batch[cut - overlap :])
        assert (rest.applied, rest.skipped) == (len(batch) - cut, overlap)
        apply(InteractionApplier(once, MODEL, 1), batch)
        assert_same_records(store, once)


@examples
@given(users=user_lists, data=st.data())
def test_the_stored_state_is_the_user_state_modules_unroll_over_the_users_events(
    users: list[str], data: st.DataObject
) -> None:
    """Whatever the batching, a user's stored state is ``model.user_state.unroll_events`` of
    all its events from zero; after a weight update (a new version) it is ``advance``: the
    stored history window rebuilt under the new weights, then the new events."""
    events = make_events(users)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(events)), max_size=3), "cuts")))
    bounds = list(zip([0, *cuts], [*cuts, len(events)], strict=True))
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        for a, b in bounds:
            if a < b:
                apply(applier, records(events[a:b], a))
        mine = [of_user(events, user) for user in USERS]
        expected = unroll_events(MODEL, FEATURIZER, mine, np.zeros((len(USERS), 16)))
        for u, user in enumerate(USERS):
            if mine[u]:
                np.testing.assert_allclose(store.get(user).state, expected[u], atol=1e-5)
        stored = {user: store.get(user, history=True) for user in USERS}
        later = make_events(list(USERS), seed=3, start=len(events))
        apply(InteractionApplier(store, OTHER_MODEL, 2), records(later, len(events)))
        expected = advance(
            OTHER_MODEL, FEATURIZER, np.stack([stored[user].state for user in USERS]),
            np.asarray([not stored[user].is_new for user in USERS]),
            [decode_history(stored[user].history or []) for user in USERS],
            [of_user(later, user) for user in USERS])
        for u, user in enumerate(USERS):
            np.testing.assert_allclose(store.get(user).state, expected[u], atol=1e-5)


@examples
@given(users=st.lists(st.sampled_from(USERS), min_size=1, max_size=30), data=st.data())
def test_the_stored_state_is_the_state_offline_training_uses_for_the_next_example(
    users: list[str], data: st.DataObject
) -> None:
    """State as served: after the applier has applied a log (in any batching), the state it
    stores for a user equals u_t of that user's next example on the offline path (carried
    states of the log, then the history window unrolled from the carried state before it, as
    training and ``unirec eval`` compute it), histories longer than the window included."""
    events = make_events(users)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(events)), max_size=3), "cuts")))
    nexts = make_events(list(USERS), seed=5, start=len(events))
    log = EventLog("small", [*events, *nexts], np.zeros(len(events) + len(nexts), np.int8))
    examples = build_examples(log, FEATURIZER, CFG.history_len, start=len(events))
    with torch.no_grad():
        user, _ = gather_batch(examples, FEATURIZER, np.arange(len(USERS)), CFG.d_model,
                               example_states(MODEL, examples))
        offline = served_state(MODEL, user).state.numpy()
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True):
            if a < b:
                apply(applier, records(events[a:b], a))
        for u, user_id in enumerate(USERS):
            stored = store.get(user_id)
            expected = np.zeros(CFG.d_model, np.float32) if stored.is_new else stored.state
            np.testing.assert_allclose(offline[u], expected, atol=2e-5)


def test_bad_records_become_dead_letters_and_the_rest_is_applied() -> None:
    events = make_events(["a", "b", "a", "b", "a", "a", "b", "a"])
    good = records(events)
    raw = msgspec.json.decode(good[1].value)
    bad = {
        1: (b"{not json", "malformed"),
        3: (msgspec.json.encode({**raw, "ts": "yesterday"}), "$.ts"),
        4: (b'{"event_id":"e","user_id":"a","item_id":"i","action":"click","ts":1e999}',
            "$.ts"),
        6: (msgspec.json.encode({**raw, "user_id": ""}), "user_id"),
    }
    batch = [
        r._replace(value=bad[r.offset][0]) if r.offset in bad else r
        for r in good
    ]
    batch[5] = good[5]._replace(key=b"b")  # a's event under b's key
    batch[7] = good[7]._replace(key=None)  # no key: its partition is a guess
    with open_store() as store:
        report = apply(InteractionApplier(store, MODEL, 1), batch)
        letters = {d.offset: d for d in report.dead_letters}
        assert sorted(letters) == [1, 3, 4, 5, 6, 7]
        for offset, (value, reason) in bad.items():
            assert letters[offset].value == value
            assert reason in letters[offset].reason
        assert "differs from the message's user_id" in letters[5].reason
        assert letters[5].key == b"b"
        assert "record has no key" in letters[7].reason
        assert all((d.topic, d.partition) == (TOPIC, 0) for d in report.dead_letters)
        assert msgspec.json.decode(letters[5].encode(), type=DeadLetter) == letters[5]
        applied = [events[i] for i in (0, 2)]
        assert (report.applied, report.users) == (2, 1)
        np.testing.assert_allclose(
            store.get("a").state, reference_state(MODEL, applied), atol=1e-5
        )
        assert decode_history(store.get("a").history) == applied
        assert store.get("b").is_new
        assert store.offset(TOPIC, 0).last_offset == 7


def test_poison_batch_still_moves_the_offset() -> None:
    batch = [ConsumedRecord(0, o, b"a", b"\xff poison") for o in (10, 11)]
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        report = apply(applier, batch, last_offset=12)
        assert [d.offset for d in report.dead_letters] == [10, 11]
        assert (report.applied, report.last_offset) == (0, 12)
        assert store.resume_offset(TOPIC, 0, LOG, end_offset=13) == 13
        again = apply(applier, batch, last_offset=12)
        assert (again.dead_letters, again.skipped) == ([], 2)
        assert not list(store.iter_users())


def test_dead_letters_are_handed_over_before_the_write() -> None:
    batch = [*records(make_events(["a"])), ConsumedRecord(0, 1, b"a", b"{}")]
    seen: list[tuple[list[DeadLetter], object]] = []
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        applier.apply(
            TOPIC, 0, LOG, batch, 1,
            on_dead_letters=lambda dead: seen.append((dead, store.offset(TOPIC, 0))),
        )
        assert [(len(dead), stored) for dead, stored in seen] == [(1, None)]
        assert store.offset(TOPIC, 0).last_offset == 1


def test_stale_state_is_rebuilt_from_the_stored_history() -> None:
    old = make_events(["a"] * 9 + ["b"] * 2)
    new = make_events(["a", "c", "a", "b"], seed=1, start=len(old))
    with open_store() as store:
        apply(InteractionApplier(store, MODEL, 1), records(old))
        stale_a = store.get("a").state
        report = apply(InteractionApplier(store, OTHER_MODEL, 2), records(new, len(old)))
        assert (report.applied, report.rebuilt) == (4, 2)
        window = STORE.history_len  # "a" had 9 events: only the newest 6 are rebuilt from
        for user, history in (("a", of_user(old, "a")[-window:]), ("b", of_user(old, "b"))):
            expected = reference_state(OTHER_MODEL, history + of_user(new, user))
            record = store.get(user)
            np.testing.assert_allclose(record.state, expected, atol=1e-5)
            assert record.model_version == 2
        np.testing.assert_allclose(
            store.get("c").state, reference_state(OTHER_MODEL, of_user(new, "c")), atol=1e-5
        )
        # Without the rebuild the new weights would continue the old weights' state.
        continued = reference_state(OTHER_MODEL, of_user(new, "a"))
        assert not np.allclose(stale_a, 0) and not np.allclose(
            store.get("a").state, continued, atol=1e-3
        )
        # Once rebuilt, a state of the current version is continued, not rebuilt again.
        more = make_events(["a"], seed=2, start=len(old) + len(new))
        assert apply(InteractionApplier(store, OTHER_MODEL, 2),
                     records(more, len(old) + len(new))).rebuilt == 0


@examples
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_histories_read_back_newest_last_and_bounded(sizes: list[int]) -> None:
    users = [USERS[k % 2] for k in range(sum(sizes))]
    events = make_events(users)
    batch = records(events)
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        start = 0
        for size in sizes:
            apply(applier, batch[start : start + size])
            start += size
        for user in set(users):
            mine = of_user(events, user)
            record = store.get(user)
            assert decode_history(record.history) == mine[-STORE.history_len :]
            assert record.update_count == len(mine)
            assert record.last_event_ts == mine[-1].ts


def test_mismatched_store_log_and_offsets_are_refused(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "small", StoreConfig(state_dim=8)) as small, pytest.raises(
        ValueError, match="d_model is 16"
    ):
        InteractionApplier(small, MODEL, 1)
    batch = records(make_events(["a", "b"]))
    with open_store() as store:
        applier = InteractionApplier(store, MODEL, 1)
        with pytest.raises(ValueError, match="strictly increasing"):
            apply(applier, batch[::-1], last_offset=1)
        with pytest.raises(ValueError, match="last_offset"):
            apply(applier, batch, last_offset=0)
        apply(applier, batch)
        with pytest.raises(LogChangedError):
            applier.apply(TOPIC, 0, "another/log", batch, 1)


def test_a_batch_that_fails_as_a_whole_is_bisected_to_the_failing_events() -> None:
    """A model version whose embedding row of one item is NaN makes every event of that item
    compute a NaN state: those events become dead letters (found by bisection), and every
    other event of the batch is applied once, exactly as if the bad ones were never sent."""
    events = make_events(["a", "b", "a", "c", "b", "a", "c", "a"])
    poisoned_item = events[2].item_id
    broken = make_model(0)
    bucket = int(FEATURIZER.events([events[2]]).item[0])
    with torch.no_grad():
        broken.tokenizer.table.weight[bucket] = float("nan")
    bad = [k for k, e in enumerate(events) if e.item_id == poisoned_item]
    good = [e for k, e in enumerate(events) if k not in bad]
    with open_store() as store, open_store() as reference:
        report = apply(InteractionApplier(store, broken, 1), records(events))
        assert [d.offset for d in report.dead_letters] == bad
        assert all(d.reason.startswith("cannot apply the event: NonFiniteStateError")
                   for d in report.dead_letters)
        assert (report.applied, store.offset(TOPIC, 0).last_offset) == (len(good), 7)
        for user in "abc":
            mine = [e for e in good if e.user_id == user]
            apply(InteractionApplier(reference, broken, 1),
                  records(mine, first_offset=100 * (ord(user) - ord("a"))))
            np.testing.assert_allclose(store.get(user).state, reference.get(user).state,
                                       atol=1e-6)
            assert decode_history(store.get(user).history) == mine


def test_an_oversized_record_is_a_bounded_dead_letter() -> None:
    """A 5 MB record is rejected undecoded; its dead letter keeps 4 KB of it, its length and
    its hash, so it fits any broker's message limit."""
    huge = b'{"event_id": "' + b"x" * 5_000_000 + b'"}'
    with open_store() as store:
        report = apply(InteractionApplier(store, MODEL, 1),
                       [ConsumedRecord(0, 0, b"a" * 9000, huge)])
    (letter,) = report.dead_letters
    assert letter.reason.startswith("record value is 5000016 bytes, over the limit")
    assert (letter.value_bytes, len(letter.value), len(letter.key)) == (len(huge), 4096, 256)
    assert letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert len(letter.encode()) < 8192


def test_an_applier_following_a_serving_model_applies_each_batch_with_its_current_pair() -> None:
    """``InteractionApplier.following``: the model and version are read at each batch from
    the one owner (the worker's scorer), so a swap there moves the applier too; the states
    written equal those of an applier fixed to each model in turn."""
    live = [(MODEL, 1)]
    events = make_events(["a", "b", "a", "b"])
    with open_store() as followed, open_store() as fixed:
        follower = InteractionApplier.following(followed, lambda: live[0])
        apply(follower, records(events[:2]))
        apply(InteractionApplier(fixed, MODEL, 1), records(events[:2]))
        live[0] = (OTHER_MODEL, 2)
        assert follower.model_version == 2
        apply(follower, records(events[2:], 2))
        apply(InteractionApplier(fixed, OTHER_MODEL, 2), records(events[2:], 2))
        for user in "ab":
            assert followed.get(user).model_version == 2
            np.testing.assert_array_equal(followed.get(user).state, fixed.get(user).state)
