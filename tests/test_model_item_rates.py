"""The candidate's item-rate features (``model.item_rates``): the training log's label counts
per item row, read causally by the training log's own examples and from the spec's table by
every later example and every served request, plus the labels counted online."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest

from eventlog.log import EventLog
from eventlog.schema import Candidate, Impression, Interaction
from model.dataset import build_examples
from model.features import FeatureSpec, Featurizer, hashed_row
from model.signature import spec_fingerprint

T0 = 1_700_000_000.0
SMOOTHING = 10.0


def event_log(n: int, seed: int) -> EventLog:
    """``n`` events of 6 users on 5 items, labels at random (item i4 is always positive)."""
    rng = np.random.default_rng(seed)
    events = [Interaction(f"e{k}", f"u{k % 6}", f"i{rng.integers(5)}", "view", T0 + 60.0 * k,
                          {"genre": "g"}, {}) for k in range(n)]
    labels = np.asarray([1 if e.item_id == "i4" else rng.integers(2) for e in events], np.int8)
    return EventLog("toy", events, labels)


def fitted(log: EventLog, stop: int) -> Featurizer:
    return Featurizer(FeatureSpec.fit(log.interactions[:stop], labels=log.labels[:stop],
                                      item_rate_smoothing=SMOOTHING))


def by_hand(log: EventLog, i: int, counted: int, prior: float, max_count: int) -> list[float]:
    """Event i's features over the events [0, counted) on its item (module formula)."""
    same = [k for k in range(counted) if log.interactions[k].item_id == log.interactions[i].item_id]
    positives, count = sum(int(log.labels[k]) for k in same), len(same)
    rate = (positives + SMOOTHING * prior) / (count + SMOOTHING)
    centred = math.log(rate / (1 - rate)) - math.log(prior / (1 - prior))
    return [centred, math.log1p(count) / math.log1p(max_count)]


def test_each_example_reads_the_events_before_its_own_then_the_table() -> None:
    """Property: example i of the training log (the first 60 events) reads its item's counts
    over events [0, i); every later example reads the counts over all 60; and no example's
    features depend on its own label or on any later one."""
    log, stop = event_log(90, seed=1), 60
    featurizer = fitted(log, stop)
    spec = featurizer.spec
    assert spec.n_item_rates == 2 and spec.item_numeric_dim == 2 + spec.n_affinity
    assert spec.item_rate_prior == pytest.approx(float(log.labels[:stop].mean()))
    rates = build_examples(log, featurizer, history_len=4).item_rates
    max_count = max(spec.item_rate_counts)
    for i in range(len(log)):
        expected = by_hand(log, i, min(i, stop), spec.item_rate_prior, max_count)
        np.testing.assert_allclose(rates[i], expected, rtol=1e-5, atol=1e-6)

    flipped = EventLog("toy", log.interactions, log.labels.copy())
    flipped.labels[30:] = 1 - flipped.labels[30:]  # example 30's own label and every later one
    refit = fitted(flipped, stop).spec  # its prior, one scalar of the whole training log, moves
    same_prior = Featurizer(replace(refit, item_rate_prior=spec.item_rate_prior))
    again = build_examples(flipped, same_prior, history_len=4).item_rates
    np.testing.assert_array_equal(again[:31], rates[:31])
    assert not np.array_equal(again[31:stop], rates[31:stop])


def test_a_served_request_reads_what_a_later_example_of_the_log_reads() -> None:
    """Property: for events after the training log, the served path (``requests``) gives the
    candidate the same item-rate features as the offline example of that event."""
    log, stop = event_log(80, seed=2), 50
    featurizer = fitted(log, stop)
    examples = build_examples(log, featurizer, history_len=4)
    for i in range(stop, len(log)):
        event = log.interactions[i]
        impression = Impression("r", event.user_id, event.ts,
                                [Candidate(event.item_id, event.item_features)], {})
        _, cands = featurizer.request(impression, [], None, np.zeros(4, np.float32), 4)
        np.testing.assert_allclose(cands.rates[0, 0].numpy(), examples.item_rates[i], rtol=1e-6)
    unseen = Impression("r", "u0", T0, [Candidate("never-seen", {"genre": "g"})], {})
    _, cands = featurizer.request(unseen, [], None, np.zeros(4, np.float32), 4)
    assert cands.rates[0, 0].tolist() == [0.0, 0.0]


def test_another_log_reads_the_table_for_every_event() -> None:
    """A log whose first events are not the ones counted (another log) gets no running counts:
    every event reads the table, as a served request would."""
    featurizer = fitted(event_log(60, seed=3), 60)
    other = event_log(70, seed=4)
    rates = build_examples(other, featurizer, history_len=4).item_rates
    rows = np.asarray([hashed_row(featurizer.spec.blocks["item_id"], e.item_id)
                       for e in other.interactions])
    np.testing.assert_allclose(rates, featurizer.item_rates(rows), rtol=1e-6)


