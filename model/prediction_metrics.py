"""Offline ranking metrics: AUC, GAUC (per-user AUC weighted by impressions), LogLoss."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    stops = np.r_[starts[1:], len(scores)]
    average = (starts + stops + 1) / 2.0
    ranks[order] = np.repeat(average, stops - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC averaged with weights = each user's number of impressions.

    Users whose impressions are all of one class have no AUC and are left out.
    """
    user_ids = np.asarray(user_ids)
    order = np.argsort(user_ids, kind="mergesort")
    _, starts = np.unique(user_ids[order], return_index=True)
    stops = np.r_[starts[1:], len(order)]
    total, weight = 0.0, 0
    for begin, end in zip(starts, stops, strict=True):
        rows = order[begin:end]
        value = auc(labels[rows], scores[rows])
        if not np.isnan(value):
            total += value * len(rows)
            weight += len(rows)
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def report(user_ids: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """``{"auc", "gauc", "logloss", "n"}`` of one evaluation."""
    return {
        "auc": auc(labels, probabilities),
        "gauc": gauc(user_ids, labels, probabilities),
        "logloss": logloss(labels, probabilities),
        "n": len(labels),
    }
