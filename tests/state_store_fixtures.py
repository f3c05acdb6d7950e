"""Helpers shared by the state-store tests (and the crash test's child process)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from state_store import ApplyResult, PartitionBatch, StateStore


def step(state: np.ndarray, offset: int) -> np.ndarray:
    """A stand-in GRU update; like a GRU, applying it twice differs from applying it once."""
    return state * 0.5 + offset


def apply_events(
    store: StateStore,
    batch: PartitionBatch,
    model_version: int = 1,
    update: Callable[[np.ndarray, int], np.ndarray] = step,
) -> ApplyResult:
    """The worker's loop: new events, read, compute (``update``) in offset order, apply."""
    fresh = store.new_events(batch)
    users, event_user = fresh.users()
    before = store.get_many(users)
    states = before.states.copy()
    for u, o in zip(event_user.tolist(), fresh.offsets.tolist(), strict=True):
        states[u] = update(states[u], o)
    return store.apply(fresh, before, states, model_version=model_version)
