"""Information compensation (UG-Sep) and the task heads.

Compensation: the mask removes U <- G reads, so a small per-candidate cross term of the pooled
user-side output p_u and the candidate summary g_c gives the interaction back:
comp = sigma(W_a [p_u, g_c]) * MLP([p_u, g_c, p_u * g_c]) (a gated 1-layer MLP).
Head: an MLP on the candidate's output tokens (flattened) plus comp -> one logit per task.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Compensation(nn.Module):
    """p_u: [B, C, d] (the user side as each candidate saw it), g: [B, C, d] -> [B, C, d]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d, d)
        self.hidden = nn.Linear(3 * d, d)
        self.out = nn.Linear(d, d)

    def forward(self, p_u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([p_u, g], dim=-1)
        cross = self.out(F.gelu(self.hidden(torch.cat([pair, p_u * g], dim=-1))))
        return torch.sigmoid(self.gate(pair)) * cross


class TaskHead(nn.Module):
    """Candidate output tokens [B, C, P_g, d] (+ compensation [B, C, d]) -> logits [B, C]."""

    def __init__(self, n_item_slots: int, d: int) -> None:
        super().__init__()
        self.reduce = nn.Linear(n_item_slots * d, d)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, g: torch.Tensor, compensation: torch.Tensor | None) -> torch.Tensor:
        z = self.reduce(g.flatten(-2))
        if compensation is not None:
            z = z + compensation
        return self.mlp(z).squeeze(-1)
