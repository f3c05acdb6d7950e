"""The cached scoring path (user side once, candidates against its K/V cache) computes the same
function as the reference path (one joint sequence per candidate), in every ablation; a
candidate's score depends neither on the order of the candidates nor on which other candidates
are in the request; under UG-Sep the user side is candidate-independent (and with UG-Sep off it
is not); the ``Scorer`` agrees with its own reference, and scoring impressions in batches
(grouped by candidate count) equals scoring each alone."""

from __future__ import annotations

import itertools
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from model_fixtures import (
    ABLATIONS,
    FEATURIZER,
    USERS,
    Recorder,
    Request,
    cached_logits,
    fresh_model,
    inputs,
    make_request,
    max_diff,
    reference_logits,
    shared_model,
)

from eventlog.schema import Impression
from model.features import CandidateInputs, UserInputs
from model.mask import LayerMask
from model.scorer import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOL = 1e-4


def stack_users(users: list[UserInputs]) -> UserInputs:
    return UserInputs(**{f.name: torch.cat([getattr(u, f.name) for u in users])
                         for f in fields(UserInputs)})


def stack_cands(cands: list[CandidateInputs]) -> CandidateInputs:
    return CandidateInputs(**{f.name: torch.cat([getattr(c, f.name) for c in cands])
                              for f in fields(CandidateInputs)})


def with_candidates(impression: Impression, order: list[int]) -> Impression:
    return Impression(impression.request_id, impression.user_id, impression.ts,
                      [impression.candidates[i] for i in order], dict(impression.context))


# -- 1. cached == reference -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ABLATIONS))
@settings(max_examples=5, deadline=None, derandomize=True)
@given(n_hist=st.integers(0, 40), n_cands=st.integers(1, 6), seed=st.integers(0, 10_000))
@example(n_hist=0, n_cands=3, seed=1)  # no history at all
@example(n_hist=2, n_cands=4, seed=2)  # fewer events than core_k = 4
@example(n_hist=40, n_cands=5, seed=3)  # more events than history_len = 16
def test_cached_scoring_equals_reference_in_every_ablation(name, n_hist, n_cands, seed):
    """For every ablation config, the cached path (encode_user + score) and the reference path
    (one joint sequence per candidate) give logits within 1e-4 of each other (fp32)."""
    model = shared_model(name)
    user, cands = inputs(model, make_request(seed, n_hist, n_cands))
    cached, reference = cached_logits(model, user, cands), reference_logits(model, user, cands)
    assert cached.shape == reference.shape == (1, n_cands)
    assert torch.isfinite(cached).all()
    assert max_diff(cached, reference) <= TOL


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_cached_scoring_equals_reference_for_a_batch_of_requests(name):
    """Several requests (empty, short, full and overlong histories) scored as one batch: cached
    and reference logits agree within 1e-4, and each request's logits equal its logits when
    scored alone (requests in a batch do not see each other)."""
    model = shared_model(name)
    pairs = [inputs(model, make_request(seed, n, 4)) for seed, n in enumerate((0, 3, 16, 30))]
    user, cands = stack_users([u for u, _ in pairs]), stack_cands([c for _, c in pairs])
    cached = cached_logits(model, user, cands)
    assert max_diff(cached, reference_logits(model, user, cands)) <= TOL
    for row, (u, c) in enumerate(pairs):
        assert max_diff(cached[row], cached_logits(model, u, c)[0]) <= 1e-5


def test_cache_equivalence_check_is_sensitive_to_a_wrong_cache():
    """Negative control: a cache whose layers are out of order (layer 0 and 1 K/V swapped)
    scores differently from the reference by far more than the tolerance, so the equivalence
    test would catch a cached path that reads the wrong K/V."""
    model = shared_model("default")
    user, cands = inputs(model, make_request(5, 12, 5))
    with torch.no_grad():
        cache = model.encode_user(user)
        cache.layers[0].kv, cache.layers[1].kv = cache.layers[1].kv, cache.layers[0].kv
        broken = model.score(cache, cands)["click"]
    assert max_diff(broken, reference_logits(model, user, cands)) > 10 * TOL


