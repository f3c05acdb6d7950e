"""The online trainer: mini-batch steps on streamed labelled examples, mixed with replay.

Contract (River-like, two threads): ``add(examples)`` buffers fresh examples (the consumer
thread); ``step()`` takes one mini-batch step when enough data is buffered and returns a
``StepReport``, or None (the trainer thread). Each step is ``model.training.guarded_step``, the
step every learner shares: u_t is the state the worker scored the impression with (the GRU
carried over the user's whole history, docs/model.md "The user state"), taken as given, so
the GRU's own weights get no gradient online (offline training backpropagates through the
history window). Gradients are clipped to ``clip_norm``, and an update is refused (weights
and optimizer state untouched, counted, logged) when its loss or gradient is not finite or its
loss explodes: above ``explode_factor`` times the running mean loss (an exponential average of
the finite losses seen, refused ones included, so that one spike is refused while a lasting
change of level is followed after a few steps).

A batch is ``batch_size`` examples: ``round(replay_fraction * batch_size)`` drawn uniformly
without replacement from the replay buffer (the last ``replay_capacity`` examples trained on;
fewer while it is smaller), the rest the oldest fresh examples. The fresh examples of an
accepted step then enter the replay buffer; those of a refused step are dropped (a poisoned
example must not come back). The trainer trains ``model`` in place: give it a copy that no
scorer reads, and publish versions from the thread that calls ``step()``.

The live model's trainer also keeps counting the labels it is given into the candidate
items' label counts (``ItemLabelCounter``; when the spec has item rates): each example keeps
the item-rate features its item had before its own label was counted, as the request was
served, and trains on them (replayed or not); ``counted_spec()`` is the spec with every label
counted so far, for the next published version, whose scorers then read the moved table
(``model.features``, the online item-rate table).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from eventlog.schema import Candidate, Impression, Interaction, UserProfile
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, Featurizer, ItemArrays, UserInputs
from model.training import TrainConfig, guarded_step, make_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class OnlineExample:
    """One impression-candidate pair with its training target.

    impression: the request (user, time, context; its candidate list is not read).
    history: the user's events before the impression, oldest first (the newest
        ``history_len`` are used). target: the label in {0, 1}, or for a student the
        teacher's probability in [0, 1]. state: [d] float32, u_t as the worker served it
        (None: a user with no state yet, zeros). item_rates: [n_item_rates] the candidate's
        item-rate features as served, before this example's label was counted
        (``ItemLabelCounter``); None: the featurizer's table.
    """

    impression: Impression
    candidate: Candidate
    history: Sequence[Interaction]
    profile: UserProfile | None
    target: float
    state: np.ndarray | None = None
    item_rates: np.ndarray | None = None


class ItemLabelCounter:
    """The candidate items' label counts as the online learner keeps them: the featurizer's
    tables (the spec's training and online ones) plus every label counted here since.

    ``read_then_count`` gives each example, in order, the item-rate features of its item
    before its own label (what a request served then read), then counts that label;
    ``spec()`` is the featurizer's spec with all of them in its online table. Not
    thread-safe: the caller serializes the two."""

    def __init__(self, featurizer: Featurizer) -> None:
        self.featurizer = featurizer
        n = featurizer.spec.n_embeddings
        self.positives = np.zeros(n)  # [n_embeddings] labels counted here, per item row
        self.counts = np.zeros(n)

    def read_then_count(self, examples: Sequence[OnlineExample]) -> list[OnlineExample]:
        """``examples`` with ``item_rates`` set; their targets (labels in {0, 1}) counted."""
        read = []
        for example in examples:
            row = self.featurizer.row("item_id", example.candidate.item_id)
            rates = self.featurizer.item_rates(np.asarray(row), self.positives[row],
                                               self.counts[row])
            read.append(replace(example, item_rates=rates))
            self.positives[row] += example.target
            self.counts[row] += 1
        return read

    def spec(self) -> FeatureSpec:
        """The featurizer's spec with every label counted here added to its online table."""
        spec = self.featurizer.spec
        positives, counts = spec.online_counts()
        return spec.with_online_counts(positives + self.positives, counts + self.counts)


def collate(
    featurizer: Featurizer, examples: Sequence[OnlineExample], cfg: ModelConfig,
    served: bool = True,
) -> tuple[UserInputs, CandidateInputs, torch.Tensor]:
    """Model inputs of B examples for a model of ``cfg``: user [B] (state: each example's
    served u_t if ``served``, zeros otherwise or where it has none), candidates [B, C = 1]
    (their affinity over ``cfg.affinity_len`` events, as served), targets [B] float. Every
    history is encoded once (``Featurizer.history_windows``)."""
    events, index, wide = featurizer.history_windows(
        [e.history for e in examples], cfg.history_len, cfg.affinity_len)
    user = featurizer.assemble_user(
        events,
        index,
        np.asarray([e.impression.ts for e in examples], dtype=np.float64),
        featurizer.users([e.impression.user_id for e in examples],
                         [e.profile for e in examples]),
        featurizer.contexts([e.impression.context for e in examples]),
        np.stack([e.state if served and e.state is not None
                  else np.zeros(cfg.d_model, dtype=np.float32) for e in examples])
        if examples else np.zeros((0, cfg.d_model), dtype=np.float32),
    )
    items = featurizer.items([e.candidate for e in examples])
    rates = featurizer.item_rates(items.item)
    for b, example in enumerate(examples):
        if example.item_rates is not None:
            rates[b] = example.item_rates
    one_each = ItemArrays(items.item[:, None], items.cat[:, None], items.num[:, None],
                          items.num_present[:, None])
    cands = featurizer.assemble_candidates(
        one_each, featurizer.window_affinity(one_each, user, events, index, wide), rates[:, None])
    targets = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return user, cands, targets


@torch.no_grad()
def predict(
    model: UniRecModel,
    featurizer: Featurizer,
    examples: Sequence[OnlineExample],
    served: bool = True,
    task: str = "click",
) -> np.ndarray:
    """[B] probabilities of ``examples`` with u_t as the trainer sees it: the served state
    (``served``) or zeros."""
    model.eval()
    device = next(model.parameters()).device
    user, cands, _ = collate(featurizer, examples, model.cfg, served)
    user, cands = user.to(device), cands.to(device)
    return torch.sigmoid(model(user, cands)[task][:, 0]).double().cpu().numpy()


@dataclass(frozen=True)
class OnlineConfig:
    """Hyperparameters of the online trainer (see the module docstring)."""

    lr: float = 3e-6  # by validation: docs/model.md, "The evaluation protocol"
    embedding_lr: float | None = None  # the embedding rows' (None: ``lr``); docs/model.md
    weight_decay: float = 0.0
    batch_size: int = 128  # 245 examples/s at d = 64 vs 167 with batches of 64 (bench/train.py)
    replay_capacity: int = 10_000
    replay_fraction: float = 0.5
    fresh_capacity: int = 10_000  # fresh examples waiting; past it the oldest are dropped
    clip_norm: float = 1.0
    explode_factor: float = 10.0
    explode_warmup: int = 20  # finite losses seen before the explosion guard is active
    loss_decay: float = 0.95  # of the running mean loss
    checkpoint_every: int = 100  # accepted steps between two model versions
    seed: int = 0  # of the replay sampling
    task: str = "click"
    count_item_labels: bool = True  # count each label into the item-rate table (module docstring)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.replay_capacity < 0 or self.fresh_capacity < 1:
            raise ValueError("batch_size and fresh_capacity must be positive")
        if not 0 <= self.replay_fraction < 1 or not 0 <= self.loss_decay < 1:
            raise ValueError("replay_fraction and loss_decay must lie in [0, 1)")
        if self.explode_factor <= 1 or self.checkpoint_every < 1 or self.clip_norm <= 0:
            raise ValueError("explode_factor must exceed 1; checkpoint_every, clip_norm > 0")


@dataclass(frozen=True)
class StepReport:
    """One step: its loss, gradient norm (before clipping; NaN if not computed), why it was
    refused (None: applied), accepted steps so far, the batch's fresh and replayed counts, and
    whether a new model version is due (every ``checkpoint_every`` accepted steps)."""

    loss: float
    grad_norm: float
    refused: str | None
    steps: int
    fresh: int
    replayed: int
    version_due: bool

    @property
    def accepted(self) -> bool:
        return self.refused is None


class OnlineTrainer:
    """Fine-tunes ``model`` in place on streamed examples (module docstring).

    ``served=False`` trains with the zero state (the static student). With
    ``cfg.count_item_labels`` and a spec with item rates, the examples' labels are counted into
    the item-rate table (``ItemLabelCounter``). Thread-safe for one
    thread calling ``add`` and another calling ``step``. Readable state: ``steps`` (accepted),
    ``refused``, ``refusals`` (count by reason), ``mean_loss``, ``pending`` (fresh examples
    waiting), ``dropped`` (fresh examples pushed out before training or in a refused batch).
    """

    def __init__(self, model: UniRecModel, cfg: OnlineConfig | None = None,
                 served: bool = True) -> None:
        self.model = model
        self.cfg = cfg = cfg or OnlineConfig()
        self.served = served
        self.featurizer = Featurizer(model.spec)
        self._counter = ItemLabelCounter(self.featurizer) \
            if cfg.count_item_labels and model.spec.n_item_rates else None
        self.optimizer = make_optimizer(
            model, TrainConfig(lr=cfg.lr, embedding_lr=cfg.embedding_lr,
                               weight_decay=cfg.weight_decay)
        )
        self.steps = 0
        self.refused = 0
        self.refusals: Counter[str] = Counter()
        self.dropped = 0
        self.mean_loss: float | None = None
        self._finite_losses = 0
        self._fresh: deque[OnlineExample] = deque()
        self._replay: deque[OnlineExample] = deque(maxlen=cfg.replay_capacity)
        self._rng = np.random.default_rng(cfg.seed)
        self._lock = threading.Lock()  # the buffers and counters
        self._step_lock = threading.Lock()  # the model and optimizer

    @property
    def pending(self) -> int:
        return len(self._fresh)

    def add(self, examples: Iterable[OnlineExample]) -> None:
        """Buffer fresh examples, oldest first, counting their labels (class docstring); past
        ``fresh_capacity`` the oldest are dropped."""
        with self._lock:
            if self._counter is not None:
                examples = self._counter.read_then_count(list(examples))
            self._fresh.extend(examples)
            overflow = len(self._fresh) - self.cfg.fresh_capacity
            for _ in range(max(overflow, 0)):
                self._fresh.popleft()
            self.dropped += max(overflow, 0)

    def counted_spec(self) -> FeatureSpec:
        """The model's spec with every label counted so far (the spec itself when none are)."""
        with self._lock:
            return self.model.spec if self._counter is None else self._counter.spec()

    @property
    def ready(self) -> bool:
        """Whether enough fresh examples wait for a step."""
        with self._lock:
            return len(self._fresh) >= self._batch_split()[0]

    def _batch_split(self) -> tuple[int, int]:
        """(fresh, replayed) counts of the next batch; call with the lock held."""
        cfg = self.cfg
        n_replay = min(round(cfg.replay_fraction * cfg.batch_size), len(self._replay))
        return cfg.batch_size - n_replay, n_replay

    def _take_batch(self) -> tuple[list[OnlineExample], list[OnlineExample]] | None:
        """(fresh, replayed) for one batch, or None while too few fresh examples wait."""
        with self._lock:
            n_fresh, n_replay = self._batch_split()
            if len(self._fresh) < n_fresh:
                return None
            fresh = [self._fresh.popleft() for _ in range(n_fresh)]
            rows = self._rng.choice(len(self._replay), size=n_replay, replace=False)
            return fresh, [self._replay[int(r)] for r in rows]

    def _guard(self, loss: float) -> str | None:
        """The explosion guard, before the backward pass; updates the running mean."""
        cfg, mean, decay = self.cfg, self.mean_loss, self.cfg.loss_decay
        self._finite_losses += 1
        self.mean_loss = loss if mean is None else decay * mean + (1 - decay) * loss
        if mean is not None and self._finite_losses > cfg.explode_warmup and (
            loss > cfg.explode_factor * mean
        ):
            return f"exploding loss {loss:.4g} > {cfg.explode_factor:g} x running mean {mean:.4g}"
        return None

    def step(self) -> StepReport | None:
        """One mini-batch step, or None if too few fresh examples are buffered."""
        with self._step_lock:
            batch = self._take_batch()
            if batch is None:
                return None
            fresh, replayed = batch
            model, cfg = self.model, self.cfg
            device = next(model.parameters()).device
            user, cands, targets = collate(
                self.featurizer, fresh + replayed, model.cfg, self.served,
            )
            result = guarded_step(
                model, self.optimizer, user.to(device), cands.to(device), targets.to(device),
                cfg.task, unroll_window=False, clip_norm=cfg.clip_norm,
                guard=self._guard,
            )
            with self._lock:
                if result.accepted:
                    self.steps += 1
                    self._replay.extend(fresh)
                else:
                    self.refused += 1
                    self.refusals[result.refused] += 1
                    self.dropped += len(fresh)
            if not result.accepted:
                log.warning("online step refused (%d so far): %s", self.refused, result.refused)
            return StepReport(
                loss=result.loss, grad_norm=result.grad_norm, refused=result.refused,
                steps=self.steps, fresh=len(fresh), replayed=len(replayed),
                version_due=result.accepted and self.steps % cfg.checkpoint_every == 0,
            )

