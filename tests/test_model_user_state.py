"""Properties of ``model.user_state``: the events-only unroll equals the former unroll through
full user inputs and the GRU stepped one event at a time; carrying the state is associative with
chunking; a stale rebuild is an unroll from zero over the history; training's u_t is the same
unroll from the carried state; the carried states of a log are each user's unroll so far;
histories decode back; the state-dim check refuses a mismatch.

References kept here: ``stepped_state`` (``model.gru`` stepped by hand over the tokenizer's
interaction embedding of each event, built through ``assemble_user`` with an empty profile and
context, as the stream did before), and ``former_unroll_states`` (the stream's former batched
unroll, verbatim but for the model call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import FEATURIZER, T0, event, fresh_model

from eventlog.schema import Interaction, encode
from model.backbone import UniRecModel
from model.features import EventInputs, Featurizer
from model.user_state import (
    UserTimelines,
    advance,
    carried_states,
    check_state_dim,
    decode_history,
    rebuild,
    served_state,
    unroll,
    unroll_events,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = fresh_model(0, d_model=16, n_heads=2, history_len=8, core_k=4)
D = MODEL.cfg.d_model
examples = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def user_events(user: str, n: int, seed: int) -> list[Interaction]:
    rng = np.random.default_rng(seed)
    return [event(rng, user, T0 + 60.0 * k, k) for k in range(n)]


def start_states(n: int, seed: int) -> np.ndarray:
    return (0.5 * np.random.default_rng(seed).standard_normal((n, D))).astype(np.float32)


@torch.no_grad()
def stepped_state(model: UniRecModel, events: Sequence[Interaction], u0: np.ndarray
                  ) -> np.ndarray:
    """[d]: ``model.gru`` stepped once per event from ``u0``, e_t from full user inputs."""
    u = torch.from_numpy(u0[None].astype(np.float32))
    for e in events:
        user = FEATURIZER.assemble_user(
            FEATURIZER.events([e]), np.zeros((1, 1), dtype=np.int64), np.asarray([e.ts]),
            FEATURIZER.users([e.user_id], [None]), FEATURIZER.contexts([{}]), u.numpy(),
        )
        u = model.gru(model.tokenizer.interaction(user)[:, 0], u)
    return u[0].numpy()


@torch.no_grad()
def former_unroll_states(model: UniRecModel, featurizer: Featurizer, user_ids: Sequence[str],
                         sequences: Sequence[Sequence[Interaction]], u0: np.ndarray
                         ) -> np.ndarray:
    """The former ``stream.applier.unroll_states``: fake profiles and contexts built only to
    satisfy ``assemble_user``."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    u0 = np.asarray(u0, dtype=np.float32)
    if not lengths.any():
        return u0.copy()
    events = featurizer.events([e for sequence in sequences for e in sequence])
    width = int(lengths.max())
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(lengths)), lengths)
    column = width - lengths[owner] + np.arange(len(owner)) - starts[owner]
    hist_index = np.full((len(lengths), width), -1, dtype=np.int64)
    hist_index[owner, column] = np.arange(len(owner))
    newest = hist_index[:, -1]
    request_ts = np.where(newest >= 0, events.ts[np.maximum(newest, 0)], 0.0)
    user = featurizer.assemble_user(
        events, hist_index, request_ts, featurizer.users(user_ids, [None] * len(user_ids)),
        featurizer.contexts([{}] * len(user_ids)), u0,
    )
    e = model.tokenizer.interaction(user)
    return model.gru.unroll(e, user.hist_valid, user.state).numpy()


lengths_lists = st.lists(st.integers(0, 11), min_size=1, max_size=5)


@examples
@given(lengths=lengths_lists, seed=st.integers(0, 2**16))
def test_the_events_only_unroll_equals_the_former_unroll_and_the_stepped_gru(
    lengths: list[int], seed: int
) -> None:
    sequences = [user_events(f"u{u}", n, seed + u) for u, n in enumerate(lengths)]
    u0 = start_states(len(lengths), seed)
    got = unroll_events(MODEL, FEATURIZER, sequences, u0)
    former = former_unroll_states(MODEL, FEATURIZER, [f"u{u}" for u in range(len(lengths))],
                                  sequences, u0)
    np.testing.assert_array_equal(got, former)
    for u, sequence in enumerate(sequences):
        np.testing.assert_allclose(got[u], stepped_state(MODEL, sequence, u0[u]), atol=1e-5)


@examples
@given(data=st.data(), lengths=lengths_lists, seed=st.integers(0, 2**16))
def test_carrying_the_state_over_chunks_equals_one_unroll(
    data: st.DataObject, lengths: list[int], seed: int
) -> None:
    """Each user's events cut at arbitrary points and unrolled chunk by chunk (the users'
    chunks batched together, every chunk from the state the previous one ended in) end in the
    state of one unroll over all of them."""
    sequences = [user_events(f"u{u}", n, seed + u) for u, n in enumerate(lengths)]
    u0 = start_states(len(lengths), seed)
    cuts = [sorted(data.draw(st.lists(st.integers(0, n), max_size=4), label=f"cuts {u}"))
            for u, n in enumerate(lengths)]
    chunks = [[s[a:b] for a, b in zip([0, *c], [*c, len(s)], strict=True)]
              for s, c in zip(sequences, cuts, strict=True)]
    state = u0
    for k in range(max(map(len, chunks))):
        state = unroll_events(MODEL, FEATURIZER,
                              [c[k] if k < len(c) else [] for c in chunks], state)
    np.testing.assert_allclose(state, unroll_events(MODEL, FEATURIZER, sequences, u0),
                               atol=1e-5)


