"""Saving and loading a model with its config and feature spec, as one file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import FeatureSpec

FORMAT = 1


class CheckpointError(ValueError):
    """A file that is not a readable unirec checkpoint."""


def save(model: UniRecModel, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write atomically: a crash leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "config": model.cfg.to_dict(),
            "spec": model.spec.to_dict(),
            "state_dict": model.state_dict(),
            "meta": meta or {},
        },
        tmp,
    )
    tmp.replace(path)


def load(path: Path, device: torch.device | str = "cpu") -> tuple[UniRecModel, dict[str, Any]]:
    """The model (in eval mode) and the metadata saved with it."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {data.get('format')!r}")
        cfg, spec = ModelConfig.from_dict(data["config"]), FeatureSpec.from_dict(data["spec"])
        model = UniRecModel(cfg, spec)
        model.load_state_dict(data["state_dict"])
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, RuntimeError,
            AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable unirec checkpoint: {exc}") from exc
    return model.to(device).eval(), data["meta"]