def test_scoring_never_modifies_the_cache():
    """The cache is reused by every candidate batch: scoring some candidates leaves its K/V
    and pooled tensors unchanged, so a second batch gets the same scores as a fresh cache."""
    model = shared_model("default")
    user, cands = inputs(model, make_request(6, 9, 6))
    with torch.no_grad():
        cache = model.encode_user(user)
        before = [t.clone() for layer in cache.layers for t in layer.kv] + [cache.pooled.clone()]
        first = model.score(cache, cands)["click"]
        after = [t for layer in cache.layers for t in layer.kv] + [cache.pooled]
        second = model.score(cache, cands)["click"]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(first, second)


# -- 2. candidate order and candidate independence -----------------------------------------


@pytest.mark.parametrize("name", ["default", "pyramid", "no_core_selection"])
@settings(max_examples=4, deadline=None, derandomize=True)
@given(order=st.permutations(list(range(6))), seed=st.integers(0, 1000))
def test_candidate_order_does_not_change_any_candidates_score(name, order, seed):
    """Scoring the candidates in another order permutes the scores the same way (cached
    path); the scores differ between candidates, so the check is not vacuous."""
    model = shared_model(name)
    request = make_request(seed, 12, 6)
    scores = cached_logits(model, *inputs(model, request))[0]
    request.impression = with_candidates(request.impression, order)
    permuted = cached_logits(model, *inputs(model, request))[0]
    assert max_diff(permuted, scores[order]) <= 1e-5
    assert float(scores.max() - scores.min()) > 1e-3


@pytest.mark.parametrize("name", ["default", "pyramid", "input_compression"])
def test_other_candidates_in_the_request_do_not_change_a_candidates_score(name):
    """Under UG-Sep a candidate's score is the same alone, in a pair, or among all six (cached
    and reference paths): candidates never read each other."""
    model = shared_model(name)
    request = make_request(7, 14, 6)
    full = cached_logits(model, *inputs(model, request))[0]
    impression = request.impression
    for subset in ([0], [3], [5, 1], [2, 4, 0]):
        request.impression = with_candidates(impression, subset)
        user, cands = inputs(model, request)
        assert max_diff(cached_logits(model, user, cands)[0], full[subset]) <= 1e-5
        assert max_diff(reference_logits(model, user, cands)[0], full[subset]) <= TOL


# -- 5. UG-Sep: the user side does not depend on the candidate -------------------------------


@pytest.mark.parametrize("name", ["default", "pyramid", "input_compression"])
def test_user_side_outputs_do_not_depend_on_the_candidate_under_ug_sep(name):
    """With ug_sep=True, in the reference pass every layer's S and U-side outputs are the same
    for every candidate, and equal the outputs of the cached user pass (encode_user); so the
    cache (K/V and pooled) that encode_user builds once is valid for any candidate."""
    model = shared_model(name)
    user, cands = inputs(model, make_request(8, 11, 5))
    with torch.no_grad(), Recorder(model, "user") as user_pass:
        model.encode_user(user)
    with torch.no_grad(), Recorder(model, "joint") as joint_pass:
        model.reference(user, cands)
    assert len(user_pass.outputs) == len(joint_pass.outputs) == model.cfg.n_layers
    for (s_user, u_user, _), (s_joint, u_joint, _) in zip(
        user_pass.outputs, joint_pass.outputs, strict=True
    ):
        assert s_joint.shape[0] == u_joint.shape[0] == 5  # one sequence per candidate
        assert max_diff(s_joint, s_user.expand_as(s_joint)) <= 1e-5
        assert max_diff(u_joint, u_user.expand_as(u_joint)) <= 1e-5


