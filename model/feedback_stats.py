"""Mergeable quality and drift figures of a set of labelled predictions (the fleet monitor's
window values): ``FeedbackStats``.

A ``DriftMonitor`` (``model.drift``) keeps the last T predictions of ONE stream in order; the
fleet monitor instead sums the predictions of many workers into time windows, in any order,
and merges partial sums. ``FeedbackStats`` holds sufficient statistics that merge exactly
(``a.merged(b)`` equals the stats of the union, in any order of adding and merging) and gives
the same figures as ``DriftMonitor``'s windows, with the same metric code (``symmetric_kl``,
``score_shift``, ``log_loss`` of ``model.drift``):

- ``n``: labelled predictions; ``n_pairs``: those with a static twin's probability too;
- ``distance``: mean symmetric binary KL of (p_dyn, p_stat); ``mean_abs_diff``: mean
  |p_dyn - p_stat|; ``psi``/``js`` of the two score histograms (``bins`` bins on [0, 1]);
- ``logloss_dynamic``/``logloss_static``: mean binary cross-entropy;
- ``auc_dynamic``/``auc_static``: the AUC of the probabilities rounded down to a grid of
  ``AUC_GRID`` steps (ties count one half). That is exactly ``auc(labels, auc_grid(p))``
  (``model.prediction_metrics.auc``) and differs from the AUC of the raw probabilities only by
  half the share of (positive, negative) pairs whose probabilities fall within one grid step of
  each other. None while one class is missing.

``to_json``/``from_json`` give a compact form (sparse grid counts) for a changelog.

>>> s = FeedbackStats().add([0.9, 0.2], [0.5, 0.5], [1, 0])
>>> s.report()["auc_dynamic"], s.report()["n"]
(1.0, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from model.drift import log_loss, score_shift, symmetric_kl

AUC_GRID = 1000  # AUC resolution: probabilities are compared in steps of 1 / AUC_GRID
BINS = 10  # histogram bins for PSI and JS, as DriftMonitor's default
KL_EPS = 1e-6  # probability clip of the KL and the histogram smoothing, as DriftMonitor's


def auc_grid(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """The grid cell of each probability: floor(p * AUC_GRID), 1.0 in the top cell."""
    q = np.asarray(p, dtype=np.float64)
    return np.minimum((q * AUC_GRID).astype(np.int64), AUC_GRID - 1)


def _grid_auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUC from per-cell counts of positives and negatives (ties within a cell count half)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(neg) - neg  # negatives in lower cells
    wins = float(np.sum(pos * below)) + 0.5 * float(np.sum(pos * neg))
    return wins / (n_pos * n_neg)


class FeedbackStats:
    """Sufficient statistics of labelled (p_dyn, p_stat or None, label) predictions."""

    __slots__ = ("grid", "hist_dyn", "hist_stat", "n", "n_pairs", "sum_abs", "sum_kl",
                 "sum_ll_dyn", "sum_ll_stat")

    def __init__(self) -> None:
        self.n = self.n_pairs = 0
        self.sum_kl = self.sum_abs = self.sum_ll_dyn = self.sum_ll_stat = 0.0
        self.hist_dyn = np.zeros(BINS, dtype=np.int64)
        self.hist_stat = np.zeros(BINS, dtype=np.int64)
        # [model (0 dynamic, 1 static), label (0, 1), grid cell]
        self.grid = np.zeros((2, 2, AUC_GRID), dtype=np.int64)

    def add(self, p_dyn: Sequence[float] | np.ndarray,
            p_stat: Sequence[float | None] | np.ndarray,
            label: Sequence[float] | np.ndarray) -> FeedbackStats:
        """Add predictions (probabilities in [0, 1], labels 0/1); ``p_stat[i]`` None: no twin.
        Returns self. ``ValueError`` on unequal lengths or values out of range."""
        p = np.asarray(p_dyn, dtype=np.float64)
        y = np.asarray(label, dtype=np.float64)
        has = np.array([q is not None for q in p_stat], dtype=bool)
        q = np.array([v if v is not None else np.nan for v in p_stat], dtype=np.float64)
        if not (p.ndim == 1 and p.shape == y.shape == q.shape):
            raise ValueError(f"p_dyn {p.shape}, p_stat {q.shape} and label {y.shape} differ")
        if not (np.all((p >= 0) & (p <= 1)) and np.all((q[has] >= 0) & (q[has] <= 1))
                and np.all((y == 0) | (y == 1))):
            raise ValueError("probabilities must lie in [0, 1] and labels be 0 or 1")
        yi = y.astype(np.int64)
        self.n += len(p)
        self.sum_ll_dyn += math.fsum(log_loss(a, b) for a, b in zip(y.tolist(), p.tolist(),
                                                                     strict=True))
        np.add.at(self.grid[0], (yi, auc_grid(p)), 1)
        if has.any():
            pp, qq, yy = p[has], q[has], y[has]
            self.n_pairs += len(pp)
            self.sum_kl += math.fsum(symmetric_kl(pp, qq, KL_EPS).tolist())
            self.sum_abs += math.fsum(np.abs(pp - qq).tolist())
            self.sum_ll_stat += math.fsum(log_loss(a, b) for a, b in zip(yy.tolist(),
                                                                          qq.tolist(),
                                                                          strict=True))
            np.add.at(self.hist_dyn, _bin(pp), 1)
            np.add.at(self.hist_stat, _bin(qq), 1)
            np.add.at(self.grid[1], (yy.astype(np.int64), auc_grid(qq)), 1)
        return self

    def merged(self, other: FeedbackStats) -> FeedbackStats:
        """A new ``FeedbackStats`` of both sets (neither is changed)."""
        out = FeedbackStats()
        out.n, out.n_pairs = self.n + other.n, self.n_pairs + other.n_pairs
        out.sum_kl = self.sum_kl + other.sum_kl
        out.sum_abs = self.sum_abs + other.sum_abs
        out.sum_ll_dyn = self.sum_ll_dyn + other.sum_ll_dyn
        out.sum_ll_stat = self.sum_ll_stat + other.sum_ll_stat
        out.hist_dyn = self.hist_dyn + other.hist_dyn
        out.hist_stat = self.hist_stat + other.hist_stat
        out.grid = self.grid + other.grid
        return out

    def report(self) -> dict[str, Any]:
        """``{"n", "n_pairs", "distance", "mean_abs_diff", "psi", "js", "auc_dynamic",
        "auc_static", "logloss_dynamic", "logloss_static"}`` (None where undefined)."""
        n, m = self.n, self.n_pairs
        out: dict[str, Any] = {
            "n": n, "n_pairs": m,
            "distance": max(self.sum_kl, 0.0) / m if m else None,
            "mean_abs_diff": self.sum_abs / m if m else None,
            "psi": None, "js": None,
            "auc_dynamic": _grid_auc(self.grid[0, 1], self.grid[0, 0]),
            "auc_static": _grid_auc(self.grid[1, 1], self.grid[1, 0]),
            "logloss_dynamic": self.sum_ll_dyn / n if n else None,
            "logloss_static": self.sum_ll_stat / m if m else None,
        }
        if m:
            out["psi"], out["js"] = score_shift(self.hist_dyn, self.hist_stat, KL_EPS)
        return out

    def to_json(self) -> bytes:
        """The stats as JSON, grid counts sparse (``from_json`` reads it back exactly)."""
        cells = np.flatnonzero(self.grid)
        return _encoder.encode({
            "n": self.n, "n_pairs": self.n_pairs, "sum_kl": self.sum_kl,
            "sum_abs": self.sum_abs, "sum_ll_dyn": self.sum_ll_dyn,
            "sum_ll_stat": self.sum_ll_stat, "hist_dyn": self.hist_dyn.tolist(),
            "hist_stat": self.hist_stat.tolist(), "cells": cells.tolist(),
            "counts": self.grid.reshape(-1)[cells].tolist(),
        })

    @classmethod
    def from_json(cls, data: bytes) -> FeedbackStats:
        """Read ``to_json``'s form; ``ValueError`` if it is not one."""
        try:
            d = msgspec.json.decode(data)
            out = cls()
            out.n, out.n_pairs = int(d["n"]), int(d["n_pairs"])
            out.sum_kl, out.sum_abs = float(d["sum_kl"]), float(d["sum_abs"])
            out.sum_ll_dyn, out.sum_ll_stat = float(d["sum_ll_dyn"]), float(d["sum_ll_stat"])
            out.hist_dyn = np.asarray(d["hist_dyn"], dtype=np.int64).reshape(BINS)
            out.hist_stat = np.asarray(d["hist_stat"], dtype=np.int64).reshape(BINS)
            flat = out.grid.reshape(-1)
            flat[np.asarray(d["cells"], dtype=np.int64)] = np.asarray(d["counts"],
                                                                      dtype=np.int64)
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not FeedbackStats JSON: {exc}") from exc
        return out


_encoder = msgspec.json.Encoder()


def _bin(p: np.ndarray) -> np.ndarray:
    return np.minimum((p * BINS).astype(np.int64), BINS - 1)
