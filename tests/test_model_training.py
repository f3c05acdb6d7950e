"""Training learns: a few dozen ``train_step`` calls on a small learnable task bring the loss
down clearly, and the loss's gradient reaches the GRU user state when the state token is on.
``fit`` with a weight average trains the same steps and returns their average."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from model_fixtures import DEVICES, T0, config

from eventlog.log import EventLog
from eventlog.schema import Interaction
from model.backbone import UniRecModel
from model.dataset import build_examples, gather_batch
from model.features import FeatureSpec, Featurizer
from model.prediction_metrics import logloss
from model.training import TrainConfig, fit, make_optimizer, predict, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TASK_GENRES = ("action", "comedy", "drama", "horror")


def majority_genre_log(seed: int = 0, n_users: int = 12, per_user: int = 24) -> EventLog:
    """Users with a favourite genre (45% of their events); an event's label is 1 iff its
    item's genre is the most frequent genre of the user's previous events (0 with none)."""
    rng = np.random.default_rng(seed)
    favourite = {f"t{u}": TASK_GENRES[u % len(TASK_GENRES)] for u in range(n_users)}
    events = []
    for k in range(per_user):
        for u, (user, fav) in enumerate(favourite.items()):
            genre = fav if rng.random() < 0.45 else TASK_GENRES[rng.integers(len(TASK_GENRES))]
            events.append(Interaction(
                f"{user}-{k}", user, f"{genre}-{int(rng.integers(10))}", "click",
                T0 + 60.0 * (k * n_users + u),
                {"genre": [genre], "price": float(rng.uniform(1, 50))},
                {"device": str(rng.choice(DEVICES)), "lat": float(rng.uniform(-5, 5))},
            ))
    seen: dict[str, Counter] = {user: Counter() for user in favourite}
    labels = []
    for e in events:
        genre, past = e.item_features["genre"][0], seen[e.user_id]
        labels.append(int(bool(past) and past.most_common(1)[0][0] == genre))
        past[genre] += 1
    return EventLog("majority-genre", events, np.array(labels, np.int8))


def setup(use_state: bool = True, seed: int = 0):
    log = majority_genre_log()
    spec = FeatureSpec.fit(log.interactions, id_buckets=256, field_buckets=32, action_buckets=8)
    featurizer = Featurizer(spec)
    cfg = config(n_layers=4, layer_widths=(1.0, 1.0, 0.5, 0.25), history_len=8,
                 use_state=use_state)
    torch.manual_seed(seed)
    model = UniRecModel(cfg, spec)
    return model, featurizer, build_examples(log, featurizer, cfg.history_len)


def batch(examples, featurizer, rows, d):
    user, cands = gather_batch(examples, featurizer, rows, d)
    return user, cands, torch.from_numpy(examples.labels[rows].astype(np.float32))


def test_training_steps_reduce_the_loss_on_a_learnable_task():
    """60 train_step calls (batch 64, lr 3e-3) on the majority-genre task bring the full
    training-set log loss (eval mode) from about the label entropy (~0.69) clearly down: by
    at least 0.1 and below 0.6."""
    model, featurizer, examples = setup()
    positive = examples.labels.mean()
    assert 0.35 < positive < 0.65  # a balanced task: the base rate alone cannot win
    before = logloss(examples.labels, predict(model, featurizer, examples, torch.device("cpu")))
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        rows = rng.choice(len(examples), 64, replace=False)
        losses.append(train_step(model, optimizer, *batch(examples, featurizer, rows, 32)))
    after = logloss(examples.labels, predict(model, featurizer, examples, torch.device("cpu")))
    assert all(np.isfinite(losses))
    assert after < before - 0.1 and after < 0.6, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


@pytest.mark.parametrize("use_state", [True, False])
def test_gradients_reach_the_gru_only_when_the_state_token_is_on(use_state):
    """After one train_step with use_state=True every GRU parameter has a non-zero gradient
    (u_t is the GRU unrolled over the history, trained end to end); with use_state=False the
    GRU takes no part and gets no gradient."""
    model, featurizer, examples = setup(use_state=use_state)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3))
    rows = np.arange(100, 164)  # late examples: every history holds several events
    assert (examples.hist_index[rows] >= 0).sum(1).min() >= 2
    train_step(model, optimizer, *batch(examples, featurizer, rows, 32))
    for name, parameter in model.gru.named_parameters():
        if use_state:
            assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
        else:
            assert parameter.grad is None or float(parameter.grad.abs().sum()) == 0, name


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_fit_with_a_weight_average_trains_the_same_steps_and_returns_their_average():
    """The average does not change the trajectory: the weights ``on_step`` sees under
    ``weight_average`` are the exponential average (``d_t = min(d, (1 + t) / (10 + t))``)
    of the weights the same run without it takes step by step, and ``fit`` ends with the
    last of those averages in the model."""
    decay, steps = 0.8, 12
    plain, featurizer, examples = setup(seed=3)
    trajectory: list[list[torch.Tensor]] = []
    fit(plain, featurizer, examples,
        TrainConfig(lr=3e-3, batch_size=32, max_steps=steps, weight_average=None),
        torch.device("cpu"), lambda *_: trajectory.append(_weights(plain)))
    averaged, _, _ = setup(seed=3)
    expected = _weights(averaged)
    seen: list[list[torch.Tensor]] = []
    fit(averaged, featurizer, examples,
        TrainConfig(lr=3e-3, batch_size=32, max_steps=steps, weight_average=decay),
        torch.device("cpu"), lambda *_: seen.append(_weights(averaged)))
    for t, weights in enumerate(trajectory, start=1):
        d = min(decay, (1 + t) / (10 + t))
        expected = [e * d + w * (1 - d) for e, w in zip(expected, weights, strict=True)]
        for got, want in zip(seen[t - 1], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(_weights(averaged), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(expected, trajectory[-1], strict=True))


def test_a_weight_average_decay_outside_zero_to_one_is_refused():
    model, featurizer, examples = setup()
    for decay in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            fit(model, featurizer, examples, TrainConfig(max_steps=1, weight_average=decay),
                torch.device("cpu"))
