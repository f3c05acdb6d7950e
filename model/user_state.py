"""The user state u_t (docs/model.md, "The user state"): every computation of it lives here.

    e_t = the model's interaction embedding of event t (``Tokenizer.interaction``: events only)
    u'  = GRU(u, e_t), applied event by event, oldest first

- ``unroll(model, events, u0)``: the GRU over ``EventInputs`` from u0, as tensors. This is the
  one code path: training (``with_history_state``, with gradient), the stream's applier and
  scorer, the online learner and offline evaluation all reach the GRU through it.
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
from dataclasses import replace

import numpy as np
import torch

from eventlog.schema import Interaction, decode
from model.backbone import UniRecModel
from model.features import EventInputs, Featurizer, UserInputs


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


def with_history_state(model: UniRecModel, user: UserInputs,
                       interaction: torch.Tensor | None = None) -> UserInputs:
    """``user`` with u_t replaced by the GRU unrolled from zero over its history (the truncated
    unroll that training and ``model.online`` use); ``interaction`` as in ``unroll``."""
    return replace(user, state=unroll(model, user, interaction=interaction))


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
