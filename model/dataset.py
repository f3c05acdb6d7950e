"""Examples from a time-ordered event log: one per interaction, scored before it happens.

Example i asks "how will ``interactions[i]``'s user respond to its item?" at that event's
time: the candidate is the event's item (with its item features), the request context is the
event's own context, the history is that user's previous events in log order (the newest
``history_len``, from the whole log, so a test example sees the train events before it), and
the label is ``labels[i]``. Events are encoded once; batches are gathered from the arrays.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from eventlog.log import EventLog
from model.features import CandidateInputs, ContextArrays, EventArrays, Featurizer, UserInputs


@dataclass
class ExampleSet:
    """Encoded events of a whole log plus the examples ``start:stop`` of it."""

    events: EventArrays
    contexts: ContextArrays  # [E] each event's own context, as a request context
    users: np.ndarray  # [E, 1 + Fp, L] user id and profile rows of each event's user
    hist_index: np.ndarray  # [N, n] previous events of the example's user, -1 = padding
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
            hist_index=self.hist_index[rows],
            event_index=self.event_index[rows],
            labels=self.labels[rows],
            user_ids=self.user_ids[rows],
            timestamps=self.timestamps[rows],
        )


def build_examples(
    log: EventLog, featurizer: Featurizer, history_len: int, start: int = 0, stop: int | None = None
) -> ExampleSet:
    """Examples for ``log.interactions[start:stop]`` (histories reach back before ``start``)."""
    stop = len(log) if stop is None else stop
    events = log.interactions
    encoded = featurizer.events(events)
    contexts = featurizer.contexts([e.context for e in events])
    user_ids = [e.user_id for e in events]
    users = featurizer.users(user_ids, [log.profiles.get(u) for u in user_ids])
    hist_index = np.full((stop - start, history_len), -1, dtype=np.int64)
    recent: dict[str, deque[int]] = {}
    for i in range(stop):
        past = recent.setdefault(user_ids[i], deque(maxlen=history_len))
        if i >= start and past:
            hist_index[i - start, history_len - len(past) :] = past
        past.append(i)
    return ExampleSet(
        events=encoded,
        contexts=contexts,
        users=users,
        hist_index=hist_index,
        event_index=np.arange(start, stop),
        labels=log.labels[start:stop],
        user_ids=np.asarray(user_ids[start:stop], dtype=object),
        timestamps=encoded.ts[start:stop],
    )


def gather_batch(
    examples: ExampleSet, featurizer: Featurizer, rows: np.ndarray, state_dim: int
) -> tuple[UserInputs, CandidateInputs]:
    """Model inputs for examples ``rows`` (B of them; one candidate each, C = 1).

    The state is zeros: training replaces it with the GRU unrolled over the history
    (``model.user_state.with_history_state``).
    """
    spec = featurizer.spec
    own = examples.event_index[rows]
    ctx = examples.contexts
    user = featurizer.assemble_user(
        examples.events,
        examples.hist_index[rows],
        examples.events.ts[own],
        examples.users[own],
        ContextArrays(ctx.cat[own], ctx.num[own], ctx.num_present[own]),
        np.zeros((len(rows), state_dim), dtype=np.float32),
    )
    items = featurizer.event_items(
        examples.events, own[:, None], len(spec.item_cat), len(spec.item_num)
    )
    return user, featurizer.assemble_candidates(items)
