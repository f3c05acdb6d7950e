"""Load any interaction data set from a Parquet or JSON-lines file into an ``EventLog``.

The file is a table, one row per interaction (``.parquet``, or ``.jsonl``/``.json`` with one
JSON object per line). Columns:

- required: ``user_id``, ``item_id`` (string or integer), ``ts`` and ``label``;
- optional: ``event_id`` (default ``f"{file stem}-{row}"``), ``action`` (default
  ``"interact"``), and any number of ``item_*``, ``ctx_*`` and ``user_*`` columns;
- any other column is an error (a misspelt column should not vanish silently).

Rules:

- ``ts`` is seconds since the Unix epoch (integer or float), or an ISO-8601 string
  (``"2024-05-01T12:00:00Z"``; without an offset it is read as UTC), or an Arrow
  timestamp/date column (naive ones read as UTC). JSON strings that look like timestamps are
  read as timestamps by Arrow, which is fine for ``ts``.
- ``label`` is 0 or 1 (integer, float or boolean).
- Value types of ``item_*``/``ctx_*`` columns: a string, integer or boolean column is
  categorical (values become strings: ``7`` -> ``"7"``, ``true`` -> ``"true"``); a float column
  is numeric (must be finite); a list-of-strings (or list-of-integers) column is a
  multi-valued categorical (``["Action", "Drama"]``); a timestamp/date column is numeric
  (seconds since the epoch). In JSON lines a column whose values are all written without a
  decimal point is an integer column, hence categorical: write ``3.0`` for a numeric 3.
- ``item_<name>`` becomes ``item_features[name]``, ``ctx_<name>`` becomes ``context[name]``.
- ``user_<name>`` becomes ``profiles[user_id].features[name]`` and must be categorical
  (string, integer or boolean; stored as a string); a user's value is the last non-null one in
  time order. Users with no non-null ``user_*`` value have no profile.
- A null in an optional column means "absent": the key is omitted (or the default used).
- Events are sorted by ``ts``; equal timestamps keep file order. ``event_id`` must be unique.

Any violation raises ``GenericFormatError`` naming the column and the row (rows count from 0,
in file order), e.g. ``row 17: column 'label' must be 0 or 1, got 3``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from eventlog.log import EventLog
from eventlog.schema import FeatureValue, Interaction, UserProfile

log = logging.getLogger(__name__)

REQUIRED = ("user_id", "item_id", "ts", "label")
OPTIONAL = ("event_id", "action")
PREFIXES = ("item_", "ctx_", "user_")
DEFAULT_ACTION = "interact"
_TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


class GenericFormatError(ValueError):
    """A file that does not follow the generic format; the message names column and row."""


def load_events(path: Path) -> EventLog:
    """Read ``path`` (see the module docstring for the format) into a time-ordered log.

    The log is named after the file stem. Raises ``GenericFormatError`` on any bad input.
    """
    started = time.perf_counter()
    table = _decode_dictionaries(_read_table(path))
    _check_columns(table)
    n, stem = table.num_rows, path.stem
    ts = _timestamps(table.column("ts"))
    labels = _labels(table.column("label"))
    users = _ids(table, "user_id")
    items = _ids(table, "item_id")
    event_ids = _optional_strings(table, "event_id", [f"{stem}-{row}" for row in range(n)])
    actions = _optional_strings(table, "action", [DEFAULT_ACTION] * n)
    item_features = _feature_maps(table, "item_")
    context = _feature_maps(table, "ctx_")
    _check_unique(event_ids)

    order = np.argsort(np.asarray(ts, np.float64), kind="stable").tolist()
    interactions = []
    for row in order:
        try:
            interactions.append(Interaction(event_ids[row], users[row], items[row], actions[row],
                                            ts[row], item_features[row], context[row]))
        except ValueError as exc:
            raise GenericFormatError(f"row {row}: {exc}") from None
    profiles = _profiles(table, users, order)
    event_log = EventLog(path.stem, interactions, labels[order], profiles)
    log.info("loaded %s: %d events, %d profiles in %.2f s", path, n, len(profiles),
             time.perf_counter() - started)
    return event_log


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".jsonl", ".json"):
            return pa_json.read_json(path)
    except (pa.ArrowException, OSError) as exc:
        raise GenericFormatError(f"{path}: cannot read: {exc}") from None
    raise GenericFormatError(
        f"{path}: unknown extension {path.suffix!r}; expected .parquet, .jsonl or .json"
    )


def _decode_dictionaries(table: pa.Table) -> pa.Table:
    """The table with dictionary-encoded columns (pandas categoricals) decoded."""
    for index, kind in enumerate(table.schema.types):
        if pa.types.is_dictionary(kind):
            column = table.column(index).cast(kind.value_type)
            table = table.set_column(index, table.field(index).with_type(kind.value_type),
                                     column)
    return table


def _check_columns(table: pa.Table) -> None:
    names = table.column_names
    for name in REQUIRED:
        if name not in names:
            raise GenericFormatError(f"missing required column {name!r} (columns: {names})")
    for name in names:
        if name in REQUIRED or name in OPTIONAL:
            continue
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise GenericFormatError(
                f"column {name!r} is not part of the format: use one of {REQUIRED + OPTIONAL} "
                f"or a name starting with {', '.join(PREFIXES)}"
            )
        if name == prefix:
            raise GenericFormatError(f"column {name!r} needs a name after the prefix")


def _timestamps(column: pa.ChunkedArray) -> list[float]:
    kind = column.type
    if _is_time(kind):
        seconds = _epoch_seconds(column)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
        seconds = column.cast(pa.float64())
    elif _is_string(kind):
        seconds = pa.chunked_array([pa.array(
            [None if text is None else _parse_iso(text, row)
             for row, text in enumerate(column.to_pylist())], pa.float64())])
    else:
        raise GenericFormatError(f"column 'ts' must hold numbers, ISO-8601 strings or "
                                 f"timestamps, got type {kind}")
    _check_not_null(seconds, "ts")
    _check_finite(seconds, "ts")
    return seconds.to_pylist()


def _epoch_seconds(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp or date column as float64 seconds since the epoch (naive read as UTC)."""
    if pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("s"))
    scale = _TIME_UNITS[column.type.unit]
    return pc.divide(column.cast(pa.int64()).cast(pa.float64()), scale)


