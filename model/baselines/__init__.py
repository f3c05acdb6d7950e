"""Baselines of the evaluation protocol (docs/model.md), on the backbone's featurization and head.

- ``DeepFM``: no sequence; FM second-order term plus the deep head over the field tokens.
- ``DIN``: target attention of the candidate over the history, one interest vector.
- ``SASRecDCN``: a causal self-attention encoder compresses the history to one vector, then
  DCNv2 cross layers mix it with the field tokens ("compress first, then interact").

Each follows ``UniRecModel``'s contract ``forward(user, cands) -> {task: logits [B, C]}``,
names its ``kind``, and has ``cfg.use_state == False``, so ``train_step``/``fit``/``predict``
apply unchanged.
"""

from model.baselines.deepfm import DeepFM
from model.baselines.din import DIN
from model.baselines.sasrec_dcn import SASRecDCN
from model.kinds import SERVING_KINDS, ModelKinds

MODEL_KINDS: ModelKinds = {**SERVING_KINDS, DeepFM.kind: DeepFM, DIN.kind: DIN,
                           SASRecDCN.kind: SASRecDCN}
"""Every kind a run can train and evaluate (``unirec train --model KIND``)."""

__all__ = ["DIN", "MODEL_KINDS", "DeepFM", "SASRecDCN"]
