"""Model kinds by name: the ``kind`` a checkpoint records and a run trains.

Every kind is a class built as ``cls(cfg: ModelConfig, spec: FeatureSpec)`` that scores with
``forward(user, cands) -> {task: logits [B, C]}`` and names itself in its class attribute
``kind``. A registry (``ModelKinds``) maps names to classes; the caller chooses which it
knows: the serving path knows ``SERVING_KINDS`` (UniRec alone, so a worker never imports the
baselines), offline evaluation ``model.baselines.MODEL_KINDS`` (UniRec and the baselines).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import FeatureSpec

ModelKinds = Mapping[str, type[nn.Module]]

SERVING_KINDS: ModelKinds = {UniRecModel.kind: UniRecModel}


def build_model(kind: str, cfg: ModelConfig, spec: FeatureSpec,
                kinds: ModelKinds = SERVING_KINDS) -> nn.Module:
    """A new model of ``kind`` from ``kinds``; ``KeyError`` names the known kinds."""
    if kind not in kinds:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind](cfg, spec)


def kind_of(model: nn.Module) -> str:
    """The kind ``model`` names itself (its class attribute ``kind``)."""
    kind = getattr(type(model), "kind", None)
    if not isinstance(kind, str):
        raise KeyError(f"{type(model).__name__} names no model kind (class attribute `kind`)")
    return kind


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
