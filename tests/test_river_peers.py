"""The online River peers of the eval suite (``evaluation/river_peers.py``) and their causal
features (``evaluation/peer_features.py``): an event's features depend on no label of its own
and on nothing later; the peers learn (a user-determined label is predicted well); tuning
reads no test event; the learning-rate grid widens at its edge; without River the suite
records a skipped section and the report says how to install it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from evaluation import suite
from evaluation.experiment import MODELS, Budget
from evaluation.peer_features import FeatureConfig, FeatureLayout, event_features
from evaluation.river_peers import SKIP_NOTE, Candidate, PeerConfig, peers_record, run_peers, tune
from eventlog.log import EventLog
from eventlog.schema import Interaction, UserProfile

T0 = 1_700_000_000.0
GENRES = ("action", "comedy", "drama", "horror")
SMALL = PeerConfig(logistic_lr=(0.03, 0.1), logistic_scale=(False, True), fm_lr=(0.01, 0.03),
                   fm_factors=(4,), widen=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_river = pytest.mark.skipif(importlib.util.find_spec("river") is None,
                                 reason="River is not installed (the [peers] extra)")


def make_log(label: Callable[[int, int, np.random.Generator], int], n_users: int = 20,
             per_user: int = 30, seed: int = 0) -> EventLog:
    """Users u0.. interleaved in time over items i0..i29 (one or two genres, a numeric year),
    with a device context and profiles; ``label(user, item, rng)`` gives each outcome."""
    rng = np.random.default_rng(seed)
    items = {i: {"genre": [str(g) for g in rng.choice(GENRES, int(rng.integers(1, 3)),
                                                      replace=False)],
                 "year": float(1950 + 2 * i)} for i in range(30)}
    events, labels = [], []
    for k in range(per_user * n_users):
        user, item = k % n_users, int(rng.integers(30))
        events.append(Interaction(f"e{k}", f"u{user}", f"i{item}", "view", T0 + 60.0 * k,
                                  items[item], {"device": ["ios", "web"][k % 2]}))
        labels.append(label(user, item, rng))
    profiles = {f"u{u}": UserProfile(f"u{u}", {"age": str(u % 3)}) for u in range(n_users)}
    return EventLog("synthetic", events, np.array(labels, dtype=np.int8), profiles)


def noisy(user: int, item: int, rng: np.random.Generator) -> int:
    return int(rng.random() < (0.8 if (user + item) % 3 == 0 else 0.3))


def with_labels(log: EventLog, labels: np.ndarray) -> EventLog:
    return EventLog(log.name, log.interactions, labels.astype(np.int8), log.profiles)


def test_an_events_features_use_no_label_of_its_own_and_nothing_later():
    """Flipping label j changes no features of events 0..j (and does change later ones);
    replacing every event after j changes none of 0..j either."""
    log = make_log(noisy)
    config = FeatureConfig()
    layout = FeatureLayout.fit(log.interactions[:300], config)
    assert layout.cross_fields == ("genre",) and set(layout.bin_edges) == {"item.year"}
    before = list(event_features(log, layout, config))
    assert "rate.user_x_genre" in before[-1] and "item.genre=" in " ".join(before[-1])
    for j in (0, 250, 401):
        labels = log.labels.copy()
        labels[j] = 1 - labels[j]
        after = list(event_features(with_labels(log, labels), layout, config))
        assert after[:j + 1] == before[:j + 1]
        assert after[j + 1:] != before[j + 1:]
    other = make_log(noisy, seed=1)
    spliced = EventLog(log.name, log.interactions[:401] + other.interactions[401:],
                       np.r_[log.labels[:401], other.labels[401:]], log.profiles)
    assert list(event_features(spliced, layout, config))[:401] == before[:401]


@needs_river
def test_the_peers_learn_a_label_that_the_user_decides():
    """Even-numbered users always click, odd ones never: both pipelines' test AUC > 0.8."""
    log = make_log(lambda user, item, rng: int(user % 2 == 0))
    record = run_peers(log, 360, 480, 3, SMALL)
    for pipeline in record["pipelines"].values():
        assert pipeline["test"]["auc"] > 0.8, pipeline
        assert pipeline["test"]["n"] == 120 and len(pipeline["chunk_auc"]) == 3
    assert record["best"] in record["pipelines"]


