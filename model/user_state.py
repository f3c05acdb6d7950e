"""The user state u_t (docs/model.md, "The user state"): every computation of it lives here.

    e_t = the model's interaction embedding of event t (``Tokenizer.interaction``: events only)
    u'  = GRU(u, e_t), applied event by event, oldest first
    u_t = the GRU carried from zeros over ALL of the user's events before t: the state served

- ``unroll(model, events, u0)``: the GRU over ``EventInputs`` from u0, as tensors. This is the
  one code path: training and evaluation (``served_state``), the stream's applier and scorer,
  and the online learner all reach the GRU through it.
- ``served_state(model, user)``: u_t of B examples as training and offline evaluation compute
  it: the GRU unrolled over the example's history window (with gradient: truncated
  backpropagation through time) from ``user.state``, the state carried over every event of the
  user before that window. With that carried state, u_t equals the state the stream's applier
  stores after the same events.
- ``UserTimelines`` and ``carried_states``: the chronological no-grad pass that gives those
  carried states for every event of a log under the current weights (training refreshes it as
  the weights move; ``model.training``).
- ``unroll_events(model, featurizer, sequences, u0)``: U users' ``Interaction`` sequences, each
  from its own state, in one batched unroll (left-padded to the longest; a padded step keeps
  the state). Carrying the state is associative: unrolling a sequence in chunks, each from the
  state the previous chunk ended in, equals one unroll over all of it.
- ``rebuild``: a stale state (written under other weights) recomputed from zeros over the
  user's stored history under the current weights; ``advance``: stored states carried over
  new events, the stale ones rebuilt first, all in one unroll.
- ``decode_history``: the stored history rows (``eventlog.schema`` Interaction JSON) back as
  events; ``check_state_dim``: a stored state vector must have the model's d_model entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from eventlog.schema import Interaction, decode
from model.backbone import UniRecModel
from model.features import EventArrays, EventInputs, Featurizer, UserInputs


def decode_history(rows: Sequence[bytes]) -> list[Interaction]:
    """Stored history rows as ``Interaction``s, in the same order (oldest first).

    Raises ``eventlog.schema.SchemaError`` on a row that is not an Interaction's JSON.
    """
    return [decode(Interaction, row) for row in rows]


def check_state_dim(model: UniRecModel, state_dim: int, holder: str) -> None:
    """Raise ``ValueError`` unless states of ``state_dim`` entries, held by ``holder`` (e.g.
    "the state store at PATH"), fit the model's GRU (d_model)."""
    if state_dim != model.cfg.d_model:
        raise ValueError(
            f"{holder} holds states of dimension {state_dim}, but the model's d_model is "
            f"{model.cfg.d_model}: open a store created for this model size"
        )


def unroll(model: UniRecModel, events: EventInputs, u0: torch.Tensor | None = None,
           interaction: torch.Tensor | None = None) -> torch.Tensor:
    """The GRU state [B, d] after ``events`` ([B, n], oldest first; invalid steps keep the
    state) from ``u0`` [B, d] (default zeros). Differentiable: training backpropagates
    through it. ``interaction``: ``model.tokenizer.interaction(events)`` [B, n, d] if the
    caller has it already."""
    e = model.tokenizer.interaction(events) if interaction is None else interaction
    if u0 is None:
        u0 = e.new_zeros(e.shape[0], model.cfg.d_model)
    return model.gru.unroll(e, events.hist_valid, u0)


def served_state(model: UniRecModel, user: UserInputs,
                 interaction: torch.Tensor | None = None) -> UserInputs:
    """``user`` with u_t in place of ``user.state``: on input, ``user.state`` [B, d] is each
    user's state carried over every event before its history window (``carried_states``; zeros
    for a user with no older event); u_t is the GRU unrolled from it over the window
    (``user.hist_*``, with gradient). ``interaction`` as in ``unroll``."""
    return replace(user, state=unroll(model, user, user.state, interaction))


