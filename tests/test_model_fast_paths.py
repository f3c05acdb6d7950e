"""The fast paths compute what the plain reference paths compute.

- fused attention (``UniBlock.fused``: SDPA on CUDA and in no-grad passes, additive-bias
  ``baddbmm`` in CPU training, no-grad candidates as one SDPA call per request) equals the
  plain logits / ``attention_weights`` path: the cached and the reference logits, the
  candidate layout alone on several requests and masks, and in training the loss and every
  parameter's gradient;
- ``guarded_step`` embeds each history once (the GRU unroll and the S tokens share it): its
  loss and gradients equal the plain two-embedding computation;
- the table's bag lookup (one ``embedding_bag``) equals the mean of the gathered rows, and
  the GRU unroll (``unbind`` over the steps) equals indexing step by step: values and gradients;
- W8A16 (``model.quantize``): int8 per-channel rounding is within half a step of the weight;
  the quantized scorer's probabilities stay within a tolerance of fp32's, its cached path
  still equals its reference path, it stores fewer weight bytes, and the fp32 model it was
  made from is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from model_fixtures import (
    ABLATIONS,
    cached_logits,
    fresh_model,
    inputs,
    make_request,
    max_diff,
    reference_logits,
)
from torch.nn import functional as F

from model.backbone import UniRecModel
from model.blocks import UniBlock
from model.features import CandidateInputs, UserInputs
from model.gru import UserStateGRU
from model.quantize import (
    W8A16Embedding,
    W8A16Linear,
    native_bf16,
    quantize_per_channel,
    quantize_w8a16,
    weight_bytes,
)
from model.scorer import Scorer
from model.tokens import EmbeddingTable
from model.training import guarded_step
from model.user_state import served_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
W8A16_PROB_TOL = 0.02  # bf16 activations (8 mantissa bits) + int8 weights, on probabilities


@contextmanager
def plain_attention(model: UniRecModel) -> Iterator[None]:
    """Run ``model`` with every block on the plain attention path and a dense gradient for
    the embedding table."""
    for block in model.blocks:
        block.fused = False
    model.tokenizer.table.sparse = False
    try:
        yield
    finally:
        for block in model.blocks:
            del block.fused  # back to the class default (fused)
        model.tokenizer.table.sparse = True


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_fused_attention_equals_plain_when_scoring(ablation: str) -> None:
    model = fresh_model(3, **ABLATIONS[ablation])
    user, cands = inputs(model, make_request(5, n_hist=11, n_cands=6))
    fast_cached, fast_ref = cached_logits(model, user, cands), reference_logits(model, user, cands)
    with plain_attention(model):
        plain_cached = cached_logits(model, user, cands)
        plain_ref = reference_logits(model, user, cands)
    assert max_diff(fast_cached, plain_cached) < TOL
    assert max_diff(fast_ref, plain_ref) < TOL
    assert max_diff(fast_cached, plain_ref) < 1e-4


@torch.no_grad()
def test_fused_candidate_layout_equals_plain_for_many_requests_and_masks() -> None:
    """``candidate_attention`` (no-grad scoring: one SDPA call per request over [user side |
    every candidate's own tokens]) equals the plain per-candidate layout, for B requests with
    different user-side masks per candidate (validity and core selection)."""
    torch.manual_seed(0)
    cfg = fresh_model(0).cfg
    block = UniBlock(cfg, n_slots=7).eval()
    b, c, p_g, l_u = 3, 5, 4, 13
    heads, e = cfg.n_heads, cfg.d_model // cfg.n_heads
    g = torch.randn(b, c, p_g, cfg.d_model)
    user_kv = (torch.randn(b, heads, l_u, e), torch.randn(b, heads, l_u, e))
    user_mask = torch.rand(b, c, l_u) > 0.4
    user_mask[0, 0] = False  # a candidate that reads no user column: only its own tokens
    items = slice(3, 7)
    fused = block.candidates(g, user_kv, user_mask, None, items)
    block.fused = False
    plain = block.candidates(g, user_kv, user_mask, None, items)
    assert (fused - plain).abs().max() < TOL


def _loss_and_grads(model: UniRecModel, user: UserInputs, cands: CandidateInputs,
                    labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain training loss: the GRU over the history, then the model, each embedding the
    history itself."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(served_state(model, user), cands)["click"][:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def _batch(model: UniRecModel, seeds: range) -> tuple[UserInputs, CandidateInputs]:
    pairs = [inputs(model, make_request(s, n_hist=4 + s, n_cands=1)) for s in seeds]
    from test_model_cache import stack_cands, stack_users  # the same stacking as the cache tests

    return stack_users([u for u, _ in pairs]), stack_cands([c for _, c in pairs])


def test_training_fast_path_equals_plain_path_loss_and_gradients() -> None:
    """fused attention + one embedding per history + the table's sparse gradient made dense
    (``guarded_step``) vs plain attention, the two-embedding computation and a dense table
    gradient: same loss, same gradients (before the update)."""
    model = fresh_model(7)
    user, cands = _batch(model, range(6))
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    with plain_attention(model):
        plain_loss, plain_grads = _loss_and_grads(model, user, cands, labels)

    captured: dict[str, torch.Tensor] = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None})

    result = guarded_step(model, Capture(model.parameters(), lr=0.0), user, cands, labels,
                          clip_norm=float("inf"))
    assert result.accepted
    assert abs(result.loss - plain_loss) < TOL
    assert captured.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bag_lookup_equals_the_mean_of_gathered_rows_value_and_gradient() -> None:
    """Bags with empty slots (row 0), a full bag and an empty bag (zeros): ``embedding_bag``
    gives the gathered rows' mean over non-empty slots, and the same table gradient."""
    torch.manual_seed(0)
    table = EmbeddingTable(30, 8)
    rows = torch.randint(0, 30, (4, 5, 6))
    rows[0, 0] = 0
    rows[1, 1] = torch.arange(1, 7)
    rows[2, 2, :4] = 0
    weights = torch.randn(4, 5, 8)

    count = (rows > 0).sum(-1, keepdim=True).clamp(min=1)
    gathered = table(rows).sum(-2) / count
    (gathered * weights).sum().backward()
    plain_grad, table.weight.grad = table.weight.grad.to_dense(), None
    bagged = table.bag(rows)
    (bagged * weights).sum().backward()
    bag_grad = table.weight.grad.to_dense()

    torch.testing.assert_close(bagged, gathered)
    assert bagged[0, 0].abs().max() == 0
    torch.testing.assert_close(bag_grad, plain_grad)
    assert bag_grad[0].abs().max() == 0  # padding learns nothing
    quantized = W8A16Embedding(table)
    torch.testing.assert_close(quantized.bag(rows), quantized(rows).sum(-2) / count)


def test_gru_unroll_equals_stepping_by_index_value_and_gradient() -> None:
    torch.manual_seed(0)
    gru = UserStateGRU(8)
    events = torch.randn(5, 7, 8, requires_grad=True)
    valid = torch.rand(5, 7) > 0.3
    u0 = torch.randn(5, 8)

    gates, u = gru.input_gates(events), u0
    for t in range(events.shape[1]):
        u = torch.where(valid[:, t, None], gru.step(gates[:, t], u), u)
    u.square().sum().backward()
    plain_grad, events.grad = events.grad.clone(), None
    unrolled = gru.unroll(events, valid, u0)
    unrolled.square().sum().backward()

    torch.testing.assert_close(unrolled, u)
    torch.testing.assert_close(events.grad, plain_grad)


def test_int8_per_channel_error_is_at_most_half_a_step() -> None:
    weight = torch.randn(5, 7, 3) * torch.tensor([0.01, 1.0, 30.0])  # channels of many scales
    q, scale = quantize_per_channel(weight, (0, 2))
    assert q.dtype == torch.int8 and scale.shape == (5, 1, 3)
    assert (q.float() * scale - weight).abs().le(scale / 2 + 1e-7).all()
    assert q.abs().amax(dim=1).eq(127).all()  # each channel uses the whole int8 range


def test_w8a16_scores_close_to_fp32_and_cache_still_exact() -> None:
    model = fresh_model(11)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    fp32 = Scorer(model, torch.device("cpu"))
    w8 = Scorer(model, torch.device("cpu"), quantize="w8a16")
    requests = [make_request(s, n_hist=3 + 2 * s, n_cands=5) for s in range(6)]
    args = [list(col) for col in zip(*((r.impression, r.history, r.profile, r.state)
                                       for r in requests), strict=True)]
    p_fp32, p_w8 = fp32.score_many(*args), w8.score_many(*args)
    diffs = [np.abs(a - b).max() for a, b in zip(p_fp32, p_w8, strict=True)]
    assert max(diffs) < W8A16_PROB_TOL
    assert max(diffs) > 0  # it really is a different (quantized) computation
    r = requests[0]
    cached = w8.score(r.impression, r.history, r.profile, r.state)
    reference = w8.score_reference(r.impression, r.history, r.profile, r.state)
    assert np.abs(cached - reference).max() < 1e-2  # bf16 rounding along two orders of ops
    assert weight_bytes(w8.serving) < 0.5 * weight_bytes(model)
    assert w8.model is model and fp32.serving is model
    for name, tensor in model.state_dict().items():  # the fp32 model is untouched
        assert torch.equal(tensor, before[name]), name


def test_w8a16_matmuls_take_bf16_only_where_native_and_return_the_input_dtype() -> None:
    """Without autocast a W8A16 layer returns fp32 for fp32 input; its matmul is rounded to bf16
    exactly when the device computes bf16 natively (``native_bf16``), else it equals the fp32
    product of the dequantized weight. Under autocast it returns autocast's dtype."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = W8A16Linear(linear)
    x = torch.randn(16, 64)
    out = layer(x)
    assert out.dtype == torch.float32
    exact = x @ (layer.qweight.float() * layer.scale).T + linear.bias.detach()
    if native_bf16(torch.device("cpu")):
        assert 0 < (out - exact).abs().max() < 0.05
    else:
        assert torch.allclose(out, exact, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_w8a16_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="quantize"):
        Scorer(fresh_model(0), torch.device("cpu"), quantize="int4")


def test_quantized_copy_has_no_float_matrices_left() -> None:
    quantized = quantize_w8a16(fresh_model(0))
    big_float = [n for n, t in quantized.state_dict().items()
                 if t.is_floating_point() and t.dim() >= 2 and t.numel() > 4096]
    assert big_float == []