def test_user_side_outputs_depend_on_the_candidate_when_ug_sep_is_off():
    """Negative control: with ug_sep=False the mask opens U -> G, the U-side outputs of the
    reference pass differ between candidates, and encode_user refuses to build a cache."""
    model = fresh_model(ug_sep=False)
    user, cands = inputs(model, make_request(8, 11, 5))
    with torch.no_grad(), Recorder(model, "joint") as joint_pass:
        logits = model(user, cands)["click"]
    assert torch.isfinite(logits).all()
    u_last = joint_pass.outputs[-1][1]
    assert max_diff(u_last, u_last[:1].expand_as(u_last)) > 1e-3
    with pytest.raises(ValueError, match="ug_sep"):
        model.encode_user(user)


def test_ug_sep_flag_is_what_closes_u_to_g_in_the_joint_mask():
    """LayerMask.joint: the U-side rows read no G column with ug_sep=True and every G column
    with ug_sep=False; the S rows read no G column either way."""
    n_in, n_user, n_item = 6, 3, 2
    keys = torch.tensor([[False, True, True, True, True, True]])
    cand_seq = keys[:, None, :].expand(1, 2, n_in)
    for ug_sep in (True, False):
        mask = LayerMask(keys, n_in, True, n_user, n_item, True, ug_sep).joint(cand_seq)
        item_cols = mask[:, :, n_in + n_user :]  # rows: S (n_in of them), U-side, G-side
        assert not item_cols[:, :n_in].any()
        user_rows = item_cols[:, n_in : n_in + n_user]
        assert bool(user_rows.all()) if not ug_sep else not user_rows.any()


# -- 14. Scorer ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "pyramid", "input_compression", "no_state"])
def test_scorer_score_equals_score_reference_on_cpu(name):
    """Scorer.score (cached) and Scorer.score_reference (joint per candidate) give the same
    probabilities within 1e-4 on the CPU, in the order of impression.candidates."""
    model = fresh_model(**ABLATIONS[name])
    scorer = Scorer(model, device=torch.device("cpu"))
    for seed, n_hist in enumerate((0, 3, 25)):
        request = make_request(seed, n_hist, 5)
        args = (request.impression, request.history, request.profile, request.state)
        fast, slow = scorer.score(*args), scorer.score_reference(*args)
        assert fast.shape == (5,) and np.all((fast > 0) & (fast < 1))
        assert max_diff(fast, slow) <= TOL
        expected = torch.sigmoid(cached_logits(model, *inputs(model, request))[0])
        assert max_diff(fast, expected) <= 1e-6


def test_every_task_head_agrees_between_cached_and_reference_paths():
    """With two task heads on one backbone, cached and reference logits agree for each task,
    and the heads are distinct functions."""
    model = fresh_model(tasks=("click", "conversion"))
    user, cands = inputs(model, make_request(9, 10, 4))
    with torch.no_grad():
        cached = model.score(model.encode_user(user), cands)
        reference = model.reference(user, cands)
    assert set(cached) == set(reference) == {"click", "conversion"}
    for task in cached:
        assert max_diff(cached[task], reference[task]) <= TOL
    assert max_diff(cached["click"], cached["conversion"]) > 1e-3


# -- 15. batched scoring ---------------------------------------------------------------------


def mixed_requests() -> list[Request]:
    """Seven impressions of different users, histories (empty, short, overlong), states,
    contexts and candidate counts (4, 6 and 1), the last of a new user (no profile, no state)."""
    shapes = [(0, 4), (3, 6), (25, 4), (9, 1), (16, 4), (1, 6)]
    requests = [make_request(40 + k, n_hist, n_cands, user=USERS[k % len(USERS)])
                for k, (n_hist, n_cands) in enumerate(shapes)]
    new_user = make_request(50, 0, 4, user="newcomer")
    return [*requests, Request(new_user.impression, [], None, None)]


