"""``unirec demo`` end to end on MovieLens-100K (skipped where the data cannot be had): it
trains a model when there is none, streams the log through an embedded broker and a worker,
and ends with a summary whose counts match what was replayed; Ctrl-C stops it cleanly, with
no process left behind."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eventlog.log import EventLog, time_split
from eventlog.movielens import DatasetUnavailable, default_data_dir, load_movielens_100k

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

REPO = Path(__file__).resolve().parents[1]
EVENTS = 200
FROZEN_EVENTS = 1000
STOP_S = 30  # a Ctrl-C'd demo has stopped everything it started within this


@pytest.fixture(scope="module")
def movielens() -> EventLog:
    try:
        return load_movielens_100k(default_data_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"MovieLens-100K not available here: {exc}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory: the first demo trains the model, the second reuses it."""
    return tmp_path_factory.mktemp("demo-runs")


def demo(run_dir: Path, *args: str, train_steps: int = 2, relative: bool = False
         ) -> subprocess.Popen:
    """``unirec demo`` in the repository root on ``run_dir``; ``relative``: from the run
    directory's parent instead, given as a relative ``UNIREC_RUN_DIR`` (as a user running it
    in a directory of their own)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNIREC_DEVICE": "cpu",
           "UNIREC_RUN_DIR": run_dir.name if relative else str(run_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--train-steps", str(train_steps), *args],
        cwd=run_dir.parent if relative else REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def leftovers(run_dir: Path) -> list[str]:
    """Command lines of live processes started for this run (its worker, its broker)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(cmdline)
    return found


def wait_for_stderr(run: subprocess.Popen, marker: str, deadline: float) -> None:
    """Read ``run``'s stderr until it has printed ``marker``; its progress bars end their
    updates with a carriage return, so this reads what arrives, not lines."""
    seen, fd = "", run.stderr.fileno()
    while marker not in seen:
        assert run.poll() is None and time.monotonic() < deadline, seen[-3000:]
        if select.select([fd], [], [], 1.0)[0]:
            seen += os.read(fd, 65536).decode(errors="replace")


def test_demo_streams_the_held_out_events_and_summarises_them(movielens: EventLog,
                                                              run_dir: Path) -> None:
    run = demo(run_dir, "--events", str(EVENTS), "--json")
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out)
    history = time_split(movielens, 0.8)
    assert summary["device"] == "cpu"
    assert summary["history_interactions"] == history
    assert summary["scored_events"] == EVENTS
    assert summary["interactions_applied"] == history + EVENTS
    assert summary["impressions_scored"] == EVENTS
    assert summary["labels_joined"] == EVENTS
    assert summary["dead_letters"] == 0
    assert summary["users"] == len({e.user_id for e in movielens.interactions[:history + EVENTS]})
    assert summary["online"]["n"] == EVENTS and summary["online"]["missing"] == 0
    assert 0.0 <= summary["online"]["auc"] <= 1.0
    assert summary["latency_ms"]["scoring"]["p99"] >= summary["latency_ms"]["scoring"]["p50"]
    assert summary["interrupted"] is False
    # the fleet monitor beside the worker saw one feedback record per joined label
    assert summary["fleet"]["n"] == EVENTS and summary["monitor"].startswith("http://127.0.0.1:")
    assert "applied" in err  # the live progress went to stderr
    assert (run_dir / "movielens-100k" / "model.pt").is_file()  # trained, since none existed
    assert leftovers(run_dir) == []


def test_a_frozen_demo_streams_the_scores_unirec_eval_computes(movielens: EventLog,
                                                               run_dir: Path) -> None:
    """State as served: with learning off (``--no-train``), the streamed score of the real
    item equals the probability ``unirec eval`` computes offline for that event from the same
    checkpoint (the worker's carried GRU state is the offline u_t), so the streamed AUC and
    GAUC match the offline ones. At full speed: the worker's event-time gate scores every
    impression after its user's previous interaction and before its own, however far the
    consumer reads ahead, and joins every label. Run from outside the repository with a
    relative run directory, it is the demo's checkpoint and store that the worker (started
    in the repository root) uses."""
    run = demo(run_dir, "--events", str(FROZEN_EVENTS), "--no-train", "--json", relative=True)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out)
    online, offline = summary["online"], summary["offline"]
    assert summary["train_steps"] == 0 and summary["learning"] is False
    assert online["n"] == offline["n"] == FROZEN_EVENTS and online["missing"] == 0
    assert offline["events_differing"] == 0, offline
    assert summary["labels_joined"] == FROZEN_EVENTS
    assert abs(online["auc"] - offline["auc"]) <= 0.002
    assert abs(online["gauc"] - offline["gauc"]) <= 0.002
    assert leftovers(run_dir) == []


def test_ctrl_c_stops_the_demo_and_everything_it_started(movielens: EventLog,
                                                         run_dir: Path) -> None:
    run = demo(run_dir, "--rate", "50")
    deadline = time.monotonic() + 300
    progress = ""
    while "applied" not in progress:  # wait for the first live progress line
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-3000:]
        progress = run.stderr.readline()
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    # Promptly: the broker outlives its clients, so their last flush and commit find it (a
    # broker stopped by the same Ctrl-C held the demo for over a minute of client timeouts).
    out, err = run.communicate(timeout=STOP_S)
    assert run.returncode == 130, err[-3000:]
    assert "(interrupted)" in out
    assert leftovers(run_dir) == []


def test_ctrl_c_while_the_model_trains_stops_the_demo_and_saves_no_model(
        movielens: EventLog, tmp_path: Path) -> None:
    """The history streams into the broker while the model trains; Ctrl-C then stops the
    training, the producer and the broker, and no half-trained checkpoint is left behind."""
    run = demo(tmp_path, train_steps=100_000)
    # The progress bar counts the steps taken: Ctrl-C once they run (the history is
    # streaming by then), not during the preparation before them.
    wait_for_stderr(run, f"/{100_000}", deadline=time.monotonic() + 300)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=STOP_S)
    assert run.returncode == 130, err[-3000:]
    assert "(interrupted)" in out
    assert not (tmp_path / "movielens-100k" / "model.pt").exists()
    assert leftovers(tmp_path) == []


def test_a_worker_that_cannot_start_ends_the_demo_with_its_error_and_nothing_left_running(
        movielens: EventLog, tmp_path: Path) -> None:
    """A checkpoint the worker refuses: the demo exits with status 2 and the worker's one-line
    error, no traceback (the producer's sends end before the broker stops, so no client is
    left flushing into a stopped broker), and no process of the run is left."""
    checkpoint = tmp_path / "movielens-100k" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    run = demo(tmp_path, "--no-train")
    out, err = run.communicate(timeout=300)
    assert out == "", out[-3000:]  # no summary: the demo did not run
    assert run.returncode == 2, err[-3000:]
    assert "unirec demo: error: the worker exited with status 2" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert leftovers(tmp_path) == []
