"""UniBlock: pre-RMSNorm -> masked attention -> residual -> pre-RMSNorm -> FFN -> residual.

Mixed parameterization (OneTrans): S tokens share one set of Q/K/V/O, norm and FFN weights;
every NS token slot has its own, applied as one batched matmul over a [slots, d_in, d_out]
weight. NS slots are numbered user-side first (F_u, C_u, U), then item-side (F_g, C_g, H);
callers pass the ``slice`` of slots a tensor holds.

A block runs in three layouts that compute the same function:

- ``user``: S and U-side NS tokens of B requests (the cacheable user pass); returns the keys
  and values of the user-side columns for candidates to read;
- ``candidates``: the G tokens of B x C candidates reading that cache plus their own tokens;
- ``joint``: the reference, one full sequence [S | U | G] per candidate under the full mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig


class MixedRMSNorm(nn.Module):
    """RMSNorm with one gain for S tokens and one per NS slot."""

    def __init__(self, d: int, n_slots: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.seq_weight = nn.Parameter(torch.ones(d))
        self.slot_weight = nn.Parameter(torch.ones(n_slots, d))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def seq(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., L, d] S tokens."""
        return self._normalize(x) * self.seq_weight

    def ns(self, x: torch.Tensor, slots: slice) -> torch.Tensor:
        """x: [..., P, d] NS tokens of ``slots``."""
        return self._normalize(x) * self.slot_weight[slots]


