"""Settings from flags and environment variables, in one place.

Environment: ``UNIREC_DATA_DIR`` (data cache, default ``~/.cache/unirec``), ``UNIREC_RUN_DIR``
(checkpoints, default ``./runs``), ``UNIREC_DEVICE`` (``auto``, ``cpu`` or ``cuda``).
Flags given on the command line win over the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from eventlog.movielens import default_data_dir


class SettingsError(ValueError):
    """A setting with a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    run_dir: Path
    device: str = "auto"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env["UNIREC_DATA_DIR"]) if env.get("UNIREC_DATA_DIR") else None
        return cls(
            data_dir=data_dir or default_data_dir(),
            run_dir=Path(env.get("UNIREC_RUN_DIR") or "runs"),
            device=env.get("UNIREC_DEVICE") or "auto",
        )

    def torch_device(self) -> torch.device:
        """The device to run on: ``auto`` takes CUDA when present."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise SettingsError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("device cuda was asked for, but torch sees no CUDA device")
        return torch.device(self.device)

    def checkpoint_path(self, log_name: str) -> Path:
        return self.run_dir / log_name / "model.pt"
