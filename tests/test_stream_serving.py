"""Serving: impressions score with the stored state and history, results are ranked; the
feedback window evicts by time and size and joins labels to what was scored."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from model_fixtures import (
    PROFILES,
    T0,
    context,
    event,
    fresh_model,
    make_candidates,
)

from eventlog.schema import Candidate, Impression, Interaction, Label, encode
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.scorer import Scorer
from model.user_state import rebuild
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.drift_tracker import DriftConfig, DriftTracker
from stream.metrics import WorkerMetrics
from stream.records import ConsumedRecord
from stream.serving import (
    FeedbackWindow,
    ImpressionScorer,
    LabelBuffer,
    ScoredImpression,
    Scores,
)

CFG = ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, dropout=0.0)
STORE = StoreConfig(state_dim=16, history_len=6)
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None  # RocksDB's syncs cost nothing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int) -> UniRecModel:
    """``model_fixtures.fresh_model`` (logits that move with the inputs) with this module's
    config."""
    return fresh_model(seed, **CFG.to_dict())


SCORER = Scorer(make_model(0), torch.device("cpu"))
TWIN = Scorer(make_model(1), torch.device("cpu"))


@pytest.fixture
def store() -> Iterator[StateStore]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as directory, StateStore.open(
        Path(directory) / "store", STORE
    ) as opened:
        yield opened


def apply_events(store: StateStore, users: Sequence[str], version: int = 1
                 ) -> list[Interaction]:
    """Apply one event per entry of ``users`` (offsets after the stored one); the events."""
    stored = store.offset("interactions", 0)
    first = 0 if stored is None else stored.next_offset
    rng = np.random.default_rng(first)
    events = [event(rng, u, T0 + 60.0 * (first + k), first + k) for k, u in enumerate(users)]
    records = [ConsumedRecord(0, first + k, e.user_id.encode(), encode(e))
               for k, e in enumerate(events)]
    InteractionApplier(store, SCORER.model, version).apply(
        "interactions", 0, "log", records, records[-1].offset
    )
    return events


def impression(request_id: str, user: str, n_cands: int = 5, ts: float = T0 + 1e5
               ) -> Impression:
    rng = np.random.default_rng(len(request_id))
    return Impression(request_id, user, ts, make_candidates(len(request_id), n_cands),
                      context(rng))


def test_a_stored_user_scores_with_its_stored_state_and_history(store: StateStore) -> None:
    events = apply_events(store, ["u1", "u2", "u1", "u1", "u2", "u1"])
    scorer = ImpressionScorer(store, SCORER, 1, PROFILES)
    request = impression("r1", "u1")
    scored = scorer.score(request)
    record = store.get("u1")
    mine = [e for e in events if e.user_id == "u1"]
    assert scored.history == mine
    np.testing.assert_array_equal(scored.state, record.state)
    assert not scored.state_rebuilt and scored.static is None
    direct = SCORER.score(request, mine, PROFILES["u1"], record.state)
    np.testing.assert_allclose(scored.dynamic, direct, atol=1e-6)
    # The state is really read: scoring with a zero state gives other scores.
    assert not np.allclose(direct, SCORER.score(request, mine, PROFILES["u1"]), atol=1e-4)
    assert scored.read_s >= 0 and scored.score_s > 0


def test_a_new_user_scores_finitely_with_a_zero_state(store: StateStore) -> None:
    scored = ImpressionScorer(store, SCORER, 1).score(impression("r2", "nobody", 7))
    assert scored.history == [] and not scored.state.any()
    assert scored.dynamic.shape == (7,) and np.isfinite(scored.dynamic).all()
    assert ((scored.dynamic > 0) & (scored.dynamic < 1)).all()


def test_results_are_ranked_and_encode_as_the_scores_payload(store: StateStore) -> None:
    apply_events(store, ["u3", "u3"])
    request = impression("r3", "u3", 9)
    for twin in (None, TWIN):
        scored = ImpressionScorer(store, SCORER, 4, PROFILES, static=twin).score(request)
        payload = scored.scores
        assert (payload.request_id, payload.user_id, payload.model_version) == ("r3", "u3", 4)
        values = [item.score for item in payload.items]
        assert values == sorted(values, reverse=True)
        order = sorted(range(9), key=lambda c: -scored.dynamic[c])
        assert [i.item_id for i in payload.items] == [
            request.candidates[c].item_id for c in order
        ]
        if twin is None:
            assert all(item.static_score is None for item in payload.items)
        else:
            direct = TWIN.score(request, scored.history, PROFILES["u3"])
            statics = {i.item_id: i.static_score for i in payload.items}
            assert statics == {c.item_id: float(s) for c, s in zip(request.candidates, direct,
                                                                    strict=True)}
        decoded = msgspec.json.decode(payload.encode())
        assert set(decoded) == {"request_id", "user_id", "model_version", "items"}
        assert set(decoded["items"][0]) == {"item_id", "score", "static_score"}
        assert msgspec.json.decode(payload.encode(), type=Scores) == payload


def test_a_batch_of_impressions_is_read_in_one_multi_get(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_events(store, ["u0", "u1", "u0"])
    requests = [impression("ra", "u0"), impression("rbb", "u1"), impression("rccc", "u0"),
                impression("rdddd", "new")]
    scorer = ImpressionScorer(store, SCORER, 1, PROFILES)
    one_by_one = [scorer.score(r) for r in requests]
    reads: list[list[str]] = []
    get_many = store.get_many
    monkeypatch.setattr(store, "get_many", lambda users, **kw: reads.append(users) or get_many(
        users, **kw))
    batched = scorer.score_many(requests)
    assert reads == [["u0", "u1", "new"]]
    for a, b in zip(one_by_one, batched, strict=True):
        assert_scored_alike(a, b)


@pytest.mark.parametrize("version", [1, 2])
def test_pending_interactions_score_as_if_they_were_applied(store: StateStore, version: int
                                                            ) -> None:
    """At version 2 the stored states (written at 1) are stale: the scorer rebuilds them and
    advances them by the pending events in one unroll, as the applier does when it applies
    them."""
    apply_events(store, ["u0", "u1"])
    requests = [impression("ra", "u0"), impression("rbb", "u1"), impression("rccc", "new")]
    rng = np.random.default_rng(7)
    pending = [[event(rng, "u0", T0 + 5000.0, 90), event(rng, "u0", T0 + 5060.0, 91)], [],
               [event(rng, "new", T0 + 5100.0, 92)]]
    scorer = ImpressionScorer(store, SCORER, version, PROFILES, static=TWIN)
    ahead = scorer.score_many(requests, pending)
    assert [s.state_rebuilt for s in ahead] == [version == 2, version == 2, False]
    first = store.offset("interactions", 0).next_offset
    records = [ConsumedRecord(0, first + k, e.user_id.encode(), encode(e))
               for k, e in enumerate([*pending[0], *pending[2]])]
    InteractionApplier(store, SCORER.model, version).apply("interactions", 0, "log", records,
                                                           records[-1].offset)
    applied = scorer.score_many(requests)
    for a, b in zip(ahead, applied, strict=True):
        assert a.history == b.history
        np.testing.assert_allclose(a.state, b.state, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.dynamic, b.dynamic, rtol=0, atol=1e-5)
    assert len(ahead[0].history) == 3 and len(ahead[2].history) == 1


def assert_scored_alike(a: ScoredImpression, b: ScoredImpression, atol: float = 1e-5) -> None:
    """``a`` and ``b`` scored the same impression from the same read, their probabilities
    within ``atol`` (batched scoring, and a stale state rebuilt with other users' states, may
    round differently from scoring alone)."""
    assert a.impression is b.impression and a.profile == b.profile
    assert a.history == b.history and a.state_rebuilt == b.state_rebuilt
    np.testing.assert_allclose(a.state, b.state, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.dynamic, b.dynamic, rtol=0, atol=atol)
    assert (a.static is None) == (b.static is None)
    if a.static is not None:
        np.testing.assert_allclose(a.static, b.static, rtol=0, atol=atol)
    assert msgspec.structs.replace(a.scores, items=[]) == msgspec.structs.replace(b.scores,
                                                                                  items=[])
    assert [i.item_id for i in a.scores.items] == [i.item_id for i in b.scores.items]


def test_a_batch_scores_by_candidate_count_in_input_order(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score_many over impressions with candidate counts 5, 3, 5, 7, 3, 5 (a new user among
    them) makes one live and one static model call per count, returns the impressions in input
    order, each as scored alone (probabilities within 1e-5), with fresh and with stale (rebuilt)
    states; impressions scored together share that batch's time equally."""
    apply_events(store, ["u0", "u1", "u0", "u2", "u1"])
    requests = [impression("a", "u0", 5), impression("bb", "u1", 3), impression("ccc", "new", 5),
                impression("dddd", "u2", 7), impression("eeeee", "u0", 3),
                impression("ffffff", "u1", 5)]
    calls: list[tuple[str, int]] = []
    for name, model in (("live", SCORER), ("static", TWIN)):
        batch = model.score_batch
        monkeypatch.setattr(model, "score_batch", lambda impressions, *args, _n=name, _f=batch:
                            calls.append((_n, len(impressions))) or _f(impressions, *args))
    for version in (1, 2):  # at version 2 every stored state is stale
        scorer = ImpressionScorer(store, SCORER, version, PROFILES, static=TWIN)
        one_by_one = [scorer.score(r) for r in requests]
        calls.clear()
        batched = scorer.score_many(requests)
        assert calls == [("live", 3), ("static", 3), ("live", 2), ("static", 2),
                         ("live", 1), ("static", 1)]
        assert [s.impression for s in batched] == requests
        for a, b in zip(one_by_one, batched, strict=True):
            assert_scored_alike(a, b)
        assert [s.state_rebuilt for s in batched] == [
            version == 2 and r.user_id != "new" for r in requests
        ]
        shares = [s.score_s for s in batched]
        assert shares[0] == shares[2] == shares[5] > 0 and shares[1] == shares[4] > 0


