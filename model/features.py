"""Featurization: events, profiles, contexts and candidates -> hashed ids and numeric arrays.

``FeatureSpec`` is fitted once on training data and saved with the model. It fixes which
fields exist, which are categorical and which numeric, the numeric standardization, and the
layout of one shared embedding table in which every categorical field owns a block of rows:

    row 0                      padding (a zero embedding)
    block "item_id", "user_id" ``id_buckets`` rows each
    block "action"             ``action_buckets`` rows
    block "item:<f>", "user:<f>", "ctx:<f>"   ``field_buckets`` rows each

A bag (multi-valued field) is unordered: its values are sorted, and the first ``max_bag`` of
them kept. A value's row is its block's offset + crc32(value) mod the block size, so unseen
users, items and values always land on a valid row (hashed ids): new ids never crash scoring.
A missing categorical value hashes a fixed sentinel, so "missing" has its own learned
embedding.

The spec also keeps the training log's most frequent actions (``actions``, with their
training frequencies ``action_prior``; none when the log has a single action). For each, the
user's numeric context C_u carries the smoothed share of that action among the history's
events, as a logit centred on the prior:

    share_a = (count_a + s * prior_a) / (n_valid + s),  feature_a = logit(share_a) - logit(prior_a)

with s = ``action_smoothing``, so a user without history reads 0. The candidate's numeric
context C_g carries the same shares over the history events that share a value with the
candidate in one item field (its affinity: per item categorical field, one share per action
and log(1 + matching events) / log(1 + n)). A spec saved before these fields existed loads
with none of them, and keeps its dimensions and fingerprint.

When fitted with labels and ``item_rate_smoothing`` > 0, the spec also keeps the training
log's label counts per item row, and C_g carries the candidate's smoothed label rate and log
count (``model.item_rates``; off by default, and then absent from the spec's dict). The
online learner keeps counting the labels it joins into a second table of the same form
(``item_rate_online_*``, ``with_online_counts``): served requests read the sum of both tables,
the log count keeps the training table's scale, and the spec's fingerprint
(``model.signature``) leaves the online table out, so each published version is the same model
with more labels counted.

``Featurizer`` turns schema objects into numpy arrays (``EventArrays``, ``ItemArrays``,
``ContextArrays``) and assembles them into the tensors the model reads (``UserInputs``,
``CandidateInputs``). Training gathers from arrays encoded once; serving encodes a request's
history and candidates on the fly; both go through ``assemble_user`` so they cannot drift.
The GRU user state reads events only: ``assemble_events`` (which ``assemble_user`` builds on)
and ``sequences`` give it ``EventInputs`` without any user-side fields.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Self

import numpy as np
import torch

from eventlog.schema import Candidate, FeatureMap, Impression, Interaction, UserProfile
from model import item_rates

MISSING = "\x00missing"
NUMERIC_CLIP = 10.0
SECONDS_PER_DAY = 86400.0
DERIVED_USER_NUMERIC = 6  # hour sin/cos, weekday sin/cos, recency, history length


@dataclass(frozen=True)
class FeatureSpec:
    """The fields of a data set and the layout of the hashed embedding table."""

    item_cat: tuple[str, ...]
    item_num: tuple[str, ...]
    user_cat: tuple[str, ...]
    ctx_cat: tuple[str, ...]
    ctx_num: tuple[str, ...]
    num_mean: tuple[float, ...]  # over item_num + ctx_num, in that order
    num_std: tuple[float, ...]
    id_buckets: int = 16384
    field_buckets: int = 1024
    action_buckets: int = 64
    max_bag: int = 8
    actions: tuple[str, ...] = ()  # whose history shares C_u carries, most frequent first
    action_prior: tuple[float, ...] = ()  # their frequencies in the training log
    action_smoothing: float = 10.0  # pseudo-events at the prior in each share
    item_rate_smoothing: float = 0.0  # pseudo-events at the prior per item rate; 0: no rates
    item_rate_prior: float = 0.5  # the training log's label rate
    item_rate_rows: tuple[int, ...] = ()  # item rows with training events, ascending
    item_rate_positives: tuple[int, ...] = ()  # per row: positive labels
    item_rate_counts: tuple[int, ...] = ()  # per row: events
    item_rate_online_rows: tuple[int, ...] = ()  # item rows with labels counted online
    item_rate_online_positives: tuple[int, ...] = ()  # per row: positive labels
    item_rate_online_counts: tuple[int, ...] = ()  # per row: labels

    def __post_init__(self) -> None:
        """Refuses action-share fields that would make every share fail or come out NaN (a
        hand-edited or hostile checkpoint): ValueError naming the field."""
        if len(self.action_prior) != len(self.actions) or len(set(self.actions)) != len(
                self.actions):
            raise ValueError("actions must be distinct and action_prior must have one "
                             f"frequency per action, got {len(self.actions)} actions and "
                             f"{len(self.action_prior)} frequencies")
        if not all(isinstance(p, float | int) and 0.0 < p <= 1.0 for p in self.action_prior):
            raise ValueError(f"action_prior must lie in (0, 1], got {self.action_prior}")
        if not (isinstance(self.action_smoothing, float | int)
                and 0.0 < self.action_smoothing < math.inf):
            raise ValueError(f"action_smoothing must be positive and finite, "
                             f"got {self.action_smoothing!r}")
        self._check_item_rates()

    def _check_item_rates(self) -> None:
        """ValueError naming the field when the item-rate table cannot be read."""
        smoothing = self.item_rate_smoothing
        if not (isinstance(smoothing, float | int) and 0.0 <= smoothing < math.inf):
            raise ValueError(f"item_rate_smoothing must be >= 0 and finite, got {smoothing!r}")
        if not smoothing:
            if self.item_rate_online_rows:
                raise ValueError("item_rate_online_rows given without item rates")
            return
        if not (isinstance(self.item_rate_prior, float | int) and 0.0 < self.item_rate_prior < 1.0):
            raise ValueError(f"item_rate_prior must lie in (0, 1), got {self.item_rate_prior!r}")
        for prefix in ("item_rate", "item_rate_online"):
            self._check_rate_table(prefix)

    def _check_rate_table(self, prefix: str) -> None:
        rows, pos, counts = (getattr(self, f"{prefix}_{part}")
                             for part in ("rows", "positives", "counts"))
        first, size = self.blocks["item_id"]
        if not (len(rows) == len(pos) == len(counts)
                and all(isinstance(v, int) for v in (*rows, *pos, *counts))
                and all(first <= r < first + size for r in rows)
                and len(set(rows)) == len(rows)
                and all(0 <= p <= n for p, n in zip(pos, counts, strict=True))):
            raise ValueError(f"{prefix}_rows, {prefix}_positives and {prefix}_counts must be "
                             "equally long integers: distinct item rows of the item_id block, "
                             "and 0 <= positives <= count")

    @classmethod
    def fit(
        cls,
        interactions: Iterable[Interaction],
        profiles: Iterable[UserProfile] = (),
        max_actions: int = 16,
        labels: Sequence[int] | np.ndarray | None = None,
        item_rate_smoothing: float = 0.0,
        **sizes: int,
    ) -> FeatureSpec:
        """Find the fields, numeric statistics and frequent actions of a training log, and,
        given its ``labels`` and ``item_rate_smoothing`` > 0, its label counts per item row
        (``model.item_rates``). Raises ValueError when ``labels`` is not one per event."""
        interactions = list(interactions)
        action_counts: dict[str, int] = {}
        item_cat: set[str] = set()
        ctx_cat: set[str] = set()
        num_values: dict[tuple[str, str], list[float]] = {}
        for event in interactions:
            action_counts[event.action] = action_counts.get(event.action, 0) + 1
            for role, features, cats in (
                ("item", event.item_features, item_cat),
                ("ctx", event.context, ctx_cat),
            ):
                for name, value in features.items():
                    if isinstance(value, float):
                        num_values.setdefault((role, name), []).append(value)
                    else:
                        cats.add(name)
        user_cat = sorted({name for p in profiles for name in p.features})
        item_num = sorted(n for r, n in num_values if r == "item" and n not in item_cat)
        ctx_num = sorted(n for r, n in num_values if r == "ctx" and n not in ctx_cat)
        stats = [np.asarray(num_values[("item", n)]) for n in item_num]
        stats += [np.asarray(num_values[("ctx", n)]) for n in ctx_num]
        spec = cls(
            item_cat=tuple(sorted(item_cat)),
            item_num=tuple(item_num),
            user_cat=tuple(user_cat),
            ctx_cat=tuple(sorted(ctx_cat)),
            ctx_num=tuple(ctx_num),
            num_mean=tuple(float(v.mean()) for v in stats),
            num_std=tuple(float(v.std()) or 1.0 for v in stats),
            **sizes,
        )
        actions = spec.share_actions(action_counts, max_actions)
        total = sum(action_counts.values())
        spec = replace(spec, actions=actions,
                       action_prior=tuple(action_counts[a] / total for a in actions))
        if not item_rate_smoothing:
            return spec
        if labels is None or len(labels) != len(interactions):
            raise ValueError("item rates need one label per interaction, got "
                             f"{'none' if labels is None else len(labels)} for "
                             f"{len(interactions)}")
        block = spec.blocks["item_id"]
        rows = np.asarray([hashed_row(block, e.item_id) for e in interactions], dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        table = sorted(item_rates.count_labels(rows, labels).items())
        prior = float(labels.mean()) if len(labels) else 0.5
        return replace(spec, item_rate_smoothing=float(item_rate_smoothing),
                       item_rate_prior=min(max(prior, 1e-3), 1 - 1e-3),
                       item_rate_rows=tuple(r for r, _ in table),
                       item_rate_positives=tuple(p for _, (p, _) in table),
                       item_rate_counts=tuple(n for _, (_, n) in table))

    def with_online_counts(self, positives: np.ndarray, counts: np.ndarray) -> FeatureSpec:
        """This spec with the online table set to ``positives`` and ``counts`` [n_embeddings]
        (labels counted online per item row; rows with no count are left out)."""
        rows = np.flatnonzero(counts)
        return replace(self, item_rate_online_rows=tuple(int(r) for r in rows),
                       item_rate_online_positives=tuple(int(positives[r]) for r in rows),
                       item_rate_online_counts=tuple(int(counts[r]) for r in rows))

    def online_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(positives, counts) [n_embeddings] float64 of the online table."""
        positives, counts = np.zeros(self.n_embeddings), np.zeros(self.n_embeddings)
        rows = np.asarray(self.item_rate_online_rows, dtype=np.int64)
        positives[rows] = self.item_rate_online_positives
        counts[rows] = self.item_rate_online_counts
        return positives, counts

    def share_actions(self, counts: dict[str, int], limit: int) -> tuple[str, ...]:
        """Up to ``limit`` actions by descending count (ties by name), skipping any whose
        hashed row is taken by a more frequent one (its count would mix both); none when
        there are fewer than two actions (a share of the only action is always 1)."""
        if len(counts) < 2:
            return ()
        block = self.blocks["action"]
        kept: dict[int, str] = {}
        for action in sorted(counts, key=lambda a: (-counts[a], a)):
            row = hashed_row(block, action)
            if len(kept) < limit and row not in kept:
                kept[row] = action
        return tuple(kept.values())

    @property
    def blocks(self) -> dict[str, tuple[int, int]]:
        """Field name -> (first row, number of rows) in the shared embedding table."""
        sizes = [("item_id", self.id_buckets), ("user_id", self.id_buckets)]
        sizes.append(("action", self.action_buckets))
        sizes += [(f"item:{f}", self.field_buckets) for f in self.item_cat]
        sizes += [(f"user:{f}", self.field_buckets) for f in self.user_cat]
        sizes += [(f"ctx:{f}", self.field_buckets) for f in self.ctx_cat]
        layout, offset = {}, 1
        for name, size in sizes:
            layout[name] = (offset, size)
            offset += size
        return layout

    @property
    def n_embeddings(self) -> int:
        return sum(size for _, size in self.blocks.values()) + 1

    @property
    def n_content_cat(self) -> int:
        """Categorical content fields of one event: item fields, then its context fields."""
        return len(self.item_cat) + len(self.ctx_cat)

    @property
    def n_content_num(self) -> int:
        return len(self.item_num) + len(self.ctx_num)

    @property
    def n_user_fields(self) -> int:
        """F_u tokens: user id, profile fields, request-context categorical fields."""
        return 1 + len(self.user_cat) + len(self.ctx_cat)

    @property
    def n_item_fields(self) -> int:
        """F_g tokens: candidate item id, item categorical fields."""
        return 1 + len(self.item_cat)

    @property
    def user_numeric_dim(self) -> int:
        return 2 * len(self.ctx_num) + DERIVED_USER_NUMERIC + len(self.actions)

    @property
    def n_affinity(self) -> int:
        """Affinity features of a candidate: per item categorical field, one share per action
        and the matching-event count (none without actions)."""
        return len(self.item_cat) * (len(self.actions) + 1) if self.actions else 0

    @property
    def n_item_rates(self) -> int:
        """The candidate's item-rate features (``model.item_rates``; none when off)."""
        return item_rates.ITEM_RATE_FEATURES if self.item_rate_smoothing else 0

    @property
    def item_numeric_dim(self) -> int:
        return 2 * len(self.item_num) + self.n_affinity + self.n_item_rates

    def to_dict(self) -> dict[str, Any]:
        """All fields; without the action-share ones when there are no actions, nor the
        item-rate ones when they are off, nor the online table when it is empty, so a spec
        saved before they existed has the same dict (and fingerprint) as when it was saved."""
        data = asdict(self)
        if not self.item_rate_online_rows:
            for name in ONLINE_RATE_FIELDS:
                del data[name]
        if not self.actions:
            for name in _ACTION_SHARE_FIELDS:
                del data[name]
        if not self.item_rate_smoothing:
            for name in _ITEM_RATE_FIELDS:
                data.pop(name, None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        """A spec from ``to_dict``'s output; fields with defaults may be absent."""
        return cls(**{f.name: _tuples(data[f.name]) for f in fields(cls) if f.name in data})


_ACTION_SHARE_FIELDS = ("actions", "action_prior", "action_smoothing")
ONLINE_RATE_FIELDS = ("item_rate_online_rows", "item_rate_online_positives",
                      "item_rate_online_counts")
"""The online table's fields: left out of the spec's fingerprint (``model.signature``)."""
_ITEM_RATE_FIELDS = ("item_rate_smoothing", "item_rate_prior", "item_rate_rows",
                     "item_rate_positives", "item_rate_counts", *ONLINE_RATE_FIELDS)


def _packed(bags: torch.Tensor) -> torch.Tensor:
    """Bag rows [..., L] (left-packed, 0 = empty slot) cut to the widest bag's length: the
    slots every bag leaves empty match nothing, so dropping them changes no comparison."""
    width = int((bags != 0).sum(-1).max()) if bags.numel() else 0
    return bags[..., :width]


def _window_rows(history: EventArrays, hist_index: np.ndarray
                 ) -> tuple[EventArrays, np.ndarray, np.ndarray]:
    """For gathering windows ``hist_index`` ([B, n] rows of ``history``, -1 = pad): the arrays
    (with a placeholder row when empty), the [B, n] mask of real rows, and the rows with every
    pad pointing at row 0 so that gathers stay in bounds."""
    valid = hist_index >= 0
    return history.with_placeholder_row(), valid, np.where(valid, hist_index, 0)


def _take(values: np.ndarray, safe: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``values``' rows ``safe`` ([B, n]), zero where ``valid`` is False: [B, n, ...]."""
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    return np.where(mask, values[safe], values.dtype.type(0))


def _as_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def hashed_row(block: tuple[int, int], value: str) -> int:
    """The row of ``value`` in a block (first row, number of rows) of the embedding table."""
    offset, size = block
    return offset + zlib.crc32(value.encode()) % size


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass
class EventArrays:
    """E encoded events. ``cat``: [E, n_content_cat, L] rows; ``num``: [E, n_content_num]."""

    item: np.ndarray  # [E] int64
    action: np.ndarray  # [E] int64
    cat: np.ndarray  # [E, Fc, L] int64, 0 = empty bag slot
    num: np.ndarray  # [E, Fn] float32, standardized, 0 where absent
    num_present: np.ndarray  # [E, Fn] bool
    ts: np.ndarray  # [E] float64 seconds

    def with_placeholder_row(self) -> EventArrays:
        """These arrays, or one all-zero row when empty, so that gathers stay in bounds."""
        if len(self.ts):
            return self
        return EventArrays(
            *(np.zeros((1, *a.shape[1:]), dtype=a.dtype) for a in
              (self.item, self.action, self.cat, self.num, self.num_present, self.ts))
        )


@dataclass
class ItemArrays:
    """C encoded candidate items (item id and item-side fields only)."""

    item: np.ndarray  # [C] int64
    cat: np.ndarray  # [C, Fi, L] int64
    num: np.ndarray  # [C, Fin] float32
    num_present: np.ndarray  # [C, Fin] bool


@dataclass
class ContextArrays:
    """B encoded request contexts."""

    cat: np.ndarray  # [B, Fctx, L] int64
    num: np.ndarray  # [B, Fctxn] float32
    num_present: np.ndarray  # [B, Fctxn] bool


@dataclass
class EventInputs:
    """B users' event sequences as tensors (n steps, left-padded, newest last): what the
    interaction embedding e_t reads, and so all that the GRU user state needs."""

    hist_item: torch.Tensor  # [B, n] long
    hist_action: torch.Tensor  # [B, n] long
    hist_cat: torch.Tensor  # [B, n, Fc, L] long
    hist_num: torch.Tensor  # [B, n, Fn] float
    hist_num_present: torch.Tensor  # [B, n, Fn] bool
    hist_valid: torch.Tensor  # [B, n] bool

    def to(self, device: torch.device | str) -> Self:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.hist_item.shape[0]


@dataclass
class UserInputs(EventInputs):
    """The user side of B requests, as tensors (n = history_len, left-padded, newest last):
    the history's events, and the request's user fields, context and state."""

    hist_age: torch.Tensor  # [B, n] float, seconds before the request (>= 0)
    user_cat: torch.Tensor  # [B, F_u, L] long
    user_num: torch.Tensor  # [B, user_numeric_dim] float
    state: torch.Tensor  # [B, d] float: the GRU state u_t (zeros for a new user)


@dataclass
class CandidateInputs:
    """C candidates for each of B requests, as tensors. ``affinity`` depends on the request's
    history too (``Featurizer.affinity``)."""

    item: torch.Tensor  # [B, C] long
    cat: torch.Tensor  # [B, C, Fi, L] long
    num: torch.Tensor  # [B, C, Fin] float
    num_present: torch.Tensor  # [B, C, Fin] bool
    affinity: torch.Tensor  # [B, C, n_affinity] float
    rates: torch.Tensor  # [B, C, n_item_rates] float (``model.item_rates``)

    def to(self, device: torch.device | str) -> CandidateInputs:
        return CandidateInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.item.shape)  # type: ignore[return-value]


class Featurizer:
    """Encodes schema objects with a ``FeatureSpec``; hashing is memoized per field."""

    MEMO_LIMIT = 1 << 20

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._blocks = spec.blocks
        self._memo: dict[str, dict[str, int]] = {name: {} for name in self._blocks}
        self._content_cat = [(f"item:{f}", f, True) for f in spec.item_cat] + [
            (f"ctx:{f}", f, False) for f in spec.ctx_cat
        ]
        n_item_num = len(spec.item_num)
        self._mean = np.asarray(spec.num_mean, dtype=np.float32)
        self._std = np.asarray(spec.num_std, dtype=np.float32)
        self._item_num_slice = slice(0, n_item_num)
        self._ctx_num_slice = slice(n_item_num, n_item_num + len(spec.ctx_num))
        self._share_rows = torch.tensor([self.row("action", a) for a in spec.actions],
                                        dtype=torch.int64)
        self._share_prior = torch.tensor(spec.action_prior, dtype=torch.float64)
        self._missing_item_rows = torch.tensor(
            [self.row(f"item:{f}", MISSING) for f in spec.item_cat], dtype=torch.int64
        )
        self._rate_positives, self._rate_counts = spec.online_counts()
        rows = np.asarray(spec.item_rate_rows, dtype=np.int64)
        self._rate_positives[rows] += spec.item_rate_positives
        self._rate_counts[rows] += spec.item_rate_counts
        self._rates_fitted = int(sum(spec.item_rate_counts))
        self._rates_max_count = max(spec.item_rate_counts, default=0)

    def row(self, block: str, value: str) -> int:
        """The embedding row of ``value`` in field ``block`` (hashed, never out of range)."""
        memo = self._memo[block]
        found = memo.get(value)
        if found is None:
            if len(memo) >= self.MEMO_LIMIT:
                memo.clear()
            found = memo[value] = hashed_row(self._blocks[block], value)
        return found

    def _bag(self, block: str, value: Any, out: np.ndarray) -> None:
        if value is None:
            out[0] = self.row(block, MISSING)
        elif isinstance(value, list):
            values = sorted(map(str, value))[: self.spec.max_bag] or [MISSING]
            for i, v in enumerate(values):
                out[i] = self.row(block, v)
        else:
            out[0] = self.row(block, str(value))

    def _numeric(
        self,
        maps: Sequence[tuple[FeatureMap, tuple[str, ...]]],
        out: np.ndarray,
        present: np.ndarray,
    ) -> None:
        col = 0
        for features, names in maps:
            for name in names:
                value = features.get(name)
                if isinstance(value, float):
                    out[col] = value
                    present[col] = True
                col += 1

    def _standardize(self, num: np.ndarray, present: np.ndarray, cols: slice) -> np.ndarray:
        z = (num - self._mean[cols]) / self._std[cols]
        return np.where(present, np.clip(z, -NUMERIC_CLIP, NUMERIC_CLIP), 0.0).astype(np.float32)

    def events(self, events: Sequence[Interaction]) -> EventArrays:
        spec, n = self.spec, len(events)
        item = np.empty(n, dtype=np.int64)
        action = np.empty(n, dtype=np.int64)
        cat = np.zeros((n, spec.n_content_cat, spec.max_bag), dtype=np.int64)
        num = np.zeros((n, spec.n_content_num), dtype=np.float32)
        present = np.zeros((n, spec.n_content_num), dtype=bool)
        ts = np.empty(n, dtype=np.float64)
        for i, event in enumerate(events):
            item[i] = self.row("item_id", event.item_id)
            action[i] = self.row("action", event.action)
            for j, (block, name, of_item) in enumerate(self._content_cat):
                source = event.item_features if of_item else event.context
                self._bag(block, source.get(name), cat[i, j])
            self._numeric(
                ((event.item_features, spec.item_num), (event.context, spec.ctx_num)),
                num[i],
                present[i],
            )
            ts[i] = event.ts
        num = self._standardize(num, present, slice(0, spec.n_content_num))
        return EventArrays(item, action, cat, num, present, ts)

    def items(self, candidates: Sequence[Candidate]) -> ItemArrays:
        spec, n = self.spec, len(candidates)
        item = np.empty(n, dtype=np.int64)
        cat = np.zeros((n, len(spec.item_cat), spec.max_bag), dtype=np.int64)
        num = np.zeros((n, len(spec.item_num)), dtype=np.float32)
        present = np.zeros((n, len(spec.item_num)), dtype=bool)
        for i, candidate in enumerate(candidates):
            item[i] = self.row("item_id", candidate.item_id)
            for j, name in enumerate(spec.item_cat):
                self._bag(f"item:{name}", candidate.item_features.get(name), cat[i, j])
            self._numeric(((candidate.item_features, spec.item_num),), num[i], present[i])
        return ItemArrays(item, cat, self._standardize(num, present, self._item_num_slice), present)

    def contexts(self, contexts: Sequence[FeatureMap]) -> ContextArrays:
        spec, n = self.spec, len(contexts)
        cat = np.zeros((n, len(spec.ctx_cat), spec.max_bag), dtype=np.int64)
        num = np.zeros((n, len(spec.ctx_num)), dtype=np.float32)
        present = np.zeros((n, len(spec.ctx_num)), dtype=bool)
        for i, context in enumerate(contexts):
            for j, name in enumerate(spec.ctx_cat):
                self._bag(f"ctx:{name}", context.get(name), cat[i, j])
            self._numeric(((context, spec.ctx_num),), num[i], present[i])
        return ContextArrays(cat, self._standardize(num, present, self._ctx_num_slice), present)

    def users(self, user_ids: Sequence[str], profiles: Sequence[UserProfile | None]) -> np.ndarray:
        """[B, 1 + len(user_cat), L]: the user id row, then one bag per profile field."""
        spec = self.spec
        out = np.zeros((len(user_ids), 1 + len(spec.user_cat), spec.max_bag), dtype=np.int64)
        for i, (user_id, profile) in enumerate(zip(user_ids, profiles, strict=True)):
            out[i, 0, 0] = self.row("user_id", user_id)
            values = profile.features if profile is not None else {}
            for j, name in enumerate(spec.user_cat):
                self._bag(f"user:{name}", values.get(name), out[i, 1 + j])
        return out

    @staticmethod
    def event_items(events: EventArrays, index: np.ndarray, n_item_cat: int, n_item_num: int
                    ) -> ItemArrays:
        """The item side of encoded events ``index`` (any shape), e.g. training candidates."""
        return ItemArrays(
            events.item[index],
            events.cat[index][..., :n_item_cat, :],
            events.num[index][..., :n_item_num],
            events.num_present[index][..., :n_item_num],
        )

    @staticmethod
    def assemble_events(history: EventArrays, hist_index: np.ndarray) -> EventInputs:
        """Gather B event sequences. ``hist_index``: [B, n] rows of ``history``, -1 = pad
        (left-padded: position n-1 is the newest event). No user, context or request time is
        needed: this is all the user state reads (``model.user_state``)."""
        history, valid, safe = _window_rows(history, hist_index)
        return EventInputs(
            hist_item=_as_long(_take(history.item, safe, valid)),
            hist_action=_as_long(_take(history.action, safe, valid)),
            hist_cat=_as_long(_take(history.cat, safe, valid)),
            hist_num=torch.from_numpy(_take(history.num, safe, valid)).float(),
            hist_num_present=torch.from_numpy(valid[..., None] & history.num_present[safe]),
            hist_valid=torch.from_numpy(valid),
        )

    def sequences(self, sequences: Sequence[Sequence[Interaction]], width: int | None = None
                  ) -> EventInputs:
        """B users' events (each oldest first, any number, zero included) as ``EventInputs``
        left-padded to ``width`` steps (default: the longest sequence); a sequence longer than
        ``width`` keeps its newest ``width`` events."""
        width = max(map(len, sequences), default=0) if width is None else width
        recent = [list(s)[-width:] if width else [] for s in sequences]
        return self.assemble_events(
            self.events([e for events in recent for e in events]),
            self.left_padded_index(list(map(len, recent)), width),
        )

    def assemble_user(
        self,
        history: EventArrays,
        hist_index: np.ndarray,
        request_ts: np.ndarray,
        users: np.ndarray,
        context: ContextArrays,
        state: np.ndarray,
    ) -> UserInputs:
        """Gather B requests' user sides. ``hist_index``: [B, n] rows of ``history``, -1 = pad.

        Histories are left-padded: position n-1 is the newest event.
        """
        events = self.assemble_events(history, hist_index)
        history = history.with_placeholder_row()
        valid = hist_index >= 0
        safe = np.where(valid, hist_index, 0)
        age = np.maximum(request_ts[:, None] - history.ts[safe], 0.0)
        age = np.where(valid, age, 0.0)
        n_valid = valid.sum(axis=1)
        last_ts = np.where(valid, history.ts[safe], -np.inf).max(axis=1, initial=-np.inf)
        recency = np.where(np.isfinite(last_ts), np.log1p(np.maximum(request_ts - last_ts, 0)), 0)
        day_phase = 2 * math.pi * (request_ts % SECONDS_PER_DAY) / SECONDS_PER_DAY
        week_phase = 2 * math.pi * (request_ts % (7 * SECONDS_PER_DAY)) / (7 * SECONDS_PER_DAY)
        derived = np.stack(
            [
                np.sin(day_phase),
                np.cos(day_phase),
                np.sin(week_phase),
                np.cos(week_phase),
                recency / 10.0,
                np.log1p(n_valid) / math.log1p(hist_index.shape[1]),
            ],
            axis=1,
        )
        user_num = np.concatenate(
            [context.num, context.num_present.astype(np.float32), derived,
             self._action_shares(events).numpy()],
            axis=1,
        ).astype(np.float32)
        user_cat = np.concatenate([users, context.cat], axis=1)
        return UserInputs(
            **{f.name: getattr(events, f.name) for f in fields(EventInputs)},
            hist_age=torch.from_numpy(age).float(),
            user_cat=_as_long(user_cat),
            user_num=torch.from_numpy(user_num).float(),
            state=torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)),
        )

    def _action_shares(self, events: EventInputs) -> torch.Tensor:
        """[B, len(spec.actions)] float: the centred shares of the events' actions."""
        acted = events.hist_action[..., None] == self._share_rows  # pads (row 0) match none
        return self._centred_shares(acted.sum(dim=1), events.hist_valid.sum(dim=1))

    def _centred_shares(self, counts: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """[..., A] float: logit((count_a + s prior_a) / (n + s)) - logit(prior_a) (module
        docstring) from per-action counts [..., A] among n [...] events."""
        s, prior = self.spec.action_smoothing, self._share_prior
        share = (counts.double() + s * prior) / (n.double()[..., None] + s)
        return (_logit(share) - _logit(prior)).float()

    def assemble_candidates(self, items: ItemArrays, affinity: torch.Tensor,
                            rates: np.ndarray | None = None) -> CandidateInputs:
        """Candidates [B, C] from item arrays shaped [B, C, ...]. ``affinity``: [B, C,
        n_affinity], each candidate's against its request's affinity window
        (``candidate_affinity``). ``rates``: [B, C, n_item_rates] item-rate features (training
        examples', ``running_item_rates``); None: the spec's table, as served."""
        if rates is None:
            rates = self.item_rates(items.item)
        return CandidateInputs(
            item=torch.from_numpy(np.ascontiguousarray(items.item, dtype=np.int64)),
            cat=_as_long(items.cat),
            num=torch.from_numpy(np.ascontiguousarray(items.num)).float(),
            num_present=torch.from_numpy(np.ascontiguousarray(items.num_present)),
            affinity=affinity,
            rates=torch.from_numpy(np.ascontiguousarray(rates, dtype=np.float32)),
        )

    def candidate_affinity(self, items: ItemArrays, history: EventInputs) -> torch.Tensor:
        """[B, C, n_affinity]: ``affinity`` of the candidates ``items`` ([B, C, ...]) over each
        request's affinity window ``history`` ([B, K] events)."""
        fields = len(self.spec.item_cat)
        return self.affinity(history.hist_cat[..., :fields, :], history.hist_action,
                             history.hist_valid, _as_long(items.cat))

    def affinity_over(self, items: ItemArrays, events: EventArrays, hist_index: np.ndarray
                      ) -> torch.Tensor:
        """``candidate_affinity`` over the window ``hist_index`` ([B, K] rows of ``events``,
        -1 = pad), gathering only what the affinity reads (the item fields, the actions):
        equal to ``candidate_affinity(items, assemble_events(events, hist_index))``."""
        history, valid, safe = _window_rows(events, hist_index)
        item_cat = _take(history.cat[:, : len(self.spec.item_cat)], safe, valid)
        return self.affinity(_as_long(item_cat), _as_long(_take(history.action, safe, valid)),
                             torch.from_numpy(valid), _as_long(items.cat))

    def window_affinity(self, items: ItemArrays, user: UserInputs, events: EventArrays,
                        index: np.ndarray, wide: np.ndarray) -> torch.Tensor:
        """[B, C, n_affinity]: the affinity over the affinity window ``wide`` of ``events``
        (``history_windows``' arrays); when that window is the history window ``index``
        itself, over the history ``user`` already holds."""
        if wide is index:
            return self.candidate_affinity(items, user)
        return self.affinity_over(items, events, wide)

    def item_rates(self, rows: np.ndarray, more_positives: np.ndarray | float = 0.0,
                   more_counts: np.ndarray | float = 0.0) -> np.ndarray:
        """[..., n_item_rates]: the item-rate features of item rows ``rows`` (any shape) from
        the spec's tables (training and online), as every served request reads them, with
        ``more_*`` labels (``rows``' shape) counted on top."""
        return self._rate_features(self._rate_positives[rows] + more_positives,
                                   self._rate_counts[rows] + more_counts)

    def running_item_rates(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[E, n_item_rates]: the item-rate features of each event of a log (item rows [E],
        labels [E]) as its example reads them: over the events before it for the training
        log's own events, from the table after them (``model.item_rates.running``)."""
        if not self.spec.n_item_rates:
            return np.zeros((len(rows), 0), dtype=np.float32)
        positives, counts = item_rates.running(rows, labels, self._rates_fitted,
                                               self._rate_positives, self._rate_counts)
        return self._rate_features(positives, counts)

    def _rate_features(self, positives: np.ndarray, counts: np.ndarray) -> np.ndarray:
        spec = self.spec
        if not spec.n_item_rates:
            return np.zeros((*np.shape(positives), 0), dtype=np.float32)
        return item_rates.rate_features(positives, counts, spec.item_rate_prior,
                                        spec.item_rate_smoothing, self._rates_max_count)

    def affinity(self, item_cat: torch.Tensor, action: torch.Tensor, valid: torch.Tensor,
                 cat: torch.Tensor) -> torch.Tensor:
        """[B, C, n_affinity]: for each item categorical field f (in ``spec.item_cat`` order),
        the centred logit shares of ``spec.actions`` (module docstring) among the history
        events whose field f shares a value with the candidate's (``cat``: [B, C, Fi, L]), then
        log(1 + those events) / log(1 + n). The history: ``item_cat`` [B, n, Fi, L'] (its
        events' item fields), ``action`` [B, n], ``valid`` [B, n] bool. A missing value shares
        nothing."""
        spec = self.spec
        b, c = cat.shape[:2]
        if not spec.n_affinity:
            return torch.zeros(b, c, 0)
        seen = _packed(item_cat)  # [B, n, Fi, L']
        wanted = _packed(cat)  # [B, C, Fi, L'']
        match = torch.stack([self._shares_a_value(seen[:, :, f], wanted[:, :, f], f)
                             for f in range(len(spec.item_cat))], dim=-1)  # [B, C, n, Fi]
        match = (match & valid[:, None, :, None]).float()
        acted = (action[..., None] == self._share_rows).float()
        counts = torch.einsum("bcnf,bna->bcfa", match, acted)  # [B, C, Fi, A]
        n_match = match.sum(dim=2)  # [B, C, Fi]
        shares = self._centred_shares(counts, n_match)
        width = valid.shape[1]
        counted = torch.log1p(n_match) / math.log1p(width) if width else n_match
        return torch.cat([shares.flatten(-2), counted], dim=-1)

    def _shares_a_value(self, seen: torch.Tensor, wanted: torch.Tensor, f: int) -> torch.Tensor:
        """[B, C, n] bool: whether history event n's bag of item field f (``seen``: [B, n, L']
        rows) holds a known value of candidate c's bag (``wanted``: [B, C, L''] rows; empty
        slots and the field's missing row are not known values). Each candidate's known
        values become a multi-hot row over the field's block of the embedding table, which
        every history slot reads: B x C x n x L' reads instead of comparing every pair."""
        offset, size = self._blocks[f"item:{self.spec.item_cat[f]}"]
        b, c, _ = wanted.shape
        known = (wanted != 0) & (wanted != self._missing_item_rows[f])
        # column `size` stands for "no value": empty slots and unknown values land there
        hot = torch.zeros(b, c, size + 1, dtype=torch.bool)
        hot.scatter_(2, torch.where(known, wanted - offset, size), True)
        hot[..., size] = False
        inside = (seen >= offset) & (seen < offset + size)
        slots = torch.where(inside, seen - offset, size).flatten(1)  # [B, n * L']
        read = hot.gather(2, slots[:, None, :].expand(b, c, slots.shape[1]))
        return read.view(b, c, seen.shape[1], seen.shape[2]).any(-1)

    def requests(
        self,
        impressions: Sequence[Impression],
        histories: Sequence[Sequence[Interaction]],
        profiles: Sequence[UserProfile | None],
        states: np.ndarray,
        history_len: int,
        affinity_len: int | None = None,
    ) -> tuple[UserInputs, CandidateInputs]:
        """B impressions with C candidates each to model inputs (B >= 1).

        ``histories[b]``, ``profiles[b]`` and ``states[b]`` ([B, d] float) belong to
        ``impressions[b]``; only the newest ``history_len`` events of each history are used
        (left-padded to n = ``history_len``), and the candidates' affinity is counted over the
        newest ``affinity_len`` (``ModelConfig.affinity_len``; None: the same n). Returns
        ``UserInputs`` of batch B and ``CandidateInputs`` [B, C] in the order of each
        ``impression.candidates``; raises ValueError unless every impression has the same
        candidate count C.
        """
        counts = {len(i.candidates) for i in impressions}
        if len(counts) != 1:
            raise ValueError(f"impressions must share one candidate count, got {sorted(counts)}")
        events, index, wide = self.history_windows(histories, history_len, affinity_len)
        user = self.assemble_user(
            events,
            index,
            np.asarray([i.ts for i in impressions], dtype=np.float64),
            self.users([i.user_id for i in impressions], profiles),
            self.contexts([i.context for i in impressions]),
            np.asarray(states, dtype=np.float32).reshape(len(impressions), -1),
        )
        items = self.items([c for i in impressions for c in i.candidates])
        grid = (len(impressions), counts.pop())
        batched = ItemArrays(*(a.reshape(*grid, *a.shape[1:]) for a in
                               (items.item, items.cat, items.num, items.num_present)))
        return user, self.assemble_candidates(
            batched, self.window_affinity(batched, user, events, index, wide))

    def history_windows(self, histories: Sequence[Sequence[Interaction]], history_len: int,
                        affinity_len: int | None = None
                        ) -> tuple[EventArrays, np.ndarray, np.ndarray]:
        """B users' histories (each oldest first), encoded once: the events, the [B,
        ``history_len``] index of each one's newest ``history_len`` (the S window) and the [B,
        K] index of its newest K = ``affinity_len`` (the affinity window; None: the S window,
        and the same array is returned twice). Left-padded with -1."""
        width = history_len if affinity_len is None else max(history_len, affinity_len)
        recent = [list(h)[-width:] if width else [] for h in histories]
        events = self.events([e for events in recent for e in events])
        wide = self.left_padded_index(list(map(len, recent)), width)
        return events, wide if width == history_len else wide[:, width - history_len :], wide

    @staticmethod
    def left_padded_index(lengths: Sequence[int], width: int) -> np.ndarray:
        """[B, width] rows of B concatenated event runs of ``lengths`` (each <= width), newest
        last, -1 where a row has fewer events (on the left)."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        owner = np.repeat(np.arange(len(lengths)), lengths)  # [E] each event's row
        rank = np.arange(len(owner)) - (np.cumsum(lengths) - lengths)[owner]  # within its run
        index = np.full((len(lengths), width), -1, dtype=np.int64)
        index[owner, width - lengths[owner] + rank] = np.arange(len(owner))
        return index

    def request(
        self,
        impression: Impression,
        history: Sequence[Interaction],
        profile: UserProfile | None,
        state: np.ndarray,
        history_len: int,
        affinity_len: int | None = None,
    ) -> tuple[UserInputs, CandidateInputs]:
        """One impression to model inputs: ``requests`` with B = 1 (``state`` is [d])."""
        return self.requests(
            [impression], [history], [profile], np.asarray(state)[None], history_len, affinity_len
        )
