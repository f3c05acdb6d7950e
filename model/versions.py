"""A directory of numbered model versions: ``v00000001.pt``, ``v00000002.pt``, ...

One publisher per directory (the online trainer) writes each version with ``checkpoint.save``
(temporary file in the same directory, fsync, rename), so a reader never sees a partial file
under a version name, and a crash mid-save leaves the previous versions as they were. Any
number of readers (scorers) ask for ``latest()`` and ``load(version)``; a version file that is
not a readable checkpoint (damaged after the fact, or written by something else) is skipped
with one error log line per file, never loaded. ``load(version, expect=signature)`` also
refuses a readable version of another model (``model.signature``) before building it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from model import checkpoint
from model.backbone import UniRecModel
from model.checkpoint import CheckpointError
from model.signature import ModelSignature

log = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{8})\.pt$")


class VersionStore:
    """Versions in ``directory`` (created if missing); the publisher keeps the newest ``keep``.

    Version numbers start at 1 and only grow, also across restarts (the next is one more than
    the largest file name present, readable or not, or more: ``publish(at_least=...)``).
    """

    def __init__(self, directory: Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be positive, got {keep}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._checked: dict[int, tuple[int, int, bool]] = {}  # version -> (size, mtime_ns, ok)

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.pt"

    def versions(self) -> list[int]:
        """Version numbers with a file present, ascending (readable or not)."""
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def publish(self, model: UniRecModel, meta: dict[str, Any] | None = None,
                at_least: int = 1) -> int:
        """Save ``model`` as the next version (its number is added to ``meta`` as "version"),
        then prune to the newest ``keep`` versions and remove temporary files left by crashed
        saves. Returns the version: one more than the largest present, and at least
        ``at_least`` (a publisher that has seen version N announced elsewhere passes N + 1,
        so that its versions move forward for readers that serve N)."""
        version = max(max(self.versions(), default=0) + 1, at_least)
        checkpoint.save(model, self.path(version), {**(meta or {}), "version": version})
        for old in self.versions()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
            self._checked.pop(old, None)
        for leftover in self.directory.glob(".v*.pt.*.tmp"):
            leftover.unlink(missing_ok=True)
        return version

    def load(self, version: int, device: torch.device | str = "cpu",
             expect: ModelSignature | None = None) -> tuple[UniRecModel, dict[str, Any]]:
        """The model of ``version`` (eval mode) and its metadata; ``CheckpointError`` if the
        file is missing or unreadable, ``IncompatibleVersion`` if ``expect`` is given and the
        version's signature differs (checked before the model is built)."""
        return checkpoint.load(self.path(version), device, expect=expect)

    def _readable(self, version: int) -> bool:
        """Whether ``version`` loads; remembered per (size, mtime) so each file is read (and a
        bad one logged) once."""
        path = self.path(version)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        known = self._checked.get(version)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        try:
            checkpoint.load(path)
            ok = True
        except CheckpointError as exc:
            log.error("skipping model version %d: %s", version, exc)
            ok = False
        self._checked[version] = (stat.st_size, stat.st_mtime_ns, ok)
        return ok

    def latest(self) -> tuple[int, Path] | None:
        """The newest readable version and its path, or None if there is none."""
        for version in reversed(self.versions()):
            if self._readable(version):
                return version, self.path(version)
        return None