def test_a_stale_state_scores_as_rebuilt_from_the_history(store: StateStore) -> None:
    apply_events(store, ["u2"] * 8)
    scored = ImpressionScorer(store, SCORER, 2, PROFILES).score(impression("r4", "u2"))
    assert scored.state_rebuilt and len(scored.history) == STORE.history_len
    rebuilt = rebuild(SCORER.model, SCORER.featurizer, [scored.history])[0]
    np.testing.assert_allclose(scored.state, rebuilt, atol=1e-6)
    assert not np.allclose(scored.state, store.get("u2").state, atol=1e-4)


# ------------------------------------------------------------------------ feedback window


def fake_scored(request_id: str, ts: float, items: Sequence[str] = ("i1", "i2", "i3"),
                user: str = "u1") -> ScoredImpression:
    """A scored impression with made-up scores (item k scores k / 10)."""
    dynamic = np.arange(1, len(items) + 1, dtype=np.float32) / 10
    request = Impression(request_id, user, ts, [Candidate(i) for i in items])
    return ScoredImpression(request, None, [], np.full(4, ts, dtype=np.float32), False,
                            dynamic, 1 - dynamic, Scores(request_id, user, 7, []), 0.0, 0.0)


def label(request_id: str, item: str, ts: float, value: int = 1, user: str = "u1") -> Label:
    return Label(request_id, user, item, value, ts)


