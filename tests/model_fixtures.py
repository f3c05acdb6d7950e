"""Shared synthetic data and small models for the model package's property tests.

A few users with profiles, items with a multi-valued ``genre`` bag and a numeric ``price``, and
events whose context has a categorical ``device`` and a numeric ``lat``. The ``FeatureSpec`` is
fitted once on a fixed training log; models are small (d=32, 8 layers with the default delayed
compression schedule over 16 history slots) so that every layer plan is exercised quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import torch

from eventlog.schema import Candidate, Impression, Interaction, UserProfile
from model.backbone import UniRecModel
from model.config import INPUT_COMPRESSION_WIDTHS, ModelConfig
from model.features import CandidateInputs, FeatureSpec, Featurizer, UserInputs

GENRES = ("action", "comedy", "drama", "horror", "scifi", "western")
DEVICES = ("ios", "android", "web")
ACTIONS = ("click", "like", "purchase", "impression")
N_ITEMS = 40
USERS = ("u0", "u1", "u2", "u3")
T0 = 1_700_000_000.0

BASE_CONFIG = ModelConfig(
    d_model=32, n_heads=4, history_len=16, core_k=4, dropout=0.0, interest_bins=5
)

# Every ablation of the evaluation protocol (docs/model.md) the cached path supports (UG-Sep on).
ABLATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "pyramid": {"compression": "pyramid"},
    "input_compression": {"layer_widths": INPUT_COMPRESSION_WIDTHS},
    "no_seq_feature_mixing": {"seq_feature_mixing": False},
    "no_state": {"use_state": False},
    "no_core_selection": {"core_selection": False},
    "no_compensation": {"compensation": False},
}


def item_features(item: int) -> dict[str, Any]:
    """Fixed features of item ``item``: one to three genres and a price."""
    rng = np.random.default_rng(1000 + item)
    genres = rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False)
    return {"genre": [str(g) for g in genres], "price": float(rng.uniform(1.0, 60.0))}


def context(rng: np.random.Generator) -> dict[str, Any]:
    return {"device": str(rng.choice(DEVICES)), "lat": float(rng.uniform(-60.0, 60.0))}


PROFILES = {
    "u0": UserProfile("u0", {"age": "18-24", "gender": "f", "tier": 1}),
    "u1": UserProfile("u1", {"age": "25-34", "gender": "m", "tier": 2}),
    "u2": UserProfile("u2", {"age": "35-44", "gender": "f", "tier": 3}),
    "u3": UserProfile("u3", {"age": "25-34", "gender": "x", "tier": 1}),
}


def event(
    rng: np.random.Generator, user: str, ts: float, index: int, item: int | None = None
) -> Interaction:
    item = int(rng.integers(N_ITEMS)) if item is None else item
    return Interaction(
        event_id=f"{user[:64]}-e{index}",  # within RecordLimits.max_id_bytes for any user
        user_id=user,
        item_id=f"i{item}",
        action=str(rng.choice(ACTIONS)),
        ts=ts,
        item_features=item_features(item),
        context=context(rng),
    )


def training_log(seed: int = 0, per_user: int = 30) -> list[Interaction]:
    rng = np.random.default_rng(seed)
    events = []
    for k in range(per_user):
        for user in USERS:
            events.append(event(rng, user, T0 + 600.0 * k + float(rng.uniform(0, 300)), k))
    return sorted(events, key=lambda e: e.ts)


SPEC = FeatureSpec.fit(
    training_log(), PROFILES.values(), id_buckets=512, field_buckets=64, action_buckets=16
)
FEATURIZER = Featurizer(SPEC)


@dataclass
class Request:
    """One impression with everything ``Featurizer.request`` needs."""

    impression: Impression
    history: list[Interaction]
    profile: UserProfile | None
    state: np.ndarray


def make_history(seed: int, n: int, user: str = "u1", end: float = T0 + 86400.0
                 ) -> list[Interaction]:
    """``n`` events of ``user``, oldest first, all before ``end``."""
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(30.0, 5000.0, size=n)
    times = end - np.cumsum(gaps)[::-1]
    return [event(rng, user, float(t), i) for i, t in enumerate(times)]


def make_candidates(seed: int, n: int) -> list[Candidate]:
    rng = np.random.default_rng(10_000 + seed)
    items = rng.choice(N_ITEMS, size=n, replace=n > N_ITEMS)
    return [Candidate(f"i{int(i)}", item_features(int(i))) for i in items]


def make_request(seed: int, n_hist: int, n_cands: int, user: str = "u1") -> Request:
    """A request of ``user`` with ``n_hist`` past events, ``n_cands`` candidates and a random
    (non-zero) GRU state."""
    rng = np.random.default_rng(20_000 + seed)
    now = T0 + 86400.0
    impression = Impression(
        request_id=f"r{seed}",
        user_id=user,
        ts=now + 10.0,
        candidates=make_candidates(seed, n_cands),
        context=context(rng),
    )
    state = (0.5 * rng.standard_normal(BASE_CONFIG.d_model)).astype(np.float32)
    return Request(impression, make_history(seed, n_hist, user, now), PROFILES.get(user), state)


def config(**overrides: Any) -> ModelConfig:
    return replace(BASE_CONFIG, **overrides)


def fresh_model(seed: int = 0, **overrides: Any) -> UniRecModel:
    """A new, randomly initialised model (seeded) in eval mode.

    At PyTorch's default initialisation the logits barely move (differences ~1e-3), which
    would make a 1e-4 tolerance nearly blind; so the RMSNorm gains are drawn from [0.5, 1.5]
    and the heads' last layer is scaled up, making every input move the logits by ~0.1.
    """
    torch.manual_seed(seed)
    model = UniRecModel(config(**overrides), SPEC)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
        for head in model.heads.values():
            head.mlp[-1].weight.mul_(30.0)
    return model.eval()


@cache
def _shared(name: str) -> UniRecModel:
    return fresh_model(**ABLATIONS[name])


def shared_model(name: str = "default") -> UniRecModel:
    """A model of ablation ``name`` built once per session: do not modify it (build one with
    ``fresh_model`` for that)."""
    return _shared(name).eval()


def inputs(model: UniRecModel, request: Request) -> tuple[UserInputs, CandidateInputs]:
    return FEATURIZER.request(
        request.impression, request.history, request.profile, request.state,
        model.cfg.history_len,
    )


@torch.no_grad()
def cached_logits(model: UniRecModel, user: UserInputs, cands: CandidateInputs) -> torch.Tensor:
    """[B, C] click logits through the cached path (encode_user once, then score)."""
    return model.score(model.encode_user(user), cands)["click"]


@torch.no_grad()
def reference_logits(model: UniRecModel, user: UserInputs, cands: CandidateInputs
                     ) -> torch.Tensor:
    """[B, C] click logits through the reference path (one joint sequence per candidate)."""
    return model.reference(user, cands)["click"]


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def with_features(candidate: Candidate, **features: Any) -> Candidate:
    return Candidate(candidate.item_id, {**candidate.item_features, **features})


def reordered(mapping: dict[str, Any]) -> dict[str, Any]:
    """The same mapping with its keys in reverse insertion order."""
    return dict(reversed(list(mapping.items())))


def seq_positions(history: Sequence[Interaction], history_len: int) -> list[int]:
    """The S slot (0 = oldest slot, history_len - 1 = newest) of each kept history event."""
    kept = min(len(history), history_len)
    return list(range(history_len - kept, history_len))


class Recorder:
    """Records what each ``UniBlock`` layout returns while installed (a context manager).

    The backbone calls ``block.user`` / ``block.joint`` directly (not ``block(...)``), so
    forward hooks never fire; the recorder shadows the method on each block instance instead.
    ``outputs[layer]`` is the tuple the layout returned at that layer.
    """

    def __init__(self, model: UniRecModel, layout: str) -> None:
        self.model, self.layout = model, layout
        self.outputs: list[tuple[Any, ...]] = []
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __enter__(self) -> Recorder:
        for block in self.model.blocks:
            original = getattr(block, self.layout)

            def wrapper(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                out = _original(*args, **kwargs)
                self.calls.append((args, kwargs))
                self.outputs.append(out)
                return out

            setattr(block, self.layout, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for block in self.model.blocks:
            delattr(block, self.layout)
