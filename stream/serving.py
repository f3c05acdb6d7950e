"""Scoring impressions against the stored user states, and joining their labels for training.

- ``ImpressionScorer`` scores an impression (or several, with one multi-get for all of their
  users) with the user's stored GRU state and history, and builds the ``scores`` payload.
- ``FeedbackWindow`` keeps what each scored impression needs for training later, for a bounded
  time and count, and joins labels to it on (request_id, item_id).
- ``LabelBuffer`` holds the joined examples for the online trainer, bounded.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from eventlog.schema import Candidate, Impression, Interaction, Label, UserProfile
from model import user_state
from model.backbone import UniRecModel
from model.scorer import Scorer
from state_store import StateStore
from stream.applier import check_state_dim

log = logging.getLogger(__name__)


class ScoredItem(msgspec.Struct, frozen=True):
    """One candidate's click probability under the live model and under the static twin
    (None when no twin runs)."""

    item_id: str
    score: float
    static_score: float | None = None


class Scores(msgspec.Struct, frozen=True):
    """The ``scores`` topic payload: an impression's candidates ranked by ``score``, highest
    first."""

    request_id: str
    user_id: str
    model_version: int
    items: list[ScoredItem]

    def encode(self) -> bytes:
        """The payload as JSON."""
        return _encoder.encode(self)


_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, eq=False)
class ScoredImpression:
    """A scored impression with the inputs it was scored from (what training needs later).

    history: the user's stored events at scoring time, oldest first.
    state: [d] float32, the GRU state scored with (rebuilt under the current weights if the
        stored one was stale; zeros for a new user).
    dynamic, static: [C] probabilities in the order of ``impression.candidates``; ``static``
        is None without a static twin.
    read_s: seconds of the multi-get it was read in (shared by a batch), history decoding and
        the state unroll (stale rebuilds, pending interactions) included; score_s: seconds
        scoring this impression: impressions with the same candidate count are scored
        together (one model call each for the live model and the static twin), and each gets
        an equal share of that batch's time.
    """

    impression: Impression
    profile: UserProfile | None
    history: list[Interaction]
    state: np.ndarray
    state_rebuilt: bool
    dynamic: np.ndarray
    static: np.ndarray | None
    scores: Scores
    read_s: float
    score_s: float


@dataclass(frozen=True, eq=False)
class _Read:
    """What the multi-get gave one impression: its user's history and state ([d] float32,
    rebuilt if stale), both advanced by its pending interactions, whether the state was
    rebuilt, and the seconds of the read."""

    history: list[Interaction]
    state: np.ndarray
    rebuilt: bool
    read_s: float


class ImpressionScorer:
    """Scores impressions with ``scorer`` and the user states and histories in ``store``.

    ``model_version`` is the version of ``scorer``'s weights. A stored state of another version
    is stale: it is rebuilt in memory from the stored history under the current weights (the
    writer rebuilds and stores it when the user's next interaction is applied). ``static`` is
    the static twin: it scores every impression in shadow with the same history and no user
    state (a zero state): the frozen model of docs/model.md. ``profiles`` maps user ids to
    profiles (a user without one scores with missing profile fields).

    ``swap(scorer, version)`` replaces the live model from any thread: the (scorer, version)
    pair is one reference, read once per ``score_many``, so a call scores (and stamps) every
    impression with one version, never a mix; weights are never changed in place.
    """

    def __init__(
        self,
        store: StateStore,
        scorer: Scorer,
        model_version: int,
        profiles: Mapping[str, UserProfile] | None = None,
        static: Scorer | None = None,
    ) -> None:
        check_state_dim(store, scorer.model)
        self.store = store
        self._live = (scorer, model_version)
        self.profiles: Mapping[str, UserProfile] = profiles if profiles is not None else {}
        self.static = static

    @property
    def scorer(self) -> Scorer:
        return self._live[0]

    @property
    def model_version(self) -> int:
        return self._live[1]

    def serving_model(self) -> tuple[UniRecModel, int]:
        """The live model and its version, read together (``InteractionApplier.following``)."""
        scorer, version = self._live
        return scorer.model, version

    def swap(self, scorer: Scorer, model_version: int) -> None:
        """Serve ``scorer``'s model as ``model_version`` from the next ``score_many`` on."""
        check_state_dim(self.store, scorer.model)
        self._live = (scorer, model_version)

    def score(self, impression: Impression) -> ScoredImpression:
        """Score one impression (one multi-get)."""
        return self.score_many([impression])[0]

    def score_many(
        self,
        impressions: Sequence[Impression],
        pending: Sequence[Sequence[Interaction]] | None = None,
    ) -> list[ScoredImpression]:
        """Score several impressions, reading all of their users in ONE multi-get, in input
        order. Impressions with the same candidate count are scored together (``Scorer.batches``:
        one model call for the live model and one for the static twin per batch).

        ``pending[i]``: interactions of impression i's user not yet in the store that precede
        it (oldest first; the worker applies them after this batch): impression i is scored
        with its stored history extended by them and its stored state advanced by them (one
        batched GRU unroll for all such impressions), as if they were applied.
        """
        start = time.perf_counter()
        scorer, version = self._live
        users = list(dict.fromkeys(i.user_id for i in impressions))
        records = self.store.get_many(users, history=True)
        histories = [user_state.decode_history(rows) for rows in records.histories]
        stale = (~records.is_new) & (records.model_versions != version)
        row = {user: u for u, user in enumerate(users)}
        position = np.asarray([row[i.user_id] for i in impressions], dtype=np.int64)
        ahead = [list(p) for p in pending] if pending is not None else [[] for _ in impressions]
        states = self._current_states(scorer, records.states[position], stale[position],
                                      [histories[u] for u in position], ahead)
        read_s = time.perf_counter() - start
        reads = [_Read(histories[u] + ahead[i], states[i], bool(stale[u]), read_s)
                 for i, u in enumerate(position.tolist())]
        scored: dict[int, ScoredImpression] = {}
        for batch in scorer.batches(impressions):
            results = self._score_batch(scorer, version, [impressions[i] for i in batch],
                                        [reads[i] for i in batch])
            scored.update(zip(batch, results, strict=True))
        return [scored[i] for i in range(len(impressions))]

    @staticmethod
    def _current_states(
        scorer: Scorer, stored: np.ndarray, stale: np.ndarray,
        histories: list[list[Interaction]], pending: list[list[Interaction]],
    ) -> np.ndarray:
        """[B, d]: each impression's state: its user's stored state (``stored`` [B, d]) or, if
        ``stale`` ([B] bool), the state rebuilt from its stored history under the current
        weights, advanced by its ``pending`` events; one batched unroll
        (``model.user_state.advance``) for the impressions that need one."""
        states = np.array(stored, dtype=np.float32)
        work = [i for i in range(len(states)) if stale[i] or pending[i]]
        if work:
            states[work] = user_state.advance(
                scorer.model, scorer.featurizer, states[work], stale[work],
                [histories[i] for i in work], [pending[i] for i in work],
            )
        return states

    def _score_batch(
        self, scorer: Scorer, version: int, impressions: list[Impression], reads: list[_Read]
    ) -> list[ScoredImpression]:
        """Score B impressions with one candidate count: one live and one static model call.

        Each impression's ``score_s`` is its share (1/B) of the time of those calls.
        """
        start = time.perf_counter()
        profiles = [self.profiles.get(i.user_id) for i in impressions]
        histories = [r.history for r in reads]
        dynamic = scorer.score_batch(impressions, histories, profiles,
                                          [r.state for r in reads])
        static = None
        if self.static is not None:
            static = self.static.score_batch(impressions, histories, profiles,
                                             [None] * len(impressions))
        share = (time.perf_counter() - start) / len(impressions)
        return [
            self._result(version, impression, profiles[b], reads[b], dynamic[b],
                         None if static is None else static[b], share)
            for b, impression in enumerate(impressions)
        ]

    @staticmethod
    def _result(
        version: int,
        impression: Impression,
        profile: UserProfile | None,
        read: _Read,
        dynamic: np.ndarray,
        static: np.ndarray | None,
        score_s: float,
    ) -> ScoredImpression:
        """The scored impression: ``dynamic`` and ``static`` are its [C] probabilities, ranked
        into the ``scores`` payload by ``dynamic``, highest first."""
        ranked = np.argsort(-dynamic, kind="stable").tolist()
        items = [
            ScoredItem(
                impression.candidates[c].item_id,
                float(dynamic[c]),
                None if static is None else float(static[c]),
            )
            for c in ranked
        ]
        scores = Scores(impression.request_id, impression.user_id, version, items)
        return ScoredImpression(
            impression=impression,
            profile=profile,
            history=read.history,
            state=read.state,
            state_rebuilt=read.rebuilt,
            dynamic=dynamic,
            static=static,
            scores=scores,
            read_s=read.read_s,
            score_s=score_s,
        )


@dataclass(frozen=True, eq=False)
class JoinedExample:
    """A label joined with the impression it answers: one training example for the online
    trainer. ``history``, ``state`` and the scores are those at scoring time."""

    impression: Impression
    candidate: Candidate
    label: Label
    profile: UserProfile | None
    history: list[Interaction]
    state: np.ndarray  # [d] float32
    score: float
    static_score: float | None
    model_version: int


@dataclass(eq=False)
class _Pending:
    """A scored impression waiting for labels."""

    scored: ScoredImpression
    sequence: int  # tells a live heap entry from one left by a replaced impression
    candidate_of: dict[str, int]  # item id -> index of its first candidate
    joined: set[str] = field(default_factory=set)  # item ids already labelled


class FeedbackWindow:
    """Scored impressions waiting for their labels, for ``window_s`` seconds of stream time and
    at most ``max_size`` impressions.

    Every ``add`` and ``join`` says when it happens (``at``, seconds): the worker passes the
    record's stream time, its broker timestamp bounded by the local clock
    (``RecordLimits.stream_time``), never an event time a record carries, so no record can
    move the clock far ahead and expire everything (one label with ts = 1e300 once stopped
    every join). The clock is the largest ``at`` seen: an impression added more than
    ``window_s`` before it is evicted (expired); past ``max_size`` the impression added
    earliest is evicted. ``join`` matches a label on (request_id,
    item_id) and counts, never raises on, labels it cannot match: ``expired_labels`` (the
    impression was evicted; remembered for the last ``max_size`` evictions),
    ``unknown_labels`` (never scored, another user, or an item not among its candidates;
    also an expired one forgotten), ``duplicate_labels`` (that item was already joined).
    Thread-safe.
    """

    def __init__(self, window_s: float, max_size: int) -> None:
        if window_s <= 0 or max_size < 1:
            raise ValueError(f"window_s ({window_s}) and max_size ({max_size}) must be positive")
        self.window_s = window_s
        self.max_size = max_size
        self.now = float("-inf")
        self.evicted_by_time = 0
        self.evicted_by_size = 0
        self.expired_labels = 0
        self.unknown_labels = 0
        self.duplicate_labels = 0
        self._pending: dict[str, _Pending] = {}
        self._heap: list[tuple[float, int, str]] = []  # (at, sequence, request_id)
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._sequence = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def unmatched_labels(self) -> int:
        """Labels that joined nothing, for any reason."""
        return self.expired_labels + self.unknown_labels + self.duplicate_labels

    def add(self, scored: ScoredImpression, at: float) -> None:
        """Keep ``scored``, added at stream time ``at``, until it expires or is pushed out
        (replacing an earlier impression with the same request id)."""
        impression = scored.impression
        candidate_of: dict[str, int] = {}
        for c, candidate in enumerate(impression.candidates):
            candidate_of.setdefault(candidate.item_id, c)
        with self._lock:
            self._sequence += 1
            self._pending[impression.request_id] = _Pending(scored, self._sequence, candidate_of)
            heapq.heappush(self._heap, (at, self._sequence, impression.request_id))
            self._advance(at)
            while len(self._pending) > self.max_size:
                self._evict_oldest()
                self.evicted_by_size += 1

    def join(self, label: Label, at: float) -> JoinedExample | None:
        """The training example of ``label`` (consumed at stream time ``at``), or None
        (counted) if it matches nothing."""
        with self._lock:
            self._advance(at)
            pending = self._pending.get(label.request_id)
            if pending is None:
                if label.request_id in self._evicted:
                    self.expired_labels += 1
                else:
                    self.unknown_labels += 1
                return None
            scored = pending.scored
            c = pending.candidate_of.get(label.item_id)
            if c is None or scored.impression.user_id != label.user_id:
                self.unknown_labels += 1
                return None
            if label.item_id in pending.joined:
                self.duplicate_labels += 1
                return None
            pending.joined.add(label.item_id)
        return JoinedExample(
            impression=scored.impression,
            candidate=scored.impression.candidates[c],
            label=label,
            profile=scored.profile,
            history=scored.history,
            state=scored.state,
            score=float(scored.dynamic[c]),
            static_score=None if scored.static is None else float(scored.static[c]),
            model_version=scored.scores.model_version,
        )

    def _advance(self, at: float) -> None:
        """Move the clock to ``at`` (never back) and evict what expired; lock held."""
        self.now = max(self.now, at)
        horizon = self.now - self.window_s
        while self._heap and self._heap[0][0] < horizon:
            if self._evict_oldest():
                self.evicted_by_time += 1

    def _evict_oldest(self) -> bool:
        """Evict the impression added earliest; False if the heap's head was a replaced
        impression's leftover entry (nothing evicted). Lock held."""
        _, sequence, request_id = heapq.heappop(self._heap)
        pending = self._pending.get(request_id)
        if pending is None or pending.sequence != sequence:
            return False
        del self._pending[request_id]
        self._evicted[request_id] = None
        if len(self._evicted) > self.max_size:
            self._evicted.popitem(last=False)
        return True


class LabelBuffer:
    """Joined examples waiting for the online trainer: at most ``capacity``, oldest first.

    ``offer`` joins a label through ``window`` and keeps the example; when full, the oldest
    example is dropped. Counters: ``joined``, ``unmatched`` (labels that joined nothing; the
    window says why), ``dropped`` (examples pushed out before the trainer took them).
    Thread-safe: labels are offered by the consumer, taken by the trainer.
    """

    def __init__(self, window: FeedbackWindow, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.window = window
        self.joined = 0
        self.unmatched = 0
        self.dropped = 0
        self._examples: deque[JoinedExample] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._examples)

    def offer(self, label: Label, at: float) -> JoinedExample | None:
        """Join ``label`` (consumed at stream time ``at``) and buffer the example; None
        (counted) if it joined nothing."""
        example = self.window.join(label, at)
        with self._lock:
            if example is None:
                self.unmatched += 1
                return None
            if len(self._examples) == self._examples.maxlen:
                self.dropped += 1
            self._examples.append(example)
            self.joined += 1
        return example

    def take(self, n: int) -> list[JoinedExample]:
        """Remove and return up to ``n`` examples, oldest first."""
        with self._lock:
            return [self._examples.popleft() for _ in range(min(n, len(self._examples)))]