@examples
@given(lengths=lengths_lists, new=st.lists(st.integers(0, 4), min_size=5, max_size=5),
       stale=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_a_stale_state_is_rebuilt_from_zero_over_its_history_then_advanced(
    lengths: list[int], new: list[int], stale: list[bool], seed: int
) -> None:
    """``rebuild`` = an unroll from zero over the history (whatever the stored state);
    ``advance`` = the new events from the stored state, or from that rebuild where stale."""
    n_users = len(lengths)
    histories = [user_events(f"u{u}", n, seed + u) for u, n in enumerate(lengths)]
    fresh = [user_events(f"u{u}", new[u], seed + 100 + u) for u in range(n_users)]
    stored = start_states(n_users, seed)
    is_stale = np.asarray(stale[:n_users])
    rebuilt = rebuild(MODEL, FEATURIZER, histories)
    for u, history in enumerate(histories):
        np.testing.assert_allclose(rebuilt[u], stepped_state(MODEL, history, np.zeros(D)),
                                   atol=1e-5)
    got = advance(MODEL, FEATURIZER, stored, is_stale, histories, fresh)
    for u in range(n_users):
        start = rebuilt[u] if is_stale[u] else stored[u]
        np.testing.assert_allclose(got[u], stepped_state(MODEL, fresh[u], start), atol=1e-5)


def test_no_events_leave_the_states_as_they_are() -> None:
    u0 = start_states(3, 1)
    np.testing.assert_array_equal(unroll_events(MODEL, FEATURIZER, [[], [], []], u0), u0)
    assert unroll_events(MODEL, FEATURIZER, [], np.zeros((0, D), np.float32)).shape == (0, D)
    np.testing.assert_array_equal(
        advance(MODEL, FEATURIZER, u0, np.zeros(3, bool), [[]] * 3, [[]] * 3), u0)


def test_training_unrolls_the_same_state_as_the_stream() -> None:
    """``served_state`` (training, offline evaluation) over a request's history window from the
    state carried before it gives the state ``unroll_events`` gives over all of the user's
    events from zero: one code path, and the events-only inputs equal the history part of the
    full user inputs."""
    history = user_events("u1", 12, 5)
    impression_ts = history[-1].ts + 30.0
    n = MODEL.cfg.history_len
    older, window = history[:-n], history[-n:]
    carried = unroll_events(MODEL, FEATURIZER, [older], np.zeros((1, D), np.float32))
    user = FEATURIZER.assemble_user(
        FEATURIZER.events(window),
        FEATURIZER.left_padded_index([len(window)], n),
        np.asarray([impression_ts]), FEATURIZER.users(["u1"], [None]),
        FEATURIZER.contexts([{"device": "ios"}]), carried,
    )
    events = FEATURIZER.sequences([history], n)
    for name in EventInputs.__dataclass_fields__:
        assert torch.equal(getattr(events, name), getattr(user, name)), name
    with torch.no_grad():
        trained = served_state(MODEL, user).state.numpy()
        np.testing.assert_array_equal(
            trained, unroll(MODEL, events, torch.from_numpy(carried)).numpy())
    np.testing.assert_allclose(trained[0], unroll_events(
        MODEL, FEATURIZER, [history], np.zeros((1, D), np.float32))[0], atol=1e-6)


@examples
@given(owners=st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=40))
def test_carried_states_are_each_users_unroll_over_its_events_so_far(owners: list[str]) -> None:
    """Row e of ``carried_states`` is the state of event e's user after its events up to and
    including e (users interleaved in any order), from zero; the extra last row is zeros."""
    rng = np.random.default_rng(len(owners))
    events = [event(rng, owner, T0 + 60.0 * k, k) for k, owner in enumerate(owners)]
    states = carried_states(MODEL, FEATURIZER.events(events), UserTimelines.of(owners))
    assert states.shape == (len(events) + 1, D)
    np.testing.assert_array_equal(states[-1], 0.0)
    prefixes = [[e for e in events[: k + 1] if e.user_id == owner]
                for k, owner in enumerate(owners)]
    if prefixes:
        expected = unroll_events(MODEL, FEATURIZER, prefixes,
                                 np.zeros((len(prefixes), D), np.float32))
        np.testing.assert_allclose(states[:-1], expected, atol=1e-5)


def test_the_unroll_is_differentiable() -> None:
    events = FEATURIZER.sequences([user_events("u0", 4, 3)])
    unroll(MODEL, events).sum().backward()
    grads = [p.grad for p in MODEL.gru.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    MODEL.zero_grad(set_to_none=True)


def test_stored_history_rows_decode_back_in_order() -> None:
    history = user_events("u2", 5, 9)
    assert decode_history([encode(e) for e in history]) == history


def test_the_state_dim_check_refuses_a_mismatch() -> None:
    check_state_dim(MODEL, D, "the store")
    with pytest.raises(ValueError, match="the store holds states of dimension 8"):
        check_state_dim(MODEL, 8, "the store")
