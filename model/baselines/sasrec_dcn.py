"""SASRec + DCNv2: compress the history first, then cross it with the features.

SASRec (Kang & McAuley 2018): pre-norm causal self-attention blocks over the S tokens; the
output at the newest position (n - 1, histories are left-padded) is the user's sequence
vector. DCNv2 (Wang et al. 2021): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l over the flattened
[fields | sequence vector] tokens, then the shared head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.baselines.base import Baseline
from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, UserInputs

SEQ_LAYERS = 2
CROSS_LAYERS = 2


class CausalBlock(nn.Module):
    """Pre-LayerNorm causal self-attention + FFN. x: [B, n, d]; allowed: [B, 1, n, n]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * d, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))  # [B, h, n, d/h]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.dropout(self.proj(attended.transpose(1, 2).flatten(-2)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, n] valid -> [B, 1, n, n]: row i reads valid j <= i, and always itself (so a padded
    row never attends to nothing)."""
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class CrossNetwork(nn.Module):
    """DCNv2's full-rank cross layers: x0 [..., D] -> [..., D]."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class SASRecDCN(Baseline):
    """``forward(user, cands) -> {task: logits [B, C]}``."""

    kind = "sasrec-dcnv2"

    kind = "sasrec-dcnv2"

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(cfg, spec, extra_slots=1)
        d = cfg.d_model
        self.encoder = nn.ModuleList(CausalBlock(cfg) for _ in range(SEQ_LAYERS))
        self.seq_norm = nn.LayerNorm(d)
        self.cross = CrossNetwork((self.n_fields + 1) * d, CROSS_LAYERS)

    def encode_history(self, user: UserInputs) -> torch.Tensor:
        """The sequence vector [B, d]: the encoder's output at the newest position."""
        h = self.history(user)
        allowed = causal_mask(user.hist_valid)
        for block in self.encoder:
            h = block(h, allowed)
        return self.seq_norm(h[:, -1])

    def forward(self, user: UserInputs, cands: CandidateInputs) -> dict[str, torch.Tensor]:
        fields = self.fields(user, cands)  # [B, C, P, d]
        b, c, p, d = fields.shape
        seq = self.encode_history(user)[:, None, None, :].expand(b, c, 1, d)
        x0 = torch.cat([fields, seq], dim=-2).flatten(-2)  # [B, C, (P + 1) d]
        return self.logits(self.cross(x0).unflatten(-1, (p + 1, d)))
