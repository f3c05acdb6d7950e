"""Consumed records, their decoding, and the dead letters of those that are rejected.

Every topic the worker consumes is keyed by user id and carries one JSON message of the event
schema (``eventlog.schema``) per record. ``decode_records`` splits a partition's records into
the messages that decode, validate and keep the ``RecordLimits`` (``stream.admission``: size,
key, ids, numbers, event time), and ``DeadLetter``s naming why each other record was rejected.
Bad input is never dropped silently and never stops the worker: the caller publishes the
dead letters to the ``dead-letters`` topic.

A dead letter is bounded whatever the record was: its payload is cut to
``DEAD_LETTER_PAYLOAD_BYTES`` (with the original length and SHA-256, so the record can be
found and told apart), its key to ``DEAD_LETTER_KEY_BYTES`` and its reason to
``DEAD_LETTER_REASON_CHARS``: its JSON is at most about 8 KB, far under the broker's limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from eventlog.schema import M, SchemaError, decode
from stream.admission import RecordLimits
from stream.records import ConsumedRecord

DEAD_LETTER_PAYLOAD_BYTES = 4096
DEAD_LETTER_KEY_BYTES = 256
DEAD_LETTER_REASON_CHARS = 1000


class DeadLetter(msgspec.Struct, frozen=True):
    """A rejected record, where it came from, and why (bounded: see the module docstring).

    ``key`` and ``value`` are the raw bytes (base64 in JSON), cut to their bounds;
    ``value_bytes`` and ``value_sha256`` are the whole value's length and hash.
    Build one with ``DeadLetter.of``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    value_bytes: int
    value_sha256: str
    reason: str

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
           reason: str) -> DeadLetter:
        """The bounded dead letter of the record (``key``, ``value``) and ``reason``."""
        value = bytes(value)
        if len(reason) > DEAD_LETTER_REASON_CHARS:
            reason = reason[:DEAD_LETTER_REASON_CHARS] + "..."
        return cls(topic, partition, offset,
                   None if key is None else bytes(key[:DEAD_LETTER_KEY_BYTES]),
                   value[:DEAD_LETTER_PAYLOAD_BYTES], len(value),
                   hashlib.sha256(value).hexdigest(), reason)

    def encode(self) -> bytes:
        """The ``dead-letters`` payload (JSON)."""
        return _encoder.encode(self)


_encoder = msgspec.json.Encoder()


def check_offsets(records: Sequence[ConsumedRecord], partition: int, last_offset: int
                  ) -> None:
    """Raise ``ValueError`` unless the records are of ``partition`` and their offsets are
    non-negative, strictly increasing and at most ``last_offset`` (a caller's bug, not bad
    input)."""
    previous = -1
    for record in records:
        if record.partition != partition:
            raise ValueError(f"a record of partition {record.partition} in a batch of "
                             f"partition {partition}")
        if record.offset <= previous:
            raise ValueError(
                f"record offsets must be non-negative and strictly increasing: "
                f"{record.offset} after {previous}"
            )
        previous = record.offset
    if previous > last_offset:
        raise ValueError(f"last_offset {last_offset} is below record offset {previous}")


def decode_records(
    kind: type[M], topic: str, records: Sequence[ConsumedRecord], limits: RecordLimits,
) -> tuple[list[tuple[int, M]], list[DeadLetter]]:
    """Decode ``records`` as ``kind`` messages: ((offset, message) in input order, dead letters).

    A record is rejected when its value is over ``limits.max_record_bytes``, is not a valid
    ``kind`` (bad JSON, a missing or mistyped field, a non-finite number, ...), has no key or
    a key that is not the message's ``user_id`` (the partitioning would be wrong: the user's
    events could be split across partitions and applied out of order), or breaks another of
    the ``limits`` (``RecordLimits.violation``).
    """
    messages: list[tuple[int, M]] = []
    dead: list[DeadLetter] = []
    for record in records:
        reason, message = _admit(kind, record.key, record.value, record.timestamp, limits)
        if reason is None:
            messages.append((record.offset, message))
        else:
            dead.append(DeadLetter.of(topic, record.partition, record.offset, record.key,
                                      record.value, reason))
    return messages, dead


def _admit(kind: type[M], key: bytes | None, value: bytes, timestamp: int,
           limits: RecordLimits) -> tuple[str | None, M | None]:
    """(None, message) for an admitted record, else (why not, None)."""
    if len(value) > limits.max_record_bytes:
        return (f"record value is {len(value)} bytes, over the limit of "
                f"{limits.max_record_bytes}"), None
    try:
        message = decode(kind, value)
    except SchemaError as exc:
        return str(exc), None
    reason = _key_mismatch(key, message.user_id) or limits.violation(message, timestamp)
    return reason, None if reason else message


def _key_mismatch(key: bytes | None, user_id: str) -> str | None:
    """Why ``key`` cannot be the key of a message of ``user_id``, or None if it can."""
    if key is None:
        return f"record has no key; it must be the message's user_id {user_id[:256]!r}"
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return f"record key {key[:256]!r} is not utf-8; it must be the user_id {user_id[:256]!r}"
    if text != user_id:
        return (f"record key {text[:256]!r} differs from the message's user_id "
                f"{user_id[:256]!r}")
    return None
