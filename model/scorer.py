"""Scoring requests: the user side once, all candidates against its cache in one batch.

``score_many`` scores B impressions per model call (those with the same candidate count C run
together: ``encode_user`` over B users, then B x C candidates); ``score`` is its B = 1 case.
Runs on CUDA with bf16 autocast when a GPU is present, on the CPU in fp32 otherwise: the same
code either way. With ``quantize="w8a16"`` (UG-Sep's serving form, ``model.quantize``) the
candidates are scored by an int8-weight copy of the model whose matmuls run in bf16 where the
device computes bf16 natively (``model.quantize.native_bf16``), the rest in fp32 on the CPU;
``model`` stays the fp32 model (the applier's user states, the online learner's copy, hot swaps).
``score_reference`` runs the full joint sequence per candidate (no reuse) and
exists to check and to measure the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eventlog.schema import Impression, Interaction, UserProfile
from model.backbone import UniRecModel
from model.features import CandidateInputs, Featurizer, UserInputs
from model.quantize import QUANTIZATION_MODES, quantize_w8a16


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEFAULT_MAX_BATCH = 64
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.02  # bf16 keeps 8 mantissa bits through the layers


def score_tolerance(device: torch.device) -> float:
    """How far a probability ``Scorer`` serves on ``device`` may lie from the fp32 offline
    computation of the same inputs (``model.training.predict``) and still be the same score:
    1e-4 where the scorer computes in fp32 (the CPU), 0.02 under CUDA's bf16 autocast."""
    return BF16_TOLERANCE if device.type == "cuda" else FP32_TOLERANCE


class Scorer:
    """Click probabilities for the candidates of impressions.

    ``state`` is the user's GRU state u_t ([d] float; zeros for a new user or None); ``history``
    the user's recent events, oldest first (the S tokens read the newest ``history_len``, the
    candidates' affinity the newest ``affinity_len``: ``ModelConfig.stored_events`` in all).
    ``score_many`` runs impressions with the same candidate count together, at most
    ``max_batch`` per model call. ``quantize``: "none" (the model as given) or "w8a16" (an
    int8-weight copy, bf16 matmuls where native, scores the candidates).
    """

    def __init__(self, model: UniRecModel, device: torch.device | None = None,
                 task: str = "click", max_batch: int = DEFAULT_MAX_BATCH,
                 quantize: str = "none") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        if quantize not in QUANTIZATION_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZATION_MODES}, got {quantize!r}")
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.quantize = quantize
        self.serving: UniRecModel = (
            quantize_w8a16(self.model) if quantize == "w8a16" else self.model  # type: ignore[assignment]
        )
        self.featurizer = Featurizer(model.spec)
        self.task = task
        self.max_batch = max_batch

    def batch_inputs(
        self,
        impressions: Sequence[Impression],
        histories: Sequence[Sequence[Interaction]],
        profiles: Sequence[UserProfile | None],
        states: Sequence[np.ndarray | None],
    ) -> tuple[UserInputs, CandidateInputs]:
        """Model inputs of B impressions with one candidate count C, on the scorer's device:
        ``UserInputs`` of batch B and ``CandidateInputs`` [B, C]. A None state is zeros."""
        d = self.model.cfg.d_model
        stacked = np.zeros((len(impressions), d), dtype=np.float32)
        for b, state in enumerate(states):
            if state is None:
                continue
            if state.shape != (d,):
                raise ValueError(f"state has shape {state.shape}, the model expects ({d},)")
            stacked[b] = state
        cfg = self.model.cfg
        user, cands = self.featurizer.requests(
            impressions, histories, profiles, stacked, cfg.history_len, cfg.affinity_len
        )
        return user.to(self.device), cands.to(self.device)

    def inputs(
        self,
        impression: Impression,
        history: Sequence[Interaction],
        profile: UserProfile | None,
        state: np.ndarray | None,
    ) -> tuple[UserInputs, CandidateInputs]:
        """``batch_inputs`` of one impression (B = 1)."""
        return self.batch_inputs([impression], [history], [profile], [state])

    def _autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA (fp32 on the CPU, where W8A16's own matmuls pick bf16)."""
        enabled = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def batches(self, impressions: Sequence[Impression]) -> list[list[int]]:
        """The model calls ``score_many`` makes: lists of indices into ``impressions``, each of
        one candidate count and at most ``max_batch`` long. Every index appears once, in input
        order within a batch; candidate counts come in the order they first appear."""
        groups: dict[int, list[int]] = {}
        for i, impression in enumerate(impressions):
            groups.setdefault(len(impression.candidates), []).append(i)
        return [
            group[k : k + self.max_batch]
            for group in groups.values()
            for k in range(0, len(group), self.max_batch)
        ]

    @torch.no_grad()
    def score_batch(
        self,
        impressions: Sequence[Impression],
        histories: Sequence[Sequence[Interaction]],
        profiles: Sequence[UserProfile | None],
        states: Sequence[np.ndarray | None],
        reference: bool = False,
    ) -> np.ndarray:
        """[B, C] probabilities of B impressions with one candidate count C, in one model call.

        The user sides run once (encode_user over B) and the B x C candidates read the cache
        (under UG-Sep); with ``reference`` (or with UG-Sep off) every candidate runs the full
        joint sequence. Row b is impression b, in the order of its candidates.
        """
        user, cands = self.batch_inputs(impressions, histories, profiles, states)
        with self._autocast():
            model = self.serving
            if model.cfg.ug_sep and not reference:
                logits = model.score(model.encode_user(user), cands)
            else:
                logits = model.reference(user, cands)
        return torch.sigmoid(logits[self.task].float()).cpu().numpy()

    def score_many(
        self,
        impressions: Sequence[Impression],
        histories: Sequence[Sequence[Interaction]],
        profiles: Sequence[UserProfile | None],
        states: Sequence[np.ndarray | None] | None = None,
        reference: bool = False,
    ) -> list[np.ndarray]:
        """One [C_i] probability array per impression, in input order.

        ``histories``, ``profiles`` and ``states`` (None: all zeros) are per impression.
        One ``score_batch`` call per entry of ``batches`` (impressions grouped by candidate
        count); each result equals scoring the impression alone, to float tolerance.
        """
        states = [None] * len(impressions) if states is None else states
        out: list[np.ndarray] = [np.empty(0)] * len(impressions)
        for batch in self.batches(impressions):
            probs = self.score_batch(
                [impressions[i] for i in batch], [histories[i] for i in batch],
                [profiles[i] for i in batch], [states[i] for i in batch], reference,
            )
            for row, i in enumerate(batch):
                out[i] = probs[row]
        return out

    def score(
        self,
        impression: Impression,
        history: Sequence[Interaction] = (),
        profile: UserProfile | None = None,
        state: np.ndarray | None = None,
        reference: bool = False,
    ) -> np.ndarray:
        """[C] probabilities, in the order of ``impression.candidates``: ``score_many`` of one
        impression."""
        return self.score_many([impression], [history], [profile], [state], reference)[0]

    def score_reference(
        self,
        impression: Impression,
        history: Sequence[Interaction] = (),
        profile: UserProfile | None = None,
        state: np.ndarray | None = None,
    ) -> np.ndarray:
        """Like ``score`` but one full joint pass per candidate."""
        return self.score(impression, history, profile, state, reference=True)