def test_featurizer_requests_stacks_what_request_builds_alone():
    """Featurizer.requests over B impressions gives exactly the tensors of Featurizer.request
    for each one, stacked on the batch axis (left padding, ages, derived context per row)."""
    model = shared_model("default")
    batch = [r for r in mixed_requests()[:-1] if len(r.impression.candidates) == 4]
    user, cands = FEATURIZER.requests(
        [r.impression for r in batch], [r.history for r in batch],
        [r.profile for r in batch], np.stack([r.state for r in batch]), model.cfg.history_len,
    )
    pairs = [inputs(model, r) for r in batch]
    assert user.batch_size == 3 and cands.shape == (3, 4)
    for name, tensor in vars(stack_users([u for u, _ in pairs])).items():
        assert torch.equal(getattr(user, name), tensor), name
    for name, tensor in vars(stack_cands([c for _, c in pairs])).items():
        assert torch.equal(getattr(cands, name), tensor), name


def test_featurizer_requests_refuses_mixed_candidate_counts():
    a, b = make_request(1, 3, 4), make_request(2, 3, 5)
    with pytest.raises(ValueError, match="candidate count"):
        FEATURIZER.requests([a.impression, b.impression], [a.history, b.history],
                            [a.profile, b.profile], np.stack([a.state, b.state]), 16)


@pytest.mark.parametrize("name", ["default", "pyramid", "input_compression"])
def test_batched_scoring_equals_scoring_each_impression_alone(name):
    """Scorer.score_many over impressions with different histories (one empty), states (one
    new user with none), contexts and candidate counts returns, in input order, each
    impression's own probabilities within 1e-5 of Scorer.score on it alone (fp32); the
    impressions score differently, so a mix-up of rows would show."""
    scorer = Scorer(shared_model(name), device=torch.device("cpu"), max_batch=2)
    requests = mixed_requests()
    batched = scorer.score_many(
        [r.impression for r in requests], [r.history for r in requests],
        [r.profile for r in requests], [r.state for r in requests],
    )
    assert [p.shape for p in batched] == [(len(r.impression.candidates),) for r in requests]
    for request, probs in zip(requests, batched, strict=True):
        alone = scorer.score(request.impression, request.history, request.profile,
                             request.state)
        assert max_diff(probs, alone) < 1e-5
    same_count = [p for p, r in zip(batched, requests, strict=True)
                  if len(r.impression.candidates) == 4]
    assert min(max_diff(a, b) for a, b in itertools.combinations(same_count, 2)) > 1e-3


def test_batched_reference_scoring_agrees_with_the_cached_path():
    """score_many(reference=True) (one joint pass per candidate, batched over impressions)
    agrees with the cached batched scores within the cache tolerance."""
    scorer = Scorer(shared_model("default"), device=torch.device("cpu"))
    requests = mixed_requests()
    args = ([r.impression for r in requests], [r.history for r in requests],
            [r.profile for r in requests], [r.state for r in requests])
    cached, reference = scorer.score_many(*args), scorer.score_many(*args, reference=True)
    for a, b in zip(cached, reference, strict=True):
        assert max_diff(a, b) <= TOL


def test_score_many_makes_one_model_call_per_candidate_count_and_chunk(monkeypatch):
    """Impressions are grouped by candidate count and cut into chunks of at most max_batch:
    encode_user runs with B > 1, once per chunk, and never on a mix of counts."""
    model = fresh_model()
    scorer = Scorer(model, device=torch.device("cpu"), max_batch=2)
    requests = mixed_requests()  # counts 4, 6, 4, 1, 4, 6, 4
    assert scorer.batches([r.impression for r in requests]) == [[0, 2], [4, 6], [1, 5], [3]]
    sizes: list[int] = []
    encode = model.encode_user
    monkeypatch.setattr(model, "encode_user", lambda user: sizes.append(user.batch_size)
                        or encode(user))
    scorer.score_many([r.impression for r in requests], [r.history for r in requests],
                      [r.profile for r in requests])
    assert sizes == [2, 2, 2, 1]
