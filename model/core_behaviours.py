"""Core-behaviour selection (CDNet), per candidate.

a_j = (cos(f_cand, s_j) + 1) / 2 over the n history events, compared at the input by the
items' own representations. A candidate's G tokens read only the top-k S tokens by a_j in the
layers where S is at full resolution; a histogram of all a_j (the interest distribution)
becomes one more G token. Training uses the straight-through estimator: the forward pass uses
the hard top-k mask M, the backward pass goes through sg[M - A] + A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class CoreSelection:
    """selected: [B, C, n] bool (top-k among valid events); interest: [B, C, bins] fractions;
    scale: [B, C, n] straight-through weights (value M, gradient to A), or None when no
    gradient is needed."""

    selected: torch.Tensor
    interest: torch.Tensor
    scale: torch.Tensor | None


def select_core(
    cand_repr: torch.Tensor, hist_repr: torch.Tensor, hist_valid: torch.Tensor, k: int, bins: int
) -> CoreSelection:
    """cand_repr: [B, C, d]; hist_repr: [B, n, d]; hist_valid: [B, n] bool."""
    similarity = F.normalize(cand_repr, dim=-1) @ F.normalize(hist_repr, dim=-1).transpose(1, 2)
    affinity = (similarity + 1) / 2  # A: [B, C, n] in [0, 1]
    valid = hist_valid[:, None, :].expand_as(affinity)
    ranked = affinity.detach().masked_fill(~valid, -1.0)
    k = min(k, affinity.shape[-1])
    top = ranked.topk(k, dim=-1).indices
    selected = torch.zeros_like(valid).scatter(-1, top, True) & valid
    bucket = (affinity.detach() * bins).long().clamp(max=bins - 1)
    counts = F.one_hot(bucket, bins).mul(valid[..., None]).sum(-2).float()
    interest = counts / valid.sum(-1, keepdim=True).clamp(min=1)
    scale = None
    if torch.is_grad_enabled() and affinity.requires_grad:
        hard = selected.to(affinity.dtype)
        scale = (hard - affinity).detach() + affinity
    return CoreSelection(selected, interest, scale)
