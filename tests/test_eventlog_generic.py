"""The generic Parquet/JSON-lines loader: column types map to the schema's feature kinds,
prefixes route columns, events come out in time order, and bad input is rejected with an error
naming the column and the row."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eventlog.generic import GenericFormatError, load_events

T0 = 1_700_000_000.0


def write_parquet(directory: Path, columns: dict[str, Any], name: str = "events") -> Path:
    path = directory / f"{name}.parquet"
    table = columns if isinstance(columns, pa.Table) else pa.table(columns)
    pq.write_table(table, path)
    return path


def write_jsonl(directory: Path, rows: list[dict[str, Any]], name: str = "events") -> Path:
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [
    {"user_id": 1, "item_id": "a", "ts": T0 + 20, "label": 1, "item_price": 9.5,
     "item_genre": ["Action", "Drama"], "item_year": 1999, "ctx_device": "ios",
     "ctx_new": True, "user_country": "fr"},
    {"user_id": 2, "item_id": "b", "ts": T0 + 10, "label": 0, "item_price": None,
     "item_genre": None, "item_year": 2001, "ctx_device": None, "ctx_new": False,
     "user_country": None},
    {"user_id": 1, "item_id": "c", "ts": T0 + 10, "label": 0, "item_price": 1.0,
     "item_genre": [], "item_year": None, "ctx_device": "web", "ctx_new": None,
     "user_country": "de"},
]


@pytest.fixture(params=["parquet", "jsonl"])
def sample(request, tmp_path: Path) -> Path:
    """ROWS written in each file format."""
    if request.param == "parquet":
        return write_parquet(tmp_path, pa.Table.from_pylist(ROWS))
    return write_jsonl(tmp_path, ROWS)


def test_events_are_sorted_by_time_and_ties_keep_file_order(sample: Path) -> None:
    """Interactions come out by ts; the two events at T0+10 keep their file order (1, 2)."""
    log = load_events(sample)
    assert [e.event_id for e in log.interactions] == ["events-1", "events-2", "events-0"]
    assert [e.ts for e in log.interactions] == [T0 + 10, T0 + 10, T0 + 20]
    assert log.labels.tolist() == [0, 0, 1]
    assert log.name == "events"


def test_columns_map_to_feature_kinds_by_type_and_prefix(sample: Path) -> None:
    """Floats are numeric, strings/integers/booleans categorical strings, string lists
    multi-valued; item_* go to item_features, ctx_* to context, prefixes stripped; nulls are
    omitted; action defaults to "interact"; ids become strings."""
    by_id = {e.event_id: e for e in load_events(sample).interactions}
    first = by_id["events-0"]
    assert (first.user_id, first.item_id, first.action) == ("1", "a", "interact")
    assert first.item_features == {"price": 9.5, "genre": ["Action", "Drama"], "year": "1999"}
    assert first.context == {"device": "ios", "new": "true"}
    assert by_id["events-1"].item_features == {"year": "2001"}
    assert by_id["events-1"].context == {"new": "false"}
    assert by_id["events-2"].item_features == {"price": 1.0, "genre": []}
    assert by_id["events-2"].context == {"device": "web"}


def test_user_columns_become_profiles_with_the_last_value_in_time_order(sample: Path) -> None:
    """user_* columns fill UserProfile.features with each user's last non-null value in time
    order (user 1: "de" at T0+10, then "fr" at T0+20); a user with only nulls has none."""
    profiles = load_events(sample).profiles
    assert set(profiles) == {"1"}
    assert profiles["1"].features == {"country": "fr"}


def test_parquet_and_jsonl_give_the_same_log(tmp_path: Path) -> None:
    """The file format does not change the log."""
    from_parquet = load_events(write_parquet(tmp_path, pa.Table.from_pylist(ROWS)))
    from_jsonl = load_events(write_jsonl(tmp_path, ROWS))
    assert from_parquet.interactions == from_jsonl.interactions
    assert from_parquet.profiles == from_jsonl.profiles
    assert from_parquet.labels.tolist() == from_jsonl.labels.tolist()


def test_given_event_ids_and_actions_are_kept_and_nulls_fall_back(tmp_path: Path) -> None:
    """event_id and action columns are used; a null falls back to the default."""
    path = write_parquet(tmp_path, {
        "event_id": ["x", None], "user_id": ["u", "u"], "item_id": ["i", "j"],
        "ts": [1.0, 2.0], "label": [True, False], "action": [None, "buy"]})
    log = load_events(path)
    assert [(e.event_id, e.action) for e in log.interactions] == [
        ("x", "interact"), ("events-1", "buy")]
    assert log.labels.tolist() == [1, 0]


def test_iso_strings_are_read_as_utc_seconds(tmp_path: Path) -> None:
    """ISO-8601 ts strings become epoch seconds: 'Z' and offsets honoured, naive read as UTC,
    fractions kept."""
    stamps = ["2024-01-01T00:00:00Z", "2024-01-01T02:00:01+02:00", "2024-01-01 00:00:02",
              "2024-01-01T00:00:03.5Z"]
    rows = [{"user_id": "u", "item_id": "i", "ts": s, "label": 0} for s in stamps]
    midnight = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    expected = [midnight, midnight + 1, midnight + 2, midnight + 3.5]
    for path in (write_jsonl(tmp_path, rows), write_parquet(tmp_path, pa.Table.from_pylist(rows))):
        assert [e.ts for e in load_events(path).interactions] == expected


def test_arrow_timestamp_and_date_columns_become_seconds(tmp_path: Path) -> None:
    """A timestamp column (any unit, with or without time zone) is read as epoch seconds, in
    ts and in features (where it is numeric)."""
    moment = datetime(2024, 1, 1, 12, tzinfo=UTC)
    path = write_parquet(tmp_path, {
        "user_id": ["u"], "item_id": ["i"], "label": [1],
        "ts": pa.array([moment], pa.timestamp("ms", tz="Europe/Paris")),
        "item_released": pa.array([moment.date()], pa.date32()),
    })
    event = load_events(path).interactions[0]
    assert event.ts == moment.timestamp()
    assert event.item_features == {"released": moment.timestamp() - 12 * 3600}


def test_dictionary_and_integer_list_columns_are_categorical(tmp_path: Path) -> None:
    """Dictionary-encoded strings (pandas categoricals) and lists of integers are categorical."""
    path = write_parquet(tmp_path, {
        "user_id": ["u", "v"], "item_id": ["i", "j"], "ts": [1, 2], "label": [0, 1],
        "ctx_device": pa.array(["ios", "web"]).dictionary_encode(),
        "item_tags": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
        "user_segment": pa.array(["a", "b"]).dictionary_encode(),
    })
    log = load_events(path)
    assert [e.context for e in log.interactions] == [{"device": "ios"}, {"device": "web"}]
    assert [e.item_features for e in log.interactions] == [{"tags": ["1", "2"]}, {"tags": ["3"]}]
    assert log.profiles["v"].features == {"segment": "b"}


def test_an_empty_file_gives_an_empty_log(tmp_path: Path) -> None:
    """Zero rows with the required columns is a valid, empty log."""
    path = write_parquet(tmp_path, pa.table({
        "user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
        "ts": pa.array([], pa.float64()), "label": pa.array([], pa.int8())}))
    log = load_events(path)
    assert len(log) == 0
    assert log.profiles == {}


BASE = {"user_id": ["u", "v", "w"], "item_id": ["i", "j", "k"], "ts": [1.0, 2.0, 3.0],
        "label": [0, 1, 0]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"label": [0, 1, 3]}, "row 2: column 'label' must be 0 or 1, got 3"),
        ({"label": [0, None, 1]}, "row 1: column 'label' is null"),
        ({"label": ["yes", "no", "no"]}, "column 'label' must hold 0/1"),
        ({"ts": [1.0, None, 3.0]}, "row 1: column 'ts' is null"),
        ({"ts": [1.0, math.inf, 3.0]}, "row 1: column 'ts' must be finite"),
        ({"ts": ["2024-01-01", "soon", "2024-01-02"]}, "row 1: column 'ts' must be seconds or"),
        ({"user_id": ["u", None, "w"]}, "row 1: column 'user_id' is null"),
        ({"user_id": ["u", "", "w"]}, "row 1: user_id must be a non-empty string"),
        ({"item_id": [1.5, 2.5, 3.5]}, "column 'item_id' must hold strings or integers"),
        ({"event_id": ["a", "b", "a"]}, "row 2: column 'event_id' repeats 'a'"),
        ({"item_price": [1.0, 2.0, math.nan]}, "row 2: column 'item_price' must be finite"),
        ({"ctx_pos": [{"x": 1}] * 3}, "column 'ctx_pos' has type struct"),
        ({"item_tags": [["a"], ["b", None], []]}, "row 1: column 'item_tags' holds a null"),
        ({"user_age": [31.0, 40.0, 22.0]}, "column 'user_age' has type double"),
        ({"rating": [1, 2, 3]}, "column 'rating' is not part of the format"),
        ({"item_": [1, 2, 3]}, "column 'item_' needs a name after the prefix"),
    ],
)
def test_bad_values_are_rejected_naming_column_and_row(tmp_path, changes, message) -> None:
    """Each bad column raises GenericFormatError whose message names the column (and the row,
    counted from 0, where one row is at fault)."""
    path = write_parquet(tmp_path, {**BASE, **changes})
    with pytest.raises(GenericFormatError) as error:
        load_events(path)
    assert message in str(error.value)


@pytest.mark.parametrize("missing", ["user_id", "item_id", "ts", "label"])
def test_a_missing_required_column_is_named(tmp_path: Path, missing: str) -> None:
    """Dropping any required column raises an error naming it."""
    path = write_parquet(tmp_path, {k: v for k, v in BASE.items() if k != missing})
    with pytest.raises(GenericFormatError, match=f"missing required column '{missing}'"):
        load_events(path)


def test_an_unknown_extension_is_rejected(tmp_path: Path) -> None:
    """Only .parquet, .jsonl and .json are read; anything else says what is expected."""
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,ts,label\n")
    with pytest.raises(GenericFormatError, match=r"unknown extension '\.csv'.*\.parquet"):
        load_events(path)


def test_malformed_json_lines_are_rejected_naming_column_and_row(tmp_path: Path) -> None:
    """A JSON column that changes type, or a line that is not JSON, is reported with its row."""
    rows = [{"user_id": "u", "item_id": "i", "ts": 1.0, "label": 0},
            {"user_id": "u", "item_id": "i", "ts": "later", "label": 0}]
    with pytest.raises(GenericFormatError, match=r"Column\(/ts\) changed .* in row 1"):
        load_events(write_jsonl(tmp_path, rows))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"user_id": "u", "item_id": "i", "ts": 1, "label": 0}\nnot json\n')
    with pytest.raises(GenericFormatError, match=r"cannot read.*row 1"):
        load_events(broken)
