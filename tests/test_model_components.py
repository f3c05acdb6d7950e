"""The pieces of the backbone against their definitions in docs/model.md: the GRU user state's
equations, CDNet core-behaviour selection (top-k, interest histogram, straight-through
estimator), and learned compression (padding gets no weight)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import (
    ABLATIONS,
    Recorder,
    cached_logits,
    inputs,
    make_request,
    max_diff,
    reference_logits,
    shared_model,
)

from model.compression import LearnedCompression
from model.core_behaviours import select_core
from model.gru import UserStateGRU
from model.user_state import unroll

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- 7. the GRU ------------------------------------------------------------------------------

W_Z = np.array([[0.5, -0.2], [0.1, 0.3]])
W_R = np.array([[-0.4, 0.2], [0.3, 0.6]])
W_H = np.array([[0.7, 0.1], [-0.5, 0.2]])
B_Z, B_R, B_H = np.array([0.1, -0.1]), np.array([0.05, 0.2]), np.array([-0.3, 0.0])
U_Z = np.array([[0.2, 0.4], [-0.3, 0.1]])
U_R = np.array([[0.6, -0.1], [0.2, 0.5]])
U_H = np.array([[0.3, -0.7], [0.4, 0.2]])


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def gru_by_hand(e, u, w_z=W_Z, w_r=W_R):
    """docs/model.md: z = sigma(W_z e + U_z u + b_z); r = sigma(W_r e + U_r u + b_r);
    h~ = tanh(W_h e + U_h (r * u) + b_h); u' = (1 - z) * u + z * h~."""
    z = sigmoid(w_z @ e + U_Z @ u + B_Z)
    r = sigmoid(w_r @ e + U_R @ u + B_R)
    h = np.tanh(W_H @ e + U_H @ (r * u) + B_H)
    return (1 - z) * u + z * h


def hand_gru() -> UserStateGRU:
    gru = UserStateGRU(2)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        gru.input_gates.weight.copy_(as_t(np.vstack([W_Z, W_R, W_H])))
        gru.input_gates.bias.copy_(as_t(np.concatenate([B_Z, B_R, B_H])))
        gru.state_gates.weight.copy_(as_t(np.vstack([U_Z, U_R])))
        gru.candidate_state.weight.copy_(as_t(U_H))
    return gru


E_CASES = np.array([[1.0, -2.0], [0.3, 0.8], [-1.5, 0.2]])
U_CASES = np.array([[0.5, -0.25], [-0.9, 0.4], [0.0, 0.0]])