@dataclass(frozen=True)
class UserTimelines:
    """A log's events as GRU steps over its users: step j applies the j-th event of every user
    that has more than j, ``steps[j]`` ([U_j] event indices) to the state rows 0..U_j - 1
    (users ordered by event count, longest first, so U_j never grows)."""

    steps: tuple[np.ndarray, ...]
    users: int
    events: int

    @classmethod
    def of(cls, owners: Sequence[str]) -> UserTimelines:
        """The timelines of events owned by ``owners[e]`` (the user of event e, log order)."""
        _, user, counts = np.unique(np.asarray(owners, dtype=object), return_inverse=True,
                                    return_counts=True)
        rank = np.empty(len(counts), dtype=np.int64)
        rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
        by_user = np.argsort(user, kind="stable")  # each user's events, in log order
        position = np.empty(len(owners), dtype=np.int64)
        starts = np.cumsum(counts) - counts
        position[by_user] = np.arange(len(owners)) - np.repeat(starts, counts)
        order = np.lexsort((rank[user], position))  # by step, then by state row
        sizes = np.bincount(position, minlength=int(counts.max(initial=0)))
        return cls(tuple(np.split(order, np.cumsum(sizes)[:-1])) if len(owners) else (),
                   len(counts), len(owners))


@torch.no_grad()
def carried_states(model: UniRecModel, events: EventArrays, timelines: UserTimelines,
                   chunk: int = 65_536) -> np.ndarray:
    """[E + 1, d] float32: row e is the state of event e's user right after e, carried from
    zeros over all of that user's events up to e (``timelines`` of the same E ``events``) under
    ``model``'s current weights; the last row is zeros, so an index of -1 (no event) reads the
    zero state. Interaction embeddings are computed ``chunk`` events at a time."""
    parameter = next(model.parameters())
    d = model.cfg.d_model
    out = torch.zeros(timelines.events + 1, d, device=parameter.device, dtype=parameter.dtype)
    if not timelines.events:
        return out.float().cpu().numpy()
    gates = torch.cat([
        model.gru.input_gates(model.tokenizer.interaction(Featurizer.assemble_events(
            events, np.arange(begin, min(begin + chunk, timelines.events))[:, None]
        ).to(parameter.device))[:, 0])
        for begin in range(0, timelines.events, chunk)
    ])
    u = torch.zeros(timelines.users, d, device=parameter.device, dtype=parameter.dtype)
    for step in timelines.steps:
        rows = torch.from_numpy(step).to(parameter.device)
        active = model.gru.step(gates[rows], u[: len(step)])
        u[: len(step)] = active
        out[rows] = active
    return out.float().cpu().numpy()


@torch.no_grad()
def unroll_events(
    model: UniRecModel,
    featurizer: Featurizer,
    sequences: Sequence[Sequence[Interaction]],
    u0: np.ndarray,
) -> np.ndarray:
    """Each user's state after its events (``sequences[u]``, oldest first, any number, zero
    included) from ``u0[u]`` ([U, d] float), in one batched unroll on the model's device and
    dtype. Returns [U, d] float32 (a copy of ``u0`` when there are no events)."""
    u0 = np.asarray(u0, dtype=np.float32)
    if not any(sequences):
        return u0.copy()
    parameter = next(model.parameters())
    events = featurizer.sequences(sequences).to(parameter.device)
    start = torch.from_numpy(u0).to(parameter.device, parameter.dtype)
    return unroll(model, events, start).float().cpu().numpy()


def rebuild(model: UniRecModel, featurizer: Featurizer,
            histories: Sequence[Sequence[Interaction]]) -> np.ndarray:
    """[U, d]: states of U users recomputed under ``model``'s weights from zeros over their
    stored histories (oldest first); what a stale state is replaced by."""
    return unroll_events(model, featurizer, histories,
                         np.zeros((len(histories), model.cfg.d_model), dtype=np.float32))


def advance(
    model: UniRecModel,
    featurizer: Featurizer,
    states: np.ndarray,
    stale: np.ndarray,
    histories: Sequence[Sequence[Interaction]],
    events: Sequence[Sequence[Interaction]],
) -> np.ndarray:
    """[U, d]: row u's state after ``events[u]`` (oldest first), carried from ``states[u]``
    ([U, d] float), or, where ``stale[u]`` ([U] bool), from ``rebuild`` of ``histories[u]``
    (read only for stale rows), all in one batched unroll."""
    stale = np.asarray(stale, dtype=bool)
    sequences = [[*histories[u], *events[u]] if stale[u] else events[u]
                 for u in range(len(events))]
    u0 = np.where(stale[:, None], np.float32(0.0), np.asarray(states, dtype=np.float32))
    return unroll_events(model, featurizer, sequences, u0)
