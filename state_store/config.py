"""Store options fixed at creation and recorded in the store (column family ``meta``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

StateDtype = Literal["float32", "float16"]

# Codes written in the config value and in every state record.
DTYPE_CODES: dict[str, int] = {"float32": 1, "float16": 2}

_CONFIG_FORMAT = 1
_CONFIG = struct.Struct("<BBHH")  # format version, dtype code, history length, state dim


@dataclass(frozen=True)
class StoreConfig:
    """The layout of a store: chosen when it is created, read back on every later open.

    state_dim: length of every user's state vector (1..65535).
    state_dtype: how states are stored on disk; reads always return float32. float16 halves
        the bytes of a state at about 3 significant digits.
    history_len: N, how many of a user's newest events are kept (1..65535).
    """

    state_dim: int = 64
    state_dtype: StateDtype = "float32"
    history_len: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.state_dim <= 0xFFFF:
            raise ValueError(f"state_dim must be in 1..65535, got {self.state_dim}")
        if self.state_dtype not in DTYPE_CODES:
            raise ValueError(f"state_dtype must be float32 or float16, got {self.state_dtype!r}")
        if not 1 <= self.history_len <= 0xFFFF:
            raise ValueError(f"history_len must be in 1..65535, got {self.history_len}")

    @property
    def numpy_dtype(self) -> np.dtype:
        """The little-endian numpy dtype of a stored state."""
        return np.dtype("<f4" if self.state_dtype == "float32" else "<f2")

    def encode(self) -> bytes:
        """The value stored under ``meta/config``."""
        code = DTYPE_CODES[self.state_dtype]
        return _CONFIG.pack(_CONFIG_FORMAT, code, self.history_len, self.state_dim)

    @classmethod
    def decode(cls, data: bytes) -> StoreConfig:
        """Inverse of ``encode``; raises ``ValueError`` on a value it cannot read."""
        if len(data) != _CONFIG.size or data[0] != _CONFIG_FORMAT:
            raise ValueError(f"unreadable store config value {data!r}")
        _, code, history_len, state_dim = _CONFIG.unpack(data)
        names = {c: name for name, c in DTYPE_CODES.items()}
        if code not in names:
            raise ValueError(f"unknown state dtype code {code}")
        return cls(state_dim=state_dim, state_dtype=names[code], history_len=history_len)
