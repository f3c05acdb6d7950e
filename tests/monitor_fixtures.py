"""Running ``unirec monitor`` as a subprocess in tests, and reading its inputs back.

- ``MonitorProcess``: ``python -m app.cli monitor --fresh --short-timeouts`` on a free
  127.0.0.1 port, its output in a log file; ``stop`` ends it by its PID.
- ``feedback_records(...)``: synthetic ``Feedback`` with probabilities that carry signal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from stream_fixtures import ServiceProcess, http_get

from stream.feedback import Feedback

REPO = Path(__file__).resolve().parents[1]


class MonitorProcess(ServiceProcess):
    """A monitor subprocess (fresh app id: no changelog recovery) on 127.0.0.1:``web_port``."""

    def __init__(self, bootstrap: str, data_dir: Path, log_path: Path, *, prefix: str = "",
                 partitions: int = 2, extra: tuple[str, ...] = ()) -> None:
        super().__init__(["monitor", "--bootstrap-servers", bootstrap, "--fresh",
                          "--short-timeouts", "--partitions", str(partitions),
                          "--topic-prefix", prefix, "--data-dir", str(data_dir), *extra],
                         log_path)

    def get(self, path: str) -> Any:
        """The JSON body of ``GET path`` (None when it does not answer 200)."""
        status, body = http_get(self.url + path, timeout_s=5.0)
        return json.loads(body) if status == 200 else None


def feedback_records(n: int, version: int, t0: float, spacing_s: float, seed: int,
                     prefix: str = "r") -> list[Feedback]:
    """``n`` feedback records of ``version`` from event time ``t0``, ``spacing_s`` apart; the
    live model's probabilities predict the labels, the twin's less so."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.random() < 0.3)
        p = float(np.clip(0.3 + (0.35 if y else -0.1) + rng.normal(0, 0.15), 0.001, 0.999))
        q = float(np.clip(0.3 + (0.1 if y else -0.02) + rng.normal(0, 0.15), 0.001, 0.999))
        out.append(Feedback(f"{prefix}{version}-{i}", f"u{i % 37}", f"i{i % 101}", y, p, q,
                            version, t0 + i * spacing_s))
    return out
