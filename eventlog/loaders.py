"""The loaders' public API in one place: a data set in, a time-ordered ``EventLog`` out.

- ``load_movielens_100k(cache_dir)``: MovieLens-100K, fetched on first use
  (``eventlog.movielens``);
- ``load_events(path)``: any data set in the generic Parquet/JSON-lines format
  (``eventlog.generic``, whose docstring states the format);
- ``EventLog`` and ``time_split`` (``eventlog.log``);
- ``load_dataset(name, cache_dir)``: a named data set (``DATASETS``).
"""

from collections.abc import Callable
from pathlib import Path

from eventlog.generic import GenericFormatError, load_events
from eventlog.log import EventLog, time_split
from eventlog.movielens import DatasetUnavailable, default_data_dir, load_movielens_100k

DATASETS: dict[str, Callable[[Path | None], EventLog]] = {
    "movielens-100k": load_movielens_100k,
}


def load_dataset(name: str, cache_dir: Path | None = None) -> EventLog:
    """The named data set; ``KeyError`` names the known ones."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](cache_dir)

__all__ = [
    "DATASETS",
    "DatasetUnavailable",
    "EventLog",
    "GenericFormatError",
    "default_data_dir",
    "load_dataset",
    "load_events",
    "load_movielens_100k",
    "time_split",
]
