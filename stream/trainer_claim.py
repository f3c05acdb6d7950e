"""One trainer per versions directory and per ``model-updates`` topic: detected, refused.

Two trainers on one topic race: each numbers and announces its own versions, workers flip
between them (v19 -> v18 -> v20 ...) and every flip marks every user state stale. Two guards,
because they cover different mistakes:

1. ``VersionsLock``: an exclusive ``flock`` on ``<versions_dir>/trainer.lock``, taken before
   the trainer writes anything there (also before it publishes its starting model) and held
   for the life of the process. The kernel frees it however the process ends (exit, crash,
   SIGKILL, a stopped container), so there is no lease to expire and no stale claim to clean
   up, and two live holders are impossible: the same mechanism ``deploy/claim_slot.py`` uses
   on the volume the compose replicas share. A second trainer on the directory gets
   ``TrainerClaimError`` naming the holder (its id, pid and host, written into the lock
   file); ``unirec trainer`` then exits with status 2 and that line. ``flock`` needs every
   holder on one kernel (one host, or a file system that supports it).

2. ``RivalWatch``: trainers whose versions directories differ (another host, another volume)
   share only the topic. Every announcement carries the trainer's id (a uuid per process) and
   its start time (``TrainerIdentity``). Before each publish the trainer reads what was
   announced on ``model-updates`` since it started; an announcement from another trainer
   that outranks it (started earlier; equal starts broken by the smaller id; an announcement
   without an id, from a trainer that cannot yield, always outranks) raises
   ``TrainerConflict``: the learner stops publishing (logged, counted) and leaves the topic
   to the other, which keeps publishing. Both sides compare the same two (start, id) pairs,
   so exactly one yields, whoever announced first; a trainer that has gone quiet blocks no
   one. Until the younger trainer reads the elder's next announcement it may publish a few
   versions; workers never roll back for them, because they refuse any version not newer
   than the one serving (``stream.model_updates``), and the elder numbers its next version
   above every version it has seen announced (``RivalWatch.check``), so its versions move
   forward again for every worker.

Why not only one of them: the lock alone misses trainers that do not share the directory; the
topic alone cannot see a rival that has not announced yet, and would let a second trainer
publish its starting model into a shared directory before it noticed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from stream.model_updates import ModelUpdate, UpdateListener

log = logging.getLogger(__name__)

LOCK_NAME = "trainer.lock"


class TrainerClaimError(RuntimeError):
    """Another live trainer holds the versions directory."""


class TrainerConflict(RuntimeError):
    """Another trainer, which outranks this one, announces on ``model-updates``."""


@dataclass(frozen=True)
class TrainerIdentity:
    """A trainer process: a fresh uuid and the wall-clock time it started."""

    trainer_id: str
    started: float

    @classmethod
    def new(cls) -> TrainerIdentity:
        return cls(uuid.uuid4().hex, time.time())

    def outranked_by(self, update: ModelUpdate) -> bool:
        """Whether the trainer that announced ``update`` keeps the topic and this one yields:
        it started earlier (ties: the smaller id), or it announces no id (it cannot yield)."""
        if update.trainer == self.trainer_id:
            return False
        if not update.trainer:
            return True
        return (update.trainer_started, update.trainer) < (self.started, self.trainer_id)


class VersionsLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/trainer.lock`` (module docstring,
    guard 1), held until ``close`` or the end of the process."""

    def __init__(self, directory: Path, identity: TrainerIdentity) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainerClaimError(
                f"another trainer ({holder}) holds {self.path}: one trainer per versions "
                "directory; stop it, or give this one another --versions-dir and topic prefix"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"trainer {identity.trainer_id}, pid {os.getpid()}, host "
                      f"{socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RivalWatch:
    """Reads ``model-updates`` from the trainer's start (module docstring, guard 2); call
    ``check`` from one thread (the learner's) before each publish."""

    def __init__(self, listener: UpdateListener, identity: TrainerIdentity) -> None:
        self.listener = listener
        self.identity = identity
        self.newest = 0  # the largest version announced since the start, by anyone
        self.conflict: str | None = None
        self._younger: set[str] = set()

    def check(self) -> int:
        """The smallest version number this trainer may publish next (one more than any
        announced since its start). Raises ``TrainerConflict`` once an outranking trainer has
        announced, and on every call after."""
        for update in self.listener.poll():
            self.newest = max(self.newest, update.version)
            if update.trainer == self.identity.trainer_id:
                continue
            if self.identity.outranked_by(update):
                if self.conflict is None:
                    self.conflict = (
                        f"trainer {update.trainer or '(no id)'} (started "
                        f"{update.trainer_started:.3f}) announces version {update.version} on "
                        f"model-updates; this trainer {self.identity.trainer_id} (started "
                        f"{self.identity.started:.3f}) yields")
            elif update.trainer not in self._younger:
                self._younger.add(update.trainer)
                log.warning("trainer %s (started later) also announces on model-updates "
                            "(version %d); it yields to this one", update.trainer,
                            update.version)
        if self.conflict is not None:
            raise TrainerConflict(self.conflict)
        return self.newest + 1

    def close(self) -> None:
        self.listener.close()
