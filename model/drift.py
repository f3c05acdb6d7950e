"""The surrogate distance between the dynamic model and its static twin (docs/model.md), windowed.

``DriftMonitor.update(p_dyn, p_stat, label=None)`` takes the two models' probabilities of the
same predictions (scalars or [B] arrays, in stream order) and, where known, their labels.
``report()`` gives, for each window of the last T predictions:

- ``distance``: D_T = mean symmetric binary KL, KL(p||q) + KL(q||p) = (p - q)(logit p - logit q),
  with both probabilities clipped to [eps, 1 - eps]; exactly 0 when p == q.
- ``mean_abs_diff``: mean |p_dyn - p_stat|.
- ``psi`` and ``js``: population stability index and Jensen-Shannon divergence (natural log,
  at most ln 2) between the two score distributions, histogrammed into ``bins`` equal bins on
  [0, 1]; each bin's share is smoothed as (count + eps) / (T + bins * eps), so an empty bin
  stays finite and identical histograms give exactly 0.
- over the last T *labelled* predictions: ``auc_dynamic``/``auc_static`` (None while the window
  holds one class only) and ``logloss_dynamic``/``logloss_static`` (None while empty).

Updates are O(1) per prediction per window (running sums over deques, re-summed once per T
evictions to shed rounding, and reset to exactly 0 while the window holds no non-zero
term); ``report()`` is O(bins) per window plus a sort of the labelled
window for the AUC. The alert compares D_T of ``alert_window`` with ``threshold`` after every
update (once the window holds ``alert_min_count`` predictions): ``alert`` is True while it is
above; ``on_alert(distance)`` is called once per upward crossing, and re-arms when D_T falls
back to the threshold or below. Not thread-safe: one caller updates and reports.

>>> monitor = DriftMonitor(windows=(4,))
>>> _ = monitor.update([0.8, 0.8], [0.5, 0.5])
>>> round(monitor.report()["windows"][4]["distance"], 6)  # 0.3 * ln 4
0.415888
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model.prediction_metrics import EPS, auc


def symmetric_kl(p: np.ndarray, q: np.ndarray, eps: float) -> np.ndarray:
    """KL(p||q) + KL(q||p) of Bernoulli(p) and Bernoulli(q), elementwise, after clipping."""
    p, q = np.clip(p, eps, 1 - eps), np.clip(q, eps, 1 - eps)
    return (p - q) * (np.log(p / (1 - p)) - np.log(q / (1 - q)))


def log_loss(label: float, p: float) -> float:
    """Binary cross-entropy of one prediction, ``p`` clipped to [EPS, 1 - EPS]."""
    p = min(max(p, EPS), 1 - EPS)
    return -math.log(p) if label else -math.log(1 - p)


def _shares(counts: np.ndarray, eps: float) -> np.ndarray:
    return (counts + eps) / (counts.sum() + len(counts) * eps)


def score_shift(hist_a: np.ndarray, hist_b: np.ndarray, eps: float) -> tuple[float, float]:
    """``(psi, js)`` of two score histograms over the same bins (counts; each bin's share is
    smoothed as (count + eps) / (total + bins * eps)): the population stability index and the
    Jensen-Shannon divergence (natural log, at most ln 2); both exactly 0 for equal ones."""
    a, b = _shares(hist_a, eps), _shares(hist_b, eps)
    mid = (a + b) / 2
    psi = float(np.sum((a - b) * np.log(a / b)))
    js = float(0.5 * np.sum(a * np.log(a / mid)) + 0.5 * np.sum(b * np.log(b / mid)))
    return psi, js


class _Window:
    """Running sums over the last ``size`` predictions and the last ``size`` labelled ones."""

    def __init__(self, size: int, bins: int) -> None:
        self.size = size
        self.pairs: deque[tuple[float, float, int, int]] = deque()  # (skl, |diff|, bin_d, bin_s)
        self.sum_kl = self.sum_abs = 0.0
        self.nonzero = 0  # pairs with p_dyn != p_stat: none means the sums are exactly 0
        self.hist_dyn = np.zeros(bins, dtype=np.int64)
        self.hist_stat = np.zeros(bins, dtype=np.int64)
        self.labelled: deque[tuple[float, float, float, float, float]] = deque()
        self.sum_ll_dyn = self.sum_ll_stat = 0.0
        self._evictions = 0

    def add(self, skl: float, diff: float, bin_dyn: int, bin_stat: int) -> None:
        self.pairs.append((skl, diff, bin_dyn, bin_stat))
        self.sum_kl += skl
        self.sum_abs += diff
        self.nonzero += diff != 0.0
        self.hist_dyn[bin_dyn] += 1
        self.hist_stat[bin_stat] += 1
        if len(self.pairs) > self.size:
            old_kl, old_diff, old_dyn, old_stat = self.pairs.popleft()
            self.sum_kl -= old_kl
            self.sum_abs -= old_diff
            self.nonzero -= old_diff != 0.0
            if not self.nonzero:
                self.sum_kl = self.sum_abs = 0.0
            self.hist_dyn[old_dyn] -= 1
            self.hist_stat[old_stat] -= 1
            self._evicted()

    def add_labelled(self, label: float, p_dyn: float, p_stat: float) -> None:
        ll_dyn, ll_stat = log_loss(label, p_dyn), log_loss(label, p_stat)
        self.labelled.append((label, p_dyn, p_stat, ll_dyn, ll_stat))
        self.sum_ll_dyn += ll_dyn
        self.sum_ll_stat += ll_stat
        if len(self.labelled) > self.size:
            _, _, _, old_dyn, old_stat = self.labelled.popleft()
            self.sum_ll_dyn -= old_dyn
            self.sum_ll_stat -= old_stat
            self._evicted()

    def _evicted(self) -> None:
        """Every ``size`` evictions, re-sum exactly so that rounding cannot accumulate."""
        self._evictions += 1
        if self._evictions >= self.size:
            self._evictions = 0
            self.sum_kl = math.fsum(p[0] for p in self.pairs)
            self.sum_abs = math.fsum(p[1] for p in self.pairs)
            self.sum_ll_dyn = math.fsum(row[3] for row in self.labelled)
            self.sum_ll_stat = math.fsum(row[4] for row in self.labelled)

    @property
    def distance(self) -> float | None:
        return max(self.sum_kl, 0.0) / len(self.pairs) if self.pairs else None

    def report(self, eps: float) -> dict[str, Any]:
        n, m = len(self.pairs), len(self.labelled)
        out: dict[str, Any] = {"n": n, "distance": self.distance,
                               "mean_abs_diff": max(self.sum_abs, 0.0) / n if n else None,
                               "psi": None, "js": None, "n_labelled": m}
        if n:
            out["psi"], out["js"] = score_shift(self.hist_dyn, self.hist_stat, eps)
        rows = np.asarray(self.labelled, dtype=np.float64).reshape(m, 5)
        for k, name in ((1, "dynamic"), (2, "static")):
            value = auc(rows[:, 0], rows[:, k]) if m else float("nan")
            out[f"auc_{name}"] = None if math.isnan(value) else value
        out["logloss_dynamic"] = self.sum_ll_dyn / m if m else None
        out["logloss_static"] = self.sum_ll_stat / m if m else None
        return out


class DriftMonitor:
    """Windowed surrogate distance, score-distribution shift and online AUC/LogLoss of a
    dynamic model and its static twin (see the module docstring for every figure).

    windows: the window sizes T (predictions). bins: histogram bins on [0, 1] for PSI and JS.
    eps: probability clip for the KL and the histogram smoothing. threshold: the alert level of
    D_T (None: no alert). alert_window: the T whose D_T is compared (default the first).
    """

    def __init__(
        self,
        windows: Sequence[int] = (1000, 10_000),
        bins: int = 10,
        eps: float = 1e-6,
        threshold: float | None = None,
        alert_window: int | None = None,
        alert_min_count: int = 100,
        on_alert: Callable[[float], None] | None = None,
    ) -> None:
        if not windows or any(t < 1 for t in windows) or bins < 1 or not 0 < eps < 0.5:
            raise ValueError(f"bad windows {windows}, bins {bins} or eps {eps}")
        alert_window = windows[0] if alert_window is None else alert_window
        if alert_window not in windows:
            raise ValueError(f"alert_window {alert_window} is not one of {windows}")
        self.bins, self.eps = bins, eps
        self.threshold, self.alert_window = threshold, alert_window
        self.alert_min_count, self.on_alert = alert_min_count, on_alert
        self.windows = {t: _Window(t, bins) for t in windows}
        self.alert = False
        self.alerts = 0  # upward crossings so far
        self.n = 0  # predictions seen

    def _bin(self, p: np.ndarray) -> np.ndarray:
        return np.minimum((p * self.bins).astype(np.int64), self.bins - 1)

    def update(
        self,
        p_dyn: float | Sequence[float] | np.ndarray,
        p_stat: float | Sequence[float] | np.ndarray,
        label: float | Sequence[float] | np.ndarray | None = None,
    ) -> DriftMonitor:
        """Add predictions (probabilities in [0, 1]) in stream order; ``label``: None (not
        labelled) or one 0/1 per prediction."""
        p = np.atleast_1d(np.asarray(p_dyn, dtype=np.float64))
        q = np.atleast_1d(np.asarray(p_stat, dtype=np.float64))
        if p.shape != q.shape or p.ndim != 1:
            raise ValueError(f"p_dyn {p.shape} and p_stat {q.shape} must be equal 1-d shapes")
        if not (np.all((p >= 0) & (p <= 1)) and np.all((q >= 0) & (q <= 1))):
            raise ValueError("probabilities must lie in [0, 1]")
        y = None if label is None else np.atleast_1d(np.asarray(label, dtype=np.float64))
        if y is not None and y.shape != p.shape:
            raise ValueError(f"label {y.shape} does not match the predictions {p.shape}")
        skl = symmetric_kl(p, q, self.eps).tolist()
        diff = np.abs(p - q).tolist()
        bin_p, bin_q = self._bin(p).tolist(), self._bin(q).tolist()
        for window in self.windows.values():
            for i in range(len(p)):
                window.add(skl[i], diff[i], bin_p[i], bin_q[i])
            if y is not None:
                for label_i, p_i, q_i in zip(y.tolist(), p.tolist(), q.tolist(), strict=True):
                    window.add_labelled(label_i, p_i, q_i)
        self.n += len(p)
        self._check_alert()
        return self

    def _check_alert(self) -> None:
        window = self.windows[self.alert_window]
        distance = window.distance
        if self.threshold is None or distance is None or len(window.pairs) < min(
            self.alert_min_count, window.size
        ):
            return
        if distance > self.threshold and not self.alert:
            self.alert = True
            self.alerts += 1
            if self.on_alert is not None:
                self.on_alert(distance)
        elif distance <= self.threshold:
            self.alert = False

    def distance(self, window: int) -> float | None:
        """D_T of window ``window`` (None while it is empty)."""
        return self.windows[window].distance

    def report(self) -> dict[str, Any]:
        """``{"n", "alert", "alerts", "threshold", "alert_window", "windows": {T: {...}}}``."""
        return {
            "n": self.n,
            "alert": self.alert,
            "alerts": self.alerts,
            "threshold": self.threshold,
            "alert_window": self.alert_window,
            "windows": {t: w.report(self.eps) for t, w in self.windows.items()},
        }
