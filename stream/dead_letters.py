"""Consumed records, their decoding, and the dead letters of those that do not decode.

Every topic the worker consumes is keyed by user id and carries one JSON message of the event
schema (``eventlog.schema``) per record. ``decode_records`` splits a partition's records into
the messages that decode, validate and match their key, and ``DeadLetter``s naming why each
other record was rejected. Bad input is never dropped silently and never stops the worker:
the caller publishes the dead letters to the ``dead-letters`` topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from eventlog.schema import M, SchemaError, decode


class ConsumedRecord(NamedTuple):
    """One record as consumed from a partition: its offset, raw key and raw value."""

    offset: int
    key: bytes | None
    value: bytes


class DeadLetter(msgspec.Struct, frozen=True):
    """A rejected record, where it came from, and why. ``key`` and ``value`` are the raw bytes
    (base64 in JSON)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str

    def encode(self) -> bytes:
        """The ``dead-letters`` payload (JSON)."""
        return _encoder.encode(self)


_encoder = msgspec.json.Encoder()


def check_offsets(records: Sequence[ConsumedRecord], last_offset: int) -> None:
    """Raise ``ValueError`` unless the offsets are non-negative, strictly increasing and at
    most ``last_offset`` (a caller's bug, not bad input)."""
    previous = -1
    for record in records:
        if record.offset <= previous:
            raise ValueError(
                f"record offsets must be non-negative and strictly increasing: "
                f"{record.offset} after {previous}"
            )
        previous = record.offset
    if previous > last_offset:
        raise ValueError(f"last_offset {last_offset} is below record offset {previous}")


def decode_records(
    kind: type[M], topic: str, partition: int, records: Sequence[ConsumedRecord]
) -> tuple[list[tuple[int, M]], list[DeadLetter]]:
    """Decode ``records`` as ``kind`` messages: ((offset, message) in input order, dead letters).

    A record is rejected when its value is not a valid ``kind`` (bad JSON, a missing or
    mistyped field, a non-finite number, ...) or when it has a key that is not the message's
    ``user_id`` (the partitioning would be wrong: the user's events could be split across
    partitions and applied out of order).
    """
    messages: list[tuple[int, M]] = []
    dead: list[DeadLetter] = []
    for offset, key, value in records:
        try:
            message = decode(kind, value)
        except SchemaError as exc:
            reason = str(exc)
        else:
            reason = _key_mismatch(key, message.user_id)
        if reason is None:
            messages.append((offset, message))
        else:
            dead.append(DeadLetter(topic, partition, offset, key, bytes(value), reason))
    return messages, dead


def _key_mismatch(key: bytes | None, user_id: str) -> str | None:
    """Why ``key`` cannot be the key of a message of ``user_id``, or None if it can."""
    if key is None:
        return None
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return f"record key {key!r} is not utf-8; it must be the user_id {user_id!r}"
    if text != user_id:
        return f"record key {text!r} differs from the message's user_id {user_id!r}"
    return None
