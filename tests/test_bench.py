"""The benchmarks still run and print the JSON they document (smoke runs, no timing asserts)."""

from __future__ import annotations

import json
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
    examples/s, seconds per step and counted FLOPs per example."""
    report = _run("training.py", "--quick")
    assert set(report["results"]) == {"suite", "default"}
    for size in report["results"].values():
        assert set(size) == {"unirec", "deepfm", "din", "sasrec-dcnv2"}
        for row in size.values():
            assert row["examples_per_s"] > 0 and row["flops_per_example"] > 0
    suite, default = report["results"]["suite"]["unirec"], report["results"]["default"]["unirec"]
    assert default["flops_per_example"] > suite["flops_per_example"]