def test_the_window_evicts_by_the_stream_time_it_is_given() -> None:
    window = FeedbackWindow(window_s=15.0, max_size=10)
    for k, ts in enumerate((0.0, 10.0, 20.0, 5.0)):  # out of time order
        window.add(fake_scored(f"r{k}", ts), ts)
    assert (len(window), window.evicted_by_time) == (3, 1)  # r0 (0 < 20 - 15)
    window.add(fake_scored("r4", 30.0), 30.0)
    assert (len(window), window.evicted_by_time) == (2, 3)  # r3 (5) and r1 (10) too
    assert window.join(label("r2", "i1", 30.0), 30.0) is not None
    assert window.join(label("r1", "i1", 31.0), 31.0) is None and window.expired_labels == 1
    assert window.join(label("r2", "i2", 36.0), 36.0) is None  # the join moves the clock: 20 < 21
    assert (window.expired_labels, window.evicted_by_time, window.evicted_by_size) == (2, 4, 0)


def test_the_window_evicts_the_oldest_past_its_size() -> None:
    window = FeedbackWindow(window_s=1e9, max_size=3)
    for k, ts in enumerate((5.0, 1.0, 3.0, 4.0, 2.0)):
        window.add(fake_scored(f"r{k}", ts), ts)
    assert (len(window), window.evicted_by_size, window.evicted_by_time) == (3, 2, 0)
    kept = [r for r in ("r0", "r1", "r2", "r3", "r4")
            if window.join(label(r, "i1", 0.0), 0.0) is not None]
    assert kept == ["r0", "r2", "r3"]  # r1 (ts 1) went first, then r4 (ts 2)
    assert window.expired_labels == 2


