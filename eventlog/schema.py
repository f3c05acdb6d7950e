"""The event schema: the common language of every part of unirec-stream.

Structures are msgspec Structs. msgspec was chosen over pydantic because the stream decodes
every Kafka message with it: it validates while it decodes (one pass, in C, several times
faster than pydantic v2 on small JSON objects), its errors name the offending path
(``Expected `float`, got `str` - at `$.ts```), and Structs are light enough to build by the
million in the data loaders.

Feature and context maps (``item_features``, ``context``) map a field name to a
``FeatureValue``:

- ``str``: a categorical value, e.g. ``{"device": "ios"}``;
- ``list[str]``: a multi-valued categorical (a bag), e.g. ``{"genre": ["Action", "Drama"]}``;
- ``float`` (JSON numbers, integers included): a numeric value, e.g. ``{"price": 12.5}``.

Timestamps are seconds since the Unix epoch (float), between ``MIN_TS`` (1970) and ``MAX_TS``
(2100): an event time outside that range is not an event time, and one such value would put
an infinite age into a model's time encoding. Numbers must be finite: NaN and infinity are
rejected with an error naming the field. Ids are non-empty and hold no control character
(NUL included: the state store keys users by their id, and a control character in an id
is never data).

Use ``decode(kind, data)`` / ``encode(obj)`` for JSON; a malformed message raises
``SchemaError`` whose message says which field is wrong.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec

FeatureValue = str | float | list[str]
FeatureMap = dict[str, FeatureValue]


class SchemaError(ValueError):
    """A message that does not decode or validate; the message names the field."""


def _check_finite(where: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")


def _check_features(where: str, features: FeatureMap) -> None:
    for name, value in features.items():
        if not name:
            raise ValueError(f"{where} has an empty field name")
        if isinstance(value, float):
            _check_finite(f"{where}[{name!r}]", value)
        elif isinstance(value, int) and not isinstance(value, bool):
            features[name] = float(value)


MIN_TS = 0.0
"""The earliest event time accepted: 1970-01-01T00:00:00Z."""
MAX_TS = 4_102_444_800.0
"""The latest event time accepted: 2100-01-01T00:00:00Z."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_id(where: str, value: str) -> None:
    if not value:
        raise ValueError(f"{where} must be a non-empty string")
    if _CONTROL.search(value) is not None:
        raise ValueError(f"{where} must not contain control characters, got {value[:64]!r}")


def _check_ts(where: str, value: float) -> None:
    _check_finite(where, value)
    if not MIN_TS <= value <= MAX_TS:
        raise ValueError(f"{where} must be seconds since the epoch in [{MIN_TS:.0f}, "
                         f"{MAX_TS:.0f}] (1970-2100), got {value!r}")


class Interaction(msgspec.Struct, forbid_unknown_fields=True):
    """One user action on one item, at time ``ts``; the unit of a user's history."""

    event_id: str
    user_id: str
    item_id: str
    action: str
    ts: float
    item_features: FeatureMap = msgspec.field(default_factory=dict)
    context: FeatureMap = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id("event_id", self.event_id)
        _check_id("user_id", self.user_id)
        _check_id("item_id", self.item_id)
        _check_id("action", self.action)
        _check_ts("ts", self.ts)
        _check_features("item_features", self.item_features)
        _check_features("context", self.context)


class Candidate(msgspec.Struct, forbid_unknown_fields=True):
    """An item offered in an impression, with its item-side features."""

    item_id: str
    item_features: FeatureMap = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id("item_id", self.item_id)
        _check_features("item_features", self.item_features)


class Impression(msgspec.Struct, forbid_unknown_fields=True):
    """A request to rank ``candidates`` for ``user_id`` at time ``ts`` in ``context``."""

    request_id: str
    user_id: str
    ts: float
    candidates: list[Candidate]
    context: FeatureMap = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_id("user_id", self.user_id)
        _check_ts("ts", self.ts)
        if not self.candidates:
            raise ValueError("candidates must hold at least one candidate")
        _check_features("context", self.context)


class Label(msgspec.Struct, forbid_unknown_fields=True):
    """The observed outcome (0 or 1) of showing ``item_id`` in request ``request_id``."""

    request_id: str
    user_id: str
    item_id: str
    label: int
    ts: float

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_id("user_id", self.user_id)
        _check_id("item_id", self.item_id)
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r}")
        _check_ts("ts", self.ts)


class UserProfile(msgspec.Struct, forbid_unknown_fields=True):
    """Static user-side categorical fields (age bucket, gender, ...)."""

    user_id: str
    features: dict[str, str | int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id("user_id", self.user_id)


Message = Interaction | Impression | Label | UserProfile
M = TypeVar("M", Interaction, Impression, Label, UserProfile)

_decoders: dict[type, msgspec.json.Decoder] = {}
_encoder = msgspec.json.Encoder()


def decode(kind: type[M], data: bytes | str) -> M:
    """Decode one JSON message into ``kind``; raise ``SchemaError`` naming the bad field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SchemaError(f"invalid {kind.__name__}: {exc}") from None


def encode(message: Message) -> bytes:
    """Encode one message as compact JSON bytes."""
    return _encoder.encode(message)


def to_builtins(message: Message) -> dict[str, Any]:
    """The message as plain dicts and lists (for JSON APIs and tables)."""
    return msgspec.to_builtins(message)
