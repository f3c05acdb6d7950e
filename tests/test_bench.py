"""The benchmarks still run and print the JSON they document (smoke runs, no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return json.loads(done.stdout)


def test_scoring_benchmark_reports_both_paths_and_their_agreement():
    """bench/scoring.py --quick prints, per case, cached and reference latencies, the speedup
    and how far the two paths' scores differ (they must agree)."""
    report = _run("scoring.py", "--quick", "--candidates", "16")
    (case,) = report["cases"]
    assert case["n"] == 64 and case["candidates"] == 16
    for path in ("cached", "reference"):
        assert case[path]["p50_ms"] > 0 and case[path]["p99_ms"] >= case[path]["p50_ms"]
    assert case["speedup_p50"] > 0
    assert case["max_abs_diff"] <= 1e-4


def test_state_store_benchmark_reports_throughput_for_each_batch_size(tmp_path):
    """bench/state_store.py --quick prints users/s for batches of 1, 64 and 1024 and the bytes
    on disk per user."""
    report = _run("state_store.py", "--quick", "--dir", str(tmp_path / "bench"))
    for key in ("read_users_per_s", "apply_users_per_s"):
        assert set(report[key]) == {"1", "64", "1024"}
        assert all(v > 0 for v in report[key].values())
    assert report["disk_bytes_per_user"] > 0


def test_training_benchmark_reports_every_kind_at_both_sizes():
    """bench/training.py --quick prints, for the suite and default sizes, every model kind's
    examples/s, seconds per step and counted FLOPs per example, on the device it names."""
    report = _run("training.py", "--quick", "--device", "cpu")
    assert report["device"] == "cpu"
    assert set(report["results"]) == {"suite", "default"}
    for size in report["results"].values():
        assert set(size) == {"unirec", "deepfm", "din", "sasrec-dcnv2"}
        for row in size.values():
            assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0
    suite, default = report["results"]["suite"]["unirec"], report["results"]["default"]["unirec"]
    assert default["flops_per_example"] > suite["flops_per_example"]


def test_rebuild_benchmark_rebuilds_every_stale_state_and_none_of_the_current():
    """bench/rebuild.py --quick applies one event per user with current states (nothing
    rebuilt) and with stale ones (every user rebuilt from its history), and prints both
    rates."""
    report = _run("rebuild.py", "--quick")
    users = report["config"]["users"]
    assert users == 200
    assert report["current"]["rebuilt"] == 0 and report["stale"]["rebuilt"] == users
    assert report["current"]["events_per_s"] > 0 and report["stale"]["events_per_s"] > 0
    assert report["stale_cost_ratio"] > 0


def test_gpu_check_compares_device_scores_with_cpu_fp32_on_the_cpu():
    """bench/gpu_check.py (the first step of bench/gpu.sh) runs here with --device cpu: W8A16
    and plain scores, cached and reference, against CPU fp32, within the bf16 tolerance."""
    report = _run("gpu_check.py", "--device", "cpu", "--n", "16", "--candidates", "4",
                  "--batch", "2")
    assert report["ok"] and report["max_abs_diff"] <= report["tol"]
    assert {(r["quantize"], r["path"]) for r in report["rows"]} == {
        (q, p) for q in ("none", "w8a16") for p in ("cached", "reference")}
    plain = [r for r in report["rows"] if r["quantize"] == "none"]
    assert max(r["max_abs_diff_vs_cpu_fp32"] for r in plain) < 1e-5  # same device, same fp32


def test_scoring_benchmark_has_a_w8a16_row():
    report = _run("scoring.py", "--quick", "--n", "16", "--candidates", "4", "--batch", "2",
                  "--quantize", "none", "w8a16")
    rows = {r["quantize"]: r for r in report["cases"]}
    assert rows["w8a16"]["serving_weight_bytes"] < rows["none"]["serving_weight_bytes"] / 2
    assert 0 < rows["w8a16"]["max_abs_diff_vs_fp32"] < 0.05


def test_training_benchmark_refuses_a_device_it_cannot_use():
    """bench/training.py --device with no such device exits 2 naming the device, before any
    data is loaded (bench/gpu.sh's training step on a machine without that device)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "training.py"), "--device",
                           "nosuch"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device nosuch" in done.stderr and not done.stdout


def test_gpu_script_stops_at_once_without_a_cuda_device(tmp_path):
    """bench/gpu.sh on a machine without CUDA exits non-zero saying so, and runs no step."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    assert list((tmp_path / "gpu").iterdir()) == []
