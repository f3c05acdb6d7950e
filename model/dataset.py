"""Examples from a time-ordered event log: one per interaction, scored before it happens.

Example i asks "how will ``interactions[i]``'s user respond to its item?" at that event's
time: the candidate is the event's item (with its item features), the request context is the
event's own context, the history is that user's previous events in log order (the newest
``history_len``, from the whole log, so a test example sees the train events before it), and
the label is ``labels[i]``. Events are encoded once; batches are gathered from the arrays.
The candidate's item-rate features (``model.item_rates``, when the spec has them) are read
once per event: over the earlier events for the events the spec was fitted on, from the spec's
table after them (``Featurizer.running_item_rates``).

u_t is the state as served (docs/model.md, "The user state"): the GRU carried over all of the
user's earlier events. An example records the last event before its history window
(``carry_index``); ``model.user_state.carried_states`` gives the state after every event of the
log, and the model unrolls the window from the carried state (``served_state``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from eventlog.log import EventLog
from model.features import CandidateInputs, ContextArrays, EventArrays, Featurizer, UserInputs
from model.user_state import UserTimelines

AFFINITY_CHUNK = 2048  # examples whose affinity is counted in one pass: bounded memory


@dataclass
class ExampleSet:
    """Encoded events of a whole log plus the examples ``start:stop`` of it."""

    events: EventArrays
    contexts: ContextArrays  # [E] each event's own context, as a request context
    users: np.ndarray  # [E, 1 + Fp, L] user id and profile rows of each event's user
    item_rates: np.ndarray  # [E, n_item_rates] each event's item-rate features, as its example
    timelines: UserTimelines  # the log's events by user, for ``carried_states``
    hist_index: np.ndarray  # [N, n] previous events of the example's user, -1 = padding
    carry_index: np.ndarray  # [N] the user's last event before the history window, -1 = none
    affinity: np.ndarray  # [N, n_affinity] the candidate's affinity over the affinity window
    event_index: np.ndarray  # [N] the example's own event
    labels: np.ndarray  # [N] int8
    user_ids: np.ndarray  # [N] str, for per-user metrics
    timestamps: np.ndarray  # [N] float64

    def __len__(self) -> int:
        return len(self.event_index)

    def subset(self, rows: np.ndarray | slice) -> ExampleSet:
        """The examples ``rows`` (in that order), sharing this set's encoded events."""
        return ExampleSet(
            events=self.events,
            contexts=self.contexts,
            users=self.users,
            item_rates=self.item_rates,
            timelines=self.timelines,
            hist_index=self.hist_index[rows],
            carry_index=self.carry_index[rows],
            affinity=self.affinity[rows],
            event_index=self.event_index[rows],
            labels=self.labels[rows],
            user_ids=self.user_ids[rows],
            timestamps=self.timestamps[rows],
        )


def build_examples(
    log: EventLog, featurizer: Featurizer, history_len: int, start: int = 0,
    stop: int | None = None, affinity_len: int | None = None,
) -> ExampleSet:
    """Examples for ``log.interactions[start:stop]`` (histories reach back before ``start``).
    Each candidate's affinity is counted over its user's newest ``affinity_len`` earlier events
    (``ModelConfig.affinity_len``; None: the history window), as a served request counts it."""
    stop = len(log) if stop is None else stop
    events = log.interactions
    encoded = featurizer.events(events)
    contexts = featurizer.contexts([e.context for e in events])
    user_ids = [e.user_id for e in events]
    users = featurizer.users(user_ids, [log.profiles.get(u) for u in user_ids])
    hist_index = np.full((stop - start, history_len), -1, dtype=np.int64)
    carry_index = np.full(stop - start, -1, dtype=np.int64)
    width = history_len if affinity_len is None else max(history_len, affinity_len)
    affinity = _AffinityCounter(featurizer, encoded, stop - start, width)
    recent: dict[str, deque[int]] = {}
    longer: dict[str, deque[int]] = {}  # the affinity windows, when longer than the history's
    carried: dict[str, int] = {}  # each user's last event that left the window
    for i in range(stop):
        past = recent.setdefault(user_ids[i], deque(maxlen=history_len))
        window = past if width == history_len else longer.setdefault(user_ids[i],
                                                                     deque(maxlen=width))
        if i >= start:
            if past:
                hist_index[i - start, history_len - len(past) :] = past
            carry_index[i - start] = carried.get(user_ids[i], -1)
            affinity.add(i, window)
        if len(past) == history_len:
            carried[user_ids[i]] = past[0]
        past.append(i)
        if window is not past:
            window.append(i)
    return ExampleSet(
        events=encoded,
        contexts=contexts,
        users=users,
        item_rates=featurizer.running_item_rates(encoded.item, log.labels),
        timelines=UserTimelines.of(user_ids),
        hist_index=hist_index,
        carry_index=carry_index,
        affinity=affinity.result(),
        event_index=np.arange(start, stop),
        labels=log.labels[start:stop],
        user_ids=np.asarray(user_ids[start:stop], dtype=object),
        timestamps=encoded.ts[start:stop],
    )


