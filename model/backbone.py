"""The unified backbone: one Transformer over S, U-side NS and G-side NS tokens (docs/model.md).

Token order per request: [S_1..S_n | F_u, C_u, U | F_g, C_g, H]. With UG-Sep the user side
never reads the item side, so ``encode_user`` runs it once per request and caches every
layer's user-side keys and values; ``score`` then runs only the G tokens of all C candidates
against that cache, in one batch. ``reference`` runs the whole joint sequence once per
candidate under the full mask; cached and reference scores agree to float tolerance.

Layer plan: ``ModelConfig.layer_widths`` gives each layer's S width. Learned compression
(UniRec) shrinks S before the first layer of a narrower width; the pyramid (OneTrans) keeps
only the newest S tokens as that layer's queries. Core-behaviour selection applies in the
layers whose S keys are the n full-resolution tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.blocks import MixedRMSNorm, UniBlock
from model.compression import LearnedCompression
from model.config import ModelConfig
from model.core_behaviours import CoreSelection, select_core
from model.features import CandidateInputs, FeatureSpec, UserInputs
from model.gru import UserStateGRU
from model.head import Compensation, TaskHead
from model.mask import LayerMask
from model.tokens import Tokenizer


@dataclass(frozen=True)
class LayerPlan:
    """One layer: S width in and out, compression before it, and whether S keeps its order."""

    n_in: int
    n_out: int
    compress_to: int | None
    ordered: bool
    full_resolution: bool


@dataclass
class CachedLayer:
    kv: tuple[torch.Tensor, torch.Tensor]  # [B, h, n_in + P_u, d/h] each
    mask: LayerMask
    full_resolution: bool


@dataclass
class UserCache:
    """Everything candidates need from the user side of B requests."""

    layers: list[CachedLayer]
    hist_repr: torch.Tensor  # [B, n, d] item representations of the history events
    hist_valid: torch.Tensor  # [B, n]
    pooled: torch.Tensor  # [B, d] mean of the final user-side tokens


def plan_layers(cfg: ModelConfig) -> list[LayerPlan]:
    n = cfg.history_len
    width, ordered, plans = n, True, []
    for w in cfg.seq_widths:
        if cfg.compression == "learned":
            compress_to = w if w < width else None
            if compress_to is not None:
                width, ordered = w, False
            plans.append(LayerPlan(width, width, compress_to, ordered, width == n and ordered))
        else:
            plans.append(LayerPlan(width, w, None, True, width == n))
            width = w
    return plans


class UniRecModel(nn.Module):
    """Scores candidates for users: ``forward(user, cands) -> {task: logits [B, C]}``."""

    kind = "unirec"

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = cfg.d_model
        self.tokenizer = Tokenizer(cfg, spec)
        n_user, n_item = self.tokenizer.n_user_slots, self.tokenizer.n_item_slots
        self.user_slots = slice(0, n_user)
        self.item_slots = slice(n_user, n_user + n_item)
        self.plan = plan_layers(cfg)
        self.blocks = nn.ModuleList(UniBlock(cfg, n_user + n_item) for _ in self.plan)
        self.compressors = nn.ModuleDict(
            {str(i): LearnedCompression(d, p.compress_to) for i, p in enumerate(self.plan)
             if p.compress_to is not None}
        )
        self.final_norm = MixedRMSNorm(d, n_user + n_item)
        self.gru = UserStateGRU(d)  # u_t's update; ``model.user_state`` unrolls it
        self.compensation = Compensation(d) if cfg.compensation else None
        self.heads = nn.ModuleDict({task: TaskHead(n_item, d) for task in cfg.tasks})

    # -- the cached path --------------------------------------------------------------------

    def _mask(self, plan: LayerPlan, seq_keys: torch.Tensor) -> LayerMask:
        return LayerMask(
            seq_keys=seq_keys,
            n_out=plan.n_out,
            ordered=plan.ordered,
            n_user=self.user_slots.stop,
            n_item=self.item_slots.stop - self.item_slots.start,
            seq_feature_mixing=self.cfg.seq_feature_mixing,
            ug_sep=self.cfg.ug_sep,
        )

    def _embed_user(self, user: UserInputs, interaction: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S tokens [B, n, d], U-side tokens [B, P_u, d], history item reprs [B, n, d].

        ``interaction``: ``tokenizer.interaction(user)`` [B, n, d] when the caller already has
        it (training embeds each history once for the GRU unroll and the S tokens)."""
        tok = self.tokenizer
        events = tok.interaction(user) if interaction is None else interaction
        s = tok.sequence(user, events)
        hist_repr = tok.item_repr(
            user.hist_item, user.hist_cat, user.hist_num, user.hist_num_present
        )
        return s, tok.user_tokens(user), hist_repr

    def _pool(self, s: torch.Tensor, valid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        total = (s * valid[..., None]).sum(1) + u.sum(1)
        return total / (valid.sum(1, keepdim=True) + u.shape[1])

    def encode_user(self, user: UserInputs, interaction: torch.Tensor | None = None
                    ) -> UserCache:
        """The user pass, once per request (requires ``ug_sep``); ``interaction`` as in
        ``_embed_user``."""
        if not self.cfg.ug_sep:
            raise ValueError("the user side depends on the candidate when ug_sep is off")
        s, u, hist_repr = self._embed_user(user, interaction)
        valid = user.hist_valid
        layers = []
        for i, (plan, block) in enumerate(zip(self.plan, self.blocks, strict=True)):
            if plan.compress_to is not None:
                s, valid = self.compressors[str(i)](s, valid)
            mask = self._mask(plan, valid)
            s, u, kv = block.user(s, u, mask.user(), plan.n_out, self.user_slots)
            valid = valid[:, -plan.n_out :]
            layers.append(CachedLayer(kv, mask, plan.full_resolution))
        s = self.final_norm.seq(s)
        u = self.final_norm.ns(u, self.user_slots)
        return UserCache(layers, hist_repr, user.hist_valid, self._pool(s, valid, u))

    def _select(self, hist_repr: torch.Tensor, hist_valid: torch.Tensor, cands: CandidateInputs
                ) -> CoreSelection | None:
        if not self.cfg.core_selection:
            return None
        cand_repr = self.tokenizer.item_repr(cands.item, cands.cat, cands.num, cands.num_present)
        cfg = self.cfg
        return select_core(cand_repr, hist_repr, hist_valid, cfg.core_k, cfg.interest_bins)

    def _cand_seq(self, mask: LayerMask, selection: CoreSelection | None, full_resolution: bool,
                  n_cands: int) -> torch.Tensor:
        """[B, C, n_in]: the S columns each candidate reads in this layer."""
        b, n_in = mask.seq_keys.shape
        cand_seq = mask.seq_keys[:, None, :].expand(b, n_cands, n_in)
        if selection is not None and full_resolution:
            cand_seq = cand_seq & selection.selected
        return cand_seq if self.cfg.seq_feature_mixing else torch.zeros_like(cand_seq)

    def _logits(self, g: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """g: [B, C, P_g, d] final candidate tokens; pooled: [B, C, d] user-side summary."""
        compensation = None
        if self.compensation is not None:
            compensation = self.compensation(pooled, g.mean(-2))
        return {task: head(g, compensation) for task, head in self.heads.items()}

    def score(self, cache: UserCache, cands: CandidateInputs) -> dict[str, torch.Tensor]:
        """All C candidates of B requests against the cached user side: logits [B, C]."""
        b, c = cands.shape
        selection = self._select(cache.hist_repr, cache.hist_valid, cands)
        g = self.tokenizer.item_tokens(cands, selection.interest if selection else None)
        for layer, block in zip(cache.layers, self.blocks, strict=True):
            cand_seq = self._cand_seq(layer.mask, selection, layer.full_resolution, c)
            scale = None
            if selection is not None and selection.scale is not None and layer.full_resolution:
                user_ones = selection.scale.new_ones(b, c, layer.mask.n_user)
                scale = torch.cat([selection.scale, user_ones], dim=-1)
            g = block.candidates(
                g, layer.kv, layer.mask.candidate_user(cand_seq), scale, self.item_slots
            )
        g = self.final_norm.ns(g, self.item_slots)
        return self._logits(g, cache.pooled[:, None, :].expand(b, c, -1))

    # -- the reference path -----------------------------------------------------------------

    def reference(self, user: UserInputs, cands: CandidateInputs,
                  interaction: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One full joint sequence per candidate (no reuse). Logits [B, C]."""
        b, c = cands.shape
        s, u, hist_repr = self._embed_user(user, interaction)
        selection = self._select(hist_repr, user.hist_valid, cands)
        g = self.tokenizer.item_tokens(cands, selection.interest if selection else None)
        per_cand = lambda x: x.repeat_interleave(c, dim=0)  # noqa: E731  [B, ...] -> [B*C, ...]
        s, u, g = per_cand(s), per_cand(u), g.flatten(0, 1)
        valid = user.hist_valid
        n_user = self.user_slots.stop
        for i, (plan, block) in enumerate(zip(self.plan, self.blocks, strict=True)):
            if plan.compress_to is not None:
                s, valid_rep = self.compressors[str(i)](s, per_cand(valid))
                valid = valid_rep[::c]
            mask = self._mask(plan, valid)
            cand_seq = self._cand_seq(mask, selection, plan.full_resolution, c)
            full = mask.joint(cand_seq)
            scale = None
            if selection is not None and selection.scale is not None and plan.full_resolution:
                scale = torch.ones(full.shape, dtype=s.dtype, device=s.device)
                scale[:, plan.n_out + n_user :, : plan.n_in] = selection.scale.flatten(0, 1)[
                    :, None, :
                ]
            s, u, g = block.joint(
                s, u, g, full, scale, plan.n_out, self.user_slots, self.item_slots
            )
            valid = valid[:, -plan.n_out :]
        s = self.final_norm.seq(s)
        u = self.final_norm.ns(u, self.user_slots)
        g = self.final_norm.ns(g, self.item_slots)
        pooled = self._pool(s, per_cand(valid), u)
        return self._logits(g.unflatten(0, (b, c)), pooled.unflatten(0, (b, c)))

    def forward(self, user: UserInputs, cands: CandidateInputs,
                interaction: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training and scoring entry: the cached path under UG-Sep, else the joint path.
        ``interaction``: the history's ``tokenizer.interaction`` [B, n, d] if already made."""
        if self.cfg.ug_sep:
            return self.score(self.encode_user(user, interaction), cands)
        return self.reference(user, cands, interaction)
