"""The model kinds a run can train (``unirec train --model KIND``), by name.

Every kind is built as ``cls(cfg: ModelConfig, spec: FeatureSpec)`` and scores with
``forward(user, cands) -> {task: logits [B, C]}``.
"""

from __future__ import annotations

from torch import nn

from model.backbone import UniRecModel
from model.baselines import DIN, DeepFM, SASRecDCN
from model.config import ModelConfig
from model.features import FeatureSpec

MODEL_KINDS: dict[str, type[nn.Module]] = {
    "unirec": UniRecModel,
    "deepfm": DeepFM,
    "din": DIN,
    "sasrec-dcnv2": SASRecDCN,
}


def build_model(kind: str, cfg: ModelConfig, spec: FeatureSpec) -> nn.Module:
    """A new model of ``kind``; ``KeyError`` names the known kinds."""
    if kind not in MODEL_KINDS:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind](cfg, spec)


def kind_of(model: nn.Module) -> str:
    """The registered name of ``model``'s class."""
    for name, cls in MODEL_KINDS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model kind")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
