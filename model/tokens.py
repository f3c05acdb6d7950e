"""Structure-preserving tokenization (docs/model.md, "Tokens"): every input becomes tokens in R^d.

- Sequence token: Phi_S(s_i) = E_item(item_i) + E_action(action_i) + Pool(content_i) + T(t_i);
  content_i is the event's item-side fields and its own context, each embedded, then averaged;
  T is sinusoids of log(1 + age in seconds), projected, plus a position embedding.
- Feature token: Phi_F(field, value) = E_field(value) (a bag of values is averaged).
- Context token: Phi_C(c) = SiLU(W_c c + b_c), one per context group (C_u, C_g).
- State token: Phi_U(u_t) = W_u u_t.
- Interest token (CDNet): a linear embedding of the histogram of core-behaviour similarities.
- A learned source-type embedding is added to every token.

All categorical fields share one hashed embedding table laid out by ``FeatureSpec``.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig
from model.features import CandidateInputs, EventInputs, FeatureSpec, UserInputs

TIME_FREQUENCIES = 16


class Source(IntEnum):
    """Source types, each with a learned embedding added to its tokens."""

    S = 0
    F_U = 1
    C_U = 2
    U = 3
    F_G = 4
    C_G = 5
    INTEREST = 6


class EmbeddingTable(nn.Embedding):
    """The shared table (row 0 = padding, a zero embedding) with bag lookups.

    Its gradient is sparse (the rows looked up, ``sparse=True``): a forward reads the table
    about ten times (history items, actions, bags, candidates, ...), and a dense gradient
    would allocate, zero and add a whole [rows, d] tensor for each read (a sixth of an online
    step at 35k rows, d 32; more as the table grows). A training step turns it into one dense
    gradient before clipping (``model.training.dense_gradients``), so the optimizer and its
    results are those of a dense table."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=0, sparse=True)

    def bag(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [..., L] (0 = empty slot) -> [..., d], the mean of each bag's non-empty rows
        (zeros for an empty bag). One ``embedding_bag``: neither the forward nor the backward
        materializes the [..., L, d] lookups (the history's bags were a tenth of a training
        step at the default size)."""
        flat = rows.reshape(-1, rows.shape[-1])
        pooled = F.embedding_bag(flat, self.weight, mode="mean", padding_idx=0,
                                 sparse=self.sparse)
        return pooled.unflatten(0, rows.shape[:-1])


class Tokenizer(nn.Module):
    """Embeds ``UserInputs`` and ``CandidateInputs`` into S, U-side NS and G-side NS tokens."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg, self.spec = cfg, spec
        self.table = EmbeddingTable(spec.n_embeddings, d)
        nn.init.normal_(self.table.weight, std=0.05)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.num_weight = nn.Parameter(torch.randn(spec.n_content_num, d) * 0.05)
        self.num_bias = nn.Parameter(torch.zeros(spec.n_content_num, d))
        frequencies = torch.exp(torch.linspace(math.log(0.05), math.log(8.0), TIME_FREQUENCIES))
        self.register_buffer("time_frequencies", frequencies, persistent=False)
        self.time_proj = nn.Linear(2 * TIME_FREQUENCIES, d)
        self.position = nn.Embedding(cfg.history_len, d)
        self.user_context = nn.Linear(spec.user_numeric_dim, d)
        self.item_context = nn.Linear(spec.item_numeric_dim, d) if spec.item_numeric_dim else None
        self.state_proj = nn.Linear(d, d, bias=False)
        self.interest = nn.Linear(cfg.interest_bins, d)
        self.source = nn.Embedding(len(Source), d)
        # at the table's scale: at N(0, 1) the source-type vector (shared by every token of a
        # source) is ~20x a value's embedding and drowns the item signal (eval suite: test
        # GAUC 0.64 -> 0.69 on MovieLens-100K)
        nn.init.normal_(self.source.weight, std=0.05)

    @property
    def n_user_slots(self) -> int:
        """P_u: F_u fields, the C_u token, and the state token when it is on."""
        return self.spec.n_user_fields + 1 + int(self.cfg.use_state)

    @property
    def n_item_slots(self) -> int:
        """P_g: F_g fields, the C_g token if the items have numeric fields, the interest token."""
        spec = self.spec
        return spec.n_item_fields + int(self.item_context is not None) + int(
            self.cfg.core_selection
        )

    def bag(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [..., L] table rows (0 = empty slot) -> [..., d], the mean of the bag."""
        return self.table.bag(rows)

    def content(
        self, cat: torch.Tensor, num: torch.Tensor, present: torch.Tensor, num_cols: slice
    ) -> torch.Tensor:
        """Pool(content): mean over categorical bags [..., Fc, L] and present numeric fields
        [..., Fn] (a numeric field embeds as x * w_f + b_f). Returns [..., d]."""
        weight, bias = self.num_weight[num_cols], self.num_bias[num_cols]
        numeric = (num[..., None] * weight + bias) * present[..., None]
        total = self.bag(cat).sum(-2) + numeric.sum(-2)
        count = cat.shape[-2] + present.sum(-1, keepdim=True)
        return total / count.clamp(min=1)

    def item_repr(
        self, item: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """The item's own representation E_item + Pool(item fields), [..., d]; compares
        candidates with history events for core-behaviour selection."""
        n_cat, n_num = len(self.spec.item_cat), len(self.spec.item_num)
        pooled = self.content(
            cat[..., :n_cat, :], num[..., :n_num], present[..., :n_num], slice(0, n_num)
        )
        return self.table(item) + pooled

    def interaction(self, events: EventInputs) -> torch.Tensor:
        """e_t for every event: E_item + E_action + Pool(content), [B, n, d]. Reads the events
        only (a ``UserInputs`` is one), so the user state needs no user-side inputs."""
        pooled = self.content(
            events.hist_cat, events.hist_num, events.hist_num_present, slice(None)
        )
        return self.table(events.hist_item) + self.table(events.hist_action) + pooled

    def time(self, age: torch.Tensor) -> torch.Tensor:
        """T(t): [B, n] ages in seconds -> [B, n, d]."""
        phase = torch.log1p(age)[..., None] * self.time_frequencies
        sinusoids = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)
        return self.time_proj(sinusoids) + self.position.weight

    def sequence(self, user: UserInputs, events: torch.Tensor) -> torch.Tensor:
        """S tokens [B, n, d] from the interaction embeddings ``events`` [B, n, d]."""
        return events + self.time(user.hist_age) + self.source.weight[Source.S]

    def user_tokens(self, user: UserInputs) -> torch.Tensor:
        """U-side NS tokens [B, P_u, d]: F_u fields, C_u, and the state token u_t."""
        source = self.source.weight
        tokens = [self.bag(user.user_cat) + source[Source.F_U]]
        tokens.append((F.silu(self.user_context(user.user_num)) + source[Source.C_U])[:, None])
        if self.cfg.use_state:
            tokens.append((self.state_proj(user.state) + source[Source.U])[:, None])
        return torch.cat(tokens, dim=1)

    def item_tokens(self, cands: CandidateInputs, interest: torch.Tensor | None) -> torch.Tensor:
        """G-side NS tokens [B, C, P_g, d]: F_g fields, C_g, and the interest token.

        interest: [B, C, bins] histogram of core-behaviour similarities (or None when off).
        """
        source = self.source.weight
        fields = torch.cat([self.table(cands.item)[..., None, :], self.bag(cands.cat)], dim=-2)
        tokens = [fields + source[Source.F_G]]
        if self.item_context is not None:
            numeric = torch.cat([cands.num, cands.num_present.float(), cands.affinity,
                                 cands.rates], dim=-1)
            tokens.append((F.silu(self.item_context(numeric)) + source[Source.C_G])[..., None, :])
        if interest is not None:
            tokens.append((self.interest(interest) + source[Source.INTEREST])[..., None, :])
        return torch.cat(tokens, dim=-2)
