"""AUC and LogLoss agree with scikit-learn (ties included); GAUC is the per-user AUC weighted
by each user's number of impressions, users with a single class left out."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from model.prediction_metrics import auc, gauc, logloss, report


@st.composite
def labelled_scores(draw, min_size=2):
    n = draw(st.integers(min_size, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.random(n) < draw(st.floats(0.05, 0.95))
    labels[: draw(st.integers(0, 1))] = True  # sometimes force both classes
    labels[-1] = not labels[0] if draw(st.booleans()) else labels[-1]
    levels = draw(st.sampled_from([3, 10, 1000]))  # few levels -> many ties
    scores = np.round(rng.random(n) * levels) / levels
    return labels.astype(np.int64), scores


@settings(max_examples=80, deadline=None, derandomize=True)
@given(labelled_scores())
def test_auc_matches_sklearn_with_ties(case):
    """auc equals sklearn's roc_auc_score on random data with many tied scores; NaN when only
    one class is present."""
    labels, scores = case
    if labels.min() == labels.max():
        assert math.isnan(auc(labels, scores))
    else:
        assert abs(auc(labels, scores) - roc_auc_score(labels, scores)) <= 1e-12


@settings(max_examples=50, deadline=None, derandomize=True)
@given(labelled_scores(min_size=1), st.floats(1e-3, 0.49))
def test_logloss_matches_sklearn(case, margin):
    """logloss equals sklearn's log_loss for probabilities inside (0, 1)."""
    labels, scores = case
    p = margin + (1 - 2 * margin) * scores
    assert abs(logloss(labels, p) - log_loss(labels, p, labels=[0, 1])) <= 1e-9


def test_logloss_is_finite_at_probabilities_zero_and_one():
    """Probabilities of exactly 0 and 1 are clipped, so a confident miss costs a finite loss."""
    value = logloss(np.array([1, 0]), np.array([0.0, 1.0]))
    assert math.isfinite(value) and value > 10


def test_gauc_on_a_hand_made_example():
    """Users a (3 impressions, AUC 1), b (4 impressions, AUC 1/4) and c (2 impressions, one
    class: skipped), rows interleaved: GAUC = (3 * 1 + 4 * 0.25) / 7."""
    users = np.array(["b", "a", "c", "b", "a", "b", "c", "a", "b"], dtype=object)
    labels = np.array([1, 1, 1, 0, 0, 1, 1, 0, 0])
    scores = np.array([0.2, 0.9, 0.3, 0.8, 0.1, 0.6, 0.7, 0.5, 0.4])
    assert abs(gauc(users, labels, scores) - 4 / 7) <= 1e-12
    assert math.isnan(gauc(np.array(["c", "c"]), np.array([1, 1]), np.array([0.1, 0.2])))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(labelled_scores(min_size=2), st.integers(1, 6), st.integers(0, 1000))
def test_gauc_equals_the_impression_weighted_mean_of_per_user_auc(case, n_users, seed):
    """On random data, gauc = sum_u n_u * AUC_u / sum_u n_u over users with both classes,
    with AUC_u from sklearn; report() carries the same numbers."""
    labels, scores = case
    users = np.random.default_rng(seed).integers(n_users, size=len(labels)).astype(str)
    total = weight = 0.0
    for u in np.unique(users):
        rows = users == u
        if len(set(labels[rows])) == 2:
            total += rows.sum() * roc_auc_score(labels[rows], scores[rows])
            weight += rows.sum()
    got = gauc(users, labels, scores)
    if weight == 0:
        assert math.isnan(got)
    else:
        assert abs(got - total / weight) <= 1e-12
    both = labels.min() != labels.max()
    out = report(users, labels, np.clip(scores, 0.01, 0.99))
    assert out["n"] == len(labels)
    assert math.isnan(out["auc"]) or both