def test_labels_join_to_what_was_scored(store: StateStore) -> None:
    apply_events(store, ["u1", "u1"])
    scorer = ImpressionScorer(store, SCORER, 1, PROFILES, static=TWIN)
    window = FeedbackWindow(window_s=600.0, max_size=100)
    first, second = impression("r5", "u1"), impression("r66", "u1", ts=T0 + 1e5 + 1)
    scored = [scorer.score(first), scorer.score(second)]
    for s in scored:
        window.add(s, s.impression.ts)
    state_then = store.get("u1").state.copy()
    apply_events(store, ["u1"])  # the state moves on after scoring
    assert not np.allclose(store.get("u1").state, state_then)
    item = second.candidates[2].item_id
    example = window.join(label("r66", item, T0 + 1e5 + 5, value=0), T0 + 1e5 + 5)
    assert example is not None
    assert example.impression is second and example.candidate == second.candidates[2]
    assert example.label.label == 0 and example.profile == PROFILES["u1"]
    np.testing.assert_array_equal(example.state, state_then)
    assert example.history == scored[1].history and len(example.history) == 2
    assert example.score == float(scored[1].dynamic[2])
    assert example.static_score == float(scored[1].static[2])
    assert example.model_version == 1


def test_unmatched_labels_are_counted_not_raised() -> None:
    window = FeedbackWindow(window_s=100.0, max_size=10)
    window.add(fake_scored("r1", 10.0), 10.0)
    assert window.join(label("nope", "i1", 11.0), 11.0) is None  # never scored
    assert window.join(label("r1", "i9", 11.0), 11.0) is None  # not a candidate
    assert window.join(label("r1", "i1", 11.0, user="u2"), 11.0) is None  # another user
    assert window.join(label("r1", "i1", 11.0), 11.0) is not None
    assert window.join(label("r1", "i1", 12.0), 12.0) is None  # a redelivered label
    assert (window.unknown_labels, window.duplicate_labels, window.expired_labels) == (3, 1, 0)
    assert window.unmatched_labels == 4


def test_the_label_buffer_is_bounded_and_counts() -> None:
    window = FeedbackWindow(window_s=100.0, max_size=10)
    window.add(fake_scored("r1", 0.0, items=("i1", "i2", "i3", "i4")), 0.0)
    buffer = LabelBuffer(window, capacity=2)
    joined = [buffer.offer(label("r1", f"i{k}", 1.0), 1.0) for k in (1, 2, 3)]
    assert buffer.offer(label("r2", "i1", 1.0), 1.0) is None
    assert (buffer.joined, buffer.unmatched, buffer.dropped, len(buffer)) == (3, 1, 1, 2)
    assert buffer.take(5) == joined[1:]  # the oldest was dropped; oldest first
    assert (buffer.take(1), len(buffer)) == ([], 0)
    assert [e.score for e in joined] == pytest.approx([0.1, 0.2, 0.3])
    assert [e.static_score for e in joined] == pytest.approx([0.9, 0.8, 0.7])


def test_a_label_far_in_the_future_does_not_stop_later_joins() -> None:
    """The window's clock is the stream time the worker passes, not a record's event time: a
    label claiming an event time decades ahead leaves the clock at its stream time."""
    window = FeedbackWindow(window_s=100.0, max_size=10)
    window.add(fake_scored("r1", 10.0), 10.0)
    assert window.join(label("r0", "i1", 4.0e9), 11.0) is None  # unknown: counted
    window.add(fake_scored("r2", 12.0), 12.0)
    assert window.join(label("r1", "i1", 13.0), 13.0) is not None
    assert window.join(label("r2", "i1", 14.0), 14.0) is not None
    assert window.now == 14.0


def test_the_last_labels_of_a_burst_reach_prometheus_without_a_later_label() -> None:
    """``DriftTracker`` exports at most every ``export_every_s``; what was fed after the last
    export is exported by ``export_due`` (the consume loop's timer), not only when another
    label happens to arrive."""
    metrics = WorkerMetrics()
    drift = DriftTracker(metrics, DriftConfig(windows=(16,), export_every_s=0.2))
    window = FeedbackWindow(window_s=100.0, max_size=10)
    window.add(fake_scored("r1", 0.0), 0.0)

    def auc() -> float | None:
        return metrics.registry.get_sample_value("unirec_online_auc", {"model": "dynamic"})

    drift.update([window.join(label("r1", "i1", 1.0, value=0), 1.0)])  # exported: one class
    drift.update([window.join(label("r1", "i3", 1.0, value=1), 1.0)])  # within the interval
    assert auc() is None
    drift.export_due()
    assert auc() is None  # not due yet
    time.sleep(0.25)
    drift.export_due()
    assert auc() == 1.0
