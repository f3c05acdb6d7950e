"""Progressive compression of the S tokens (UniRec): Compress(S) = softmax(Q_c S^T / sqrt d) S.

The queries Q_c in R^{k x d} are learned; padding S tokens get no weight. A request without
history compresses to k zero tokens marked invalid.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedCompression(nn.Module):
    """S [B, n, d] with validity [B, n] -> S' [B, k, d] with validity [B, k]."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(k, d) / math.sqrt(d))

    def forward(self, s: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.einsum("kd,bnd->bkn", self.queries, s) / math.sqrt(s.shape[-1])
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        any_valid = valid.any(dim=-1, keepdim=True).expand(-1, self.queries.shape[0])
        return weights @ s, any_valid
