"""The candidate item's label rate over the training log, a numeric C_g feature.

Per hashed item row (``FeatureSpec.blocks["item_id"]``; colliding items share their counts):
``positives`` and ``count`` of the training log's events on that row, read as two features

    logit((positives + s * prior) / (count + s)) - logit(prior),   log(1 + count) / log(1 + max)

with s the smoothing, ``prior`` the training log's label rate and ``max`` the largest count,
so an item never seen reads (0, 0). It is what an online peer's running item rate gives a
logistic regression, and what an item embedding learns only slowly, one gradient step per
example (docs/model.md, "Inputs of one prediction").

No example may read its own label: the spec's table counts the whole training log, so the
training log's own examples read the counts of the events before theirs (``running``), and
every later example and every served request reads the table (``Featurizer.item_rates``),
where the running counts end. The prior and the largest count are the whole training log's:
one scalar each, the same for every example.
"""

from __future__ import annotations

import math

import numpy as np

ITEM_RATE_FEATURES = 2
DEFAULT_SMOOTHING = 10.0
"""What training and the eval suite use unless told otherwise (``FeatureSpec.fit`` itself
keeps no rates unless given labels and a smoothing): the River peers' prior weight, not tuned.
On MovieLens-100K (docs/model.md) it raised UniRec's validation AUC on every seed."""


def count_labels(rows: np.ndarray, labels: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{row: (positives, count)}`` over events with item rows ``rows`` [E] and labels [E]."""
    counts: dict[int, list[int]] = {}
    for row, label in zip(rows.tolist(), labels.tolist(), strict=True):
        entry = counts.setdefault(row, [0, 0])
        entry[0] += int(label)
        entry[1] += 1
    return {row: (p, n) for row, (p, n) in counts.items()}


def rate_features(positives: np.ndarray, counts: np.ndarray, prior: float, smoothing: float,
                  max_count: int) -> np.ndarray:
    """[..., 2] float32: the centred smoothed logit and the scaled log count (module
    docstring) of ``positives`` and ``counts`` (same shape)."""
    rate = (positives + smoothing * prior) / (counts + smoothing)
    rate = np.clip(rate, 1e-6, 1 - 1e-6)
    centred = np.log(rate) - np.log1p(-rate) - (math.log(prior) - math.log1p(-prior))
    counted = np.log1p(counts) / math.log1p(max(max_count, 1))
    return np.stack([centred, counted], axis=-1).astype(np.float32)


def running(rows: np.ndarray, labels: np.ndarray, fitted: int, table_positives: np.ndarray,
            table_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per event of a log, the positives and count [E] its example reads for its item row.

    When the log's first ``fitted`` events are the ones the table counts (their counts add up
    to it exactly), event i < ``fitted`` reads the counts over the events before it and every
    later event the table; otherwise (another log, or a shorter one) every event reads the
    table, as a served request does. ``table_*``: [rows] arrays indexed by item row."""
    frozen = table_positives[rows].astype(np.float64), table_counts[rows].astype(np.float64)
    if len(rows) < fitted:
        return frozen
    positives, counts = frozen[0].copy(), frozen[1].copy()
    seen_positives, seen_counts = np.zeros(len(table_counts)), np.zeros(len(table_counts))
    for i, (row, label) in enumerate(zip(rows[:fitted].tolist(), labels[:fitted].tolist(),
                                         strict=True)):
        positives[i], counts[i] = seen_positives[row], seen_counts[row]
        seen_positives[row] += label
        seen_counts[row] += 1
    if not (np.array_equal(seen_counts, table_counts)
            and np.array_equal(seen_positives, table_positives)):
        return frozen
    return positives, counts