@needs_river
def test_tuning_reads_no_test_event():
    """Corrupting every test label and item leaves the validation grid and the choice
    unchanged (the final run does see the corruption)."""
    log = make_log(noisy)
    layout = FeatureLayout.fit(log.interactions[:360], SMALL.features)
    corrupt = log.labels.copy()
    corrupt[480:] = 1 - corrupt[480:]
    events = log.interactions[:480] + [replace_item(e) for e in log.interactions[480:]]
    broken = EventLog(log.name, events, corrupt, log.profiles)
    assert tune(log, layout, 360, 480, SMALL) == tune(broken, layout, 360, 480, SMALL)
    clean, dirty = run_peers(log, 360, 480, 3, SMALL), run_peers(broken, 360, 480, 3, SMALL)
    for name, pipeline in clean["pipelines"].items():
        assert pipeline["chosen"] == dirty["pipelines"][name]["chosen"]
        assert pipeline["test"] != dirty["pipelines"][name]["test"]


def replace_item(event: Interaction) -> Interaction:
    return Interaction(event.event_id, event.user_id, "i-new", event.action, event.ts,
                       {"genre": ["western"]}, event.context)


@needs_river
def test_a_learning_rate_at_the_edge_of_the_grid_is_widened():
    """A one-point grid is its own edge: one widening round tries lr / 3 and lr * 3."""
    log = make_log(noisy, n_users=8, per_user=20)
    layout = FeatureLayout.fit(log.interactions[:100], FeatureConfig())
    config = replace(SMALL, logistic_lr=(0.03,), logistic_scale=(False,), fm_lr=(0.01,),
                     widen=1)
    tried = tune(log, layout, 100, 130, config)
    assert {c.lr for c in tried if c.pipeline == "logistic"} == {0.01, 0.03, 0.09}
    assert {c.lr for c in tried if c.pipeline == "fm"} == {0.00333, 0.01, 0.03}
    assert Candidate("fm", 0.03, False, 4) in tried


def test_without_river_the_suite_records_a_skip_and_the_report_says_why(monkeypatch, tmp_path):
    """With River unimportable, ``run_suite`` (on one fast variant) records the peers as
    skipped with the install note, and the Markdown report prints it."""
    monkeypatch.setitem(sys.modules, "river", None)
    log = make_log(noisy, n_users=8, per_user=20)
    assert peers_record(log, 100, 130, 3) == {"status": "skipped", "note": SKIP_NOTE}
    monkeypatch.setattr(suite, "MODELS", MODELS[1:2])
    monkeypatch.setattr(suite, "VARIANTS", MODELS[1:2])
    budget = Budget(d_model=16, history_len=4, core_k=2, steps=1, batch_size=32, seeds=1,
                    chunks=2)
    record = suite.run_suite(log, budget, tmp_path, torch.device("cpu"))
    assert record["peers"] == {"status": "skipped", "note": SKIP_NOTE}
    assert f"Skipped: {SKIP_NOTE}" in (tmp_path / "synthetic.md").read_text()


@needs_river
def test_the_report_shows_both_pipelines_next_to_our_arms(monkeypatch, tmp_path):
    """A suite run with River writes the peers table: our two arms and both pipelines, the
    best peer marked."""
    log = make_log(noisy, n_users=8, per_user=20)
    budget = Budget(d_model=16, history_len=4, core_k=2, steps=1, batch_size=32, seeds=1,
                    chunks=2)
    monkeypatch.setattr(suite, "MODELS", MODELS[1:2])
    monkeypatch.setattr(suite, "VARIANTS", MODELS[1:2])
    monkeypatch.setattr(suite, "peers_record",
                        lambda *args: peers_record(*args, replace(SMALL, fm_lr=(0.01,))))
    record = suite.run_suite(log, budget, tmp_path, torch.device("cpu"))
    assert record["peers"]["status"] == "ran"
    report = (tmp_path / "synthetic.md").read_text()
    section = report.split("## Online peers (River)")[1].split("## Claims")[0]
    for row in ("| deepfm frozen |", "| deepfm fine-tuned |", "River logistic regression",
                "River factorization machine", "best peer**"):
        assert row in section
