"""Saving and loading a model with its kind, config, feature spec and signature, as one file.

A file without a ``kind`` (written before baselines existed) holds a ``"unirec"`` model. The
``signature`` (``model.signature``: kind, checked config, feature-spec fingerprint, state
width) is recorded at save; a file written before that has its signature derived from the
kind, config and spec it holds, and a recorded signature that disagrees with them makes the
file unreadable. ``load(..., expect=...)`` checks the signature before any weights are built.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import FeatureSpec
from model.kinds import SERVING_KINDS, ModelKinds, build_model, kind_of
from model.signature import IncompatibleVersion, ModelSignature, signature_from, signature_of

FORMAT = 1


class CheckpointError(ValueError):
    """A file that is not a readable unirec checkpoint."""


def save(model: nn.Module, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write atomically and durably: the bytes go to a temporary file in the same directory
    (``.{name}.*.tmp``), are fsynced, and the file is renamed over ``path`` (then the directory
    is fsynced). A crash at any point leaves ``path`` as it was, or complete; at worst a
    temporary file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(
                {
                    "format": FORMAT,
                    "kind": kind_of(model),
                    "config": model.cfg.to_dict(),
                    "spec": model.spec.to_dict(),
                    "signature": signature_of(model).to_dict(),
                    "state_dict": model.state_dict(),
                    "meta": meta or {},
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(
    path: Path, device: torch.device | str = "cpu", kind: str | None = "unirec",
    expect: ModelSignature | None = None, kinds: ModelKinds = SERVING_KINDS,
) -> tuple[UniRecModel, dict[str, Any]]:
    """The model (in eval mode) and the metadata saved with it.

    ``kind``: the model kind the caller needs (the stream needs ``"unirec"``); a file of
    another kind raises ``CheckpointError``. ``None`` accepts every kind in ``kinds``, the
    registry the caller knows (default: UniRec alone; offline evaluation passes
    ``model.baselines.MODEL_KINDS``).
    ``expect``: the signature the model must have; a readable file of another signature
    raises ``IncompatibleVersion`` (its ``reason`` names the difference) before the model is
    built or its weights are read into it. Anything unreadable, and weights holding NaN or
    infinity (every state and score would come out NaN), raise ``CheckpointError``.
    """
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {data.get('format')!r}")
        found = data.get("kind", "unirec")
        if not isinstance(found, str):
            raise CheckpointError(f"{path} names no model kind")
        cfg, spec = ModelConfig.from_dict(data["config"]), FeatureSpec.from_dict(data["spec"])
        signature = signature_from(found, cfg, spec)
        if "signature" in data and ModelSignature.from_dict(data["signature"]) != signature:
            raise CheckpointError(f"{path}: its recorded signature does not match its "
                                  "kind, config and feature spec")
        if expect is not None:
            expect.check(signature)
        if found not in kinds:
            raise CheckpointError(f"{path} holds a model kind this program does not know: "
                                  f"{found!r} (known: {', '.join(kinds)})")
        if kind not in (None, found):
            raise CheckpointError(f"{path} holds a {found!r} model, not {kind!r}")
        model = build_model(found, cfg, spec, kinds)
        model.load_state_dict(data["state_dict"])
        broken = next((name for name, tensor in model.state_dict().items()
                       if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if broken is not None:
            raise CheckpointError(f"{path}: weight {broken!r} holds NaN or infinity")
    except (CheckpointError, IncompatibleVersion):
        raise
    except Exception as exc:
        # A corrupt or hostile file may raise anything (torch's weights-only unpickler raises
        # IndexError on some bytes): whatever it is, the file is unreadable, never a crash.
        raise CheckpointError(f"{path} is not a readable unirec checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), data["meta"]
