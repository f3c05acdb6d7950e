"""DIN (Zhou et al. 2018): the candidate attends over the history with an activation unit.

w_j = MLP([q, k_j, q - k_j, q * k_j]) for the candidate's item representation q and history
token k_j; interest = sum_j w_j k_j over valid events (no softmax, as in the paper). The
interest vector joins the field tokens before the head.
"""

from __future__ import annotations

import torch
from torch import nn

from model.baselines.base import Baseline
from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, UserInputs


class TargetAttention(nn.Module):
    """DIN's activation unit: query [B, C, d], keys [B, n, d], valid [B, n] -> [B, C, d]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(4 * d, d), nn.PReLU(), nn.Linear(d, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor
                ) -> torch.Tensor:
        b, c, d = query.shape
        n = keys.shape[1]
        q = query[:, :, None].expand(b, c, n, d)
        k = keys[:, None].expand(b, c, n, d)
        weight = self.unit(torch.cat([q, k, q - k, q * k], dim=-1)).squeeze(-1)  # [B, C, n]
        weight = weight * valid[:, None, :]
        return torch.einsum("bcn,bnd->bcd", weight, keys)


class DIN(Baseline):
    """``forward(user, cands) -> {task: logits [B, C]}``."""

    kind = "din"

    kind = "din"

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(cfg, spec, extra_slots=1)
        self.attention = TargetAttention(cfg.d_model)

    def forward(self, user: UserInputs, cands: CandidateInputs) -> dict[str, torch.Tensor]:
        query = self.tokenizer.item_repr(cands.item, cands.cat, cands.num, cands.num_present)
        interest = self.attention(query, self.history(user), user.hist_valid)  # [B, C, d]
        tokens = torch.cat([self.fields(user, cands), interest[..., None, :]], dim=-2)
        return self.logits(tokens)
