"""Feature tokens are a set: the order of fields in a feature map and of values in a
multi-valued bag never changes a score; and bad or unseen inputs either score finitely (empty
history, unknown ids, missing features) or are refused with an error naming the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import (
    ABLATIONS,
    FEATURIZER,
    SPEC,
    Request,
    cached_logits,
    inputs,
    make_request,
    max_diff,
    reordered,
    shared_model,
    with_features,
)

from eventlog.schema import Candidate, Impression, Interaction, UserProfile
from model.scorer import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def scores(model, request: Request) -> torch.Tensor:
    return cached_logits(model, *inputs(model, request))[0]


def transformed(request: Request, candidate_features, event_features, event_context,
                context, profile_features) -> Request:
    """A copy of ``request`` with each feature map passed through the given function."""
    imp = request.impression
    impression = Impression(
        imp.request_id, imp.user_id, imp.ts,
        [Candidate(c.item_id, candidate_features(c.item_features)) for c in imp.candidates],
        context(imp.context),
    )
    history = [
        Interaction(e.event_id, e.user_id, e.item_id, e.action, e.ts,
                    event_features(e.item_features), event_context(e.context))
        for e in request.history
    ]
    profile = request.profile
    if profile is not None:
        profile = UserProfile(profile.user_id, profile_features(profile.features))
    return Request(impression, history, profile, request.state)


# -- 4. feature-token permutation invariance --------------------------------------------------


@pytest.mark.parametrize("name", ["default", "no_seq_feature_mixing"])
def test_key_order_of_feature_maps_does_not_change_scores(name):
    """Reversing the key order of every item_features, context and profile map (candidates,
    history events, request) leaves every score unchanged."""
    model = shared_model(name)
    request = make_request(11, 12, 5)
    same = transformed(request, reordered, reordered, reordered, reordered, reordered)
    assert [list(c.item_features) for c in same.impression.candidates] == [
        ["price", "genre"]] * 5  # the orders really differ
    assert max_diff(scores(model, request), scores(model, same)) <= 1e-6


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000))
def test_order_of_values_in_a_multi_valued_bag_does_not_change_scores(seed):
    """Shuffling the values of every genre bag (candidates and history events) leaves every
    score unchanged within float summation error."""
    model = shared_model("default")
    rng = np.random.default_rng(seed)

    def shuffle_genres(features):
        genres = list(features["genre"])
        return {**features, "genre": [genres[i] for i in rng.permutation(len(genres))]}

    request = make_request(seed, 14, 6)
    keep = dict
    same = transformed(request, shuffle_genres, shuffle_genres, keep, keep, keep)
    assert max_diff(scores(model, request), scores(model, same)) <= 1e-5


@pytest.mark.parametrize("size", [SPEC.max_bag, SPEC.max_bag + 1, SPEC.max_bag + 4])
def test_order_of_values_in_a_bag_longer_than_max_bag_does_not_change_scores(size):
    """The bag is a set even when it holds more values than the featurizer keeps (max_bag):
    reversing a candidate's genre list must not change its score. (Which max_bag values
    are kept must not depend on the order they were listed in.)"""
    model = shared_model("default")
    request = make_request(15, 10, 3)
    imp = request.impression
    bag = [f"genre-{i}" for i in range(size)]
    scored = []
    for values in (bag, bag[::-1]):
        first = with_features(imp.candidates[0], genre=values)
        other = Request(Impression(imp.request_id, imp.user_id, imp.ts,
                                   [first, *imp.candidates[1:]], imp.context),
                        request.history, request.profile, request.state)
        scored.append(scores(model, other))
    assert max_diff(scored[0], scored[1]) <= 1e-5


def test_feature_values_do_reach_the_scores():
    """Sensitivity control for the invariance tests: changing a candidate's genre bag, the
    request's device or lat, or a profile field does change the scores."""
    model = shared_model("default")
    request = make_request(12, 12, 4)
    base = scores(model, request)
    imp = request.impression
    first = with_features(imp.candidates[0], genre=["western", "horror"])
    variants = [
        (imp.context, [first, *imp.candidates[1:]], request.profile),
        ({**imp.context, "device": "tv"}, imp.candidates, request.profile),
        ({**imp.context, "lat": -imp.context["lat"]}, imp.candidates, request.profile),
        (imp.context, imp.candidates, UserProfile("u1", {**request.profile.features, "age": "?"})),
    ]
    for context, candidates, profile in variants:
        other = Request(Impression(imp.request_id, imp.user_id, imp.ts, candidates, context),
                        request.history, profile, request.state)
        assert max_diff(base[0], scores(model, other)[0]) > 1e-3


# -- 8. bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_empty_history_unknown_ids_and_missing_features_score_finitely(name):
    """No history, a user and items never seen in fitting, candidates without any feature,
    history events without features or context, and no profile: all scores are finite."""
    model = shared_model(name)
    request = make_request(13, 0, 3, user="never-seen-user")
    imp = request.impression
    cands = [Candidate("unseen-item-1", {"genre": ["no-such-genre"], "price": 1e6}),
             Candidate("unseen-item-2"), imp.candidates[0]]
    bare_history = [Interaction(f"x{i}", "never-seen-user", f"unseen-{i}", "never-seen-action",
                                imp.ts - 100.0 * (5 - i)) for i in range(5)]
    for history in ([], bare_history):
        for profile in (None, UserProfile("never-seen-user", {"brand-new-field": "v"})):
            req = Request(Impression("r", imp.user_id, imp.ts, cands, {}), history, profile,
                          request.state)
            out = scores(model, req)
            assert out.shape == (3,) and torch.isfinite(out).all()


def test_unknown_values_hash_to_rows_inside_the_embedding_table():
    """Hashed ids: any user, item or field value lands on a row of its own field's block."""
    for block, (offset, size) in SPEC.blocks.items():
        for value in ("", "never-seen", "x" * 300, "\u00e9\u4e2d"):
            row = FEATURIZER.row(block, value)
            assert offset <= row < offset + size < SPEC.n_embeddings + 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_at_construction_naming_the_field(bad):
    """A NaN or infinite number in an impression's context, a candidate's features or an
    event's features raises ValueError whose message names the field."""
    with pytest.raises(ValueError, match=r"context\['lat'\] must be a finite number"):
        Impression("r", "u1", 1.0, [Candidate("i1")], {"device": "ios", "lat": bad})
    with pytest.raises(ValueError, match=r"item_features\['price'\]"):
        Candidate("i1", {"genre": ["drama"], "price": bad})
    with pytest.raises(ValueError, match=r"item_features\['price'\]"):
        Interaction("e", "u1", "i1", "click", 1.0, {"price": bad})
    with pytest.raises(ValueError, match=r"\bts\b"):
        Impression("r", "u1", bad, [Candidate("i1")])


@pytest.mark.parametrize("shape", [(31,), (33,), (1, 32), (32, 1), ()])
def test_a_state_of_the_wrong_shape_is_refused_by_the_scorer(shape):
    """Scorer.score raises ValueError (naming the expected shape) for a state that is not a
    [d_model] vector; the right shape scores."""
    scorer = Scorer(shared_model("default"), device=torch.device("cpu"))
    request = make_request(14, 4, 2)
    with pytest.raises(ValueError, match=r"state has shape .*\(32,\)"):
        scorer.score(request.impression, request.history, request.profile,
                     np.zeros(shape, dtype=np.float32))
    ok = scorer.score(request.impression, request.history, request.profile,
                      np.zeros(32, dtype=np.float32))
    assert np.isfinite(ok).all()
