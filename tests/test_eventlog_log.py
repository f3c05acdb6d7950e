"""EventLog's contract (time order, aligned int8 0/1 labels) and time_split's guarantee: no
event after the split is earlier than, or simultaneous with, an event before it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventlog.log import EventLog, time_split
from eventlog.schema import Interaction, UserProfile


def make_log(timestamps: list[float], labels: list[int] | None = None) -> EventLog:
    events = [Interaction(f"e{i}", "u", f"i{i}", "click", ts) for i, ts in enumerate(timestamps)]
    label_array = np.array(labels if labels is not None else [0] * len(events), np.int8)
    return EventLog("test", events, label_array, {"u": UserProfile("u")})


# Few distinct values, so that runs of equal timestamps are common.
sorted_times = st.lists(st.integers(0, 6), max_size=40).map(lambda xs: sorted(map(float, xs)))


@given(sorted_times, st.floats(0.0, 1.0))
def test_time_split_never_puts_a_later_event_first_and_keeps_ties_together(ts, fraction):
    """Every event after the split is strictly later than every event before it."""
    k = time_split(make_log(ts), fraction)
    assert 0 <= k <= len(ts)
    if 0 < k < len(ts):
        assert ts[k - 1] < ts[k]


@given(sorted_times, st.floats(0.0, 1.0))
def test_time_split_moves_the_boundary_only_to_the_nearer_end_of_a_tie_run(ts, fraction):
    """The split is the requested position unless that cuts a run of equal timestamps; then
    it is the nearer end of that run."""
    k = time_split(make_log(ts), fraction)
    target = round(fraction * len(ts))
    if 0 < target < len(ts) and ts[target - 1] == ts[target]:
        run = [i for i, t in enumerate(ts) if t == ts[target]]
        start, stop = run[0], run[-1] + 1
        assert k == min((start, stop), key=lambda end: (abs(end - target), end))
    else:
        assert k == target


def test_time_split_on_distinct_times_takes_the_requested_fraction() -> None:
    """With distinct timestamps the split takes exactly round(fraction * n) events."""
    log = make_log([float(t) for t in range(10)])
    assert [time_split(log, f) for f in (0.0, 0.25, 0.8, 1.0)] == [0, 2, 8, 10]


def test_time_split_rejects_a_fraction_outside_0_1() -> None:
    """A fraction outside [0, 1] is an error, not a silently clamped split."""
    with pytest.raises(ValueError, match="fraction"):
        time_split(make_log([1.0, 2.0]), 1.5)


def test_slice_keeps_events_labels_and_profiles_aligned() -> None:
    """slice(a, b) holds events a..b-1 with their own labels and the shared profiles."""
    log = make_log([1.0, 2.0, 3.0, 4.0], [0, 1, 1, 0])
    part = log.slice(1, 3)
    assert [e.event_id for e in part.interactions] == ["e1", "e2"]
    assert part.labels.tolist() == [1, 1]
    assert part.profiles is log.profiles
    assert len(part) == 2


@pytest.mark.parametrize(
    ("timestamps", "labels", "message"),
    [
        ([2.0, 1.0], [0, 1], "not in time order at index 1"),
        ([1.0, 2.0], [0], "1 labels for 2 interactions"),
        ([1.0, 2.0], [0, 2], "labels must be 0 or 1"),
    ],
)
def test_event_log_rejects_a_broken_contract(timestamps, labels, message) -> None:
    """EventLog refuses unsorted events, misaligned labels and labels other than 0/1."""
    with pytest.raises(ValueError, match=message):
        make_log(timestamps, labels)


def test_event_log_rejects_labels_that_are_not_int8() -> None:
    """Labels must be an int8 array (the dtype every consumer relies on)."""
    events = [Interaction("e", "u", "i", "click", 1.0)]
    with pytest.raises(ValueError, match="int8"):
        EventLog("test", events, np.array([1], np.int64))
