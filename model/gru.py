"""The GRU user state (docs/model.md, "The user state"), written out as its equations.

    z  = sigma(W_z e + U_z u + b_z)
    r  = sigma(W_r e + U_r u + b_r)
    h~ = tanh(W_h e + U_h (r * u) + b_h)
    u' = (1 - z) * u + z * h~

``e`` is the interaction embedding of the event (the backbone tokenizer's
E_item + E_action + Pool(content)), so updating a state needs no backbone pass.
``model.user_state`` is where states are computed with it.
"""

from __future__ import annotations

import torch
from torch import nn


class UserStateGRU(nn.Module):
    """u' = GRU(u, e) for a batch: e, u: [B, d] -> [B, d]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_gates = nn.Linear(d, 3 * d)  # W_z, W_r, W_h with b_z, b_r, b_h
        self.state_gates = nn.Linear(d, 2 * d, bias=False)  # U_z, U_r
        self.candidate_state = nn.Linear(d, d, bias=False)  # U_h

    def forward(self, e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.step(self.input_gates(e), u)

    def step(self, gates_e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One update from precomputed input gates ``gates_e`` = [W_z e, W_r e, W_h e] + b."""
        ez, er, eh = gates_e.chunk(3, dim=-1)
        uz, ur = self.state_gates(u).chunk(2, dim=-1)
        z = torch.sigmoid(ez + uz)
        r = torch.sigmoid(er + ur)
        h = torch.tanh(eh + self.candidate_state(r * u))
        return (1 - z) * u + z * h

    def unroll(self, events: torch.Tensor, valid: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        """Apply events [B, n, d] oldest first from u0 [B, d]; invalid ([B, n] False) steps keep
        the state. Returns the final state [B, d]."""
        u = u0
        # unbind, not gates[:, t]: its backward stacks the n step gradients once, where each
        # index's backward would write a zero-filled [B, n, 3d] gradient (half the unroll's time)
        for gates_t, valid_t in zip(self.input_gates(events).unbind(1), valid.unbind(1),
                                    strict=True):
            u = torch.where(valid_t[:, None], self.step(gates_t, u), u)
        return u