class MixedLinear(nn.Module):
    """y = x W + b with one (W, b) for all S tokens and one per NS slot ([slots, d_in, d_out])."""

    def __init__(self, d_in: int, d_out: int, n_slots: int) -> None:
        super().__init__()
        self.seq_proj = nn.Linear(d_in, d_out)
        bound = 1 / math.sqrt(d_in)
        self.slot_weight = nn.Parameter(torch.empty(n_slots, d_in, d_out).uniform_(-bound, bound))
        self.slot_bias = nn.Parameter(torch.empty(n_slots, d_out).uniform_(-bound, bound))

    def seq(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_proj(x)

    def ns(self, x: torch.Tensor, slots: slice) -> torch.Tensor:
        """x: [..., P, d_in] -> [..., P, d_out], slot p multiplied by its own weight."""
        return torch.einsum("...pi,pio->...po", x, self.slot_weight[slots]) + self.slot_bias[slots]


def attention_weights(
    logits: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """Softmax over the last dim of masked ``logits``.

    ``scale`` (same shape, 1 in the forward pass) carries the straight-through estimator of
    core-behaviour selection: it multiplies the logits and the weights of the S columns, so the
    forward value is the hard mask's and gradients reach the similarities.
    """
    if scale is not None:
        logits = logits * scale
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return weights * scale if scale is not None else weights


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """Masked attention: q [..., Lq, e], k and v [..., Lk, e], mask (and the straight-through
    ``scale``) broadcastable to [..., Lq, Lk]. Returns [..., Lq, e].

    ``fused`` (and no ``scale``): one ``F.scaled_dot_product_attention`` call on CUDA and in
    no-grad passes; in CPU training (where its backward is slower at these head sizes) the mask
    as an additive bias folded into one ``baddbmm`` with the 1/sqrt(e) scale. Otherwise the
    plain path: logits, ``attention_weights``, values. They agree to float tolerance
    (``tests/test_model_fast_paths.py``).
    """
    if fused and scale is None:
        if q.device.type == "cuda" or not torch.is_grad_enabled():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        *lead, lq, e = q.shape
        lk = k.shape[-2]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask, float("-inf")).expand(*lead, lq, lk)
        logits = torch.baddbmm(bias.reshape(-1, lq, lk), q.reshape(-1, lq, e),
                               k.reshape(-1, lk, e).transpose(1, 2), alpha=1 / math.sqrt(e))
        out = torch.softmax(logits, dim=-1) @ v.reshape(-1, lk, e)
        return out.reshape(*lead, lq, e)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return attention_weights(logits, mask, scale) @ v


def candidate_attention(
    qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor,
    k_user: torch.Tensor, v_user: torch.Tensor, user_mask: torch.Tensor,
) -> torch.Tensor:
    """The G tokens of C candidates reading the cached user side and their own tokens, as one
    ``F.scaled_dot_product_attention`` call per request (the fused candidate layout).

    qg, kg, vg: [B, C, h, P_g, e]; k_user, v_user: [B, h, L_u, e]; user_mask: [B, C, L_u] bool.
    The C x P_g queries of a request form one sequence over the keys [user side | all C x P_g
    candidate tokens], each candidate's rows open on its own P_g columns only. Returns
    [B, C, h, P_g, e], equal to the plain layout's attention to float tolerance.
    """
    b, c, h, p, e = qg.shape
    rows = lambda x: x.transpose(1, 2).reshape(b, h, c * p, e)  # noqa: E731
    own = torch.eye(c, dtype=torch.bool, device=qg.device)
    own = own.repeat_interleave(p, 0).repeat_interleave(p, 1).expand(b, c * p, c * p)
    mask = torch.cat([user_mask.repeat_interleave(p, 1), own], dim=-1)[:, None]
    out = F.scaled_dot_product_attention(
        rows(qg), torch.cat([k_user, rows(kg)], dim=2), torch.cat([v_user, rows(vg)], dim=2),
        attn_mask=mask,
    )
    return out.reshape(b, h, c, p, e).transpose(1, 2)


class UniBlock(nn.Module):
    """One layer of the unified backbone (see the module docstring for its three layouts).

    ``fused`` (the default): where no straight-through scale applies, attention through
    ``attend``'s fused path, and in no-grad passes the candidates' attention through
    ``candidate_attention`` (one SDPA call per request: 23% off the candidate pass of 64
    impressions of C = 10, n = 50, one thread). With gradients the candidates keep the plain
    layout, whose backward is faster on the CPU (a default-size training step 0.347 s vs
    0.361 s). False runs the plain reference path everywhere.
    """

    fused: bool = True

    def __init__(self, cfg: ModelConfig, n_slots: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.attn_norm = MixedRMSNorm(d, n_slots)
        self.qkv = MixedLinear(d, 3 * d, n_slots)
        self.proj = MixedLinear(d, d, n_slots)
        self.ffn_norm = MixedRMSNorm(d, n_slots)
        self.ffn_in = MixedLinear(d, cfg.ffn_mult * d, n_slots)
        self.ffn_out = MixedLinear(cfg.ffn_mult * d, d, n_slots)
        self.dropout = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, d] -> [..., h, L, d/h]."""
        return x.unflatten(-1, (self.n_heads, -1)).transpose(-3, -2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[..., h, L, d/h] -> [..., L, d]."""
        return x.transpose(-3, -2).flatten(-2)

    def _qkv_seq(self, s: torch.Tensor) -> list[torch.Tensor]:
        return [self._heads(t) for t in self.qkv.seq(self.attn_norm.seq(s)).chunk(3, dim=-1)]

    def _qkv_ns(self, x: torch.Tensor, slots: slice) -> list[torch.Tensor]:
        qkv = self.qkv.ns(self.attn_norm.ns(x, slots), slots)
        return [self._heads(t) for t in qkv.chunk(3, dim=-1)]

    def _finish_seq(self, s: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        s = s + self.dropout(self.proj.seq(attended))
        return s + self.dropout(self.ffn_out.seq(F.gelu(self.ffn_in.seq(self.ffn_norm.seq(s)))))

    def _finish_ns(self, x: torch.Tensor, attended: torch.Tensor, slots: slice) -> torch.Tensor:
        x = x + self.dropout(self.proj.ns(attended, slots))
        hidden = F.gelu(self.ffn_in.ns(self.ffn_norm.ns(x, slots), slots))
        return x + self.dropout(self.ffn_out.ns(hidden, slots))

    def user(
        self, s: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, n_out: int, user_slots: slice
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The user pass. s: [B, n_in, d]; u: [B, P_u, d]; mask: [B, n_out + P_u, n_in + P_u].

        Returns s' [B, n_out, d], u' [B, P_u, d] and the user-side (keys, values), each
        [B, h, n_in + P_u, d/h], for candidates to read.
        """
        qs, ks, vs = self._qkv_seq(s)
        qu, ku, vu = self._qkv_ns(u, user_slots)
        q = torch.cat([qs[..., -n_out:, :], qu], dim=-2)
        k, v = torch.cat([ks, ku], dim=-2), torch.cat([vs, vu], dim=-2)
        out = self._merge(attend(q, k, v, mask[:, None], None, self.fused))
        s_next = self._finish_seq(s[:, -n_out:], out[:, :n_out])
        u_next = self._finish_ns(u, out[:, n_out:], user_slots)
        return s_next, u_next, (k, v)

    def candidates(
        self,
        g: torch.Tensor,
        user_kv: tuple[torch.Tensor, torch.Tensor],
        user_mask: torch.Tensor,
        user_scale: torch.Tensor | None,
        item_slots: slice,
    ) -> torch.Tensor:
        """G tokens reading the cached user side. g: [B, C, P_g, d].

        user_kv: [B, h, L_u, d/h] each; user_mask: [B, C, L_u] bool; user_scale: [B, C, L_u]
        (straight-through selection) or None. Returns g' [B, C, P_g, d].
        """
        k_user, v_user = user_kv
        qg, kg, vg = self._qkv_ns(g, item_slots)  # [B, C, h, P_g, d/h]
        if self.fused and user_scale is None and not torch.is_grad_enabled():
            out = candidate_attention(qg, kg, vg, k_user, v_user, user_mask)
            return self._finish_ns(g, self._merge(out), item_slots)
        scale = 1 / math.sqrt(qg.shape[-1])
        logits_user = torch.einsum("bchpe,bhle->bchpl", qg, k_user) * scale
        logits_own = qg @ kg.transpose(-1, -2) * scale
        n_user = logits_user.shape[-1]
        logits = torch.cat([logits_user, logits_own], dim=-1)
        own = user_mask.new_ones((*user_mask.shape[:2], logits_own.shape[-1]))
        mask = torch.cat([user_mask, own], dim=-1)[:, :, None, None, :]
        full_scale = None
        if user_scale is not None:
            ones = user_scale.new_ones(own.shape)
            full_scale = torch.cat([user_scale, ones], dim=-1)[:, :, None, None, :]
        weights = attention_weights(logits, mask, full_scale)
        out = torch.einsum("bchpl,bhle->bchpe", weights[..., :n_user], v_user)
        out = out + weights[..., n_user:] @ vg
        return self._finish_ns(g, self._merge(out), item_slots)

    def joint(
        self,
        s: torch.Tensor,
        u: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor,
        scale: torch.Tensor | None,
        n_out: int,
        user_slots: slice,
        item_slots: slice,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference layout: N sequences [S | U | G]. s: [N, n_in, d]; u: [N, P_u, d];
        g: [N, P_g, d]; mask, scale: [N, n_out + P_u + P_g, n_in + P_u + P_g]."""
        qs, ks, vs = self._qkv_seq(s)
        qu, ku, vu = self._qkv_ns(u, user_slots)
        qg, kg, vg = self._qkv_ns(g, item_slots)
        q = torch.cat([qs[..., -n_out:, :], qu, qg], dim=-2)
        k, v = torch.cat([ks, ku, kg], dim=-2), torch.cat([vs, vu, vg], dim=-2)
        out = self._merge(attend(
            q, k, v, mask[:, None], scale[:, None] if scale is not None else None, self.fused
        ))
        n_user = u.shape[1]
        s_next = self._finish_seq(s[:, -n_out:], out[:, :n_out])
        u_next = self._finish_ns(u, out[:, n_out : n_out + n_user], user_slots)
        g_next = self._finish_ns(g, out[:, n_out + n_user :], item_slots)
        return s_next, u_next, g_next

