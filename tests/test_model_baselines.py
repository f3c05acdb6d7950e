"""The baselines (DeepFM, DIN, SASRec + DCNv2): the backbone's forward contract, candidate-order
invariance, learning a planted signal in a few steps, parameter matching within 20%, and
checkpoints that round-trip every model kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.experiment import Budget, matched_width
from eventlog.log import EventLog
from model.baselines import MODEL_KINDS
from model.checkpoint import CheckpointError, load, save
from model.dataset import build_examples
from model.kinds import build_model, parameter_count
from model.prediction_metrics import auc
from model.training import TrainConfig, fit, predict
from tests.model_fixtures import (
    FEATURIZER,
    SPEC,
    config,
    inputs,
    make_request,
    training_log,
)

BASELINES = ("deepfm", "din", "sasrec-dcnv2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def baseline(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(kind, config(dropout=0.0, **overrides), SPEC, MODEL_KINDS).eval()


@pytest.mark.parametrize("kind", BASELINES)
def test_forward_gives_one_logit_per_candidate_and_no_state(kind):
    """forward(user, cands) -> {"click": [B, C]} with finite values; use_state is off, so
    train_step does not unroll a GRU for it."""
    model = baseline(kind)
    user, cands = inputs(model, make_request(0, n_hist=7, n_cands=6))
    logits = model(user, cands)["click"]
    assert logits.shape == (1, 6) and torch.isfinite(logits).all()
    assert not model.cfg.use_state


@pytest.mark.parametrize("kind", BASELINES)
def test_reordering_candidates_reorders_their_scores(kind):
    model = baseline(kind)
    user, cands = inputs(model, make_request(1, n_hist=12, n_cands=5))
    order = torch.tensor([3, 0, 4, 1, 2])
    shuffled = type(cands)(cands.item[:, order], cands.cat[:, order], cands.num[:, order],
                           cands.num_present[:, order], cands.affinity[:, order],
                           cands.rates[:, order])
    with torch.no_grad():
        torch.testing.assert_close(model(user, shuffled)["click"],
                                   model(user, cands)["click"][:, order])


@pytest.mark.parametrize("kind", BASELINES)
def test_an_empty_history_scores_finite(kind):
    model = baseline(kind)
    user, cands = inputs(model, make_request(2, n_hist=0, n_cands=3))
    assert torch.isfinite(model(user, cands)["click"]).all()


def planted_log() -> EventLog:
    """Label 1 exactly when the event's item has the genre "comedy"."""
    events = training_log(seed=3, per_user=40)
    labels = np.array([int("comedy" in e.item_features["genre"]) for e in events], np.int8)
    return EventLog("planted", events, labels)


@pytest.mark.parametrize("kind", BASELINES)
def test_each_baseline_learns_a_planted_signal_in_a_few_steps(kind):
    examples = build_examples(planted_log(), FEATURIZER, 16)
    model = baseline(kind, d_model=16)
    losses = fit(model, FEATURIZER, examples, TrainConfig(lr=3e-3, batch_size=32, max_steps=40),
                 torch.device("cpu"))
    probabilities = predict(model, FEATURIZER, examples, torch.device("cpu"))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert auc(examples.labels, probabilities) > 0.9


def test_matched_widths_bring_every_kind_within_20_percent_of_unirec():
    budget = Budget(d_model=16, history_len=16, core_k=4)
    target = parameter_count(build_model("unirec", budget.model_config(0.1), SPEC))
    for kind in BASELINES:
        cfg = budget.model_config(0.1, d_model=matched_width(kind, budget, SPEC, target))
        count = parameter_count(build_model(kind, cfg, SPEC, MODEL_KINDS))
        assert abs(count - target) <= 0.2 * target, (kind, count, target)


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_checkpoints_round_trip_every_kind(kind, tmp_path):
    """save/load(kind=None, kinds=MODEL_KINDS) restores the kind and its scores; the default
    load (what the stream uses: it knows UniRec alone) refuses a baseline with a
    CheckpointError naming the kind."""
    model = baseline(kind)
    path = tmp_path / "model.pt"
    save(model, path, {"dataset": "x"})
    loaded, meta = load(path, kind=None, kinds=MODEL_KINDS)
    assert type(loaded) is type(model) and meta == {"dataset": "x"}
    user, cands = inputs(model, make_request(3, n_hist=9, n_cands=4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(user, cands)["click"], model(user, cands)["click"])
    if kind != "unirec":
        with pytest.raises(CheckpointError, match=kind):
            load(path)
