"""The ``unirec`` command line: train + eval work end to end on a generic event file and on
MovieLens-100K, print the documented JSON, and fail with a message and exit status 2 on bad
input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.cli import main
from evaluation.sizes import model_size
from eventlog.movielens import DatasetUnavailable, default_data_dir, load_movielens_100k
from model.baselines import MODEL_KINDS
from model.checkpoint import load
from model.config import ModelConfig

TINY = ["--d-model", "16", "--history-len", "8", "--batch-size", "64"]


def _write_events(path: Path, n_users: int = 30, per_user: int = 20, seed: int = 0) -> Path:
    """A learnable log: users like the genre they interact with most often."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        favourite = rng.integers(3)
        for k in range(per_user):
            genre = int(rng.integers(3))
            rows.append({
                "user_id": f"u{u}", "item_id": f"i{rng.integers(40)}",
                "ts": 1_700_000_000.0 + k * 3600 + u, "label": int(genre == favourite),
                "item_genre": ["g0", "g1", "g2"][genre], "item_price": float(rng.random()),
                "ctx_device": ["ios", "web"][k % 2], "user_age": f"{20 + u % 3}",
            })
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_train_then_eval_on_a_generic_file_prints_the_metrics(tmp_path, capsys, monkeypatch):
    """`unirec train --events F` writes a checkpoint; `unirec eval --events F --json` prints
    auc, gauc, logloss and n for the later 20% of the events."""
    monkeypatch.setenv("UNIREC_RUN_DIR", str(tmp_path / "runs"))
    events = _write_events(tmp_path / "events.parquet")
    assert main(["train", "--events", str(events), "--max-steps", "4", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["checkpoint"]).is_file()
    assert summary["steps"] == 4
    assert main(["eval", "--events", str(events), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"auc", "gauc", "logloss", "n"}
    assert metrics["n"] == 120
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["logloss"] > 0


def test_eval_without_a_checkpoint_fails_with_a_message(tmp_path, capsys, monkeypatch):
    """A missing checkpoint is a one-line error and exit status 2, not a traceback."""
    monkeypatch.setenv("UNIREC_RUN_DIR", str(tmp_path / "runs"))
    events = _write_events(tmp_path / "events.parquet")
    assert main(["eval", "--events", str(events)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "unirec train" in err


def test_bad_event_files_fail_with_a_message(tmp_path, capsys):
    """A missing file or a file with a bad column gives exit status 2 and names the problem."""
    assert main(["train", "--events", str(tmp_path / "missing.parquet")]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u", "item_id": "i", "ts": 1.0, "label": 3}\n')
    assert main(["train", "--events", str(bad)]) == 2
    assert "label" in capsys.readouterr().err


def test_an_unknown_device_is_refused(tmp_path, capsys):
    """--device must be auto, cpu or cuda."""
    events = _write_events(tmp_path / "events.parquet")
    assert main(["train", "--events", str(events), "--device", "tpu", "--max-steps", "1"]) == 2
    assert "device" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    ["--max-steps", "0"], ["--max-steps", "-3"], ["--epochs", "0"], ["--batch-size", "0"],
    ["--d-model", "0"], ["--history-len", "0"], ["--lr", "nan"], ["--lr", "-1"],
    ["--lr", "inf"], ["--d-model", "10"], ["--item-rate-smoothing", "-1"],
    ["--item-rate-smoothing", "nan"], ["--affinity-len", "0"],
    ["--affinity-len", "4", "--history-len", "8"],
])
def test_a_training_flag_out_of_range_is_refused_naming_it(tmp_path, capsys, monkeypatch,
                                                           flags):
    """Counts must be positive, the rate positive and finite, the width a multiple of the
    heads, the affinity window no shorter than the history: exit status 2 naming the flag, no
    traceback and no checkpoint."""
    monkeypatch.setenv("UNIREC_RUN_DIR", str(tmp_path / "runs"))
    events = _write_events(tmp_path / "events.parquet")
    assert main(["train", "--events", str(events), *flags]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_size_sets_the_config_and_the_flags_given_override_it(tmp_path, capsys, monkeypatch):
    """`--size suite` trains the eval suite's UniRec (two layers, d 48, history 20, its tuned
    learning rate); `--d-model` and `--history-len` given on top replace only themselves."""
    monkeypatch.setenv("UNIREC_RUN_DIR", str(tmp_path / "runs"))
    events = _write_events(tmp_path / "events.parquet")
    suite = model_size("suite")
    for extra, expected in (
        ([], suite.config),
        (["--d-model", "16", "--history-len", "8"],
         ModelConfig(**{**vars(suite.config), "d_model": 16, "history_len": 8})),
    ):
        argv = ["train", "--events", str(events), "--size", "suite", "--max-steps", "1", *extra]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["train_config"]["lr"] == suite.lr
        model, _ = load(Path(summary["checkpoint"]), torch.device("cpu"), kind=None,
                        kinds=MODEL_KINDS)
        assert model.cfg == expected


def test_a_model_trained_with_item_rates_keeps_its_table_and_evaluates(tmp_path, capsys,
                                                                      monkeypatch):
    """`unirec train --item-rate-smoothing 10` saves a spec with the training part's item
    rates (model.item_rates), and `unirec eval` scores the later events with them."""
    monkeypatch.setenv("UNIREC_RUN_DIR", str(tmp_path / "runs"))
    events = _write_events(tmp_path / "events.parquet")
    argv = ["train", "--events", str(events), "--size", "suite", "--max-steps", "2",
            "--item-rate-smoothing", "10"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    model, _ = load(Path(summary["checkpoint"]), torch.device("cpu"), kind=None,
                    kinds=MODEL_KINDS)
    spec = model.spec
    assert spec.item_rate_smoothing == 10.0 and spec.n_item_rates == 2
    assert sum(spec.item_rate_counts) == summary["train_examples"]
    assert main(["eval", "--events", str(events), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] > 0 and 0.0 <= metrics["auc"] <= 1.0


@pytest.mark.parametrize("command", ["worker", "trainer"])
@pytest.mark.parametrize("flag", ["--train-lr", "--train-embedding-lr"])
@pytest.mark.parametrize("rate", ["0", "-1e-3", "nan", "inf"])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(tmp_path, capsys, command,
                                                                     flag, rate):
    """The online learner's rates must be positive and finite: exit status 2 naming the
    flag, before any broker is contacted (127.0.0.1:9 has none)."""
    argv = [command, "--bootstrap-servers", "127.0.0.1:9", "--store", str(tmp_path / "s"),
            f"{flag}={rate}"]
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.broker
def test_the_console_script_runs_train_and_eval_on_movielens(tmp_path):
    """`unirec train --dataset movielens-100k` then `unirec eval ... --json`, as a user runs
    them, in a subprocess."""
    try:
        load_movielens_100k(default_data_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"MovieLens-100K not available here: {exc}")
    env_args = ["--checkpoint", str(tmp_path / "model.pt")]
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run(
        [*cli, "train", "--dataset", "movielens-100k", "--max-steps", "3", *TINY, *env_args],
        check=True, capture_output=True,
    )
    done = subprocess.run(
        [*cli, "eval", "--dataset", "movielens-100k", "--json", *env_args],
        check=True, capture_output=True, text=True,
    )
    metrics = json.loads(done.stdout)
    assert metrics["n"] == 20_001
    assert 0.0 <= metrics["auc"] <= 1.0
