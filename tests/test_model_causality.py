"""The mixed attention mask matches its table (docs/model.md); the causality it guarantees holds in
the model: an S token at position i never reads a later event j > i where the design says so
(ordered S -> S blocks; all layers when S and NS do not mix; the first layer always)."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import (
    Recorder,
    event,
    fresh_model,
    inputs,
    make_request,
    max_diff,
    seq_positions,
)

from model.mask import LayerMask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- 6. the mask table ------------------------------------------------------------------------


@st.composite
def layer_masks(draw):
    """A LayerMask over arbitrary valid-key patterns (padding anywhere, or everywhere), with
    n_out <= n_in, any slot counts and flags; plus a cand_seq for C candidates."""
    b, n_in = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    keys = draw(st.lists(st.lists(st.booleans(), min_size=n_in, max_size=n_in),
                         min_size=b, max_size=b))
    seq_keys = torch.tensor(keys)
    c = draw(st.integers(1, 3))
    pick = torch.tensor(draw(st.lists(st.booleans(), min_size=b * c * n_in,
                                      max_size=b * c * n_in))).view(b, c, n_in)
    mask = LayerMask(
        seq_keys=seq_keys,
        n_out=draw(st.integers(1, n_in)),
        ordered=draw(st.booleans()),
        n_user=draw(st.integers(1, 4)),
        n_item=draw(st.integers(1, 4)),
        seq_feature_mixing=draw(st.booleans()),
        ug_sep=draw(st.booleans()),
    )
    return mask, seq_keys[:, None, :] & pick


def expected_seq_block(mask: LayerMask) -> np.ndarray:
    """[B, n_out, n_in] S -> S straight from the table: valid columns j <= i when ordered (all
    valid columns when not), and a row always reads itself."""
    keys = mask.seq_keys.numpy()
    b, n_in = keys.shape
    out = np.zeros((b, mask.n_out, n_in), dtype=bool)
    for r in range(mask.n_out):
        i = n_in - mask.n_out + r  # the S position of query row r: the newest n_out
        for j in range(n_in):
            out[:, r, j] = keys[:, j] & (j <= i or not mask.ordered)
        out[:, r, i] = True
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(layer_masks())
def test_user_and_joint_masks_match_the_mask_table(case):
    """user() and joint() blocks are exactly the mask table: S->S causal (open among
    unordered compressed tokens), S->U open, S->G closed, U->S open, U->U open, U->G closed
    (open with ug_sep=False), G->S = the candidate's readable S columns, G->U and G->G open;
    seq_feature_mixing=False closes S<->NS; padding S columns are readable by no row but
    their own; every row reads at least one column; candidate_user equals joint's G rows."""
    mask, cand_seq = case
    b, n_in = mask.seq_keys.shape
    n_out, n_user, n_item = mask.n_out, mask.n_user, mask.n_item
    c = cand_seq.shape[1]
    mix = mask.seq_feature_mixing
    keys = mask.seq_keys.numpy()

    user = mask.user().numpy()
    assert user.shape == (b, n_out + n_user, n_in + n_user)
    np.testing.assert_array_equal(user[:, :n_out, :n_in], expected_seq_block(mask))
    assert (user[:, :n_out, n_in:] == mix).all()  # S -> U
    np.testing.assert_array_equal(  # U -> S: the valid S columns, when S and NS mix
        user[:, n_out:, :n_in], np.broadcast_to(keys[:, None, :] & mix, (b, n_user, n_in))
    )
    assert user[:, n_out:, n_in:].all()  # U -> U

    joint = mask.joint(cand_seq).numpy().reshape(b, c, n_out + n_user + n_item, -1)
    assert joint.shape[-1] == n_in + n_user + n_item
    np.testing.assert_array_equal(joint[:, :, : n_out + n_user, : n_in + n_user],
                                  np.broadcast_to(user[:, None], (b, c, *user.shape[1:])))
    assert not joint[:, :, :n_out, n_in + n_user :].any()  # S -> G closed
    assert (joint[:, :, n_out : n_out + n_user, n_in + n_user :] == (not mask.ug_sep)).all()
    g_rows = joint[:, :, n_out + n_user :]
    np.testing.assert_array_equal(  # G -> S
        g_rows[..., :n_in], np.broadcast_to(cand_seq.numpy()[:, :, None], (b, c, n_item, n_in))
    )
    assert g_rows[..., n_in:].all()  # G -> U and G -> G
    np.testing.assert_array_equal(
        g_rows[..., : n_in + n_user],
        np.broadcast_to(mask.candidate_user(cand_seq).numpy()[:, :, None],
                        (b, c, n_item, n_in + n_user)),
    )

    # padding columns: only the padding token's own row may read it
    rows_of_seq = list(range(n_in - n_out, n_in))
    for batch, j in zip(*np.nonzero(~keys), strict=True):
        readers = np.flatnonzero(joint[batch, :, :, j].any(axis=0))
        assert set(readers.tolist()) <= {r for r, i in enumerate(rows_of_seq) if i == j}
    assert joint.any(-1).all() and user.any(-1).all()  # no empty row


def test_seq_to_seq_is_causal_when_ordered_and_open_among_compressed_tokens():
    """LayerMask S->S: with ordered=True row i reads exactly the valid j <= i; with
    ordered=False (learned-compressed summaries) it reads every valid token."""
    keys = torch.tensor([[False, False, True, True, True, True]])
    ordered = LayerMask(keys, 6, True, 2, 2, True, True).user()[0, :6, :6].numpy()
    open_ = LayerMask(keys, 6, False, 2, 2, True, True).user()[0, :6, :6].numpy()
    valid = keys[0].numpy()
    for i in range(2, 6):
        np.testing.assert_array_equal(ordered[i], valid & (np.arange(6) <= i))
        np.testing.assert_array_equal(open_[i], valid)


