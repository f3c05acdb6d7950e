"""Isolating the records that make a batch computation fail, by bisection.

The worker computes a micro-batch as a whole (one GRU unroll, one scoring call per candidate
count). When that computation raises, ``isolate`` splits the batch in halves until it finds
a record whose computation fails on its own, sets it aside with the error as its reason (the
caller turns it into a dead letter), and computes the rest again: the good records of the
batch are still computed together, once. Finding one bad record among n costs about
2 log2(n) extra attempts.

Only pure computations go through ``isolate`` (no writes, no I/O): an error there is caused
by the records or by the model. A batch that fails while no single record fails on its own
is not a record's fault: ``isolate`` raises ``BatchFailure`` rather than reject good records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchFailure(RuntimeError):
    """A batch computation failed although each of its records computes on its own."""


@dataclass(frozen=True)
class Isolated(Generic[T, R]):
    """The result of the computation over ``kept``, and the records set aside with why."""

    result: R
    kept: list[T]
    failed: list[tuple[T, str]]


def isolate(items: Sequence[T], attempt: Callable[[Sequence[T]], R]) -> Isolated[T, R]:
    """``attempt(items)``, setting aside, one at a time, records whose attempt alone raises.

    ``attempt`` must accept any sub-sequence of ``items`` (the empty one included) and must
    not change anything outside itself. The reason of a set-aside record is its error as
    ``"<ExceptionType>: <message>"``.
    """
    kept = list(items)
    failed: list[tuple[T, str]] = []
    while True:
        try:
            return Isolated(attempt(kept), kept, failed)
        except Exception as exc:
            if not kept:
                raise
            culprit = _culprit(kept, attempt)
            if culprit is None:
                raise BatchFailure(
                    f"a batch of {len(kept)} records failed ({_describe(exc)}) although no "
                    "single record fails on its own") from exc
            index, reason = culprit
            failed.append((kept.pop(index), reason))


def _culprit(items: list[T], attempt: Callable[[Sequence[T]], R]) -> tuple[int, str] | None:
    """(index, reason) of a record of ``items`` whose attempt alone raises, found by
    bisection; None if every half tried succeeds."""
    begin, end = 0, len(items)
    while end - begin > 1:
        middle = (begin + end) // 2
        if _fails(items[begin:middle], attempt) is not None:
            end = middle
        elif _fails(items[middle:end], attempt) is not None:
            begin = middle
        else:
            return None
    reason = _fails(items[begin:end], attempt)
    return None if reason is None else (begin, reason)


def _fails(items: Sequence[T], attempt: Callable[[Sequence[T]], R]) -> str | None:
    try:
        attempt(items)
    except Exception as exc:
        return _describe(exc)
    return None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