def test_the_table_round_trips_its_dict_and_is_absent_when_off() -> None:
    log = event_log(40, seed=5)
    on = fitted(log, 40).spec
    assert FeatureSpec.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    off = FeatureSpec.fit(log.interactions, labels=log.labels)
    assert off.n_item_rates == 0 and not any(k.startswith("item_rate_") for k in off.to_dict())
    with pytest.raises(ValueError, match="one label per interaction"):
        FeatureSpec.fit(log.interactions, labels=log.labels[:-1], item_rate_smoothing=1.0)


@pytest.mark.parametrize(("field", "value"), [
    ("item_rate_smoothing", math.nan), ("item_rate_smoothing", -1.0),
    ("item_rate_prior", 1.0), ("item_rate_rows", (0, 1, 2, 3, 4)),
    ("item_rate_positives", (99, 0, 0, 0, 0)), ("item_rate_counts", (1,)),
])
def test_a_hostile_item_rate_table_is_refused_naming_the_field(field: str, value: object) -> None:
    """A hand-edited checkpoint's table that would index out of the item block, or give
    negative or NaN rates, is a ValueError naming the field, never a wrong score."""
    spec = fitted(event_log(40, seed=6), 40).spec
    assert len(spec.item_rate_rows) == 5
    data = {**asdict(spec), field: value}
    with pytest.raises(ValueError, match=field if field != "item_rate_positives" else "positives"):
        replace(spec, **{field: value})
    with pytest.raises(ValueError):
        FeatureSpec.from_dict(json.loads(json.dumps(data, default=list)))


def test_served_rates_add_the_online_table_at_the_training_scale_and_keep_the_fingerprint(
) -> None:
    """Labels counted online (``with_online_counts``) add to the training counts of what a
    served request reads, the log count keeps the training table's largest count as its scale,
    the fingerprint does not change (a version with more labels counted is the same model),
    the dict round-trips, and a spec with none has the dict it had before the online table."""
    log = event_log(40, seed=7)
    spec = fitted(log, 40).spec
    row = hashed_row(spec.blocks["item_id"], "i4")
    positives, counts = np.zeros(spec.n_embeddings), np.zeros(spec.n_embeddings)
    positives[row], counts[row] = 500, 600
    online = spec.with_online_counts(positives, counts)
    prior, scale = spec.item_rate_prior, max(spec.item_rate_counts)
    trained = dict(zip(spec.item_rate_rows, zip(spec.item_rate_positives, spec.item_rate_counts,
                                                strict=True), strict=True))[row]
    rate = (trained[0] + 500 + SMOOTHING * prior) / (trained[1] + 600 + SMOOTHING)
    expected = [math.log(rate / (1 - rate)) - math.log(prior / (1 - prior)),
                math.log1p(trained[1] + 600) / math.log1p(scale)]
    np.testing.assert_allclose(Featurizer(online).item_rates(np.asarray([row]))[0], expected,
                               rtol=1e-6)
    np.testing.assert_allclose(Featurizer(online).item_rates(np.asarray([row + 1])),
                               Featurizer(spec).item_rates(np.asarray([row + 1])))
    assert online.item_rate_online_rows == (row,)
    assert spec_fingerprint(online) == spec_fingerprint(spec)
    assert FeatureSpec.from_dict(json.loads(json.dumps(online.to_dict()))) == online
    assert not any(k.startswith("item_rate_online") for k in spec.to_dict())
    np.testing.assert_array_equal(online.online_counts()[1], counts)


@pytest.mark.parametrize(("field", "value"), [
    ("item_rate_online_rows", (-1,)), ("item_rate_online_positives", (7,)),
    ("item_rate_online_counts", (1, 2)),
])
def test_a_hostile_online_table_is_refused_naming_the_field(field: str, value: object) -> None:
    """An online table outside the item block, with more positives than labels, or of
    unequal lengths is a ValueError naming the table, never a wrong score."""
    spec = fitted(event_log(40, seed=6), 40).spec
    row = spec.blocks["item_id"][0]
    good = {"item_rate_online_rows": (row,), "item_rate_online_positives": (3,),
            "item_rate_online_counts": (5,)}
    replace(spec, **good)
    with pytest.raises(ValueError, match="item_rate_online"):
        replace(spec, **{**good, field: value})
    with pytest.raises(ValueError, match="without item rates"):
        replace(FeatureSpec.fit(event_log(40, seed=6).interactions), **good)
