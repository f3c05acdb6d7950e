"""What a model version must share with the model a worker serves to be swapped in.

A ``ModelSignature`` names four things; a version that differs in any of them cannot replace
the serving model without breaking something outside the weights:

- ``kind``: the model class (``model.kinds``); the stream scores ``"unirec"`` models;
- ``config``: the ``ModelConfig`` fields that change parameter shapes or what the model
  computes (every field but ``dropout``, which is off when serving);
- ``spec``: a fingerprint (SHA-256 of the canonical JSON) of the ``FeatureSpec``: another
  spec hashes ids and fields into other rows and standardises numbers differently. The
  labels the online learner counts into the spec's online item-rate table are left out:
  they change as the model learns, like its weights (``model.features``);
- ``state_width``: the length of the GRU user state (``d_model``), which the state store's
  ``state_dim`` must equal.

``checkpoint.save`` records the signature in the file; for a file written before that, it is
derived from the kind, config and spec the file holds (``signature_from``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from model.config import ModelConfig
from model.features import ONLINE_RATE_FIELDS, FeatureSpec
from model.kinds import kind_of

# Fields of ModelConfig that change neither a shape nor the served function.
UNCHECKED_CONFIG_FIELDS = frozenset({"dropout"})


class IncompatibleVersion(ValueError):
    """A model version whose signature differs from the one expected.

    ``reason``: which part differs first, in the order ``model_kind``, ``state_width``,
    ``feature_spec``, ``model_config`` (a short label, e.g. for a metric)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason.replace('_', ' ')} differs: {detail}")
        self.reason = reason


def spec_fingerprint(spec: FeatureSpec) -> str:
    """SHA-256 (hex) of the spec's canonical JSON without its online item-rate table: specs
    equal but for that table, equal fingerprints."""
    data = {k: v for k, v in spec.to_dict().items() if k not in ONLINE_RATE_FIELDS}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ModelSignature:
    """The kind, checked config fields, feature-spec fingerprint and state width of a model."""

    kind: str
    config: dict[str, Any]
    spec: str
    state_width: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": dict(self.config), "spec": self.spec,
                "state_width": self.state_width}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSignature:
        """Raises ``KeyError`` / ``TypeError`` / ``ValueError`` on anything else."""
        return cls(str(data["kind"]), dict(data["config"]), str(data["spec"]),
                   int(data["state_width"]))

    def with_state_width(self, state_width: int) -> ModelSignature:
        """This signature expecting a state of ``state_width`` (e.g. the store's state_dim)."""
        return replace(self, state_width=state_width)

    def check(self, found: ModelSignature) -> None:
        """Raise ``IncompatibleVersion`` if ``found`` cannot replace a model of this
        signature; the message names the first difference."""
        if found.kind != self.kind:
            raise IncompatibleVersion("model_kind", f"{found.kind!r}, serving {self.kind!r}")
        if found.state_width != self.state_width:
            raise IncompatibleVersion(
                "state_width", f"{found.state_width}, serving {self.state_width}")
        if found.spec != self.spec:
            raise IncompatibleVersion(
                "feature_spec", f"fingerprint {found.spec[:12]}, serving {self.spec[:12]}")
        if found.config != self.config:
            keys = sorted(set(found.config) | set(self.config))
            diff = [f"{k}={found.config.get(k)!r} (serving {self.config.get(k)!r})"
                    for k in keys if found.config.get(k) != self.config.get(k)]
            raise IncompatibleVersion("model_config", ", ".join(diff))


def signature_from(kind: str, cfg: ModelConfig, spec: FeatureSpec) -> ModelSignature:
    """The signature of a model of ``kind`` built from ``cfg`` and ``spec``."""
    checked = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items()
               if k not in UNCHECKED_CONFIG_FIELDS}
    return ModelSignature(kind, checked, spec_fingerprint(spec), cfg.d_model)


def signature_of(model: nn.Module) -> ModelSignature:
    """The signature of a built model (one that names its ``kind``, ``model.kinds``)."""
    return signature_from(kind_of(model), model.cfg, model.spec)
