"""Causal feature dicts, one per event, for the online peers (``evaluation/river_peers.py``).

Event ``i``'s dict (keys are strings, values floats) holds:

- one-hot ids: ``user=<id>`` and ``item=<id>``;
- every categorical item and context field, one-hot: ``item.<name>=<value>``,
  ``ctx.<name>=<value>`` (a multi-valued field gives one key per value);
- every numeric item and context field as a one-hot quantile bin ``item.<name>#<k>`` (the
  release year of a film, a price): the edges are fitted on a prefix of the log
  (``FeatureLayout.fit``, the training part), like the model's ``FeatureSpec``;
- the user's profile fields, one-hot: ``profile.<name>=<value>``;
- running label statistics of the events before ``i``: for the user, the item, and each
  cross field ``f`` (``rate.user``, ``rate.item``, ``rate.user_x_<f>``), the smoothed rate
  ``(positives + m * global) / (count + m)`` and ``log(1 + count)`` (``logn.*``), where
  ``global`` is the positive rate over all earlier events (0.5 before the first) and ``m`` is
  ``FeatureConfig.smoothing``. ``user_x_<f>`` counts the (user, value of ``f``) pairs; for an
  item with several values of ``f`` (several genres) it is the mean over them, and for an
  item with none it is the prior (``global``, count 0).

The cross fields are every categorical item field of the fitted prefix (the genres of a
film), or the ones ``FeatureConfig.cross_fields`` names. The statistics are read before event
``i`` and updated after it with label ``i`` (``event_features``), so an event's dict depends
on no label of its own and on nothing later.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from eventlog.log import EventLog
from eventlog.schema import FeatureMap, Interaction, UserProfile


@dataclass(frozen=True)
class FeatureConfig:
    """How event dicts are built: ``smoothing`` is the prior weight ``m`` of the smoothed
    rates, ``numeric_bins`` the number of quantile bins per numeric field, ``cross_fields``
    the item fields of the user x field rates (None: every categorical item field)."""

    smoothing: float = 10.0
    numeric_bins: int = 8
    cross_fields: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FeatureLayout:
    """What a prefix of the log fixes: the bin edges of each numeric field (``"item.<name>"``
    -> ascending edges) and the cross fields of the user x field rates."""

    bin_edges: dict[str, tuple[float, ...]]
    cross_fields: tuple[str, ...]

    @classmethod
    def fit(cls, events: Sequence[Interaction], config: FeatureConfig) -> FeatureLayout:
        """The layout of ``events`` (the training part); raises ``ValueError`` when a named
        cross field is not a categorical item field there."""
        numeric: dict[str, list[float]] = {}
        categorical: set[str] = set()
        for event in events:
            for source, features in _maps(event):
                for name, value in features.items():
                    if isinstance(value, float):
                        numeric.setdefault(f"{source}.{name}", []).append(value)
                    elif source == "item":
                        categorical.add(name)
        quantiles = np.arange(1, config.numeric_bins) / config.numeric_bins
        edges = {field: tuple(np.unique(np.quantile(values, quantiles)).tolist())
                 for field, values in sorted(numeric.items())}
        cross = config.cross_fields
        if cross is None:
            cross = tuple(sorted(categorical))
        missing = sorted(set(cross) - categorical)
        if missing:
            raise ValueError(f"cross fields {missing} are not categorical item fields "
                             f"(those are {sorted(categorical)})")
        return cls(edges, tuple(cross))

    def rate_keys(self) -> tuple[str, ...]:
        """The keys of the running statistics, in a fixed order."""
        groups = ("user", "item", *(f"user_x_{field}" for field in self.cross_fields))
        return tuple(f"{kind}.{group}" for group in groups for kind in ("rate", "logn"))


def static_features(event: Interaction, profile: UserProfile | None,
                    layout: FeatureLayout) -> dict[str, float]:
    """The one-hot part of an event's dict (ids, item/context fields, profile)."""
    x = {f"user={event.user_id}": 1.0, f"item={event.item_id}": 1.0}
    for source, features in _maps(event):
        for name, value in features.items():
            field = f"{source}.{name}"
            if isinstance(value, float):
                edges = layout.bin_edges.get(field)
                if edges is not None:
                    x[f"{field}#{int(np.searchsorted(edges, value, side='right'))}"] = 1.0
            else:
                for one in _values(value):
                    x[f"{field}={one}"] = 1.0
    if profile is not None:
        for name, value in profile.features.items():
            x[f"profile.{name}={value}"] = 1.0
    return x


class RunningRates:
    """Label statistics of the events seen so far (module docstring): ``read`` an event's
    features, then ``update`` with its label."""

    def __init__(self, layout: FeatureLayout, smoothing: float) -> None:
        self._cross = layout.cross_fields
        self._m = smoothing
        self._stats: dict[tuple[str, ...], list[int]] = {}  # key -> [positives, count]
        self._positives = 0
        self._count = 0

    def read(self, event: Interaction) -> dict[str, float]:
        """The statistics of the events before ``event`` that concern it."""
        prior = (self._positives / self._count) if self._count else 0.5
        x: dict[str, float] = {}
        for group, keys in self._groups(event):
            rates, counts = [], []
            for key in keys:
                positives, count = self._stats.get(key, (0, 0))
                rates.append((positives + self._m * prior) / (count + self._m))
                counts.append(math.log1p(count))
            x[f"rate.{group}"] = sum(rates) / len(rates) if rates else prior
            x[f"logn.{group}"] = sum(counts) / len(counts) if counts else 0.0
        return x

    def update(self, event: Interaction, label: int) -> None:
        """Count ``event`` with its ``label`` (0 or 1)."""
        self._positives += label
        self._count += 1
        for _, keys in self._groups(event):
            for key in keys:
                stats = self._stats.setdefault(key, [0, 0])
                stats[0] += label
                stats[1] += 1

    def _groups(self, event: Interaction) -> Iterator[tuple[str, list[tuple[str, ...]]]]:
        user = event.user_id
        yield "user", [("user", user)]
        yield "item", [("item", event.item_id)]
        for field in self._cross:
            values = _values(event.item_features.get(field, []))
            yield f"user_x_{field}", [("cross", field, user, value) for value in values]


def event_features(log: EventLog, layout: FeatureLayout, config: FeatureConfig,
                   stop: int | None = None) -> Iterator[dict[str, float]]:
    """The dicts of events ``0 .. stop - 1`` (default: all) in time order.

    A generator: event ``i``'s dict is built before label ``i`` is read, and label ``i`` is
    read only when the dict of event ``i + 1`` is asked for; no event at or after ``stop`` is
    read at all.
    """
    rates = RunningRates(layout, config.smoothing)
    for i in range(len(log) if stop is None else stop):
        event = log.interactions[i]
        x = static_features(event, log.profiles.get(event.user_id), layout)
        x.update(rates.read(event))
        yield x
        rates.update(event, int(log.labels[i]))


def _maps(event: Interaction) -> tuple[tuple[str, FeatureMap], ...]:
    return (("item", event.item_features), ("ctx", event.context))


def _values(value: str | float | list[str]) -> list[str]:
    """A categorical value as a list of strings (a bag stays a bag)."""
    return list(value) if isinstance(value, list) else [str(value)]