@pytest.mark.parametrize("compression", ["learned", "pyramid"])
def test_layer_plans_keep_order_until_learned_compression(compression):
    """The backbone asks for ordered (causal) S->S in every layer before learned compression,
    and unordered after it; the pyramid keeps original tokens, so it stays ordered."""
    model = fresh_model(compression=compression)
    widths = model.cfg.seq_widths
    for plan, width in zip(model.plan, widths, strict=True):
        compressed = compression == "learned" and width < model.cfg.history_len
        assert plan.ordered is (not compressed)


def test_mask_with_seq_feature_mixing_off_closes_candidate_reads_of_s():
    """With seq_feature_mixing=False the backbone gives the G tokens no S column to read, in
    every layer; with it on, they read the valid (and, at full resolution, selected) ones."""
    for mix in (True, False):
        model = fresh_model(seq_feature_mixing=mix)
        user, cands = inputs(model, make_request(2, 10, 3))
        with torch.no_grad(), Recorder(model, "candidates") as rec:
            model.score(model.encode_user(user), cands)
        for (_, _, user_mask, _, _), _ in rec.calls:
            seq_cols = user_mask[..., : user_mask.shape[-1] - model.tokenizer.n_user_slots]
            assert bool(seq_cols.any()) is mix


# -- 3. causality in the model ------------------------------------------------------------------


def seq_outputs(model, request) -> list[torch.Tensor]:
    """Each layer's S outputs [n_out, d] of the (single-request) user pass."""
    user, _ = inputs(model, request)
    with torch.no_grad(), Recorder(model, "user") as rec:
        model.encode_user(user)
    return [s[0] for s, _, _ in rec.outputs]


def changed_later_event(seed: int, n_hist: int, k: int):
    """A request and a copy whose history event k has another item and context. Its
    timestamp and action stay, so the request's numeric context (recency, history length,
    action shares: summaries of the history the S tokens may read, docs/model.md) is
    unchanged and only the S -> S structure is under test."""
    base = make_request(seed, n_hist, 2)
    other = make_request(seed, n_hist, 2)
    old = other.history[k]
    new = event(np.random.default_rng(seed + 99), "u1", old.ts, k,
                item=(int(old.item_id[1:]) + 7) % 40)
    other.history[k] = msgspec.structs.replace(new, action=old.action)
    return base, other


def assert_earlier_positions_unchanged(model, n_hist, k, seed, layers) -> float:
    """Compares each layer's S outputs at positions before the changed event; returns the
    largest change at the changed event's own position (to show the change is felt)."""
    base, other = changed_later_event(seed, n_hist, k)
    n = model.cfg.history_len
    slot = seq_positions(base.history, n)[k - max(0, n_hist - n)]
    felt = 0.0
    for layer, (a, b) in enumerate(zip(seq_outputs(model, base), seq_outputs(model, other),
                                        strict=True)):
        if layer not in layers:
            continue
        first = n - a.shape[0]  # these outputs are S slots first .. n-1
        if slot > first:  # positions first .. slot-1 come before the changed event
            earlier = slice(0, slot - first)
            assert max_diff(a[earlier], b[earlier]) <= 1e-6, f"layer {layer} reads a later event"
        if slot >= first:
            felt = max(felt, max_diff(a[slot - first], b[slot - first]))
    return felt


NO_MIX_CONFIGS = {
    "uncompressed": {"seq_feature_mixing": False, "layer_widths": (1.0,) * 8},
    "pyramid": {"seq_feature_mixing": False, "compression": "pyramid"},
}


@pytest.mark.parametrize("name", list(NO_MIX_CONFIGS))
@settings(max_examples=6, deadline=None, derandomize=True)
@given(n_hist=st.integers(2, 16), data=st.data())
def test_future_events_never_change_past_s_outputs_without_seq_feature_mixing(name, n_hist,
                                                                               data):
    """With S<->NS closed and S kept in order (no compression, or the pyramid), the S output
    of every layer at position i is unchanged when an event at a later position j > i
    changes; the change does reach position j itself."""
    k = data.draw(st.integers(1, n_hist - 1), label="changed event")
    model = fresh_model(**NO_MIX_CONFIGS[name])
    felt = assert_earlier_positions_unchanged(model, n_hist, k, seed=n_hist, layers=range(8))
    assert felt > 1e-3


@settings(max_examples=6, deadline=None, derandomize=True)
@given(n_hist=st.integers(2, 30), data=st.data())
def test_future_events_never_change_past_s_outputs_of_the_first_layer(n_hist, data):
    """Default config: in the first layer the S outputs at position i do not depend on a
    later event's content (S reads U-side tokens, which read all of S, so from the second
    layer on this is not promised)."""
    k = data.draw(st.integers(max(0, n_hist - 16) + 1, n_hist - 1), label="changed event")
    model = fresh_model()
    felt = assert_earlier_positions_unchanged(model, n_hist, k, seed=n_hist, layers=[0])
    assert felt > 1e-3


def test_causality_check_detects_an_open_seq_mask():
    """Negative control: the same check on a model whose plan marks S as unordered (S->S fully
    open) finds that earlier positions change when a later event changes."""
    model = fresh_model(**NO_MIX_CONFIGS["uncompressed"])
    model.plan = [replace(plan, ordered=False) for plan in model.plan]
    with pytest.raises(AssertionError, match="reads a later event"):
        assert_earlier_positions_unchanged(model, 10, 7, seed=3, layers=[0])

