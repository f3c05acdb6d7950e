"""DriftMonitor on hand-made sequences: identical models are at distance 0 exactly, a known
shift gives its closed-form value, windows forget what slid out, the windowed AUC and LogLoss
are sklearn's on the window, and the alert fires once per crossing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from model.drift import DriftMonitor, symmetric_kl


def test_identical_models_are_at_distance_zero_exactly():
    """p_dyn == p_stat everywhere: D_T, mean |diff|, PSI and JS are all exactly 0, in every
    window, even after the windows have slid."""
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(windows=(50, 200))
    for _ in range(30):
        p = rng.uniform(0, 1, size=17)
        monitor.update(p, p, rng.integers(0, 2, size=17))
    for window in monitor.report()["windows"].values():
        assert window["distance"] == 0.0 and window["mean_abs_diff"] == 0.0
        assert window["psi"] == 0.0 and window["js"] == 0.0
        assert window["auc_dynamic"] == window["auc_static"]


def test_a_constant_shift_gives_the_closed_form_symmetric_kl():
    """p_dyn = 0.8, p_stat = 0.5: KL(0.8||0.5) + KL(0.5||0.8) = 0.3 * ln 4, mean |diff| = 0.3;
    all mass in bin 8 vs bin 5, so PSI and JS equal the smoothed two-point values."""
    monitor = DriftMonitor(windows=(100,), bins=10, eps=1e-6)
    monitor.update(np.full(100, 0.8), np.full(100, 0.5))
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    kl += 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    window = monitor.report()["windows"][100]
    assert window["distance"] == pytest.approx(kl, rel=1e-12)
    assert window["distance"] == pytest.approx(0.3 * math.log(4), rel=1e-12)
    assert window["mean_abs_diff"] == pytest.approx(0.3, rel=1e-12)
    a = np.full(10, 1e-6)
    b = a.copy()
    a[8] += 100
    b[5] += 100
    a, b = a / a.sum(), b / b.sum()
    assert window["psi"] == pytest.approx(float(np.sum((a - b) * np.log(a / b))), rel=1e-9)
    mid = (a + b) / 2
    js = 0.5 * np.sum(a * np.log(a / mid)) + 0.5 * np.sum(b * np.log(b / mid))
    assert window["js"] == pytest.approx(float(js), rel=1e-9)
    assert window["js"] <= math.log(2)


def test_symmetric_kl_clips_certain_probabilities():
    """p = 0 against q = 1 stays finite (both clipped to [eps, 1 - eps])."""
    value = float(symmetric_kl(np.array([0.0]), np.array([1.0]), 1e-6)[0])
    assert math.isfinite(value) and value == pytest.approx(2 * (1 - 2e-6) * math.log(1e6 - 1))


def test_windows_drop_what_slid_out():
    """After 100 shifted predictions then 30 identical ones, the 30-window is back at 0 while
    the 100-window still holds 70 shifted ones (70/100 of the shifted distance)."""
    monitor = DriftMonitor(windows=(30, 100))
    for _ in range(100):
        monitor.update(0.8, 0.5)
    monitor.update(np.full(30, 0.4), np.full(30, 0.4))
    windows = monitor.report()["windows"]
    assert windows[30]["distance"] == 0.0 and windows[30]["psi"] == 0.0
    assert windows[100]["distance"] == pytest.approx(0.7 * 0.3 * math.log(4), rel=1e-9)
    assert windows[100]["n"] == 100 and monitor.n == 130


def test_windowed_auc_and_logloss_match_sklearn_on_the_window():
    """Over a long labelled stream with unlabelled predictions mixed in, each window's AUC and
    LogLoss are sklearn's on exactly its last T labelled predictions."""
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(windows=(64, 500))
    labels, dyn, stat = [], [], []
    for k in range(400):
        p, q = rng.uniform(0.01, 0.99, size=3), rng.uniform(0.01, 0.99, size=3)
        if k % 4 == 0:
            monitor.update(p, q)  # unlabelled: in the distance, not in AUC/LogLoss
            continue
        y = (rng.uniform(size=3) < p).astype(int)
        monitor.update(p, q, y)
        labels += y.tolist()
        dyn += p.tolist()
        stat += q.tolist()
    for t, window in monitor.report()["windows"].items():
        y, p, q = np.array(labels[-t:]), np.array(dyn[-t:]), np.array(stat[-t:])
        assert window["n_labelled"] == len(y) == min(t, len(labels))
        assert window["auc_dynamic"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert window["auc_static"] == pytest.approx(roc_auc_score(y, q), abs=1e-12)
        assert window["logloss_dynamic"] == pytest.approx(log_loss(y, p), rel=1e-9)
        assert window["logloss_static"] == pytest.approx(log_loss(y, q), rel=1e-9)
        assert window["auc_dynamic"] > window["auc_static"]  # p generated the labels


def test_auc_is_none_while_a_window_holds_one_class():
    monitor = DriftMonitor(windows=(10,))
    monitor.update([0.2, 0.9], [0.3, 0.4], [1, 1])
    window = monitor.report()["windows"][10]
    assert window["auc_dynamic"] is None and window["auc_static"] is None
    assert window["logloss_dynamic"] == pytest.approx(-(math.log(0.2) + math.log(0.9)) / 2)


def test_the_alert_fires_once_per_crossing_and_rearms():
    """Crossing the threshold calls on_alert once, staying above does not call it again,
    falling back re-arms it, and the next crossing calls it again."""
    fired: list[float] = []
    monitor = DriftMonitor(windows=(10,), threshold=0.1, alert_min_count=10,
                           on_alert=fired.append)
    monitor.update(np.full(10, 0.5), np.full(10, 0.5))
    assert not monitor.report()["alert"] and fired == []
    for _ in range(10):
        monitor.update(0.8, 0.5)  # D crosses 0.1 at the 3rd shifted prediction
    assert monitor.report()["alert"] and len(fired) == 1 and fired[0] > 0.1
    monitor.update(np.full(10, 0.5), np.full(10, 0.5))
    assert not monitor.alert and len(fired) == 1
    monitor.update(np.full(10, 0.8), np.full(10, 0.5))
    assert monitor.alert and len(fired) == 2 and monitor.alerts == 2


def test_rounding_does_not_accumulate_over_many_slides():
    """After 20 000 random predictions through a 100-window, the running D_T equals the
    exact mean over the window's last 100 predictions."""
    rng = np.random.default_rng(2)
    p, q = rng.uniform(0, 1, 20_000), rng.uniform(0, 1, 20_000)
    monitor = DriftMonitor(windows=(100,))
    for begin in range(0, 20_000, 37):
        monitor.update(p[begin : begin + 37], q[begin : begin + 37])
    exact = float(np.mean(symmetric_kl(p[-100:], q[-100:], 1e-6)))
    assert monitor.distance(100) == pytest.approx(exact, rel=1e-12)
