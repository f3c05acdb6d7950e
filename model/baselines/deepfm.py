"""DeepFM (Guo et al. 2017): no sequence. logit = FM(e) + Deep(v) over the field tokens.

v: the field tokens as the backbone embeds them (with their source-type embedding); e: the same
tokens without it (the source embedding is shared by fields of one side, so it would add a
large constant to every pairwise product of the FM term).
"""

from __future__ import annotations

import torch

from model.baselines.base import Baseline
from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, UserInputs
from model.tokens import Source


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Second-order FM term sum_{i<j} <v_i, v_j> of v: [..., P, d] -> [...]."""
    return 0.5 * (v.sum(-2).pow(2) - v.pow(2).sum(-2)).sum(-1)


class DeepFM(Baseline):
    """``forward(user, cands) -> {task: logits [B, C]}``; the history is not read."""

    kind = "deepfm"

    kind = "deepfm"

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__(cfg, spec, extra_slots=0)
        sources = [Source.F_U] * spec.n_user_fields + [Source.C_U]
        sources += [Source.F_G] * spec.n_item_fields
        sources += [Source.C_G] * int(self.tokenizer.item_context is not None)
        self.register_buffer("sources", torch.tensor(sources), persistent=False)

    def forward(self, user: UserInputs, cands: CandidateInputs) -> dict[str, torch.Tensor]:
        v = self.fields(user, cands)  # [B, C, P, d]
        e = v - self.tokenizer.source(self.sources)
        return self.logits(v, fm_interaction(e))
