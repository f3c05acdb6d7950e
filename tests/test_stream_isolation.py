"""``stream.isolation.isolate``: a failing batch is bisected down to the records that fail on
their own; the rest is computed together, once."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.isolation import BatchFailure, isolate


def total_unless_poisoned(items: Sequence[int]) -> int:
    """A batch computation that fails when any item is negative."""
    bad = [i for i in items if i < 0]
    if bad:
        raise ValueError(f"poisoned by {bad[0]}")
    return sum(items)


@given(st.lists(st.integers(-3, 50), max_size=40))
def test_exactly_the_poisoned_records_are_set_aside_and_the_rest_computed_once(
        items: list[int]) -> None:
    calls: list[list[int]] = []

    def attempt(some: Sequence[int]) -> int:
        calls.append(list(some))
        return total_unless_poisoned(some)

    isolated = isolate(items, attempt)
    assert isolated.kept == [i for i in items if i >= 0]
    assert sorted(i for i, _ in isolated.failed) == sorted(i for i in items if i < 0)
    assert all(reason == f"ValueError: poisoned by {i}" for i, reason in isolated.failed)
    assert isolated.result == sum(isolated.kept)
    assert calls[-1] == isolated.kept  # the good records, together, last


def test_a_batch_failing_with_no_failing_record_is_not_blamed_on_records() -> None:
    """Each record computes alone but not all together: no good record is rejected."""
    def attempt(some: Sequence[int]) -> int:
        if len(some) > 2:
            raise MemoryError("too big")
        return len(some)

    with pytest.raises(BatchFailure, match="no single record fails on its own"):
        isolate([1, 2, 3, 4], attempt)
