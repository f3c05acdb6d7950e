"""The evaluation harness: time splits that never leak, prequential test-then-train order, the
claim verdicts, and ``unirec eval-suite`` end to end on a tiny generic event file (report,
PNG, JSON, the River peers' section, which ``--no-peers`` skips; ``--tune`` writes the tuning
file that later runs read). ``unirec train --model`` and ``eval`` round-trip a baseline.
Metric correctness (AUC/LogLoss vs scikit-learn, GAUC on a hand-made example) is pinned in
``test_model_metrics.py``; the River peers' own properties in ``test_river_peers.py``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from evaluation.experiment import MODELS, VARIANTS, Budget, Hyper, make_splits, run_one
from evaluation.prequential import chunk_bounds, prequential
from evaluation.results_report import _arms_differ, _online_settings, verdict
from evaluation.tuning import _bracket
from eventlog.loaders import load_events
from model.dataset import build_examples
from model.features import Featurizer
from model.online import OnlineConfig
from model.prediction_metrics import report
from model.training import TrainConfig, predict
from tests.test_cli import _write_events

FLOAT32_METRIC = 1e-6  # the same weights' scores in other batch shapes differ in the last bits
TINY_BUDGET = Budget(d_model=16, history_len=8, core_k=4, steps=3, batch_size=32, seeds=2,
                     chunks=3)
TINY_FLAGS = ["--seeds", "2", "--steps", "2", "--d-model", "16", "--history-len", "8",
              "--batch-size", "32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def events_file(tmp_path_factory) -> Path:
    return _write_events(tmp_path_factory.mktemp("suite") / "tiny.parquet", n_users=16,
                         per_user=15)


def test_the_time_split_never_leaks(events_file):
    """Every validation event is later than every training event, every test event later
    than every validation event, and each example's history holds only earlier events of
    the same user."""
    splits = make_splits(load_events(events_file), TINY_BUDGET)
    train, val, test = splits.train, splits.val, splits.test
    assert len(train) and len(val) and len(test)
    assert train.timestamps.max() < val.timestamps.min()
    assert val.timestamps.max() < test.timestamps.min()
    interactions = splits.log.interactions
    for part in (train, val, test):
        for own, history in zip(part.event_index, part.hist_index, strict=True):
            past = history[history >= 0]
            assert (past < own).all()
            assert all(interactions[i].user_id == interactions[own].user_id for i in past)
            assert all(interactions[i].ts <= interactions[own].ts for i in past)


def test_chunks_cover_the_test_period_in_order():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]


def test_prequential_scores_a_chunk_before_learning_from_it(events_file):
    """The first chunk is scored by the untouched model (fine-tuned = frozen there); later
    chunks by a model that has learned; the frozen model itself is never changed."""
    splits = make_splits(load_events(events_file), TINY_BUDGET)
    result = run_one(MODELS[0], Hyper(lr=1e-2), 0, splits, TINY_BUDGET, 16, torch.device("cpu"))
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    out = prequential(result.model, splits.featurizer, splits.test, result.probabilities,
                      TrainConfig(lr=1e-2, batch_size=8), 3, torch.device("cpu"))
    assert out.frozen_auc[0] == out.fine_tuned_auc[0] or np.isnan(out.frozen_auc[0])
    assert out.online_steps == sum(-(-(e - b) // 8) for b, e in chunk_bounds(len(splits.test), 3))
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_the_fine_tuned_arm_reads_the_labels_of_earlier_chunks_and_never_its_own(events_file):
    """At lr 0 the weights do not move, so the arms differ only in the item-rate table: each
    chunk of the fine-tuned arm scores exactly as a served version whose spec has the labels
    of every earlier chunk in its online table (none for the first chunk, so it equals the
    frozen arm there), and without counting it is the frozen arm throughout."""
    log = load_events(events_file)
    splits = make_splits(log, TINY_BUDGET)
    result = run_one(MODELS[0], Hyper(lr=1e-2), 0, splits, TINY_BUDGET, 16, torch.device("cpu"))
    spec, test = splits.featurizer.spec, splits.test
    assert spec.n_item_rates
    cpu, bounds = torch.device("cpu"), chunk_bounds(len(test), 3)
    out = prequential(result.model, splits.featurizer, test, result.probabilities,
                      TrainConfig(lr=0.0, batch_size=8), 3, cpu)
    rows = test.events.item[test.event_index]
    expected = []
    for begin, end in bounds:
        positives, counts = np.zeros(spec.n_embeddings), np.zeros(spec.n_embeddings)
        np.add.at(positives, rows[:begin], test.labels[:begin])
        np.add.at(counts, rows[:begin], 1)
        served = Featurizer(spec.with_online_counts(positives, counts))
        examples = build_examples(log, served, TINY_BUDGET.history_len).subset(
            test.event_index[begin:end])
        expected.append(predict(result.model, served, examples, cpu))
    assert out.fine_tuned == pytest.approx(
        report(test.user_ids, test.labels, np.concatenate(expected)), abs=FLOAT32_METRIC)
    assert out.fine_tuned_auc[0] == out.frozen_auc[0]
    assert abs(out.fine_tuned["logloss"] - out.frozen["logloss"]) > 10 * FLOAT32_METRIC
    off = prequential(result.model, splits.featurizer, test, result.probabilities,
                      TrainConfig(lr=0.0, batch_size=8), 3, cpu, count_labels=False)
    assert off.fine_tuned == pytest.approx(off.frozen, abs=FLOAT32_METRIC)


def test_verdicts_need_two_standard_errors():
    assert verdict(0.03, 0.01) == "held"
    assert verdict(0.01, 0.01) == "within noise"
    assert verdict(-0.03, 0.01) == "reversed"
    assert verdict(-0.01, 0.01, keeps=True) == "held"
    assert verdict(-0.03, 0.01, keeps=True) == "did not hold"


def test_an_affinity_window_shorter_than_the_history_is_refused(events_file, tmp_path, capsys):
    """The model config's own check, as a CLI error (status 2) before anything is written."""
    argv = ["eval-suite", "--events", str(events_file), "--out", str(tmp_path / "reports"),
            "--history-len", "20", "--affinity-len", "19"]
    assert main(argv) == 2
    assert "affinity_len=19 is shorter than history_len=20" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_eval_suite_writes_the_report_and_reads_its_tuning(events_file, tmp_path, capsys):
    out = tmp_path / "reports"
    argv = ["eval-suite", "--events", str(events_file), "--out", str(out), "--json"]
    assert main([*argv, *TINY_FLAGS, "--tune", "--tune-steps", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    for ext in ("md", "png", "json"):
        assert (out / f"tiny.{ext}").stat().st_size > 0
    assert [row["name"] for row in record["variants"]] == [v.name for v in VARIANTS]
    assert all(len(row["runs"]) == 2 for row in record["variants"])
    for run in (run for row in record["variants"] for run in row["runs"]):
        assert 1 <= run["steps"] <= 2 and run["curve"][-1]["step"] <= 2
    assert set(record["prequential"]) == {v.name for v in MODELS}
    report = (out / "tiny.md").read_text()
    assert "± " in report and "tiny.png" in report and "prequential" in report.lower()
    assert record["budget"]["affinity_len"] == Budget().affinity_len
    assert f"the candidates' affinity over the newest {Budget().affinity_len}" in report
    online = OnlineConfig()
    assert record["online_config"] == asdict(online)
    assert _online_settings(record["online_config"]) in report
    assert "the labels the fine-tuned arm counts into its item-rate table" in report
    assert "candidates' training label rates (smoothing 10)" in report
    assert "## Online peers (River)" in report
    assert record["peers"]["status"] == ("ran" if importlib.util.find_spec("river") else
                                         "skipped")
    tuning = json.loads((out / "tiny.tuning.json").read_text())["models"]
    assert main([*argv, "--seeds", "1", "--steps", "1", "--d-model", "16",
                 "--history-len", "8", "--no-peers"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["peers"]["status"] == "skipped" and "--no-peers" in record["peers"]["note"]
    assert record["hyperparameters"] == "tuned: tiny.tuning.json"
    for row in record["variants"]:
        assert (row["lr"], row["dropout"]) == (tuning[row["kind"]]["lr"],
                                               tuning[row["kind"]]["dropout"])


def test_the_report_names_the_online_rates_it_ran_with():
    assert _online_settings(asdict(OnlineConfig(lr=1e-5, batch_size=128, weight_decay=0.0))) \
        == "lr 1e-05, batches of 128, weight decay 0"
    assert _online_settings(asdict(OnlineConfig(lr=1e-5, embedding_lr=1e-3))) == (
        "lr 1e-05, the embedding table's rows 0.001, batches of 128, weight decay 0")
    assert _online_settings(None) == "its learning rate, batch size and weight decay"
    assert _arms_differ({"online_config": None}) == "only the weights differ"
    assert _arms_differ({"online_config": asdict(OnlineConfig(count_item_labels=False))}) \
        == "only the weights differ"


def test_a_run_keeps_its_best_validation_weights_and_stops_after_its_patience(events_file):
    """Early stopping: the scored weights are those of the best validation AUC on the curve
    (their step is the run's ``steps``), and a run ends at most ``patience`` measurements
    after its best one."""
    budget = replace(TINY_BUDGET, steps=12, eval_every=1, patience=2)
    splits = make_splits(load_events(events_file), budget)
    result = run_one(MODELS[0], Hyper(lr=3e-2), 0, splits, budget, 16, torch.device("cpu"),
                     on_val=True)
    aucs = [p["val_auc"] for p in result.curve]
    best = int(np.argmax(aucs))
    assert result.steps == result.curve[best]["step"]
    assert result.metrics["auc"] == pytest.approx(aucs[best], abs=1e-9)
    assert len(aucs) - 1 - best <= budget.patience
    assert len(aucs) == 12 or len(aucs) - 1 - best == budget.patience


def test_the_tuning_search_extends_past_an_edge_until_the_best_is_inside():
    """A coordinate whose best value is at an edge of the tried ones gets the next value past
    that edge, so a peak outside the first grid is found; a peak inside adds nothing."""
    tried = []

    def score(peak):
        def f(v):
            tried.append(v)
            return -abs(np.log(v) - np.log(peak))
        return f

    assert _bracket([3e-4, 1e-3, 3e-3], score(9e-3), lambda e, d: e * 3.0 ** d) == \
        pytest.approx(9e-3)
    assert min(tried) < 9e-3 < max(tried) and len(tried) == 5
    tried.clear()
    assert _bracket([3e-4, 1e-3, 3e-3], score(1e-3), lambda e, d: e * 3.0 ** d) == 1e-3
    assert len(tried) == 3


def test_train_and_eval_a_baseline_from_the_cli(events_file, tmp_path, capsys):
    checkpoint = tmp_path / "deepfm.pt"
    common = ["--events", str(events_file), "--checkpoint", str(checkpoint)]
    assert main(["train", *common, "--model", "deepfm", "--max-steps", "2", "--d-model", "16",
                 "--history-len", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "deepfm"
    assert main(["eval", *common, "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["auc"] <= 1.0


def test_a_width_the_heads_do_not_divide_is_refused_before_anything_runs(events_file, tmp_path,
                                                                        capsys):
    argv = ["eval-suite", "--events", str(events_file), "--out", str(tmp_path / "reports"),
            "--d-model", "30"]
    assert main(argv) == 2
    assert "d_model=30 is not divisible by n_heads=4" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
