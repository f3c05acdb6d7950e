"""The loaders' public API in one place: a data set in, a time-ordered ``EventLog`` out.

- ``load_movielens_100k(cache_dir)``: MovieLens-100K, fetched on first use
  (``eventlog.movielens``);
- ``load_events(path)``: any data set in the generic Parquet/JSON-lines format
  (``eventlog.generic``, whose docstring states the format);
- ``EventLog`` and ``time_split`` (``eventlog.log``).
"""

from eventlog.generic import GenericFormatError, load_events
from eventlog.log import EventLog, time_split
from eventlog.movielens import DatasetUnavailable, default_data_dir, load_movielens_100k

__all__ = [
    "DatasetUnavailable",
    "EventLog",
    "GenericFormatError",
    "default_data_dir",
    "load_events",
    "load_movielens_100k",
    "time_split",
]
