"""The action shares of the user's numeric context: each is the smoothed share of one frequent
training action among the history's events, as a logit centred on its training frequency;
the candidate's affinity: the same shares over the history events that share a value with the
candidate in one item field; ``FeatureSpec.fit`` picks the actions; and a spec saved before the
shares existed loads with its old dimensions and fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog.schema import Candidate, Impression, Interaction
from model.features import DERIVED_USER_NUMERIC, MISSING, FeatureSpec, Featurizer
from model.signature import spec_fingerprint

T0 = 1_700_000_000.0


def interaction(k: int, action: str, user: str = "u", genre: object = "g") -> Interaction:
    return Interaction(f"e{user}{k}", user, f"i{k % 7}", action, T0 + 60.0 * k,
                       {"genre": genre}, {"lat": float(k)})


def training_log(counts: dict[str, int]) -> list[Interaction]:
    actions = [a for a, n in counts.items() for _ in range(n)]
    return [interaction(k, a) for k, a in enumerate(actions)]


def request(featurizer: Featurizer, history: list[Interaction], genres: list[object],
            history_len: int = 8):
    candidates = [Candidate(f"c{j}", {"genre": g}) for j, g in enumerate(genres)]
    impression = Impression("r", "u", T0 + 1e6, candidates, {"lat": 0.0})
    return featurizer.request(impression, history, None, np.zeros(4, np.float32), history_len)


def shares(featurizer: Featurizer, history: list[Interaction], history_len: int = 8
           ) -> np.ndarray:
    user, _ = request(featurizer, history, ["g"], history_len)
    n = len(featurizer.spec.actions)
    return user.user_num[0, -n:].double().numpy() if n else np.zeros(0)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_fit_keeps_the_most_frequent_actions_first_with_their_training_frequencies():
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3, "buy": 1}), max_actions=2)
    assert spec.actions == ("view", "like")
    assert spec.action_prior == pytest.approx((0.6, 0.3))
    assert spec.user_numeric_dim == 2 * len(spec.ctx_num) + DERIVED_USER_NUMERIC + 2


def test_fit_skips_an_action_whose_hashed_row_a_more_frequent_one_holds():
    buckets = 4
    row = {a: zlib.crc32(a.encode()) % buckets for a in (f"a{i}" for i in range(40))}
    first = "a0"
    twin = next(a for a in row if a != first and row[a] == row[first])
    other = next(a for a in row if row[a] != row[first])
    spec = FeatureSpec.fit(training_log({first: 5, twin: 4, other: 3}), action_buckets=buckets)
    assert spec.actions == (first, other)


def test_a_log_with_a_single_action_has_no_shares():
    spec = FeatureSpec.fit(training_log({"click": 9}))
    assert spec.actions == ()
    assert spec.user_numeric_dim == 2 * len(spec.ctx_num) + DERIVED_USER_NUMERIC


def test_shares_equal_a_hand_count_over_the_history_window():
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3, "buy": 1}))
    featurizer = Featurizer(spec)
    history = [interaction(k, a) for k, a in enumerate(["buy"] * 5 + ["like", "view", "like"])]
    history = [interaction(100, "view"), *history]  # older than the window of 8: not counted
    counts = {"view": 1, "like": 2, "buy": 5}
    s = spec.action_smoothing
    expected = [logit((counts[a] + s * p) / (8 + s)) - logit(p)
                for a, p in zip(spec.actions, spec.action_prior, strict=True)]
    np.testing.assert_allclose(shares(featurizer, history), expected, rtol=1e-5)


def test_a_user_without_history_reads_zero_shares_and_unknown_actions_count_for_none():
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3}))
    featurizer = Featurizer(spec)
    assert np.all(shares(featurizer, []) == 0.0)
    unknown = [interaction(k, "never-seen") for k in range(4)]
    rows = {featurizer.row("action", a) for a in spec.actions}
    assert featurizer.row("action", "never-seen") not in rows
    assert np.all(shares(featurizer, unknown) < 0.0)


def test_shares_are_finite_for_an_extreme_prior():
    spec = FeatureSpec.fit(training_log({"view": 10_000, "like": 1}))
    featurizer = Featurizer(spec)
    for history in ([], [interaction(k, "like") for k in range(8)]):
        assert np.all(np.isfinite(shares(featurizer, history)))


def test_a_spec_saved_before_the_shares_loads_with_its_dimensions_and_fingerprint():
    fitted = FeatureSpec.fit(training_log({"view": 6, "like": 3}))
    old = {k: v for k, v in asdict(fitted).items()
           if k not in ("actions", "action_prior", "action_smoothing")
           and not k.startswith("item_rate_")}  # item rates came later still
    old = json.loads(json.dumps(old))
    loaded = FeatureSpec.from_dict(old)
    assert loaded == replace(fitted, actions=(), action_prior=())
    assert loaded.user_numeric_dim == 2 * len(loaded.ctx_num) + DERIVED_USER_NUMERIC
    text = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert spec_fingerprint(loaded) == hashlib.sha256(text.encode()).hexdigest()


def test_a_spec_with_shares_round_trips_through_its_dict():
    fitted = FeatureSpec.fit(training_log({"view": 6, "like": 3, "buy": 2}))
    assert FeatureSpec.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


def test_affinity_equals_a_hand_count_over_the_events_sharing_a_field_value():
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3, "buy": 1}))
    featurizer = Featurizer(spec)
    assert spec.item_cat == ("genre",) and spec.n_affinity == len(spec.actions) + 1
    history = [interaction(0, "like", genre=["a", "b"]), interaction(1, "view", genre="c"),
               interaction(2, "like", genre=["b"]), interaction(3, "buy", genre=["c", "d"]),
               interaction(4, "view", genre="a")]
    _, cands = request(featurizer, history, [["a", "x"], "c", "zzz"], history_len=8)
    s = spec.action_smoothing

    def expected(counts: dict[str, int]) -> list[float]:
        n = sum(counts.values())
        out = [logit((counts.get(a, 0) + s * p) / (n + s)) - logit(p)
               for a, p in zip(spec.actions, spec.action_prior, strict=True)]
        return [*out, math.log1p(n) / math.log1p(8)]

    got = cands.affinity[0].double().numpy()
    np.testing.assert_allclose(got[0], expected({"like": 1, "view": 1}), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[1], expected({"view": 1, "buy": 1}), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[2], np.zeros(spec.n_affinity), atol=1e-7)


def test_affinity_matches_a_value_in_any_slot_of_either_bag():
    """Bags share a value wherever it sits: the last slot of the widest bags counts."""
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3}))
    featurizer = Featurizer(spec)
    history = [interaction(0, "like", genre=["a", "b", "c"]), interaction(1, "like", genre="d")]
    _, cands = request(featurizer, history, [["x", "y", "c"], ["x", "y", "z"]], history_len=8)
    counted = cands.affinity[0, :, -1].double().numpy()
    np.testing.assert_allclose(counted, [math.log1p(1) / math.log1p(8), 0.0], atol=1e-7)


def test_affinity_ignores_missing_values_and_padding():
    spec = FeatureSpec.fit(training_log({"view": 6, "like": 3}))
    featurizer = Featurizer(spec)
    history = [interaction(k, "like", genre=None) for k in range(3)]
    _, cands = request(featurizer, history, [None, "g"], history_len=8)
    assert cands.affinity.shape == (1, 2, spec.n_affinity)
    assert torch.all(cands.affinity == 0.0)
    _, empty = request(featurizer, [], [None, "g"], history_len=8)
    assert torch.all(empty.affinity == 0.0)


@pytest.mark.parametrize("change", [
    {"action_prior": (0.6,)},
    {"actions": ("view", "view")},
    {"action_prior": (0.6, 0.0)},
    {"action_prior": (0.6, float("nan"))},
    {"action_smoothing": 0.0},
    {"action_smoothing": float("inf")},
])
def test_a_spec_whose_shares_would_fail_or_be_nan_is_refused(change):
    fitted = FeatureSpec.fit(training_log({"view": 6, "like": 3}))
    with pytest.raises(ValueError, match="action"):
        FeatureSpec.from_dict({**fitted.to_dict(), **change})


def pairwise_affinity_matches(featurizer: Featurizer, user_history, cands) -> torch.Tensor:
    """[B, C, n, Fi]: the match of every history event and candidate by comparing every pair
    of bag slots, the definition ``Featurizer.affinity``'s multi-hot reading must equal."""
    spec = featurizer.spec
    fields = len(spec.item_cat)
    seen = user_history.hist_cat[:, :, :fields, :]
    wanted = cands.cat[:, :, :fields, :]
    missing = [featurizer.row(f"item:{f}", MISSING) for f in spec.item_cat]
    b, c = wanted.shape[:2]
    n = seen.shape[1]
    out = torch.zeros(b, c, n, fields, dtype=torch.bool)
    for i in range(b):
        for j in range(c):
            for k in range(n):
                for f in range(fields):
                    known = {int(v) for v in wanted[i, j, f] if v != 0 and v != missing[f]}
                    out[i, j, k, f] = bool(known & {int(v) for v in seen[i, k, f]})
    return out


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_affinity_reads_the_same_matches_as_comparing_every_pair_of_slots(data):
    """Property: over two item fields (a bag and a single value), with missing values, empty
    bags, repeated values and values unseen in training, the affinity equals the one computed
    from the pairwise matches of every history event's bag with every candidate's, whether
    its window is the history window or a wider one."""
    genres = st.one_of(st.none(), st.lists(st.sampled_from("abcdexyz"), max_size=4),
                       st.sampled_from("abq"))
    brands = st.one_of(st.none(), st.sampled_from(["n", "m", "unseen"]))
    train = [Interaction(f"t{k}", "u", f"i{k}", ("view", "like")[k % 2], T0 + k,
                         {"genre": ["a", "b", "c"][: 1 + k % 3], "brand": "nm"[k % 2]}, {})
             for k in range(12)]
    featurizer = Featurizer(FeatureSpec.fit(train))
    assert featurizer.spec.item_cat == ("brand", "genre")
    history = [Interaction(f"h{k}", "u", f"i{k}", data.draw(st.sampled_from(["view", "like"])),
                           T0 + 100 + k, {"genre": data.draw(genres), "brand": data.draw(brands)},
                           {}) for k in range(data.draw(st.integers(0, 6)))]
    candidates = [Candidate(f"c{j}", {"genre": data.draw(genres), "brand": data.draw(brands)})
                  for j in range(data.draw(st.integers(1, 4)))]
    impression = Impression("r", "u", T0 + 1e6, candidates, {})
    user, cands = featurizer.request(impression, history, None, np.zeros(4, np.float32), 6)
    match = pairwise_affinity_matches(featurizer, user, cands)
    match = (match & user.hist_valid[:, None, :, None]).float()
    acted = (user.hist_action[..., None] == featurizer._share_rows).float()
    counts = torch.einsum("bcnf,bna->bcfa", match, acted)
    n_match = match.sum(dim=2)
    expected = torch.cat([featurizer._centred_shares(counts, n_match).flatten(-2),
                          torch.log1p(n_match) / math.log1p(6)], dim=-1)
    torch.testing.assert_close(cands.affinity, expected.to(cands.affinity.dtype),
                               rtol=0, atol=0)
    # the same window as an affinity window wider than a history window of 2
    # (``Featurizer.affinity_over``, which gathers only what the affinity reads)
    _, wide = featurizer.request(impression, history, None, np.zeros(4, np.float32), 2, 6)
    torch.testing.assert_close(wide.affinity, cands.affinity, rtol=0, atol=0)
