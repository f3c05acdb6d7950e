"""The ``feedback`` topic's record: one per label the worker joins (docs/system.md, "Topics").

The worker publishes a ``Feedback`` for every joined (scored impression, label), keyed by user
id, through its ``Publisher`` (``stream.handlers.handle_labels``); the fleet monitor
(``stream.monitor``) reads them from every worker. ``p_dynamic``/``p_static``: the live model's
and the static twin's probabilities the impression was served with (``p_static`` None without
a twin); ``model_version``: the live version that scored it; ``ts``: event time, seconds: the
label's stream time at the join (its broker timestamp, bounded by the worker's clock).

Every field is bounded by what the worker admits (ids within ``RecordLimits``), so a record is
a few hundred bytes, far under any broker's message limit.
"""

from __future__ import annotations

import math

import msgspec

from stream.serving import JoinedExample


class Feedback(msgspec.Struct, frozen=True):
    """One joined label with both models' probabilities (module docstring)."""

    request_id: str
    user_id: str
    item_id: str
    label: int
    p_dynamic: float
    p_static: float | None
    model_version: int
    ts: float

    def encode(self) -> bytes:
        return _encoder.encode(self)

    def violation(self) -> str | None:
        """Why the record cannot be aggregated (None if it can): probabilities outside [0, 1]
        or not finite, a label other than 0/1, a non-finite or negative time."""
        if self.label not in (0, 1):
            return f"label {self.label} is not 0 or 1"
        for name, p in (("p_dynamic", self.p_dynamic), ("p_static", self.p_static)):
            if p is not None and not (math.isfinite(p) and 0.0 <= p <= 1.0):
                return f"{name} {p!r} is not a probability"
        if not (math.isfinite(self.ts) and self.ts >= 0):
            return f"ts {self.ts!r} is not a time"
        return None


_encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(Feedback)


def feedback_of(example: JoinedExample, at: float) -> Feedback:
    """The ``Feedback`` of a joined example, at stream time ``at`` (seconds)."""
    label = example.label
    return Feedback(
        request_id=label.request_id, user_id=label.user_id, item_id=label.item_id,
        label=int(label.label), p_dynamic=float(example.score),
        p_static=None if example.static_score is None else float(example.static_score),
        model_version=int(example.model_version), ts=float(at),
    )