class _AffinityCounter:
    """The affinity features of N examples in order, each counted once over its window
    (``Featurizer.affinity_over``), ``AFFINITY_CHUNK`` examples at a time."""

    def __init__(self, featurizer: Featurizer, events: EventArrays, n: int, width: int) -> None:
        self.featurizer, self.events = featurizer, events
        self.out = np.zeros((n, featurizer.spec.n_affinity), dtype=np.float32)
        self.own = np.zeros(AFFINITY_CHUNK, dtype=np.int64)
        self.windows = np.full((AFFINITY_CHUNK, width), -1, dtype=np.int64)
        self.pending = self.done = 0

    def add(self, event: int, window: deque[int]) -> None:
        """The next example: its own event (the candidate) and its window's events."""
        if not self.out.shape[1]:
            return
        row, width = self.pending, self.windows.shape[1]
        self.own[row] = event
        self.windows[row, : width - len(window)] = -1
        self.windows[row, width - len(window) :] = window
        self.pending += 1
        if self.pending == AFFINITY_CHUNK:
            self._count()

    def result(self) -> np.ndarray:
        """[N, n_affinity] float32, once every example was added."""
        if self.pending:
            self._count()
        return self.out

    def _count(self) -> None:
        spec, b = self.featurizer.spec, self.pending
        items = Featurizer.event_items(self.events, self.own[:b, None], len(spec.item_cat),
                                       len(spec.item_num))
        affinity = self.featurizer.affinity_over(items, self.events, self.windows[:b])[:, 0]
        self.out[self.done : self.done + b] = affinity.numpy()
        self.done, self.pending = self.done + b, 0


def gather_batch(
    examples: ExampleSet, featurizer: Featurizer, rows: np.ndarray, state_dim: int,
    carried: np.ndarray | None = None,
) -> tuple[UserInputs, CandidateInputs]:
    """Model inputs for examples ``rows`` (B of them; one candidate each, C = 1).

    ``carried``: [E + 1, state_dim] states after every event of the log, zeros last
    (``model.user_state.carried_states``); None: zero states (a model without one). The
    user's ``state`` is the carried state before the history window (``carry_index``): the
    model turns it into u_t (``model.user_state.served_state``).
    """
    spec = featurizer.spec
    own = examples.event_index[rows]
    ctx = examples.contexts
    start = (np.zeros((len(rows), state_dim), dtype=np.float32) if carried is None
             else carried[examples.carry_index[rows]])
    user = featurizer.assemble_user(
        examples.events,
        examples.hist_index[rows],
        examples.events.ts[own],
        examples.users[own],
        ContextArrays(ctx.cat[own], ctx.num[own], ctx.num_present[own]),
        start,
    )
    items = featurizer.event_items(
        examples.events, own[:, None], len(spec.item_cat), len(spec.item_num)
    )
    affinity = torch.from_numpy(examples.affinity[rows][:, None])
    return user, featurizer.assemble_candidates(items, affinity, examples.item_rates[own][:, None])