def _parse_iso(text: str, row: int) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise GenericFormatError(
            f"row {row}: column 'ts' must be seconds or an ISO-8601 time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _labels(column: pa.ChunkedArray) -> np.ndarray:
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind) or pa.types.is_null(kind)):
        raise GenericFormatError(f"column 'label' must hold 0/1 or booleans, got type {kind}")
    _check_not_null(column, "label")
    values = column.to_pylist()
    for row, value in enumerate(values):
        if value not in (0, 1):
            raise GenericFormatError(f"row {row}: column 'label' must be 0 or 1, got {value!r}")
    return np.asarray(values, np.int8)


def _strings(table: pa.Table, name: str) -> list[str | None]:
    """An id-like column (strings or integers) as strings; nulls stay ``None``."""
    column = table.column(name)
    kind = column.type
    if not (_is_string(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
        raise GenericFormatError(f"column {name!r} must hold strings or integers, got type {kind}")
    return column.cast(pa.string()).to_pylist()


def _ids(table: pa.Table, name: str) -> list[str]:
    """A required id column as strings; a null is an error."""
    _check_not_null(table.column(name), name)
    return _strings(table, name)  # type: ignore[return-value]  # checked: no None


def _optional_strings(table: pa.Table, name: str, defaults: list[str]) -> list[str]:
    if name not in table.column_names:
        return defaults
    return [default if value is None else value
            for value, default in zip(_strings(table, name), defaults, strict=True)]


def _feature_maps(table: pa.Table, prefix: str) -> list[dict[str, FeatureValue]]:
    """One dict per row of the ``prefix`` columns' non-null values, prefix stripped."""
    maps: list[dict[str, FeatureValue]] = [{} for _ in range(table.num_rows)]
    for name, key in _prefixed(table, prefix):
        for row, value in enumerate(_feature_values(table.column(name), name)):
            if value is not None:
                maps[row][key] = value
    return maps


def _feature_values(column: pa.ChunkedArray, name: str) -> list[FeatureValue | None]:
    """A feature column's values converted by its type (see the module docstring)."""
    kind = column.type
    if _is_categorical(kind):
        return column.cast(pa.string()).to_pylist()
    if pa.types.is_floating(kind) or _is_time(kind):
        numbers = _epoch_seconds(column) if _is_time(kind) else column.cast(pa.float64())
        _check_finite(numbers, name)
        return numbers.to_pylist()
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            _is_categorical(kind.value_type)):
        for row, values in enumerate(column.to_pylist()):
            if values is not None and None in values:
                raise GenericFormatError(f"row {row}: column {name!r} holds a null in its list")
        return column.cast(pa.list_(pa.string())).to_pylist()
    raise GenericFormatError(
        f"column {name!r} has type {kind}; features must be strings, integers, booleans, "
        f"floats, timestamps or lists of strings"
    )


def _profiles(table: pa.Table, users: list[str], order: list[int]) -> dict[str, UserProfile]:
    """Each user's last non-null ``user_*`` values in time order (``order``)."""
    features: dict[str, dict[str, str | int]] = {}
    for name, key in _prefixed(table, "user_"):
        column = table.column(name)
        if not _is_categorical(column.type):
            raise GenericFormatError(f"column {name!r} has type {column.type}; user_* columns "
                                     f"must be categorical (strings, integers or booleans)")
        values = column.cast(pa.string()).to_pylist()
        for row in order:
            if values[row] is not None:
                features.setdefault(users[row], {})[key] = values[row]
    return {user: UserProfile(user, fields) for user, fields in features.items()}


def _prefixed(table: pa.Table, prefix: str) -> list[tuple[str, str]]:
    """``(column, key)`` for each ``prefix`` column (``user_id`` is no ``user_`` column)."""
    return [(name, name.removeprefix(prefix)) for name in table.column_names
            if name.startswith(prefix) and name not in REQUIRED + OPTIONAL]


def _check_unique(event_ids: list[str]) -> None:
    first_row: dict[str, int] = {}
    for row, event_id in enumerate(event_ids):
        if event_id in first_row:
            raise GenericFormatError(f"row {row}: column 'event_id' repeats {event_id!r} "
                                     f"(first seen in row {first_row[event_id]})")
        first_row[event_id] = row


def _check_not_null(column: pa.ChunkedArray, name: str) -> None:
    if column.null_count:
        raise GenericFormatError(f"row {_first(column.is_null())}: column {name!r} is null")


def _check_finite(numbers: pa.ChunkedArray, name: str) -> None:
    bad = pc.invert(pc.fill_null(pc.is_finite(numbers), True))
    if pc.any(bad).as_py():
        row = _first(bad)
        raise GenericFormatError(f"row {row}: column {name!r} must be finite, "
                                 f"got {numbers[row].as_py()}")


def _first(mask: pa.ChunkedArray) -> int:
    """The index of the first true value of a boolean column that has one."""
    return int(np.argmax(mask.to_numpy(zero_copy_only=False)))


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or (
        pa.types.is_string_view(kind))


def _is_time(kind: pa.DataType) -> bool:
    return pa.types.is_timestamp(kind) or pa.types.is_date(kind)


def _is_categorical(kind: pa.DataType) -> bool:
    """String, integer or boolean; or null (an all-null JSON column, absent everywhere)."""
    return (_is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)
            or pa.types.is_null(kind))