def test_gru_cell_matches_its_equations():
    """With hand-set weights (d = 2), UserStateGRU gives the u' that the equations
    give when computed by hand; the example distinguishes the equations from a GRU with z and
    r swapped or with transposed weights."""
    gru = hand_gru()
    with torch.no_grad():
        got = gru(torch.tensor(E_CASES, dtype=torch.float32),
                  torch.tensor(U_CASES, dtype=torch.float32)).numpy()
    want = np.stack([gru_by_hand(e, u) for e, u in zip(E_CASES, U_CASES, strict=True)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    swapped = np.stack([gru_by_hand(e, u, W_R, W_Z) for e, u in zip(E_CASES, U_CASES,
                                                                     strict=True)])
    transposed = np.stack([gru_by_hand(e, u, W_Z.T, W_R.T) for e, u in zip(E_CASES, U_CASES,
                                                                          strict=True)])
    assert max_diff(swapped, want) > 1e-3 and max_diff(transposed, want) > 1e-3


def test_gru_unroll_applies_valid_events_in_order_and_invalid_steps_keep_the_state():
    """unroll(events, valid, u0) = the cell applied to the valid events oldest first; an
    invalid step (padding) leaves the state exactly as it was; all-invalid returns u0."""
    gru = hand_gru()
    events = torch.tensor(np.stack([E_CASES[[0, 1, 2, 0]]] * 2), dtype=torch.float32)
    valid = torch.tensor([[False, True, False, True], [False, False, False, False]])
    u0 = torch.tensor(U_CASES[:2], dtype=torch.float32)
    with torch.no_grad():
        got = gru.unroll(events, valid, u0).numpy()
    want = gru_by_hand(E_CASES[0], gru_by_hand(E_CASES[1], U_CASES[0]))
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    np.testing.assert_array_equal(got[1], u0[1].numpy())
    order_matters = gru_by_hand(E_CASES[1], gru_by_hand(E_CASES[0], U_CASES[0]))
    assert max_diff(order_matters, want) > 1e-3


def test_model_state_is_the_gru_over_the_history_interaction_embeddings():
    """model.user_state.unroll = the GRU stepped by hand over e_t (the tokenizer's
    interaction embeddings) of the valid events, from zeros; padding slots are skipped."""
    model = shared_model("default")
    user, _ = inputs(model, make_request(21, 5, 1))
    with torch.no_grad():
        state = unroll(model, user)
        events = model.tokenizer.interaction(user)[0]
        u = torch.zeros(1, model.cfg.d_model)
        for t in np.flatnonzero(user.hist_valid[0].numpy()):
            u = model.gru(events[t : t + 1], u)
    assert int(user.hist_valid.sum()) == 5
    assert max_diff(state, u) <= 1e-6 and float(u.abs().max()) > 1e-2


# -- 9. core selection -----------------------------------------------------------------------


@st.composite
def selection_cases(draw):
    b, c, n, d = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 12)),
                  draw(st.integers(2, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    valid = rng.random((b, n)) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    cand = torch.tensor(rng.standard_normal((b, c, d)), dtype=torch.float32)
    hist = torch.tensor(rng.standard_normal((b, n, d)), dtype=torch.float32)
    return cand, hist, torch.tensor(valid), draw(st.integers(1, 8)), draw(st.integers(1, 6))


def affinities(cand: torch.Tensor, hist: torch.Tensor) -> np.ndarray:
    """a_j = (cos(f_cand, s_j) + 1) / 2, computed independently in float64."""
    c, h = cand.double().numpy(), hist.double().numpy()
    c = c / np.linalg.norm(c, axis=-1, keepdims=True)
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    return (np.einsum("bcd,bnd->bcn", c, h) + 1) / 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(selection_cases())
def test_core_selection_picks_the_k_most_similar_valid_events(case):
    """select_core selects exactly min(k, n_valid) events per candidate, never a padding
    event, and every selected event is at least as similar as every unselected valid one."""
    cand, hist, valid, k, bins = case
    with torch.no_grad():
        out = select_core(cand, hist, valid, k, bins)
    selected = out.selected.numpy()
    a = affinities(cand, hist)
    valid_np = np.broadcast_to(valid.numpy()[:, None, :], selected.shape)
    assert not (selected & ~valid_np).any()
    np.testing.assert_array_equal(selected.sum(-1), np.minimum(k, valid_np.sum(-1)))
    for idx in np.ndindex(selected.shape[:2]):
        chosen, rest = a[idx][selected[idx]], a[idx][valid_np[idx] & ~selected[idx]]
        if len(chosen) and len(rest):
            assert chosen.min() >= rest.max() - 1e-6


@settings(max_examples=60, deadline=None, derandomize=True)
@given(selection_cases())
def test_interest_histogram_is_the_distribution_of_valid_similarities(case):
    """The interest histogram is non-negative, sums to 1 over the valid events (0 without
    history), and its bins bracket the mean similarity: sum_b p_b * b/bins <= mean(a) <=
    sum_b p_b * (b+1)/bins, i.e. the events are in the right bins."""
    cand, hist, valid, k, bins = case
    with torch.no_grad():
        interest = select_core(cand, hist, valid, k, bins).interest.double().numpy()
    assert interest.shape == (*cand.shape[:2], bins) and (interest >= 0).all()
    a = affinities(cand, hist)
    lower, upper = np.arange(bins) / bins, np.arange(1, bins + 1) / bins
    for bi, ci in np.ndindex(interest.shape[:2]):
        v = valid[bi].numpy()
        if not v.any():
            assert (interest[bi, ci] == 0).all()
            continue
        p = interest[bi, ci]
        assert abs(p.sum() - 1) <= 1e-6
        mean = a[bi, ci, v].mean()
        assert p @ lower - 1e-5 <= mean <= p @ upper + 1e-5


def test_core_selection_straight_through_forward_is_hard_and_gradients_reach_similarities():
    """Training (grad enabled): scale's forward value equals the hard top-k mask, and a loss
    through scale gives non-zero gradients to both the candidate and the history
    representations; without a gradient to carry, scale is None."""
    torch.manual_seed(0)
    cand = torch.randn(2, 3, 8, requires_grad=True)
    hist = torch.randn(2, 10, 8, requires_grad=True)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    out = select_core(cand, hist, valid, 4, 5)
    assert out.scale is not None
    torch.testing.assert_close(out.scale.detach(), out.selected.float(), atol=1e-6, rtol=0)
    (out.scale * torch.randn(out.scale.shape)).sum().backward()
    assert cand.grad is not None and float(cand.grad.abs().sum()) > 0
    assert hist.grad is not None and float(hist.grad.abs().sum()) > 0
    with torch.no_grad():
        assert select_core(cand, hist, valid, 4, 5).scale is None
    assert select_core(cand.detach(), hist.detach(), valid, 4, 5).scale is None


def test_candidates_read_only_their_core_events_in_full_resolution_layers():
    """In the model, each candidate's G tokens read exactly min(core_k, n_valid) S columns in
    the layers where S is at full resolution (the same columns as select_core picks), and
    all valid (compressed) S columns in the other layers."""
    model = shared_model("default")
    for n_hist in (2, 12):
        user, cands = inputs(model, make_request(30 + n_hist, n_hist, 4))
        with torch.no_grad(), Recorder(model, "candidates") as rec:
            cache = model.encode_user(user)
            model.score(cache, cands)
        n_user = model.tokenizer.n_user_slots
        for layer, plan, ((_, _, user_mask, _, _), _) in zip(
            cache.layers, model.plan, rec.calls, strict=True
        ):
            seq_cols = user_mask[..., :-n_user]
            if plan.full_resolution:
                assert (seq_cols.sum(-1) == min(model.cfg.core_k, n_hist)).all()
            else:
                assert torch.equal(seq_cols, layer.mask.seq_keys[:, None].expand_as(seq_cols))


# -- 10. learned compression -----------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), k=st.integers(1, 6), n_valid=st.integers(0, 12),
       seed=st.integers(0, 10_000))
def test_learned_compression_gives_padding_tokens_zero_weight(n, k, n_valid, seed):
    """Changing the value of a padded S token never changes the compressed tokens; changing
    a valid one does; the output validity is 'any valid input'."""
    torch.manual_seed(seed)
    n_valid = min(n_valid, n)
    compress = LearnedCompression(8, k)
    s = torch.randn(2, n, 8)
    valid = torch.zeros(2, n, dtype=torch.bool)
    valid[0, n - n_valid :] = True  # left-padded, as the featurizer builds histories
    valid[1] = torch.rand(n) < 0.5  # padding anywhere
    noisy = torch.where(valid[..., None], s, 5 * torch.randn(2, n, 8))
    with torch.no_grad():
        out, out_valid = compress(s, valid)
        out_noisy, _ = compress(noisy, valid)
        bumped, _ = compress(s + valid[..., None] * 0.5, valid)
    assert torch.equal(out_valid, valid.any(-1, keepdim=True).expand(2, k))
    assert max_diff(out, out_noisy) <= 1e-6
    for row in range(2):
        if valid[row].any():
            assert max_diff(out[row], bumped[row]) > 1e-3


def test_learned_compression_of_an_empty_history_is_zero_and_invalid():
    """No valid token: k zero tokens, all marked invalid (no NaN from an empty softmax)."""
    compress = LearnedCompression(8, 3)
    with torch.no_grad():
        out, out_valid = compress(torch.randn(1, 5, 8), torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(1, 3, 8)) and not out_valid.any()


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_padding_slot_contents_never_change_a_score(name):
    """Garbage in the padded history slots (items, actions, features, ages) changes neither
    the cached nor the reference scores, nor the GRU state: padding is invisible everywhere
    (compression, masks, core selection, pooling, interest histogram, state unroll)."""
    model = shared_model(name)
    user, cands = inputs(model, make_request(40, 5, 4))
    pad = ~user.hist_valid
    g = torch.Generator().manual_seed(0)
    noisy = replace(
        user,
        hist_item=torch.where(pad, torch.randint(1, 500, pad.shape, generator=g),
                              user.hist_item),
        hist_action=torch.where(pad, torch.randint(1, 500, pad.shape, generator=g),
                                user.hist_action),
        hist_cat=torch.where(pad[..., None, None],
                             torch.randint(1, 600, user.hist_cat.shape, generator=g),
                             user.hist_cat),
        hist_num=torch.where(pad[..., None], torch.randn(user.hist_num.shape, generator=g),
                             user.hist_num),
        hist_num_present=user.hist_num_present | pad[..., None],
        hist_age=torch.where(pad, torch.rand(pad.shape, generator=g) * 1e5, user.hist_age),
    )
    assert max_diff(cached_logits(model, user, cands), cached_logits(model, noisy, cands)) <= 1e-6
    assert max_diff(reference_logits(model, user, cands),
                    reference_logits(model, noisy, cands)) <= 1e-6
    with torch.no_grad():
        assert max_diff(unroll(model, user), unroll(model, noisy)) <= 1e-6
    # control: the same garbage marked valid does change the scores
    seen = replace(noisy, hist_valid=torch.ones_like(pad))
    assert max_diff(cached_logits(model, user, cands), cached_logits(model, seen, cands)) > 1e-3
