"""Scoring one request: the user side once, all candidates against its cache in one batch.

Runs on CUDA with bf16 autocast when a GPU is present, on the CPU in fp32 otherwise: the same
code either way. ``score_reference`` runs the full joint sequence per candidate (no reuse) and
exists to check and to measure the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eventlog.schema import Impression, Interaction, UserProfile
from model.backbone import UniRecModel
from model.features import CandidateInputs, Featurizer, UserInputs


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Scorer:
    """Click probabilities for the candidates of an impression.

    ``state`` is the user's GRU state u_t ([d] float; zeros for a new user); ``history`` the
    user's recent events, oldest first (only the newest ``history_len`` are read).
    """

    def __init__(self, model: UniRecModel, device: torch.device | None = None,
                 task: str = "click") -> None:
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.featurizer = Featurizer(model.spec)
        self.task = task

    def inputs(
        self,
        impression: Impression,
        history: Sequence[Interaction],
        profile: UserProfile | None,
        state: np.ndarray | None,
    ) -> tuple[UserInputs, CandidateInputs]:
        d = self.model.cfg.d_model
        state = np.zeros(d, dtype=np.float32) if state is None else state
        if state.shape != (d,):
            raise ValueError(f"state has shape {state.shape}, the model expects ({d},)")
        user, cands = self.featurizer.request(
            impression, history, profile, state, self.model.cfg.history_len
        )
        return user.to(self.device), cands.to(self.device)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )

    @torch.no_grad()
    def score(
        self,
        impression: Impression,
        history: Sequence[Interaction] = (),
        profile: UserProfile | None = None,
        state: np.ndarray | None = None,
        reference: bool = False,
    ) -> np.ndarray:
        """[C] probabilities, in the order of ``impression.candidates``.

        The user side runs once and the candidates read its cache (under UG-Sep); with
        ``reference`` (or with UG-Sep off) every candidate runs the full joint sequence.
        """
        user, cands = self.inputs(impression, history, profile, state)
        with self._autocast():
            if self.model.cfg.ug_sep and not reference:
                logits = self.model.score(self.model.encode_user(user), cands)
            else:
                logits = self.model.reference(user, cands)
        return torch.sigmoid(logits[self.task][0].float()).cpu().numpy()

    def score_reference(
        self,
        impression: Impression,
        history: Sequence[Interaction] = (),
        profile: UserProfile | None = None,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Like ``score`` but one full joint pass per candidate."""
        return self.score(impression, history, profile, state, reference=True)
