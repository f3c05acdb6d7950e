"""Value formats. Every value starts with a format-version byte; all integers little-endian.

State record (``users: s <uid>``), fixed size for a store::

    u8  format version (1)      u8  dtype code (1 float32, 2 float16)   u16 state dim
    u64 update count (>= 1)     i64 model version                       f64 last event time (s)
    state: dim x float32 or float16

History row (``users: h <uid> 0x00 <slot>``)::

    u8 format version (1)   u64 seq (the event's number for this user, from 0)   row bytes

Offset (``offsets: <topic> 0x00 <partition>``)::

    u8 format version (1)   i64 last applied offset   log id (utf-8)

Records are encoded and decoded for a whole batch at once through a numpy structured dtype;
a value that does not decode raises ``CorruptValueError`` naming its key.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from state_store.config import DTYPE_CODES, StoreConfig
from state_store.errors import CorruptValueError
from state_store.keys import OFFSETS_CF

FORMAT_VERSION = 1

_HEADER_SIZE = 28
_INT64_MAX = int(np.iinfo(np.int64).max)
_ROW_HEADER = struct.Struct("<BQ")
_OFFSET_HEADER = struct.Struct("<Bq")


@dataclass(frozen=True)
class DecodedRecords:
    """Columns of decoded state records; rows of absent keys hold zeros."""

    present: np.ndarray  # (U,) bool, a record was stored
    update_counts: np.ndarray  # (U,) int64
    model_versions: np.ndarray  # (U,) int64
    last_event_ts: np.ndarray  # (U,) float64
    states: np.ndarray  # (U, D) float32


class RecordCodec:
    """Encodes and decodes the state records of one store's ``StoreConfig``."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._code = DTYPE_CODES[config.state_dtype]
        self.dtype = np.dtype(
            [
                ("version", "u1"),
                ("dtype", "u1"),
                ("dim", "<u2"),
                ("count", "<u8"),
                ("model_version", "<i8"),
                ("ts", "<f8"),
                ("state", config.numpy_dtype, (config.state_dim,)),
            ]
        )
        self.size = self.dtype.itemsize
        # The first 4 bytes of every record of this store: version, dtype code, dim.
        self._head = np.frombuffer(
            bytes([FORMAT_VERSION, self._code]) + config.state_dim.to_bytes(2, "little"), np.uint8
        )

    def encode(
        self,
        update_counts: np.ndarray,
        model_version: int,
        last_event_ts: np.ndarray,
        states: np.ndarray,
    ) -> list[bytes]:
        """One record value per row of ``states`` (U, D)."""
        out = np.empty(len(states), dtype=self.dtype)
        out["version"] = FORMAT_VERSION
        out["dtype"] = self._code
        out["dim"] = self.config.state_dim
        out["count"] = update_counts
        out["model_version"] = model_version
        out["ts"] = last_event_ts
        out["state"] = states
        buf = out.tobytes()
        size = self.size
        return [buf[i : i + size] for i in range(0, len(buf), size)]

    def decode(self, keys: Sequence[bytes], values: Sequence[bytes | None]) -> DecodedRecords:
        """Decode ``values`` (``None`` for an absent key); raise ``CorruptValueError``."""
        n, size = len(values), self.size
        stored = [v for v in values if v is not None]
        if any(len(v) != size for v in stored):
            i = next(i for i, v in enumerate(values) if v is not None and len(v) != size)
            raise CorruptValueError(keys[i], self._diagnose(values[i]))
        joined = b"".join(stored)
        arr = np.frombuffer(joined, dtype=self.dtype)
        head = np.frombuffer(joined, dtype=np.uint8).reshape(len(stored), size)[:, :4]
        bad = (
            (head != self._head).any(axis=1)
            | (arr["count"] - np.uint64(1) >= np.uint64(_INT64_MAX))  # count in 1..2**63-1
            | ~np.isfinite(arr["ts"])
            | ~np.isfinite(arr["state"]).all(axis=1)
        )
        present = np.array([v is not None for v in values], dtype=bool)
        if bad.any():
            i = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]])
            raise CorruptValueError(keys[i], self._diagnose(values[i]))
        if len(stored) == n:
            return DecodedRecords(
                present=present,
                update_counts=arr["count"].astype(np.int64),
                model_versions=arr["model_version"].copy(),
                last_event_ts=arr["ts"].copy(),
                states=arr["state"].astype(np.float32),
            )
        counts = np.zeros(n, dtype=np.int64)
        versions = np.zeros(n, dtype=np.int64)
        ts = np.zeros(n, dtype=np.float64)
        states = np.zeros((n, self.config.state_dim), dtype=np.float32)
        counts[present] = arr["count"]
        versions[present] = arr["model_version"]
        ts[present] = arr["ts"]
        states[present] = arr["state"]
        return DecodedRecords(present, counts, versions, ts, states)

    def _diagnose(self, value: bytes) -> str:
        """Why ``value`` is not a valid record of this store (it is known not to be)."""
        if len(value) < _HEADER_SIZE:
            return f"{len(value)} bytes, shorter than the {_HEADER_SIZE}-byte record header"
        if value[0] != FORMAT_VERSION:
            return f"unknown format version {value[0]} (expected {FORMAT_VERSION})"
        if value[1] != self._code:
            return f"state dtype code {value[1]}, the store uses {self._code}"
        dim = int.from_bytes(value[2:4], "little")
        if dim != self.config.state_dim:
            return f"state dim {dim}, the store uses {self.config.state_dim}"
        if len(value) != self.size:
            return f"{len(value)} bytes, a record of this store has {self.size}"
        rec = np.frombuffer(value, dtype=self.dtype)[0]
        if not 0 < int(rec["count"]) <= _INT64_MAX:
            return f"update count {int(rec['count'])} out of range"
        if not np.isfinite(rec["ts"]):
            return f"last event time {float(rec['ts'])} is not finite"
        return "state vector holds a NaN or infinity"


def encode_row(seq: int, row: bytes) -> bytes:
    """The value of a history slot holding event number ``seq`` with payload ``row``."""
    return _ROW_HEADER.pack(FORMAT_VERSION, seq) + row


def decode_row(key: bytes, value: bytes, expected_seq: int) -> bytes:
    """The payload of a history slot that must hold event ``expected_seq``."""
    if len(value) < _ROW_HEADER.size or value[0] != FORMAT_VERSION:
        raise CorruptValueError(key, f"not a history row of format {FORMAT_VERSION}")
    seq = _ROW_HEADER.unpack_from(value)[1]
    if seq != expected_seq:
        raise CorruptValueError(key, f"history slot holds event {seq}, expected {expected_seq}")
    return value[_ROW_HEADER.size :]


def encode_offset(last_offset: int, log_id: str) -> bytes:
    """The value of a partition's offset key."""
    return _OFFSET_HEADER.pack(FORMAT_VERSION, last_offset) + log_id.encode()


def decode_offset(key: bytes, value: bytes) -> tuple[int, str]:
    """``(last applied offset, log id)`` from an offset value."""
    if len(value) < _OFFSET_HEADER.size or value[0] != FORMAT_VERSION:
        raise CorruptValueError(key, f"not an offset value of format {FORMAT_VERSION}", OFFSETS_CF)
    last_offset = _OFFSET_HEADER.unpack_from(value)[1]
    try:
        log_id = value[_OFFSET_HEADER.size :].decode()
    except UnicodeDecodeError as exc:
        raise CorruptValueError(key, f"log id is not utf-8: {exc}", OFFSETS_CF) from None
    return last_offset, log_id
