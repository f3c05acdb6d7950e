"""Named points where the worker can be made to die at once, as a power cut would kill it.

The exactly-once rule is a claim about crashes at any point; a crash test needs to hit the
points that matter deterministically. ``crash_point(name)`` sends SIGKILL to its own process
when the environment variable ``UNIREC_CRASH_AT`` names that point (read once, at import), and
does nothing otherwise (one dictionary lookup). Points:

- ``after-dead-letters``: the applier has published (and flushed) a batch's dead letters, and
  has not yet written the batch's states and offset.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset({"after-dead-letters"})
_ARMED = os.environ.get("UNIREC_CRASH_AT")


def crash_point(name: str) -> None:
    """Die by SIGKILL here if ``UNIREC_CRASH_AT`` is ``name``."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {sorted(POINTS)}")
    if name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
