"""Prequential (test-then-train) evaluation over the test period, in time order.

The test examples are cut into ``chunks`` consecutive chunks. Each chunk is first scored by
the model as it stands, then learned from with ``train_step`` (the shared optimizer step), in
mini-batches in time order, before the next chunk is scored. The users' GRU states and
histories follow the stream in both arms: an example's history holds every earlier event of
its user (test events included), and u_t is the state as served, carried over the user's
whole history under the current weights: the carried states are recomputed at the start of
every chunk (a stale state rebuilt: docs/model.md, "The user state"), and that chunk is scored
and then learned from with them. When the spec has item rates, the fine-tuned arm also counts
each chunk's labels into the item-rate table after learning from it, as the online learner
does (``model.online.ItemLabelCounter``): a chunk reads the labels of every earlier chunk, like
a version published at the chunk's start, and never its own. So "frozen" and "fine-tuned"
differ in the weights and in the labels counted since the split, as a frozen worker and a
learning one do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from model.dataset import ExampleSet, gather_batch
from model.features import Featurizer
from model.online import OnlineConfig
from model.prediction_metrics import auc, report
from model.training import TrainConfig, example_states, make_optimizer, predict, train_step


@dataclass
class PrequentialResult:
    """Whole-period metrics of both arms and per-chunk AUC (chunk ``k`` ends at
    ``chunk_end_ts[k]``)."""

    frozen: dict[str, float]
    fine_tuned: dict[str, float]
    chunk_end_ts: list[float]
    frozen_auc: list[float]
    fine_tuned_auc: list[float]
    online_steps: int


def online_train_config(online: OnlineConfig, seed: int) -> TrainConfig:
    """The fine-tuning arm's ``train_step`` settings: the online learner's learning rate,
    weight decay, batch size and task."""
    return TrainConfig(lr=online.lr, embedding_lr=online.embedding_lr,
                       weight_decay=online.weight_decay,
                       batch_size=online.batch_size, seed=seed, task=online.task)


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` consecutive [begin, end) ranges covering range(n), sizes differing by <= 1."""
    edges = np.linspace(0, n, min(chunks, n) + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


class _CountedLabels:
    """The fine-tuned arm's item-rate table: the featurizer's, plus the labels of the test
    examples counted so far (the featurizer's alone when not ``on`` or the spec has no item
    rates)."""

    def __init__(self, featurizer: Featurizer, test: ExampleSet, on: bool) -> None:
        self.featurizer, self.test = featurizer, test
        self.on = on and bool(featurizer.spec.n_item_rates)
        self.rows = test.events.item[test.event_index]  # [N] the examples' item rows
        self.positives = np.zeros(featurizer.spec.n_embeddings)
        self.counts = np.zeros(featurizer.spec.n_embeddings)

    def read(self, begin: int, end: int) -> ExampleSet:
        """The test set whose examples ``begin:end`` read the table as it stands."""
        if not self.on:
            return self.test
        rows = self.rows[begin:end]
        rates = self.test.item_rates.copy()
        rates[self.test.event_index[begin:end]] = self.featurizer.item_rates(
            rows, self.positives[rows], self.counts[rows])
        return replace(self.test, item_rates=rates)

    def count(self, begin: int, end: int) -> None:
        """Count the labels of examples ``begin:end``."""
        np.add.at(self.positives, self.rows[begin:end], self.test.labels[begin:end])
        np.add.at(self.counts, self.rows[begin:end], 1)


def prequential(model: nn.Module, featurizer: Featurizer, test: ExampleSet,
                frozen_probabilities: np.ndarray, train_cfg: TrainConfig, chunks: int,
                device: torch.device, count_labels: bool = True) -> PrequentialResult:
    """Test-then-train a copy of ``model`` over ``test`` (time-ordered); ``model`` itself is
    the frozen arm, whose probabilities on ``test`` are ``frozen_probabilities`` [N].
    ``count_labels``: the fine-tuned arm counts labels into its item-rate table
    (``OnlineConfig.count_item_labels``; module docstring)."""
    online = copy.deepcopy(model)
    optimizer = make_optimizer(online, train_cfg)
    tuned = np.empty(len(test), dtype=np.float64)
    ends, frozen_auc, tuned_auc, steps = [], [], [], 0
    counted = _CountedLabels(featurizer, test, count_labels)
    for begin, end in chunk_bounds(len(test), chunks):
        reading = counted.read(begin, end)  # the test set as this chunk reads the table
        chunk = reading.subset(slice(begin, end))
        carried = example_states(online, reading)
        tuned[begin:end] = predict(online, featurizer, chunk, device, carried=carried)
        for first in range(begin, end, train_cfg.batch_size):
            rows = np.arange(first, min(first + train_cfg.batch_size, end))
            user, cands = gather_batch(reading, featurizer, rows, online.cfg.d_model, carried)
            labels = torch.from_numpy(test.labels[rows].astype(np.float32))
            train_step(online, optimizer, user.to(device), cands.to(device), labels.to(device),
                       train_cfg.task)
            steps += 1
        counted.count(begin, end)
        ends.append(float(test.timestamps[end - 1]))
        frozen_auc.append(auc(chunk.labels, frozen_probabilities[begin:end]))
        tuned_auc.append(auc(chunk.labels, tuned[begin:end]))
    return PrequentialResult(
        frozen=report(test.user_ids, test.labels, frozen_probabilities),
        fine_tuned=report(test.user_ids, test.labels, tuned),
        chunk_end_ts=ends,
        frozen_auc=frozen_auc,
        fine_tuned_auc=tuned_auc,
        online_steps=steps,
    )
