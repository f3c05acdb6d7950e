"""Scoring a gate release equals scoring its events one at a time.

Property: a time-ordered stream of interactions and impressions of a few users (one partition),
cut into releases of any sizes and processed as the worker processes one release (the
impressions scored first, each with its user's interactions of the release ordered before it
as pending, then the interactions applied), scores every impression exactly as processing the
events one by one does (each impression scored once every earlier interaction is stored).
A release may hold several impressions and interactions of one user in any interleaving.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import PROFILES, SPEC, T0, context, event, item_features

from eventlog.schema import Candidate, Impression, Interaction, encode
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.scorer import Scorer
from state_store import StateStore, StoreConfig
from stream.applier import InteractionApplier
from stream.gate import preceding_interactions
from stream.handlers import WorkerServices, handle_impressions, handle_interactions
from stream.publisher import DiscardingPublisher
from stream.records import ConsumedRecord
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer, ScoredImpression
from stream.topics import TopicNames

CFG = ModelConfig(d_model=16, n_heads=2, history_len=6, core_k=4, dropout=0.0)
USERS = ("u0", "u1", "u2")
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

pytestmark = pytest.mark.usefixtures("one_torch_thread")

torch.manual_seed(5)
MODEL = UniRecModel(CFG, SPEC).eval()


class RecordingScorer(ImpressionScorer):
    """An ``ImpressionScorer`` that keeps what it scored."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.scored: list[ScoredImpression] = []

    def score_many(self, impressions, pending=None):  # type: ignore[no-untyped-def]
        out = super().score_many(impressions, pending)
        self.scored += out
        return out


Event = tuple[str, ConsumedRecord]  # (kind, record)


def stream_of(kinds: Sequence[tuple[str, bool]]) -> list[Event]:
    """One record per ``(user, is_impression)``, a millisecond apart, in time order."""
    rng = np.random.default_rng(7)
    out: list[Event] = []
    offsets = {"impressions": 0, "interactions": 0}
    for k, (user, is_impression) in enumerate(kinds):
        ts = T0 + k
        if is_impression:
            items = rng.integers(40, size=int(rng.integers(1, 4)))
            message: Impression | Interaction = Impression(
                f"r{k}", user, ts, [Candidate(f"i{i}", item_features(int(i))) for i in items],
                context(rng))
            kind = "impressions"
        else:
            message, kind = event(rng, user, ts, k), "interactions"
        out.append((kind, ConsumedRecord(0, offsets[kind], user.encode(), encode(message),
                                         int(ts * 1000))))
        offsets[kind] += 1
    return out


def process(releases: Sequence[Sequence[Event]]) -> dict[str, np.ndarray]:
    """Each impression's [C] live scores after the worker's handling of ``releases``."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as directory, StateStore.open(
            Path(directory) / "store", StoreConfig(state_dim=16, history_len=6)) as store:
        scorer = RecordingScorer(store, Scorer(MODEL, torch.device("cpu")), 1, PROFILES)
        services = WorkerServices(
            store=store, scorer=scorer,
            applier=InteractionApplier.following(store, scorer.serving_model),
            labels=LabelBuffer(FeedbackWindow(1e9, 100_000), 100_000),
            publisher=DiscardingPublisher(), topics=TopicNames(), publish_scores=False)
        services.log_ids[0] = "cluster/log"
        for release in releases:
            impressions = [r for kind, r in release if kind == "impressions"]
            interactions = [r for kind, r in release if kind == "interactions"]
            if impressions:
                handle_impressions(services, impressions,
                                   preceding_interactions(impressions, interactions))
            if interactions:
                handle_interactions(services, interactions)
        return {s.impression.request_id: s.dynamic for s in scorer.scored}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.tuples(st.sampled_from(USERS), st.booleans()), min_size=1,
                      max_size=24),
       cuts=st.lists(st.integers(1, 24), max_size=8))
def test_a_release_scores_each_impression_as_one_event_at_a_time_does(
        kinds: list[tuple[str, bool]], cuts: list[int]) -> None:
    events = stream_of(kinds)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    releases = [events[a:b] for a, b in itertools.pairwise(bounds)]
    batched = process(releases)
    one_by_one = process([[e] for e in events])
    assert batched.keys() == one_by_one.keys()
    for request_id, scores in one_by_one.items():
        np.testing.assert_allclose(batched[request_id], scores, atol=1e-5,
                                   err_msg=f"impression {request_id}")
