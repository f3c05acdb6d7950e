"""The candidate's affinity over a window longer than the history's
(``ModelConfig.affinity_len``): counted once per training example over the user's newest K
earlier events, it equals what a served request counts over the same K events; the S tokens
and the action shares keep the newest ``history_len``; the config refuses a window shorter
than the history's and keeps its old dict (and serving signature) when the field is unset."""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec
import numpy as np
import pytest
import torch
from model_fixtures import BASE_CONFIG, FEATURIZER, PROFILES, training_log

from eventlog.log import EventLog
from eventlog.schema import Candidate, Impression
from model.config import ModelConfig
from model.dataset import build_examples, gather_batch
from model.signature import signature_from

HISTORY_LEN = 4


def small_log() -> EventLog:
    """30 events per user: most examples have more earlier events than either window."""
    events = training_log(seed=3, per_user=30)
    labels = np.random.default_rng(3).integers(0, 2, len(events)).astype(np.int8)
    return EventLog("small", events, labels, dict(PROFILES))


def served(log: EventLog, i: int, affinity_len: int | None):
    """``Featurizer.request`` for event ``i`` of ``log`` as the worker serves it: the user's
    earlier events (all of them: the request keeps the newest it needs), the event's item as
    the one candidate."""
    e = log.interactions[i]
    earlier = [p for p in log.interactions[:i] if p.user_id == e.user_id]
    impression = Impression(f"r{i}", e.user_id, e.ts, [Candidate(e.item_id, e.item_features)],
                            e.context)
    return FEATURIZER.request(impression, earlier, log.profiles.get(e.user_id),
                              np.zeros(BASE_CONFIG.d_model, np.float32), HISTORY_LEN,
                              affinity_len)


@pytest.mark.parametrize("affinity_len", [None, HISTORY_LEN, 12, 500])
def test_an_examples_affinity_equals_the_served_requests(affinity_len):
    """Train as served: every example's precomputed affinity, and every user input of its
    batch (the S window), equal those of the request the worker builds for that event."""
    log = small_log()
    examples = build_examples(log, FEATURIZER, HISTORY_LEN, affinity_len=affinity_len)
    rows = np.arange(len(examples))
    user, cands = gather_batch(examples, FEATURIZER, rows, BASE_CONFIG.d_model)
    for i in range(0, len(examples), 7):
        ref_user, ref_cands = served(log, i, affinity_len)
        assert torch.equal(cands.affinity[i : i + 1], ref_cands.affinity), i
        for name, value in vars(ref_user).items():
            assert torch.equal(getattr(user, name)[i : i + 1], value), (i, name)


def test_a_longer_window_counts_the_events_the_history_window_leaves_out():
    """The affinity's log count is log(1 + matching events) / log(1 + K): a user whose every
    earlier event shares the candidate's genre has min(events, K) matches, so with 7 earlier
    events the window of 4 reads 1 and the window of 10 reads log 8 / log 11; the user's
    action shares (C_u) read the window of 4 either way."""
    log = small_log()
    i = next(k for k, e in enumerate(log.interactions)
             if sum(p.user_id == e.user_id for p in log.interactions[:k]) == 7)
    e = log.interactions[i]
    genre = {"genre": ["drama"], "price": 10.0}
    events = [msgspec.structs.replace(p, item_features=genre) if p.user_id == e.user_id else p
              for p in log.interactions[: i + 1]]
    log = EventLog("same-genre", events, log.labels[: i + 1], dict(PROFILES))
    n_shares = len(FEATURIZER.spec.actions)
    short_user, short = served(log, i, None)
    long_user, long = served(log, i, 10)
    assert short.affinity[0, 0, n_shares].item() == pytest.approx(1.0)
    assert long.affinity[0, 0, n_shares].item() == pytest.approx(math.log(8) / math.log(11))
    assert not torch.equal(short.affinity, long.affinity)
    assert torch.equal(short_user.user_num, long_user.user_num)
    assert int(long_user.hist_valid.sum()) == HISTORY_LEN


def test_the_config_refuses_an_affinity_window_shorter_than_the_history():
    with pytest.raises(ValueError, match="affinity_len=3 is shorter than history_len=4"):
        ModelConfig(history_len=4, affinity_len=3)
    cfg = ModelConfig(history_len=4, affinity_len=9)
    assert cfg.stored_events == 9
    assert (ModelConfig(history_len=4).stored_events, ModelConfig().stored_events) == (4, 50)


def test_an_unset_affinity_window_keeps_the_configs_dict_and_signature():
    """A config without the field has the dict it had before the field existed, so versions
    recorded then keep their serving signature; a set window round-trips and is checked."""
    plain = BASE_CONFIG.to_dict()
    assert "affinity_len" not in plain
    assert ModelConfig.from_dict(plain) == BASE_CONFIG
    longer = replace(BASE_CONFIG, affinity_len=64)
    assert ModelConfig.from_dict(longer.to_dict()) == longer
    spec = FEATURIZER.spec
    assert signature_from("unirec", longer, spec) != signature_from("unirec", BASE_CONFIG, spec)
