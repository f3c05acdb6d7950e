"""The mixed attention mask, docs/model.md "The mixed mask" (True = row may attend to column).

| row \\ column | S           | U-side NS | G-side NS |
|--------------|-------------|-----------|-----------|
| S            | causal j<=i | open      | closed    |
| U-side NS    | open        | open      | closed    |
| G-side NS    | open        | open      | open      |

``seq_feature_mixing=False`` closes the S<->NS off-diagonal blocks; ``ug_sep=False`` opens
U -> G. Padding S columns are never readable; a row may always read itself, so no row is empty.
After learned compression the S tokens are summaries without an order, so S -> S is open among
them; the pyramid keeps the newest original tokens, so S -> S stays causal.

``LayerMask`` holds the blocks of one layer once; the three layouts the backbone uses (the user
pass, candidates reading the cached user side, and the joint reference sequence) are read off
it, so the cached and the reference paths cannot disagree about who reads whom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerMask:
    """Mask blocks of one layer for B requests of C candidates.

    ``seq_keys``: [B, n_in] valid S columns; the S queries are the newest ``n_out`` of them.
    The candidate layouts take ``cand_seq``: [B, C, n_in], the S columns each candidate's G
    tokens may read (validity, core-behaviour selection and the S<->NS switch applied).
    """

    seq_keys: torch.Tensor
    n_out: int
    ordered: bool
    n_user: int
    n_item: int
    seq_feature_mixing: bool
    ug_sep: bool

    def _seq_rows(self) -> torch.Tensor:
        """[B, n_out, n_in]: S queries over S keys."""
        b, n_in = self.seq_keys.shape
        device = self.seq_keys.device
        rows = torch.arange(n_in - self.n_out, n_in, device=device)[:, None]
        cols = torch.arange(n_in, device=device)[None, :]
        allowed = self.seq_keys[:, None, :].expand(b, self.n_out, n_in)
        if self.ordered:
            allowed = allowed & (cols <= rows)
        return allowed | (cols == rows)

    def user(self) -> torch.Tensor:
        """[B, n_out + P_u, n_in + P_u]: the user pass (rows and columns: S then U-side NS)."""
        b, n_in = self.seq_keys.shape
        mix = self.seq_feature_mixing
        seq_to_user = self.seq_keys.new_full((b, self.n_out, self.n_user), mix)
        user_to_seq = self.seq_keys[:, None, :].expand(b, self.n_user, n_in)
        if not mix:
            user_to_seq = torch.zeros_like(user_to_seq)
        user_to_user = self.seq_keys.new_ones((b, self.n_user, self.n_user))
        top = torch.cat([self._seq_rows(), seq_to_user], dim=2)
        bottom = torch.cat([user_to_seq, user_to_user], dim=2)
        return torch.cat([top, bottom], dim=1)

    def candidate_user(self, cand_seq: torch.Tensor) -> torch.Tensor:
        """[B, C, n_in + P_u]: the user-side columns one candidate's G tokens may read."""
        b, c, _ = cand_seq.shape
        return torch.cat([cand_seq, cand_seq.new_ones((b, c, self.n_user))], dim=2)

    def joint(self, cand_seq: torch.Tensor) -> torch.Tensor:
        """[B*C, n_out + P_u + P_g, n_in + P_u + P_g]: one sequence [S | U | G] per candidate."""
        b, c, _ = cand_seq.shape
        user = self.user()
        user_rows = user.shape[1]
        user_to_item = self.seq_keys.new_zeros((b, user_rows, self.n_item))
        user_to_item[:, self.n_out :, :] = not self.ug_sep
        top = torch.cat([user, user_to_item], dim=2)
        top = top[:, None].expand(b, c, *top.shape[1:])
        item_rows = torch.cat(
            [self.candidate_user(cand_seq), cand_seq.new_ones((b, c, self.n_item))], dim=2
        )
        item_rows = item_rows[:, :, None, :].expand(b, c, self.n_item, item_rows.shape[-1])
        return torch.cat([top, item_rows], dim=2).flatten(0, 1)
