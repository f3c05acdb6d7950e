"""What every baseline shares with the backbone: its ``Tokenizer`` (the same featurization and
one hashed embedding table laid out by ``FeatureSpec``) and its ``TaskHead``.

A baseline turns a request into P output tokens per candidate, ``[B, C, P, d]``, and the head
reads them exactly as it reads the backbone's candidate tokens. The GRU state, core selection
and compensation belong to the backbone: a baseline's config has them off (``stateless``), so
``train_step`` does not unroll a state for it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, UserInputs
from model.head import TaskHead
from model.tokens import Tokenizer


def stateless(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the backbone-only parts (GRU state, core selection, compensation) off."""
    return replace(cfg, use_state=False, core_selection=False, compensation=False)


class Baseline(nn.Module):
    """Base of the baselines: ``self.fields``, ``self.history`` and ``self.logits``.

    ``extra_slots``: output tokens a subclass adds to the P_u + P_g field tokens.
    """

    kind: ClassVar[str]

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, extra_slots: int) -> None:
        super().__init__()
        self.cfg, self.spec = stateless(cfg), spec
        self.tokenizer = Tokenizer(self.cfg, spec)
        self.n_fields = self.tokenizer.n_user_slots + self.tokenizer.n_item_slots
        self.dropout = nn.Dropout(cfg.dropout)
        d = cfg.d_model
        self.heads = nn.ModuleDict(
            {task: TaskHead(self.n_fields + extra_slots, d) for task in cfg.tasks}
        )

    def fields(self, user: UserInputs, cands: CandidateInputs) -> torch.Tensor:
        """[B, C, P_u + P_g, d]: the user's field tokens (F_u, C_u) repeated for each
        candidate, then the candidate's (F_g, C_g)."""
        u = self.tokenizer.user_tokens(user)  # [B, P_u, d]
        g = self.tokenizer.item_tokens(cands, None)  # [B, C, P_g, d]
        return torch.cat([u[:, None].expand(-1, g.shape[1], -1, -1), g], dim=-2)

    def history(self, user: UserInputs) -> torch.Tensor:
        """S tokens [B, n, d] embedded as the backbone embeds them (event + time + source)."""
        return self.tokenizer.sequence(user, self.tokenizer.interaction(user))

    def logits(
        self, tokens: torch.Tensor, extra: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """tokens: [B, C, P, d] -> {task: logits [B, C]}, plus ``extra`` [B, C] if given."""
        tokens = self.dropout(tokens)
        out = {task: head(tokens, None) for task, head in self.heads.items()}
        return out if extra is None else {task: z + extra for task, z in out.items()}
